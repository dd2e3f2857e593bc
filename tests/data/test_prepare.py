"""`prepare`: raw files -> MDS blocks. Round trip, block layout, formats, errors, determinism, S3, Ray."""
import gzip
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import format as fmt
from data_pipeline.prepare import BlockPacker, prepare, summary_line, verify_shards
from data_pipeline.tokenizer import TextTokenizer, train_tokenizer

BLOCK = 64
WORDS = "the quick brown fox jumps over a lazy dog while liquid models mix experts über naïve 中文 🤖".split()


def make_docs(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        length = int(rng.choice([1, 3, 8, 40, 120]))  # from well under a block to several blocks
        docs.append(f"doc {seed}-{i}: " + " ".join(rng.choice(WORDS, size=length)) + ("\n" if i % 3 else ""))
    return docs


def jsonl(docs: list[str], **extra) -> bytes:
    return b"".join(json.dumps({"text": d, **extra}).encode() + b"\n" for d in docs)


def write_inputs(root: Path) -> dict[str, list[str]]:
    """One file per supported format; returns name -> documents, in the sorted order prepare reads them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    root.mkdir(parents=True, exist_ok=True)
    files = {"a.txt": make_docs(1, 1), "b.jsonl": make_docs(12, 2), "c.jsonl.gz": make_docs(9, 3),
             "d.jsonl.zst": make_docs(7, 4), "e.parquet": make_docs(11, 5)}
    (root / "a.txt").write_text(files["a.txt"][0], encoding="utf-8")
    (root / "b.jsonl").write_bytes(jsonl(files["b.jsonl"], id=1))
    (root / "c.jsonl.gz").write_bytes(gzip.compress(jsonl(files["c.jsonl.gz"]), mtime=0))
    (root / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(files["d.jsonl.zst"])))
    pq.write_table(pa.table({"text": files["e.parquet"], "n": list(range(11))}), root / "e.parquet")
    return files


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    texts = [d for seed in range(1, 6) for d in make_docs(30, seed)]
    return str(train_tokenizer(texts, vocab_size=400, out_dir=tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tokenizer):
    """One prepared dataset shared by the read-only checks: (inputs, output root, summary)."""
    base = tmp_path_factory.mktemp("prepared")
    files = write_inputs(base / "in")
    summary = prepare([str(base / "in")], str(base / "out"), tokenizer, block_tokens=BLOCK, use_ray=False,
                      progress=False)
    return files, base / "out", summary


def run(inputs, output, tokenizer, **kw):
    kw = {"block_tokens": BLOCK, "use_ray": False, "progress": False, **kw}
    return prepare([str(i) for i in inputs], str(output), tokenizer, **kw)


def read_blocks(local, remote=None) -> list[dict]:
    """Every sample in index order, through StreamingDataset (what the loader uses)."""
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(local), remote=remote, shuffle=False, batch_size=1)
    return [ds[i] for i in range(ds.num_samples)]


def part_of(index: dict) -> list[str]:
    return [s["zip_data"]["basename"].split("/")[1] for s in index["shards"] for _ in range(s["samples"])]


def split_docs(stream: np.ndarray, eos: int) -> list[np.ndarray]:
    ends = np.flatnonzero(stream == eos)
    assert len(ends) and ends[-1] == len(stream) - 1, "the stream of a file ends with EOS"
    return np.split(stream, ends + 1)[:-1]


def file_streams(blocks: list[dict], parts: list[str]) -> dict[str, np.ndarray]:
    streams: dict[str, list] = {}
    for block, part in zip(blocks, parts):
        streams.setdefault(part, []).append(block["tokens"][:block["num_tokens"]])
    return {p: np.concatenate(v) for p, v in streams.items()}


def files_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- round trip and block layout -------------------------------------------------------------------------------

def test_round_trip_every_format(dataset, tokenizer):
    files, root, summary = dataset
    tok = TextTokenizer(tokenizer)
    index = json.loads((root / "index.json").read_text())
    streams = file_streams(read_blocks(root), part_of(index))
    assert sorted(streams) == [f"{i:05d}" for i in range(len(files))]
    for part, (name, docs) in zip(sorted(streams), files.items()):
        got = [tok.decode(d[:-1].tolist()) for d in split_docs(streams[part], tok.eos_id)]
        assert got == docs, name
    assert summary["documents"] == sum(len(d) for d in files.values())
    assert summary["tokens"] == sum(len(s) for s in streams.values())


def test_blocks_are_full_except_each_files_last_padded(dataset, tokenizer):
    _, root, summary = dataset
    tok = TextTokenizer(tokenizer)
    blocks = read_blocks(root)
    parts = part_of(json.loads((root / "index.json").read_text()))
    assert len(blocks) == summary["blocks"] > len(set(parts))
    for i, (block, part) in enumerate(zip(blocks, parts)):
        assert block["tokens"].dtype == np.uint16 and block["tokens"].shape == (BLOCK,)
        last_of_file = i + 1 == len(parts) or parts[i + 1] != part
        n = block["num_tokens"]
        if not last_of_file:
            assert n == BLOCK
        assert 0 < n <= BLOCK and (block["tokens"][n:] == tok.pad_id).all()
        if last_of_file:
            assert block["tokens"][n - 1] == tok.eos_id


def test_the_summary_reports_the_padding_and_warns_when_most_is_padding(dataset, tmp_path, tokenizer):
    _, root, summary = dataset
    blocks = read_blocks(root)
    real = sum(int(b["num_tokens"]) for b in blocks)
    assert summary["padding_fraction"] == pytest.approx(1 - real / (len(blocks) * BLOCK), abs=1e-4)
    # Many small files: each ends in a block of its own, so nearly every token is padding.
    small = []
    for i in range(6):
        small.append(tmp_path / f"small{i}.jsonl")
        small[-1].write_bytes(jsonl([f"a short document number {i}"]))
    tiny = run(small, tmp_path / "small-out", tokenizer)
    assert tiny["blocks"] == 6 and tiny["padding_fraction"] > 0.5
    assert "padding" in summary_line(tiny) and "6 input files" in summary_line(tiny)
    if summary["padding_fraction"] <= 0.10:
        assert "padding" not in summary_line(summary)


def test_bad_input_files_stop_the_run_or_are_left_out_and_listed(tmp_path, tokenizer):
    import zstandard

    good = tmp_path / "good.jsonl"
    good.write_bytes(jsonl(["a good document", "another good one"]))
    whole = zstandard.ZstdCompressor().compress(jsonl([f"document {i} " * 40 for i in range(100)]))
    bad = tmp_path / "bad.jsonl.zst"
    bad.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}: corrupt .jsonl.zst input"):
        run([good, bad], tmp_path / "out", tokenizer)
    summary = run([good, bad], tmp_path / "out2", tokenizer, skip_bad=True)
    assert summary["documents"] == 2 and len(summary["bad_inputs"]) == 1 and str(bad) in summary["bad_inputs"][0]
    bad_index = next(f["index"] for f in summary["files"] if f["path"] == str(bad))
    assert not (tmp_path / "out2" / "parts" / f"{bad_index:05d}").exists()  # its part left nothing behind
    assert "left out 1 input file(s)" in summary_line(summary)
    assert len(read_blocks(tmp_path / "out2")) == summary["blocks"] == 1
    with pytest.raises(ValueError, match="1 file\\(s\\) cannot be read"):
        run([bad], tmp_path / "out3", tokenizer, skip_bad=True)


def test_doc_starts_mark_every_document_start(dataset, tokenizer):
    _, root, _ = dataset
    eos = TextTokenizer(tokenizer).eos_id
    blocks = read_blocks(root)
    parts = part_of(json.loads((root / "index.json").read_text()))
    for part in sorted(set(parts)):
        mine = [b for b, p in zip(blocks, parts) if p == part]
        stream = np.concatenate([b["tokens"][:b["num_tokens"]] for b in mine])
        want = [0] + [i + 1 for i in np.flatnonzero(stream == eos)[:-1]]
        got = [k * BLOCK + int(s) for k, b in enumerate(mine) for s in b["doc_starts"] if s < b["num_tokens"]]
        assert got == want
        for b in mine:
            starts = b["doc_starts"]
            assert starts.dtype == np.int32 and len(starts) and (np.diff(starts) > 0).all()
            assert (starts < b["num_tokens"]).all() or starts.tolist() == [BLOCK]
        assert any(b["doc_starts"].tolist() == [BLOCK] for b in mine) or len(mine) < 3


def test_packer_boundaries():
    out = []
    packer = BlockPacker(4, "uint16", eos_id=9, fill_id=0, emit=out.append)
    packer.add([1, 2, 3])        # fills block 0 exactly (with EOS)
    packer.add([4])              # starts block 1 at offset 0
    packer.add([5, 6, 7, 8, 5])  # starts at 2, spans block 2, ends in block 3
    packer.finish()
    assert [b["tokens"].tolist() for b in out] == [[1, 2, 3, 9], [4, 9, 5, 6], [7, 8, 5, 9]]
    assert [b["doc_starts"].tolist() for b in out] == [[0], [0, 2], [4]]  # [block_tokens]: no start
    assert [b["num_tokens"] for b in out] == [4, 4, 4] and packer.blocks == 3 and packer.tokens == 12
    packer.add([1])
    packer.finish()
    assert out[-1]["tokens"].tolist() == [1, 9, 0, 0] and out[-1]["num_tokens"] == 2


def test_metadata_and_summary_files(dataset, tokenizer):
    files, root, summary = dataset
    tok = TextTokenizer(tokenizer)
    meta = json.loads((root / fmt.META_FILE).read_text())
    assert meta == {"format_version": fmt.FORMAT_VERSION, "block_tokens": BLOCK, "dtype": "uint16",
                    "vocab_size": tok.vocab_size, "padded_vocab_size": tok.padded_vocab_size, "eos_id": tok.eos_id,
                    "bos_id": tok.bos_id, "pad_id": tok.pad_id, "tokenizer_sha256": tok.sha256,
                    "documents": summary["documents"], "tokens": summary["tokens"], "blocks": summary["blocks"],
                    "num_inputs": 5, "text_field": "text", "compression": "zstd", "hashes": ["sha1"]}
    written = json.loads((root / fmt.SUMMARY_FILE).read_text())
    assert written == summary
    index = json.loads((root / "index.json").read_text())
    assert summary["shards"] == len(index["shards"]) and summary["num_inputs"] == len(files)
    assert summary["bytes_written"] == sum(s["zip_data"]["bytes"] for s in index["shards"])
    assert summary["skipped"] == {"invalid_utf8": 0, "empty": 0} and summary["tokens_per_s"] > 0
    assert [Path(p).name for p in summary["inputs"]] == list(files)
    line = summary_line(summary)
    assert f"{summary['documents']:,} documents" in line and str(root) in line


def test_index_matches_streaming_merge_index(dataset, tmp_path):
    """Our merge is streaming's merge_index layout, with basenames relative to the dataset root."""
    from streaming.base.util import merge_index

    _, root, _ = dataset
    parts = tmp_path / "parts"
    shutil.copytree(root / "parts", parts)
    merge_index(str(parts), keep_local=True)
    theirs = json.loads((parts / "index.json").read_text())
    ours = json.loads((root / "index.json").read_text())
    for shard in theirs["shards"]:
        for key in ("raw_data", "zip_data"):
            shard[key]["basename"] = "parts/" + shard[key]["basename"]
    assert ours == theirs


# --- sources: skips and errors ---------------------------------------------------------------------------------

def test_invalid_utf8_and_empty_records_are_counted(tmp_path, tokenizer):
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl(["good one"]) + b'{"text": "bad \xff byte"}\n' + jsonl(["  "]) + jsonl(["good two"]))
    (tmp_path / "bad.txt").write_bytes(b"\xc3\x28 not utf-8")
    summary = run([src, tmp_path / "bad.txt"], tmp_path / "out", tokenizer)
    assert summary["documents"] == 2
    assert summary["skipped"] == {"invalid_utf8": 2, "empty": 1}
    where = summary["skipped_where"]
    assert f"skipped_invalid_utf8: {src}:2" in where and f"skipped_empty: {src}:3" in where
    assert any("bad.txt" in w for w in where)
    assert json.loads((tmp_path / "out" / fmt.SUMMARY_FILE).read_text())["skipped"]["invalid_utf8"] == 2
    assert "2 invalid_utf8, 1 empty" in summary_line(summary)


def test_missing_text_field_names_file_and_line(tmp_path, tokenizer):
    src = tmp_path / "x.jsonl"
    src.write_bytes(jsonl(["fine"]) + b'{"content": "no text here"}\n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(src))}:2: no text field 'text'"):
        run([src], tmp_path / "out", tokenizer)
    assert not (tmp_path / "out" / "index.json").exists()


def test_empty_inputs_are_refused_with_the_reasons(tmp_path, tokenizer):
    src = tmp_path / "empty.jsonl"
    src.write_bytes(jsonl(["", "   "]) + b'{"text": "\xfe"}\n')
    with pytest.raises(ValueError, match=r"no documents in 1 input file\(s\): 3 records skipped "
                                         r"\(invalid_utf8: 1, empty: 2\); first: skipped_empty: "):
        run([src], tmp_path / "out", tokenizer)
    assert not (tmp_path / "out" / "index.json").exists() and not (tmp_path / "out" / "parts").exists()
    with pytest.raises(ValueError, match="matches no file"):
        run([tmp_path / "nothing-*.jsonl"], tmp_path / "out", tokenizer)


def test_bad_arguments_are_refused(tmp_path, tokenizer, dataset, monkeypatch):
    files, root, _ = dataset
    src = tmp_path / "a.jsonl"
    src.write_bytes(jsonl(["hello"]))
    with pytest.raises(ValueError, match="already holds a dataset"):
        run([src], root, tokenizer)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        run([src], tmp_path / "o1", tokenizer, block_tokens=1)
    with pytest.raises(ValueError, match="compression"):
        run([src], tmp_path / "o2", tokenizer, compression="lzma9")
    with pytest.raises(ValueError, match="size-limit"):
        run([src], tmp_path / "o3", tokenizer, size_limit=100)
    monkeypatch.setattr(TextTokenizer, "padded_vocab_size", property(lambda self: 2**32 + 128))
    with pytest.raises(ValueError, match="does not fit uint32"):
        run([src], tmp_path / "o4", tokenizer)


def test_overwrite_replaces_a_dataset(tmp_path, tokenizer):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(jsonl(make_docs(30, 7)))
    b.write_bytes(jsonl(["just one document"]))
    out = tmp_path / "out"
    run([a, b], out, tokenizer)
    (out / "keep.txt").write_text("not ours")
    summary = run([b], out, tokenizer, overwrite=True)
    assert summary["documents"] == 1 and (out / "keep.txt").exists()
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["00000"]
    blocks = read_blocks(out)
    assert len(blocks) == 1 and blocks[0]["num_tokens"] == summary["tokens"]


def test_no_pad_token_pads_with_eos_and_uncompressed(tmp_path, tokenizer):
    spec = json.loads(Path(tokenizer).read_text())
    for tok in spec["added_tokens"]:
        if tok["content"] == "<|pad|>":
            tok["content"] = "<|unused|>"
    spec["model"]["vocab"]["<|unused|>"] = spec["model"]["vocab"].pop("<|pad|>")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(spec))
    tok = TextTokenizer(tmp_path / "tok")
    assert tok.pad_id is None
    src = tmp_path / "a.jsonl"
    src.write_bytes(jsonl(["a short document"]))
    run([src], tmp_path / "out", str(tmp_path / "tok"), compression=None, hashes=("sha1", "xxh64"))
    (block,) = read_blocks(tmp_path / "out")
    n = block["num_tokens"]
    assert n < BLOCK and (block["tokens"][n:] == tok.eos_id).all()
    meta = json.loads((tmp_path / "out" / fmt.META_FILE).read_text())
    assert meta["pad_id"] == tok.eos_id and meta["compression"] is None and meta["bos_id"] == tok.bos_id


# --- determinism, integrity ------------------------------------------------------------------------------------

def test_same_inputs_give_byte_identical_shards(tmp_path, tokenizer):
    write_inputs(tmp_path / "in")
    run([tmp_path / "in"], tmp_path / "one", tokenizer)
    run([tmp_path / "in" / "*"], tmp_path / "two", tokenizer, progress=True)
    one, two = files_bytes(tmp_path / "one"), files_bytes(tmp_path / "two")
    assert one.pop(fmt.SUMMARY_FILE) and two.pop(fmt.SUMMARY_FILE)  # holds timings and the output path
    assert sorted(one) == sorted(two) and "index.json" in one and len(one) > 10
    assert one == two
    assert str(tmp_path) not in one["index.json"].decode()


def test_verify_shards_finds_truncated_and_flipped_shards(tmp_path, tokenizer):
    write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    run([tmp_path / "in"], out, tokenizer, size_limit=4096)
    index = json.loads((out / "index.json").read_text())
    names = [s["zip_data"]["basename"] for s in index["shards"]]
    assert len(names) >= 3 and verify_shards(out) == []
    (out / names[0]).write_bytes((out / names[0]).read_bytes()[:-5])
    data = bytearray((out / names[2]).read_bytes())
    data[len(data) // 2] ^= 0x01
    (out / names[2]).write_bytes(bytes(data))
    assert verify_shards(out) == [names[0], names[2]]
    (out / names[1]).unlink()
    assert verify_shards(out) == names[:3]


# --- remote output ---------------------------------------------------------------------------------------------

def test_prepare_to_s3_and_read_back(tmp_path, tokenizer, s3_bucket):
    import boto3

    from data_pipeline.sources import expand_inputs

    files = write_inputs(tmp_path / "in")
    url = f"s3://{s3_bucket}/ds"
    summary = run([tmp_path / "in"], url, tokenizer)
    s3 = boto3.client("s3", endpoint_url=__import__("os").environ["S3_ENDPOINT_URL"])
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    index = json.loads(s3.get_object(Bucket=s3_bucket, Key="ds/index.json")["Body"].read())
    shards = {"ds/" + s["zip_data"]["basename"] for s in index["shards"]}
    assert {"ds/index.json", f"ds/{fmt.META_FILE}", f"ds/{fmt.SUMMARY_FILE}"} <= keys and shards <= keys
    assert len(shards) == summary["shards"] and summary["output"] == url
    meta = json.loads(s3.get_object(Bucket=s3_bucket, Key=f"ds/{fmt.META_FILE}")["Body"].read())
    assert meta["blocks"] == summary["blocks"] and meta["dtype"] == "uint16"

    tok = TextTokenizer(tokenizer)
    blocks = read_blocks(tmp_path / "cache", remote=url)
    streams = file_streams(blocks, part_of(index))
    for part, docs in zip(sorted(streams), files.values()):
        assert [tok.decode(d[:-1].tolist()) for d in split_docs(streams[part], tok.eos_id)] == docs
    assert len(expand_inputs([str(tmp_path / "in")])) == len(streams)

    with pytest.raises(ValueError, match="already holds a dataset"):
        run([tmp_path / "in"], url, tokenizer)
    assert run([tmp_path / "in" / "a.txt"], url, tokenizer, overwrite=True)["documents"] == 1


# --- Ray -------------------------------------------------------------------------------------------------------

def test_without_ray_running_the_caller_must_say_how_to_start_it(tmp_path, tokenizer):
    """How Ray starts (loopback-only unless an address is given) is cluster/safety.py's choice, passed in as
    ray_init by the CLI: without it and without a running Ray, prepare refuses before writing anything."""
    import ray

    assert not ray.is_initialized()
    write_inputs(tmp_path / "in")
    with pytest.raises(ValueError, match="Ray is not running; pass ray_init"):
        run([tmp_path / "in"], tmp_path / "out", tokenizer, use_ray=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ray_tasks_write_the_same_bytes_as_in_process(tmp_path, tokenizer):
    """One Ray instance: prepare reuses it (and leaves it running), output equals the in-process path."""
    import ray

    write_inputs(tmp_path / "in")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_bytes(jsonl(["ok"]))
    (bad / "b.jsonl").write_bytes(jsonl(["ok"]) + b'{"body": "x"}\n')
    run([tmp_path / "in"], tmp_path / "local", tokenizer)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        summary = run([tmp_path / "in"], tmp_path / "ray", tokenizer, use_ray=True, num_tasks=2, progress=True)
        assert ray.is_initialized()
        with pytest.raises(ValueError, match=rf"{re.escape(str(bad / 'b.jsonl'))}:2: no text field"):
            run([bad], tmp_path / "bad-out", tokenizer, use_ray=True)
    finally:
        ray.shutdown()
    local, remote = files_bytes(tmp_path / "local"), files_bytes(tmp_path / "ray")
    assert local.pop(fmt.SUMMARY_FILE) and remote.pop(fmt.SUMMARY_FILE)
    assert local == remote
    assert summary["num_inputs"] == 5 and summary["documents"] == 40
