"""StreamingRows: row slicing, exact resume, epochs, data-parallel ranks, mixing, S3, corruption, errors.

Test datasets encode where every token comes from: token = base + block * block_tokens + offset.
"""
import json
import os
import socket
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


def take(rows, num_batches, batch_size):
    return [rows.next_batch(batch_size) for _ in range(num_batches)]


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        for key in ("input_ids", "labels", "doc_start"):
            assert torch.equal(x[key], y[key]), key


def epoch_blocks(rows, batch_size=1):
    """Blocks read until the loader moves into the next epoch."""
    seen = []
    epoch = rows.state_dict()["epoch"]
    while True:
        batch = rows.next_batch(batch_size)
        if rows.state_dict()["epoch"] != epoch:
            return seen
        seen += [block for block, _ in row_ids(batch)]


@pytest.fixture
def ds(tmp_path):
    return write_dataset(tmp_path / "ds", compression="zstd", short_blocks={5: 50, 23: 100})


@pytest.mark.parametrize("vocab_size", [65536, 100_000])  # uint16 and uint32 tokens
def test_rows_labels_padding_and_doc_starts(tmp_path, vocab_size):
    path = write_dataset(tmp_path / "ds", num_blocks=4, short_blocks={1: 50, 2: 1}, vocab_size=vocab_size)
    with loader([path], tmp_path, shuffle=False) as rows:
        assert (rows.block_tokens, rows.rows_per_block, rows.vocab_size) == (BT, 8, vocab_size)
        batch = rows.next_batch(10)  # block 0: 8 rows, block 1: 2 rows (50 tokens), block 2: none
        assert row_ids(batch) == [(0, i) for i in range(8)] + [(1, 0), (1, 1)]
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
        assert batch["doc_start"].dtype == torch.bool and batch["input_ids"].shape == (10, SEQ)
        assert torch.equal(batch["labels"][0, :-1], batch["input_ids"][0, 1:])
        assert batch["labels"][0, -1] == 32  # the row's extra token
        last = batch["labels"][9]  # block 1 row 1: inputs 32..63, labels 33..64, real up to 49
        assert torch.equal(last[:17], torch.arange(BT + 33, BT + 50)) and (last[17:] == -100).all()
        assert batch["doc_start"][0, 0]
        inside = rows.next_batch(8)  # block 2 (one padding token) is skipped
        assert row_ids(inside) == [(3, i) for i in range(8)] and not inside["doc_start"].any()
        assert row_ids(rows.next_batch(1)) == [(0, 0)]  # the next epoch


def test_doc_starts_match_the_shard(tmp_path):
    path = write_dataset(tmp_path / "ds", num_blocks=2)
    with loader([path], tmp_path, shuffle=False) as rows:
        batch = rows.next_batch(16)
        sample = rows._ds[1]
    flat = batch["doc_start"][8:].reshape(-1)  # block 1, rows in order: position = index
    assert sorted(torch.nonzero(flat).reshape(-1).tolist()) == [s for s in sample["doc_starts"] if s < 256]


def test_exact_resume_across_buffers_and_epochs(ds, tmp_path):
    with loader([ds], tmp_path) as rows:
        head = take(rows, 13, 7)
        state = json.loads(json.dumps(rows.state_dict()))  # a checkpoint holds plain values
        tail = take(rows, 40, 7)  # 182 rows per epoch: crosses two epoch boundaries
    assert tail[-1] is not None and rows.state_dict()["epoch"] == 2
    with loader([ds], tmp_path) as resumed:
        resumed.load_state_dict(state)
        assert_same(take(resumed, 40, 7), tail)
    with loader([ds], tmp_path) as other_batch:  # the position is in rows: the batch size may change
        other_batch.load_state_dict(state)
        assert torch.equal(other_batch.next_batch(70)["input_ids"],
                           torch.cat([b["input_ids"] for b in tail[:10]]))
    with loader([ds], tmp_path) as again:  # deterministic from the seed
        assert_same(head[:3], take(again, 3, 7))


def test_a_resume_generates_the_epoch_order_once(ds, tmp_path, monkeypatch):
    """Constructing a loader and loading a checkpoint's position both set the epoch: the order (the costly
    part at scale) is generated once, for the epoch the checkpoint is in."""
    import streaming.base.batching as batching

    with loader([ds], tmp_path) as rows:
        take(rows, 30, 7)  # into the second epoch
        state = json.loads(json.dumps(rows.state_dict()))
    epochs = []
    generate = batching.generate_work
    monkeypatch.setattr(batching, "generate_work", lambda *a: epochs.append(a[3]) or generate(*a))
    with loader([ds], tmp_path) as resumed:
        resumed.load_state_dict(state)
        resumed.next_batch(7)
    assert epochs == [state["epoch"]] == [1]


def test_each_epoch_reads_every_row_once_in_a_new_order(ds, tmp_path):
    with loader([ds], tmp_path) as rows:
        epochs = [[tuple(r) for r in row_ids(rows.next_batch(182))] for _ in range(2)]
    expected = {(b, r) for b in range(24) for r in range(8) if b not in (5, 23)}
    expected |= {(5, 0), (5, 1), (23, 0), (23, 1), (23, 2), (23, 3)}
    for epoch in epochs:
        assert sorted(epoch) == sorted(expected)
    assert epochs[0] != epochs[1]


def test_two_ranks_split_each_epoch(ds, tmp_path):
    ranks = [loader([ds], tmp_path, rank=r, world=2) for r in range(2)]
    for _ in range(2):
        seen = [epoch_blocks(rows) for rows in ranks]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(set(seen[0]) | set(seen[1])) == list(range(24))
    for rows in ranks:
        rows.close()


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (1, 2), (2, 3)])
def test_resume_with_another_world(ds, tmp_path, old_world, new_world):
    old = [loader([ds], tmp_path, rank=r, world=old_world) for r in range(old_world)]
    before = [[b for batch in take(rows, 5, 4) for b, _ in row_ids(batch)] for rows in old]
    states = [rows.state_dict() for rows in old]
    for rows in old:
        rows.close()
    new = [loader([ds], tmp_path, rank=r, world=new_world) for r in range(new_world)]
    after = []
    for rows in new:
        rows.load_rank_states(states)  # what a resharding checkpoint load calls
        after.append(epoch_blocks(rows, batch_size=1))
        rows.close()
    read_before, read_after = {b for seen in before for b in seen}, [b for seen in after for b in seen]
    assert set(read_after) | read_before == set(range(24))  # nothing skipped
    assert sum(len(set(seen)) for seen in after) == len(set(read_after))  # new ranks do not overlap
    repeated = read_before & set(read_after)  # only the old ranks' current buffers
    assert 0 < len(repeated) <= 3 * old_world


def test_resume_rank_exactly_and_refusals(ds, tmp_path):
    with loader([ds], tmp_path, rank=1, world=2) as rows:
        rows.next_batch(3)
        state = rows.state_dict()
        expected = take(rows, 20, 5)
    with loader([ds], tmp_path, rank=1, world=2) as same:
        same.load_state_dict(state)
        assert_same(take(same, 20, 5), expected)
    with loader([ds], tmp_path, rank=0, world=2) as other, pytest.raises(ValueError, match="rank 1"):
        other.load_state_dict(state)
    with loader([ds], tmp_path, rank=1, world=2, seed=8) as reseeded, pytest.raises(ValueError, match="train.seed was 7"):
        reseeded.load_state_dict(state)
    with loader([ds], tmp_path, rank=1, world=2, seq_len=16) as shorter, pytest.raises(ValueError, match="train.seq_len was"):
        shorter.load_state_dict(state)


def test_mixing_by_proportion(tmp_path):
    a = write_dataset(tmp_path / "a", num_blocks=30)
    b = write_dataset(tmp_path / "b", num_blocks=30, base=30000, seed=1)
    specs = [StreamSpec(a, 0.75), StreamSpec(b, 0.25)]

    def run(seed):
        with loader(specs, tmp_path, seed=seed) as rows:
            return take(rows, 30, 32)  # 960 rows: two epochs of 60 blocks

    first = run(3)
    from_b = np.mean([float((batch["input_ids"][:, 0] >= 30000).float().mean()) for batch in first])
    assert abs(from_b - 0.25) < 0.03
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
    for _ in range(2):  # the second loader reuses the cache (and the released shared memory)
        with loader([url], tmp_path) as remote:
            assert_same(take(remote, 30, 8), expected)
    assert any(p.name.startswith("shard.") for p in (tmp_path / "cache").rglob("*"))


_RANK_PROCESS = """
import json, sys
import torch.distributed as dist
from data_pipeline.loader import StreamingRows, StreamSpec
dist.init_process_group("gloo")
rows = StreamingRows([StreamSpec(sys.argv[1])], seq_len=32, seed=7, cache_dir=sys.argv[2], rank=dist.get_rank(),
                     world=dist.get_world_size(), shuffle_buffer_blocks=3)
seen = set()
while True:
    first = int(rows.next_batch(1)["input_ids"][0, 0])
    if rows.state_dict()["epoch"]:
        break
    seen.add(first // int(sys.argv[3]))
prefix = rows._ds._shm_prefix_int
rows.close()
dist.barrier()  # then streaming's lock files of this run can go (a lone process's close removes them)
if dist.get_rank() == 0:
    import os, tempfile
    for name in ("cache_filelock", "barrier_filelock"):
        path = os.path.join(tempfile.gettempdir(), f"{prefix:06}_{name}")
        if os.path.exists(path):
            os.remove(path)
print(json.dumps(sorted(seen)))
"""


def test_two_rank_processes_share_the_remote_cache(ds, tmp_path, s3_bucket):
    """The training setup: one process per rank, distributed env set, one cache directory per node."""
    url = _upload(ds, s3_bucket, "ds")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_PROCESS, url, str(tmp_path / "cache"), str(BT)],
                              stdout=subprocess.PIPE, text=True, env={
                                  **os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                  "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(2)]
    seen = [set(json.loads(proc.communicate(timeout=120)[0].splitlines()[-1])) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(24))


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
