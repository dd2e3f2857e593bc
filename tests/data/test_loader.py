"""StreamingRows: row slicing, the layout-free order, exact resume at any layout, epochs, mixing, S3,
corruption, errors.

Test datasets encode where every token comes from: token = base + block * block_tokens + offset; the
loader's record file says which (epoch, block, row) each row is, and the tests check the tokens agree.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline import format as fmt
from data_pipeline.loader import DataCorruptionError, StreamingRows, StreamSpec

BT = 257  # block tokens
SEQ = 32  # 8 rows per block


def write_dataset(root, *, num_blocks=24, base=0, block_tokens=BT, vocab_size=65536, compression=None,
                  short_blocks=(), tokenizer="tok-a", seed=0):
    """Blocks of consecutive ids; blocks in `short_blocks` (index -> real tokens) end with padding."""
    from streaming import MDSWriter

    rng = np.random.default_rng(seed)
    dtype = fmt.token_dtype(vocab_size)
    with MDSWriter(out=str(root), columns=fmt.mds_columns(vocab_size), compression=compression,
                   hashes=["sha1"], size_limit=3000) as writer:
        for b in range(num_blocks):
            n = dict(short_blocks).get(b, block_tokens)
            tokens = np.zeros(block_tokens, dtype)
            tokens[:n] = base + b * block_tokens + np.arange(n)
            starts = np.unique(np.concatenate([[0], rng.integers(0, n, 3)])).astype(np.int32)
            if b % 4 == 3:  # inside one long document: MDS stores no empty array, so [block_tokens]
                starts = np.array([block_tokens], np.int32)
            writer.write({"tokens": tokens, "doc_starts": starts, "num_tokens": n})
    fmt.write_meta(root, {"block_tokens": block_tokens, "dtype": dtype, "tokenizer_sha256": tokenizer,
                          "vocab_size": vocab_size, "eos_id": 1, "pad_id": 0})
    return str(root)


def loader(streams, tmp_path, **kw):
    streams = [StreamSpec(s) if isinstance(s, str) else s for s in streams]
    kw = {"seq_len": SEQ, "seed": 7, "cache_dir": tmp_path / "cache", "shuffle_buffer_blocks": 3, **kw}
    return StreamingRows(streams, **kw)


def row_ids(batch, base=0):
    """(block, row) of each row, from its first token."""
    first = batch["input_ids"][:, 0].numpy() - base
    return [(int(g) // BT, int(g) % BT // SEQ) for g in first]


def recorded_rows(path) -> list[tuple[int, int, int]]:
    """(epoch, block, row) of every row a loader with `record=path` gave, in order."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [t for r in lines for t in zip(r["epoch"], r["block"], r["row"])]


def take(rows, num_batches, batch_size):
    return [rows.next_batch(batch_size) for _ in range(num_batches)]


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        for key in ("input_ids", "labels", "doc_start"):
            assert torch.equal(x[key], y[key]), key


def steps(rows, num_steps, micro=None):
    """`num_steps` global steps of a loader: its rows of each step, in micro-batches of `micro` rows."""
    micro = micro or rows.per_rank
    out = []
    for _ in range(num_steps):
        parts = [rows.next_batch(micro) for _ in range(rows.per_rank // micro)]
        out.append({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    return out


def global_steps(ranks, num_steps, micro=None):
    """Every rank's rows of each step, concatenated in rank order: the global batch."""
    per_rank = [steps(rows, num_steps, micro) for rows in ranks]
    return [{k: torch.cat([p[s][k] for p in per_rank]) for k in per_rank[0][s]} for s in range(num_steps)]


@pytest.fixture
def ds(tmp_path):
    return write_dataset(tmp_path / "ds", compression="zstd", short_blocks={5: 50, 23: 100})


@pytest.mark.parametrize("vocab_size", [65536, 100_000])  # uint16 and uint32 tokens
def test_rows_labels_padding_and_doc_starts(tmp_path, vocab_size):
    path = write_dataset(tmp_path / "ds", num_blocks=4, short_blocks={1: 50, 2: 1}, vocab_size=vocab_size)
    with loader([path], tmp_path, shuffle=False) as rows:
        assert (rows.block_tokens, rows.rows_per_block, rows.vocab_size) == (BT, 8, vocab_size)
        batch = rows.next_batch(10)  # block 0: 8 rows, block 1: 2 rows with its 50 real tokens...
        assert row_ids(batch) == [(0, i) for i in range(8)] + [(1, 0), (1, 1)]
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
        assert batch["doc_start"].dtype == torch.bool and batch["input_ids"].shape == (10, SEQ)
        assert torch.equal(batch["labels"][0, :-1], batch["input_ids"][0, 1:])
        assert batch["labels"][0, -1] == 32  # the row's extra token
        last = batch["labels"][9]  # block 1 row 1: inputs 32..63, labels 33..64, real up to 49
        assert torch.equal(last[:17], torch.arange(BT + 33, BT + 50)) and (last[17:] == -100).all()
        assert batch["doc_start"][0, 0]
        padding = rows.next_batch(14)  # ...then its 6 rows past the real tokens and block 2's 8 (1 real token)
        assert (padding["labels"] == -100).all() and (padding["input_ids"][:, 1:] == 0).all()
        inside = rows.next_batch(8)  # block 3, inside one long document
        assert row_ids(inside) == [(3, i) for i in range(8)] and not inside["doc_start"].any()
        assert row_ids(rows.next_batch(1)) == [(0, 0)] and rows.epoch == 1  # the next epoch


def test_doc_starts_match_the_shard(tmp_path):
    from streaming import StreamingDataset

    path = write_dataset(tmp_path / "ds", num_blocks=2)
    with loader([path], tmp_path, shuffle=False) as rows:
        batch = rows.next_batch(16)
    sample = StreamingDataset(local=path, shuffle=False, batch_size=1)[1]
    flat = batch["doc_start"][8:].reshape(-1)  # block 1, rows in order: position = index
    assert sorted(torch.nonzero(flat).reshape(-1).tolist()) == [s for s in sample["doc_starts"] if s < 256]


def test_each_epoch_reads_every_row_once_in_a_new_order(ds, tmp_path):
    record = tmp_path / "rows.jsonl"
    with loader([ds], tmp_path, record=record) as rows:
        batches = [rows.next_batch(96) for _ in range(4)]  # 192 rows per epoch
    seen = recorded_rows(record)
    epochs = [[(b, r) for e, b, r in seen if e == epoch] for epoch in (0, 1)]
    for epoch in epochs:
        assert sorted(epoch) == [(b, r) for b in range(24) for r in range(8)]
    assert epochs[0] != epochs[1]
    # The tokens are those of the recorded block and row (rows past a short block's end are padding).
    short = {5: 50, 23: 100}
    tokens = torch.cat([b["input_ids"] for b in batches])
    for (_, block, row), first in zip(seen, tokens[:, 0].tolist(), strict=True):
        real = row * SEQ < short.get(block, BT)
        assert first == (block * BT + row * SEQ if real else 0)


def test_a_window_mixes_rows_of_its_blocks(ds, tmp_path):
    """Consecutive rows come from the window's blocks (shuffle_buffer_blocks=3), not one block."""
    record = tmp_path / "rows.jsonl"
    with loader([ds], tmp_path, record=record) as rows:
        rows.next_batch(24)
    blocks = [b for _, b, _ in recorded_rows(record)]
    assert len(set(blocks)) == 3 and len(set(blocks[:8])) > 1


@pytest.mark.parametrize("world,micro", [(2, 6), (3, 2), (4, 1), (6, 2), (12, 1)])
def test_the_rows_of_a_step_do_not_depend_on_the_layout(ds, tmp_path, world, micro):
    """Global batch 12: whatever the number of ranks and the micro-batch size, step s is the same 12 rows
    in the same order (rank r holds rows r*12/world...), across an epoch boundary (192 rows)."""
    with loader([ds], tmp_path, global_batch=12) as one:
        reference = steps(one, 20)
    ranks = [loader([ds], tmp_path, rank=r, world=world, global_batch=12) for r in range(world)]
    assert_same(global_steps(ranks, 20, micro), reference)
    for rows in ranks:
        rows.close()


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (1, 2), (2, 3), (4, 6)])
def test_resume_at_another_layout_is_exact(ds, tmp_path, old_world, new_world):
    """A state taken between steps at one number of ranks continues at another with exactly the rows the
    uninterrupted run reads."""
    with loader([ds], tmp_path, global_batch=12) as one:
        reference = steps(one, 25)
    old = [loader([ds], tmp_path, rank=r, world=old_world, global_batch=12) for r in range(old_world)]
    global_steps(old, 7)
    states = [json.loads(json.dumps(rows.state_dict())) for rows in old]  # a checkpoint holds plain values
    assert len({(s["rows"], s["in_step"]) for s in states}) == 1 and states[0]["rows"] == 7 * 12
    new = [loader([ds], tmp_path, rank=r, world=new_world, global_batch=12) for r in range(new_world)]
    for rows in new:
        rows.load_rank_states(states)  # what a resharding checkpoint load calls
    assert_same(global_steps(new, 18), reference[7:])
    for rows in old + new:
        rows.close()


def test_exact_resume_mid_step_at_the_same_layout(ds, tmp_path):
    with loader([ds], tmp_path, rank=1, world=2, global_batch=8) as rows:
        rows.next_batch(3)  # inside a step: 3 of this rank's 4 rows
        state = json.loads(json.dumps(rows.state_dict()))
        expected = take(rows, 50, 5)  # crosses epochs (192 rows)
    with loader([ds], tmp_path, rank=1, world=2, global_batch=8) as same:
        same.load_state_dict(state)
        assert_same(take(same, 50, 5), expected)
    with loader([ds], tmp_path) as again, loader([ds], tmp_path) as first:  # deterministic from the seed
        assert_same(take(again, 3, 7), take(first, 3, 7))


def test_refusals(ds, tmp_path):
    with loader([ds], tmp_path, rank=1, world=2, global_batch=8) as rows:
        rows.next_batch(3)
        inside = rows.state_dict()
        rows.next_batch(1)
        between = rows.state_dict()
    with loader([ds], tmp_path, rank=0, world=2, global_batch=8) as other, pytest.raises(ValueError, match="rank 1"):
        other.load_state_dict(inside)
    with loader([ds], tmp_path, world=1, global_batch=8) as fewer, pytest.raises(ValueError, match="middle of a step"):
        fewer.load_rank_states([inside])
    with loader([ds], tmp_path, seed=8, world=2, global_batch=8) as reseeded, \
            pytest.raises(ValueError, match="train.seed was 7"):
        reseeded.load_state_dict(between)
    with loader([ds], tmp_path, seq_len=16, world=2, global_batch=8) as shorter, \
            pytest.raises(ValueError, match="train.seq_len was"):
        shorter.load_state_dict(between)
    with loader([ds], tmp_path) as newer, pytest.raises(ValueError, match="older loader"):
        newer.load_state_dict({**between, "version": 1})
    with pytest.raises(ValueError, match="global_batch_size=6 rows must be a multiple of the 4"):
        loader([ds], tmp_path, world=4, global_batch=6)


def test_mixing_by_proportion(tmp_path):
    a = write_dataset(tmp_path / "a", num_blocks=30)
    b = write_dataset(tmp_path / "b", num_blocks=30, base=30000, seed=1)
    specs = [StreamSpec(a, 0.75), StreamSpec(b, 0.25)]

    def run(seed):
        with loader(specs, tmp_path, seed=seed) as rows:
            return take(rows, 30, 32)  # 960 rows: two epochs of 60 blocks

    first = run(3)
    from_b = np.mean([float((batch["input_ids"][:, 0] >= 30000).float().mean()) for batch in first])
    assert from_b == 0.25  # 15 of each epoch's 60 blocks
    assert_same(first, run(3))
    assert not torch.equal(first[0]["input_ids"], run(4)[0]["input_ids"])


def _upload(local, bucket, prefix):
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    for path in sorted(Path(local).iterdir()):
        s3.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    return f"s3://{bucket}/{prefix}"


def test_remote_matches_local(ds, tmp_path, s3_bucket):
    url = _upload(ds, s3_bucket, "ds")
    with loader([ds], tmp_path) as local:
        expected = take(local, 30, 8)
    for _ in range(2):  # the second loader reuses the cache
        with loader([url], tmp_path) as remote:
            assert_same(take(remote, 30, 8), expected)
    assert any(p.name.startswith("shard.") for p in (tmp_path / "cache").rglob("*"))


_RANK_PROCESS = """
import json, sys
from data_pipeline.loader import StreamingRows, StreamSpec
rank = int(sys.argv[4])
rows = StreamingRows([StreamSpec(sys.argv[1])], seq_len=32, seed=7, cache_dir=sys.argv[2], rank=rank, world=2,
                     global_batch=8, shuffle_buffer_blocks=3, record=sys.argv[3])
for _ in range(24):  # one epoch: 24 steps of 8 rows
    rows.next_batch(4)
rows.close()
"""


def test_two_rank_processes_share_the_remote_cache(ds, tmp_path, s3_bucket):
    """The training setup: one process per rank, one cache directory per node. Together the ranks read
    every row of the epoch once; each shard is in the cache once, whole, with no partial downloads left."""
    url = _upload(ds, s3_bucket, "ds")
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_PROCESS, url, str(cache), str(tmp_path / f"rank{r}.jsonl"),
                               str(r)]) for r in range(2)]
    assert [proc.wait(timeout=120) for proc in procs] == [0, 0]
    seen = [recorded_rows(tmp_path / f"rank{r}.jsonl") for r in range(2)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(b * 8 + r for _, b, r in seen[0] + seen[1]) == list(range(192))
    cached = sorted(p.name for p in cache.rglob("shard.*") if not p.name.endswith(".lock"))
    assert cached == sorted(p.name.removesuffix(".zstd") for p in Path(ds).glob("shard.*"))


def test_remote_corrupt_shard_is_reported(tmp_path, s3_bucket):
    path = write_dataset(tmp_path / "ds", compression="zstd")
    shard = Path(path, "shard.00002.mds.zstd")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    url = _upload(path, s3_bucket, "bad")
    with loader([url], tmp_path) as rows, pytest.raises(DataCorruptionError, match="shard.00002.mds"):
        take(rows, 30, 8)


def test_local_truncated_shard_is_reported(tmp_path):
    path = write_dataset(tmp_path / "ds")
    shard = Path(path, "shard.00001.mds")
    shard.write_bytes(shard.read_bytes()[:-100])
    with loader([path], tmp_path) as rows, pytest.raises(DataCorruptionError, match="shard.00001.mds.*truncated"):
        take(rows, 30, 8)
    assert shard.exists()  # the user's data is left alone


def test_clear_errors(ds, tmp_path, s3_bucket):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty} has no liquid_data.json.*liquid data prepare"):
        loader([str(empty)], tmp_path)
    fmt.write_meta(empty, {"block_tokens": BT})
    with pytest.raises(ValueError, match="has no index.json.*liquid data prepare"):
        loader([str(empty)], tmp_path)
    with pytest.raises(ValueError, match=f"s3://{s3_bucket}/nothing has no liquid_data.json"):
        loader([f"s3://{s3_bucket}/nothing"], tmp_path)
    with pytest.raises(ValueError, match="does not fit a data block of 257"):
        loader([ds], tmp_path, seq_len=300)
    with pytest.raises(ValueError, match=">= 0"):
        loader([StreamSpec(ds, 0.5), StreamSpec(ds, -0.5)], tmp_path)
    with pytest.raises(ValueError, match="every stream or for none"):
        loader([StreamSpec(ds, 0.5), StreamSpec(ds)], tmp_path)
    other = write_dataset(tmp_path / "other", num_blocks=2, tokenizer="tok-b")
    with pytest.raises(ValueError, match=f"{ds} and {other} disagree on tokenizer_sha256"):
        loader([ds, other], tmp_path)


def test_a_missing_local_shard_is_named(tmp_path):
    path = write_dataset(tmp_path / "ds")
    Path(path, "shard.00002.mds").unlink()
    with loader([path], tmp_path, shuffle=False) as rows, \
            pytest.raises(DataCorruptionError, match="shard.00002.mds listed in .*index.json is missing"):
        take(rows, 30, 8)


def test_a_bounded_cache_stays_under_its_limit(ds, tmp_path, s3_bucket):
    """Two epochs of a remote dataset (6 shards) through a cache that holds 3: the cache never holds more
    (checked after every batch), evicted shards are fetched again when needed, and the rows are those of an
    unbounded cache."""
    url = _upload(ds, s3_bucket, "ds")
    shards = len(list(Path(ds).glob("shard.*")))
    with loader([url], tmp_path, cache_dir=tmp_path / "unbounded", shuffle_buffer_blocks=1) as rows:
        expected = take(rows, 96, 4)
        shard = max(size for _, size, _ in rows.cache.files())
    usage, got = [], []
    with loader([url], tmp_path, cache_dir=tmp_path / "bounded", cache_limit=3 * shard, shuffle_buffer_blocks=1) as rows:
        for _ in range(96):
            got.append(rows.next_batch(4))
            usage.append(rows.cache.usage())
    assert_same(got, expected)
    assert shards == 6 and len(list((tmp_path / "unbounded").rglob("shard.*.mds"))) == shards
    assert max(usage) <= 3 * shard and len(list((tmp_path / "bounded").rglob("shard.*.mds"))) <= 3
