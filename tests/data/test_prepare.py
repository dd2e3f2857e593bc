"""`prepare`: raw files -> MDS blocks. Round trip, block layout, formats, errors, determinism, S3, Ray."""
import gzip
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import format as fmt
from data_pipeline.prepare import TASK_MB, BlockPacker, plan_tasks, prepare, summary_line, verify_shards
from data_pipeline.tokenizer import TextTokenizer, train_tokenizer

BLOCK = 64
# Input bytes per task for the small test files: write_inputs' files (54, ~3.5K, ~800, ~600, ~2K bytes) make
# the tasks [a, b, c] and [d, e]. (Dividing by 2**20 is exact.)
TASK = 4000 / 2**20
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
                      progress=False, task_mb=TASK)
    assert [t["inputs"] for t in summary["tasks"]] == [[0, 1, 2], [3, 4]]
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
    assert len(ends) and ends[-1] == len(stream) - 1, "the stream of a task ends with EOS"
    return np.split(stream, ends + 1)[:-1]


def file_streams(blocks: list[dict], parts: list[str]) -> dict[str, np.ndarray]:
    """Part (task) -> its token stream: its blocks' tokens without the padding."""
    streams: dict[str, list] = {}
    for block, part in zip(blocks, parts):
        streams.setdefault(part, []).append(block["tokens"][:block["num_tokens"]])
    return {p: np.concatenate(v) for p, v in streams.items()}


def docs_by_part(files: dict[str, list[str]], summary: dict) -> dict[str, list[str]]:
    """Part (task) -> the documents of its input files, in input order (files: name -> documents, input order)."""
    docs = list(files.values())
    return {f"{t['index']:05d}": [d for i in t["inputs"] for d in docs[i]] for t in summary["tasks"]}


def expected_stream(docs: list[str], tok: TextTokenizer) -> np.ndarray:
    """The documents tokenized one by one, each followed by EOS: what the blocks must hold, in order."""
    return np.concatenate([np.asarray(ids + [tok.eos_id]) for ids in tok.encode_batch(docs)])


def files_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- round trip and block layout -------------------------------------------------------------------------------

def test_round_trip_every_format(dataset, tokenizer):
    files, root, summary = dataset
    tok = TextTokenizer(tokenizer)
    index = json.loads((root / "index.json").read_text())
    streams = file_streams(read_blocks(root), part_of(index))
    want = docs_by_part(files, summary)
    assert sorted(streams) == sorted(want) == ["00000", "00001"]
    for part, docs in want.items():
        got = [tok.decode(d[:-1].tolist()) for d in split_docs(streams[part], tok.eos_id)]
        assert got == docs, part
    assert summary["documents"] == sum(len(d) for d in files.values())
    assert summary["tokens"] == sum(len(s) for s in streams.values())
    # Per input file: its documents, tokens and bytes, and the task (part) it went to.
    assert [(Path(f["path"]).name, f["index"], f["task"], f["documents"]) for f in summary["files"]] == [
        (name, i, 0 if i < 3 else 1, len(docs)) for i, (name, docs) in enumerate(files.items())]
    for f, docs in zip(summary["files"], files.values()):
        assert f["tokens"] == len(expected_stream(docs, tok)) and f["bytes_in"] == sum(len(d.encode()) for d in docs)
    assert [t["blocks"] for t in summary["tasks"]] == [part_of(index).count(p) for p in ("00000", "00001")]


def test_blocks_are_full_except_each_tasks_last_padded(dataset, tokenizer):
    _, root, summary = dataset
    tok = TextTokenizer(tokenizer)
    blocks = read_blocks(root)
    parts = part_of(json.loads((root / "index.json").read_text()))
    assert len(blocks) == summary["blocks"] > len(set(parts))
    for i, (block, part) in enumerate(zip(blocks, parts)):
        assert block["tokens"].dtype == np.uint16 and block["tokens"].shape == (BLOCK,)
        last_of_task = i + 1 == len(parts) or parts[i + 1] != part
        n = block["num_tokens"]
        if not last_of_task:
            assert n == BLOCK
        assert 0 < n <= BLOCK and (block["tokens"][n:] == tok.pad_id).all()
        if last_of_task:
            assert block["tokens"][n - 1] == tok.eos_id


def test_the_summary_reports_the_padding_and_warns_when_most_is_padding(dataset, tmp_path, tokenizer):
    _, root, summary = dataset
    blocks = read_blocks(root)
    real = sum(int(b["num_tokens"]) for b in blocks)
    assert summary["padding_fraction"] == pytest.approx(1 - real / (len(blocks) * BLOCK), abs=1e-4)
    # Many small files, one task each (task_mb=0): each ends in a block of its own, so most tokens are padding.
    small = []
    for i in range(6):
        small.append(tmp_path / f"small{i}.jsonl")
        small[-1].write_bytes(jsonl([f"a short document number {i}"]))
    tiny = run(small, tmp_path / "small-out", tokenizer, task_mb=0)
    assert tiny["blocks"] == tiny["num_tasks"] == 6 and tiny["padding_fraction"] > 0.5
    assert "padding" in summary_line(tiny) and "6 tasks" in summary_line(tiny) and "--task-mb" in summary_line(tiny)
    # Grouped (the default): one task, one padded block; what padding is left is the end of the data.
    grouped = run(small, tmp_path / "grouped-out", tokenizer)
    assert grouped["num_tasks"] == 1 and grouped["tokens"] == tiny["tokens"]
    assert grouped["blocks"] == -(-grouped["tokens"] // BLOCK) < 6
    if grouped["padding_fraction"] > 0.10:
        assert "lower --block-tokens" in summary_line(grouped) and "--task-mb" not in summary_line(grouped)
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
    for task_mb in (0, TASK_MB):  # a task of its own; one task with the good file
        out = tmp_path / f"out-{task_mb}"
        summary = run([good, bad], out, tokenizer, skip_bad=True, task_mb=task_mb)
        assert summary["documents"] == 2 and len(summary["bad_inputs"]) == 1 and str(bad) in summary["bad_inputs"][0]
        entry = next(f for f in summary["files"] if f["path"] == str(bad))
        assert entry["documents"] == entry["tokens"] == 0 and entry["bad_input"] == summary["bad_inputs"][0]
        if task_mb == 0:
            assert not (out / "parts" / f"{entry['task']:05d}").exists()  # its part left nothing behind
        assert "left out 1 input file(s)" in summary_line(summary)
        assert len(read_blocks(out)) == summary["blocks"] == 1
    with pytest.raises(ValueError, match="1 file\\(s\\) cannot be read"):
        run([bad], tmp_path / "out3", tokenizer, skip_bad=True)


# --- tasks: input files grouped so they share blocks ---------------------------------------------------------

def test_plan_tasks_groups_consecutive_files_up_to_the_target():
    assert plan_tasks([10, 10, 10, 10, 10], 25) == [[0, 1, 2], [3, 4]]
    assert plan_tasks([5, 100, 5, 5, 30, 5], 20) == [[0], [1], [2, 3], [4], [5]]  # 100, 30: alone
    assert plan_tasks([3, 10, 3], 10) == [[0], [1], [2]]  # the target itself: alone
    assert plan_tasks([1, 2, 3], 0) == [[0], [1], [2]]  # 0: one task per file
    assert plan_tasks([1, 2, 3], 1000) == [[0, 1, 2]] and plan_tasks([], 10) == []


def write_small_files(root: Path, n: int) -> dict[str, list[str]]:
    """n small .jsonl and .txt files (names sort in creation order); returns name -> documents."""
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for i in range(n):
        if i % 4 == 3:
            files[f"{i:03d}.txt"] = make_docs(1, 100 + i)
            (root / f"{i:03d}.txt").write_text(files[f"{i:03d}.txt"][0], encoding="utf-8")
        else:
            files[f"{i:03d}.jsonl"] = make_docs(1 + i % 5, 100 + i)
            (root / f"{i:03d}.jsonl").write_bytes(jsonl(files[f"{i:03d}.jsonl"]))
    return files


def test_many_small_files_share_blocks_and_keep_every_document_once_in_order(tmp_path, tokenizer):
    files = write_small_files(tmp_path / "in", 40)
    tok = TextTokenizer(tokenizer)
    want = expected_stream([d for docs in files.values() for d in docs], tok)
    apart = run([tmp_path / "in"], tmp_path / "apart", tokenizer, task_mb=0)  # one task per file, as before
    grouped = run([tmp_path / "in"], tmp_path / "grouped", tokenizer)  # default: one task of all 40
    assert apart["num_tasks"] == 40 and grouped["num_tasks"] == 1 and grouped["task_mb"] == TASK_MB
    assert apart["tokens"] == grouped["tokens"] == len(want) and grouped["documents"] == apart["documents"]
    assert apart["blocks"] >= 40 and grouped["blocks"] == -(-len(want) // BLOCK)  # one padded block, the last
    assert grouped["padding_fraction"] < BLOCK / len(want) < 0.1 < apart["padding_fraction"]
    assert "padding" not in summary_line(grouped) and "--task-mb" in summary_line(apart)
    blocks = read_blocks(tmp_path / "grouped")
    assert all(b["num_tokens"] == BLOCK for b in blocks[:-1])
    assert np.array_equal(np.concatenate([b["tokens"][:b["num_tokens"]] for b in blocks]), want)
    assert [f["documents"] for f in grouped["files"]] == [len(d) for d in files.values()]
    assert [Path(f["path"]).name for f in grouped["files"]] == list(files)

    # A target of ~1.5 KB: several tasks of several files; each task's blocks hold its files' documents.
    some = run([tmp_path / "in"], tmp_path / "some", tokenizer, task_mb=1536 / 2**20)
    # skip_bad tokenizes each file of a task whole before packing it: with no bad file, the same bytes.
    run([tmp_path / "in"], tmp_path / "some-skip", tokenizer, task_mb=1536 / 2**20, skip_bad=True)
    plain, whole = files_bytes(tmp_path / "some"), files_bytes(tmp_path / "some-skip")
    assert plain.pop(fmt.SUMMARY_FILE) and whole.pop(fmt.SUMMARY_FILE) and plain == whole
    tasks = [t["inputs"] for t in some["tasks"]]
    assert 3 < len(tasks) < 40 and [i for t in tasks for i in t] == list(range(40))
    index = json.loads((tmp_path / "some" / "index.json").read_text())
    streams = file_streams(read_blocks(tmp_path / "some"), part_of(index))
    for part, docs in docs_by_part(files, some).items():
        assert np.array_equal(streams[part], expected_stream(docs, tok)), part
        task = some["tasks"][int(part)]
        assert task["blocks"] == -(-len(streams[part]) // BLOCK) and task["tokens"] == len(streams[part])
    assert np.array_equal(np.concatenate([streams[p] for p in sorted(streams)]), want)
    assert {f["task"] for f in some["files"] if f["index"] in tasks[1]} == {1}


def write_bad_files(root: Path) -> tuple[dict[str, list[str]], list[str]]:
    """Good files and every kind of unreadable one, in one directory (sorted: the input order); the bad ones
    hold readable documents before the error (more than one encode batch's worth in one of them). Returns the
    good files' documents by name and the bad files' names."""
    import zstandard

    root.mkdir(parents=True, exist_ok=True)
    good = {"00-good.jsonl": make_docs(5, 11), "02-good.txt": make_docs(1, 12), "04-good.jsonl.gz": make_docs(6, 13),
            "08-good.parquet": make_docs(4, 14)}
    (root / "00-good.jsonl").write_bytes(jsonl(good["00-good.jsonl"]))
    (root / "01-bad-json.jsonl").write_bytes(jsonl([f"fine {i}" for i in range(300)]) + b'{"text": "cut\n')
    (root / "02-good.txt").write_text(good["02-good.txt"][0], encoding="utf-8")
    whole = zstandard.ZstdCompressor().compress(jsonl([f"document {i} " * 40 for i in range(100)]))
    (root / "03-truncated.jsonl.zst").write_bytes(whole[: len(whole) // 2])
    (root / "04-good.jsonl.gz").write_bytes(gzip.compress(jsonl(good["04-good.jsonl.gz"]), mtime=0))
    (root / "05-no-field.jsonl").write_bytes(jsonl(["fine", "also fine"]) + b'{"body": "x"}\n')
    (root / "06-garbage.parquet").write_bytes(b"PAR1 this is not parquet")
    gz = gzip.compress(jsonl([f"gz document {i} " * 30 for i in range(50)]), mtime=0)
    (root / "07-truncated.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": good["08-good.parquet"]}), root / "08-good.parquet")
    bad = ["01-bad-json.jsonl", "03-truncated.jsonl.zst", "05-no-field.jsonl", "06-garbage.parquet",
           "07-truncated.jsonl.gz"]
    return good, bad


def test_skip_bad_files_inside_a_task_keeps_the_good_files_and_no_part_of_the_bad(tmp_path, tokenizer):
    good, bad = write_bad_files(tmp_path / "in")
    tok = TextTokenizer(tokenizer)
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'in' / bad[0]))}:301: not valid JSON"):
        run([tmp_path / "in"], tmp_path / "stop", tokenizer)
    assert not (tmp_path / "stop" / "index.json").exists()

    summary = run([tmp_path / "in"], tmp_path / "out", tokenizer, skip_bad=True)
    assert summary["num_tasks"] == 1 and summary["num_inputs"] == 9
    assert summary["documents"] == sum(len(d) for d in good.values())
    blocks = read_blocks(tmp_path / "out")
    stream = np.concatenate([b["tokens"][:b["num_tokens"]] for b in blocks])
    assert np.array_equal(stream, expected_stream([d for docs in good.values() for d in docs], tok))
    assert len(blocks) == summary["blocks"] == -(-len(stream) // BLOCK)
    assert [Path(m.split(":")[0]).name for m in summary["bad_inputs"]] == bad
    for f in summary["files"]:
        name = Path(f["path"]).name
        if name in bad:
            assert f["documents"] == f["tokens"] == f["bytes_in"] == 0 and name in f["bad_input"]
        else:
            assert f["documents"] == len(good[name]) and "bad_input" not in f
    assert "left out 5 input file(s)" in summary_line(summary)


def test_a_file_above_the_target_is_a_task_of_its_own(tmp_path, tokenizer):
    import zstandard

    root = tmp_path / "in"
    root.mkdir()
    docs = {name: [f"small {name} document {k}" for k in range(n)] for name, n in
            [("0.jsonl", 2), ("2.jsonl", 2), ("3.jsonl", 3), ("5.jsonl", 2)]}
    docs["1-big.jsonl"] = make_docs(60, 22)
    docs = dict(sorted(docs.items()))
    for name, d in docs.items():
        (root / name).write_bytes(jsonl(d))
    whole = zstandard.ZstdCompressor().compress(jsonl(make_docs(200, 26)))
    (root / "4-big-bad.jsonl.zst").write_bytes(whole[: len(whole) * 3 // 4])
    target = 2000
    sizes = {p.name: p.stat().st_size for p in root.iterdir()}
    assert sizes["1-big.jsonl"] > target and sizes["4-big-bad.jsonl.zst"] > target
    assert sum(v for k, v in sizes.items() if "big" not in k) < target
    summary = run([root], tmp_path / "out", tokenizer, task_mb=target / 2**20, skip_bad=True)
    assert [t["inputs"] for t in summary["tasks"]] == [[0], [1], [2, 3], [4], [5]]
    assert [t["part"] for t in summary["tasks"]] == [f"parts/{i:05d}" for i in range(5)]
    parts = sorted(p.name for p in (tmp_path / "out" / "parts").iterdir())
    assert parts == ["00000", "00001", "00002", "00004"]  # the big bad file's part is dropped, as before
    assert len(summary["bad_inputs"]) == 1 and "4-big-bad.jsonl.zst" in summary["bad_inputs"][0]
    tok = TextTokenizer(tokenizer)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    streams = file_streams(read_blocks(tmp_path / "out"), part_of(index))
    assert np.array_equal(streams["00001"], expected_stream(docs["1-big.jsonl"], tok))
    assert np.array_equal(streams["00002"], expected_stream(docs["2.jsonl"] + docs["3.jsonl"], tok))
    assert summary["documents"] == sum(len(d) for d in docs.values())


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


def test_the_shard_table_is_published_beside_the_index_and_agrees_with_it(dataset):
    from data_pipeline.shard_table import TABLE_FILES, ShardTable

    _, root, summary = dataset
    assert all((root / name).is_file() for name in TABLE_FILES)
    index = json.loads((root / "index.json").read_text())
    header = json.loads((root / "shard_table.json").read_text())
    assert header["index"] == {"bytes": (root / "index.json").stat().st_size}
    table = ShardTable.open(str(root))
    assert table.folder == str(root)  # the published table, not one built from index.json
    assert [table.entry(i) for i in range(table.num_shards)] == index["shards"]
    assert table.num_samples == summary["blocks"] == sum(s["samples"] for s in index["shards"])
    ends = np.cumsum([s["samples"] for s in index["shards"]])
    assert table.locate(ends - 1)[0].tolist() == list(range(len(ends)))


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
    with pytest.raises(ValueError, match="--task-mb -1: expected input MB per task, 0 or more"):
        run([src], tmp_path / "o5", tokenizer, task_mb=-1)
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
    run([tmp_path / "in"], tmp_path / "one", tokenizer, task_mb=TASK)
    run([tmp_path / "in" / "*"], tmp_path / "two", tokenizer, progress=True, task_mb=TASK)
    one, two = files_bytes(tmp_path / "one"), files_bytes(tmp_path / "two")
    assert one.pop(fmt.SUMMARY_FILE) and two.pop(fmt.SUMMARY_FILE)  # holds timings and the output path
    assert sorted(one) == sorted(two) and {"index.json", "parts/00000/index.json", "parts/00001/index.json"} <= set(one)
    assert one == two
    assert str(tmp_path) not in one["index.json"].decode()


def test_verify_shards_finds_truncated_and_flipped_shards(tmp_path, tokenizer):
    write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    run([tmp_path / "in"], out, tokenizer, size_limit=2048)
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
    summary = run([tmp_path / "in"], url, tokenizer, task_mb=TASK)
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
    want = docs_by_part(files, summary)
    assert sorted(streams) == sorted(want) and len(want) == summary["num_tasks"] == 2
    for part, docs in want.items():
        assert [tok.decode(d[:-1].tolist()) for d in split_docs(streams[part], tok.eos_id)] == docs
    assert len(expand_inputs([str(tmp_path / "in")])) == summary["num_inputs"] == len(files)

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
    run([tmp_path / "in"], tmp_path / "local", tokenizer, task_mb=TASK)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        summary = run([tmp_path / "in"], tmp_path / "ray", tokenizer, use_ray=True, num_tasks=2, progress=True,
                      task_mb=TASK)
        assert ray.is_initialized()
        with pytest.raises(ValueError, match=rf"{re.escape(str(bad / 'b.jsonl'))}:2: no text field"):
            run([bad], tmp_path / "bad-out", tokenizer, use_ray=True)
        skipped = run([bad], tmp_path / "skip-out", tokenizer, use_ray=True, skip_bad=True)  # one task of both
        assert skipped["num_tasks"] == 1 and skipped["documents"] == 1 and len(skipped["bad_inputs"]) == 1
    finally:
        ray.shutdown()
    local, remote = files_bytes(tmp_path / "local"), files_bytes(tmp_path / "ray")
    assert local.pop(fmt.SUMMARY_FILE) and remote.pop(fmt.SUMMARY_FILE)
    assert local == remote
    assert summary["num_inputs"] == 5 and summary["num_tasks"] == 2 and summary["documents"] == 40
