"""ShardTable: entries and sample locations against index.json and streaming's own reading; building from
index.json (also by several processes at once); shards that differ; remote fetching; scale; errors."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import format as fmt
from data_pipeline import shard_table
from data_pipeline.prepare import prepare
from data_pipeline.shard_table import TABLE_FILES, ShardTable, generate_index, write_table
from data_pipeline.tokenizer import train_tokenizer
from tests.data.test_prepare import make_docs, write_inputs

BLOCK = 64
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A small prepared dataset of several shards per input file."""
    base = tmp_path_factory.mktemp("table")
    write_inputs(base / "in")
    texts = [d for seed in range(1, 6) for d in make_docs(30, seed)]
    tokenizer = train_tokenizer(texts, vocab_size=400, out_dir=base / "tok")
    prepare([str(base / "in")], str(base / "out"), str(tokenizer), block_tokens=BLOCK, use_ray=False, task_mb=0,
            progress=False, size_limit=1500)
    return base / "out"


def index_shards(root) -> list[dict]:
    return json.loads((Path(root) / "index.json").read_text())["shards"]


def entries(table: ShardTable) -> list[dict]:
    return [table.entry(i) for i in range(table.num_shards)]


def brute_force(shards: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(shard, index within it) of every sample id, by walking the shards."""
    pairs = [(s, j) for s, shard in enumerate(shards) for j in range(shard["samples"])]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def copy_without_table(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*TABLE_FILES))
    return dst


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --- agreement with index.json and streaming --------------------------------------------------------------------

def test_entries_and_locate_agree_with_index_json(prepared):
    shards = index_shards(prepared)
    table = ShardTable.open(str(prepared))
    assert table.folder == str(prepared)  # the table prepare wrote, not a new one
    assert table.num_shards == len(shards) > 5 and table.num_samples == sum(s["samples"] for s in shards)
    assert entries(table) == shards
    assert [table.shard_samples(i) for i in range(table.num_shards)] == [s["samples"] for s in shards]
    want_shard, want_index = brute_force(shards)
    ids = np.arange(table.num_samples)
    for dtype in (np.int64, np.int32, np.uint64):
        shard, index = table.locate(ids.astype(dtype))
        assert shard.tolist() == want_shard.tolist() and index.tolist() == want_index.tolist()
    perm = np.random.default_rng(0).permutation(table.num_samples)
    shard, index = table.locate(perm)
    assert (shard == want_shard[perm]).all() and (index == want_index[perm]).all()
    for bad in ([-1], [table.num_samples], [0, table.num_samples + 5], np.array([2**64 - 1], np.uint64)):
        with pytest.raises(IndexError, match="sample id"):
            table.locate(np.asarray(bad))
    for bad in (-1, table.num_shards):
        with pytest.raises(IndexError, match="shard"):
            table.entry(bad)
        with pytest.raises(IndexError, match="shard"):
            table.shard_samples(bad)


def test_readers_from_entries_read_what_streaming_reads(prepared, tmp_path):
    """streaming's reader built from entry(i) over the shard's bytes gives StreamingDataset's samples."""
    from streaming import StreamingDataset
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)  # StreamingDataset unpacks shards beside their compressed files
    ds = StreamingDataset(local=str(copy), shuffle=False, batch_size=1)
    want = [ds[i] for i in range(ds.num_samples)]
    table = ShardTable.open(str(prepared))
    shard, index = table.locate(np.arange(table.num_samples))
    raw_dir = tmp_path / "raw"
    readers = []
    for i in range(table.num_shards):
        entry = table.entry(i)
        raw = decompress(entry["compression"], (prepared / entry["zip_data"]["basename"]).read_bytes())
        assert len(raw) == entry["raw_data"]["bytes"]
        assert hashlib.sha1(raw).hexdigest() == entry["raw_data"]["hashes"]["sha1"]
        (raw_dir / entry["raw_data"]["basename"]).parent.mkdir(parents=True, exist_ok=True)
        (raw_dir / entry["raw_data"]["basename"]).write_bytes(raw)
        readers.append(reader_from_json(str(raw_dir), None, entry))
    assert len(want) == table.num_samples
    for sample_id, expected in enumerate(want):
        got = readers[shard[sample_id]].get_item(int(index[sample_id]))
        assert sorted(got) == sorted(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])


# --- building from index.json -----------------------------------------------------------------------------------

def test_a_dataset_without_a_table_gets_one_built_once(prepared, tmp_path, monkeypatch):
    shards = index_shards(prepared)
    root = copy_without_table(prepared, tmp_path / "old")
    build = tmp_path / "build"
    table = ShardTable.open(str(root), build_dir=str(build))
    assert table.folder == str(build) and entries(table) == shards
    assert sorted(p.name for p in build.iterdir()) == sorted(TABLE_FILES)
    assert not any((root / name).exists() for name in TABLE_FILES)  # the dataset stays as it is
    built = {name: (build / name).read_bytes() for name in TABLE_FILES}
    with monkeypatch.context() as m:  # opened again: reused, not built
        m.setattr(shard_table, "_build", lambda *a: pytest.fail("built again"))
        assert entries(ShardTable.open(str(root), build_dir=str(build))) == shards
    # Built and written tables are the same bytes but for the header's stamp of index.json (size and mtime).
    for name in TABLE_FILES[:-1]:
        assert built[name] == (prepared / name).read_bytes()

    # index.json rewritten (one shard fewer): both the built table and the one prepare wrote are stale.
    text = json.dumps({"shards": shards[:-1], "version": 2}, sort_keys=True)
    (root / "index.json").write_text(text)
    table = ShardTable.open(str(root), build_dir=str(build))
    assert table.num_shards == len(shards) - 1 and entries(table) == shards[:-1]
    written = copy_without_table(prepared, tmp_path / "stale")
    write_table(str(written), shards, index_bytes=len((prepared / "index.json").read_bytes()))
    (written / "index.json").write_text(text)
    assert entries(ShardTable.open(str(written))) == shards[:-1]
    assert not leftovers(build) and not leftovers(written) and not leftovers(root)


def test_processes_building_at_once_leave_one_good_table(tmp_path):
    generate_index(tmp_path / "ref", tokens=1e12)
    generate_index(tmp_path / "ds", tokens=1e12, with_table=False)
    code = ("import sys; from data_pipeline.shard_table import ShardTable; "
            "t = ShardTable.open(sys.argv[1]); print(t.num_shards, t.entry(t.num_shards - 1)['samples'])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "ds")], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len({out for out, _ in outs}) == 1
    for name in TABLE_FILES[:-1]:
        assert (tmp_path / "ds" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert not leftovers(tmp_path / "ds")
    table = ShardTable.open(str(tmp_path / "ds"))
    assert entries(table)[-3:] == index_shards(tmp_path / "ref")[-3:]


def test_shards_that_differ_in_shared_fields_round_trip(prepared, tmp_path, monkeypatch):
    base = index_shards(prepared)[0]
    odd = [dict(base), {**base, "zip_data": None, "compression": None}, {**base, "samples": 0},
           {k: v for k, v in base.items() if k not in ("size_limit", "hashes")},
           {**base, "raw_meta": {"basename": "m", "bytes": 3, "hashes": {}}, "extra": [1, {"a": None}]},
           {**base, "samples": 7, "version": 2, "column_sizes": [None, 4, None]}]
    write_table(str(tmp_path / "w"), odd)
    table = ShardTable.open(str(tmp_path / "w"))
    assert entries(table) == odd
    shard, index = table.locate(np.arange(table.num_samples))
    want_shard, want_index = brute_force(odd)
    assert (shard == want_shard).all() and (index == want_index).all() and 2 not in shard.tolist()
    # The same entries from an index.json in another layout, read in chunks of a few characters.
    monkeypatch.setattr(shard_table._JsonReader, "CHUNK", 5)
    (tmp_path / "i").mkdir()
    (tmp_path / "i" / "index.json").write_text(json.dumps({"version": 2, "note": [1.5, "x"], "shards": odd}, indent=3))
    table = ShardTable.open(str(tmp_path / "i"))
    assert entries(table) == odd
    for name in TABLE_FILES[:-1]:
        assert (tmp_path / "i" / name).read_bytes() == (tmp_path / "w" / name).read_bytes()
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "index.json").write_text('{"shards": [], "version": 2}')
    empty = ShardTable.open(str(tmp_path / "e"))
    assert (empty.num_shards, empty.num_samples) == (0, 0)
    with pytest.raises(IndexError):
        empty.locate(np.array([0]))


def test_generated_index_is_a_prepared_dataset_in_form(prepared, tmp_path):
    stats = generate_index(tmp_path / "g", tokens=5e9, blocks_per_shard=64, vocab_size=100_000)
    text = (tmp_path / "g" / "index.json").read_text()
    shards = json.loads(text)["shards"]
    assert text == json.dumps({"shards": shards, "version": 2}, sort_keys=True)  # as prepare writes it
    meta = json.loads((tmp_path / "g" / fmt.META_FILE).read_text())
    assert sorted(meta) == sorted(json.loads((prepared / fmt.META_FILE).read_text()))
    assert meta["blocks"] == stats["blocks"] == sum(s["samples"] for s in shards) and meta["dtype"] == "uint32"
    assert stats["shards"] == len(shards) == -(-stats["blocks"] // 64)
    assert (stats["blocks"] - 1) * fmt.BLOCK_TOKENS < 5e9 <= stats["blocks"] * fmt.BLOCK_TOKENS
    assert sorted(shards[0]) == sorted(index_shards(prepared)[0])
    assert entries(ShardTable.open(str(tmp_path / "g"))) == shards
    generate_index(tmp_path / "n", tokens=1e8, with_table=False)
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == ["index.json", fmt.META_FILE]


# --- remote ------------------------------------------------------------------------------------------------------

def s3_fetch(url: str, root: Path, log: list[str]):
    from streaming.base.storage import CloudDownloader

    def fetch(name: str) -> str | None:
        log.append(name)
        root.mkdir(parents=True, exist_ok=True)
        try:
            CloudDownloader.direct_download(f"{url}/{name}", str(root / name))
        except Exception:  # noqa: BLE001 - "not found", in the client's own type
            return None
        return str(root / name)
    return fetch


def test_a_remote_table_is_fetched_and_an_old_remote_dataset_gets_one_built(prepared, tmp_path, s3_bucket):
    import boto3

    write_inputs(tmp_path / "in")
    url = f"s3://{s3_bucket}/ds"
    prepare([str(tmp_path / "in")], url, str(prepared / fmt.TOKENIZER_FILE), block_tokens=BLOCK, use_ray=False,
            progress=False, size_limit=1500)
    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    shards = json.loads(s3.get_object(Bucket=s3_bucket, Key="ds/index.json")["Body"].read())["shards"]

    log = []
    table = ShardTable.open(str(tmp_path / "c1"), fetch=s3_fetch(url, tmp_path / "c1", log))
    assert log == ["shard_table.json", "shard_table.npy", "shard_table.jsonl"] and entries(table) == shards
    ShardTable.open(str(tmp_path / "c1"), fetch=s3_fetch(url, tmp_path / "c1", log))
    assert len(log) == 3  # all in the cache: nothing fetched

    s3.delete_object(Bucket=s3_bucket, Key="ds/shard_table.jsonl")
    with pytest.raises(ValueError, match="has shard_table.json but not shard_table.jsonl"):
        ShardTable.open(str(tmp_path / "c2"), fetch=s3_fetch(url, tmp_path / "c2", []))

    for name in TABLE_FILES:  # a dataset prepared before the table
        s3.delete_object(Bucket=s3_bucket, Key=f"ds/{name}")
    log = []
    table = ShardTable.open(str(tmp_path / "c3"), fetch=s3_fetch(url, tmp_path / "c3", log))
    assert log == ["shard_table.json", "index.json"] and table.folder == str(tmp_path / "c3")
    assert entries(table) == shards


# --- scale and errors --------------------------------------------------------------------------------------------

MEASURE = """
import json, sys, time
import numpy as np
from data_pipeline.shard_table import ShardTable

def rss_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024

before = rss_mib()
start = time.perf_counter()
table = ShardTable.open(sys.argv[1])
opened = time.perf_counter() - start
ids = np.random.default_rng(0).integers(0, table.num_samples, 5000)
shard, index = table.locate(ids)
entries = [table.entry(int(s)) for s in shard[:100]]
print(json.dumps({"open_s": opened, "rss_mib": rss_mib() - before, "ids": ids.tolist(), "shard": shard.tolist(),
                  "index": index.tolist(), "samples": table.num_samples, "basenames": [e["raw_data"]["basename"]
                  for e in entries]}))
"""


def measure_open(root: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(root)], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("with_table", [True, False], ids=["written", "built"])
def test_a_trillion_tokens_open_fast_in_little_memory(tmp_path, with_table):
    """1e12 tokens: 15M blocks in 30K shards. Opening (or building from index.json, streamed) stays small."""
    stats = generate_index(tmp_path / "ds", tokens=1e12, with_table=with_table)
    got = measure_open(tmp_path / "ds")
    if with_table:
        assert got["open_s"] < 5
    assert got["rss_mib"] < 200, got["rss_mib"]
    assert got["samples"] == stats["blocks"]
    ids = np.array(got["ids"])
    assert got["shard"] == (ids // 512).tolist() and got["index"] == (ids % 512).tolist()  # all shards full
    assert got["basenames"][:3] == ["parts/{:05d}/shard.{:05d}.mds".format(*divmod(s, 8)) for s in got["shard"][:3]]


def test_missing_or_garbled_files_are_named(prepared, tmp_path):
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'none' / 'index.json'} is missing")):
        ShardTable.open(str(tmp_path / "none"))
    text = (prepared / "index.json").read_text()
    for i, (content, why) in enumerate([(text[:len(text) // 2], "Expecting|Unterminated|expected"),
                                        ('{"version": 2}', 'no "shards" list'),
                                        ('{"shards": {"a": 1}}', "expected '\\['"),
                                        ('{"shards": [3]}', "not an object"),
                                        ('{"shards": [{"format": "mds"}]}', "sample count"),
                                        (text + "x", "data after"),
                                        ('{"shards": [{"samples": 1, "b": "\xff"}]}', "not UTF-8")]):
        folder = tmp_path / f"bad{i}"
        folder.mkdir()
        (folder / "index.json").write_bytes(content.encode("latin-1" if "\xff" in content else "utf-8"))
        with pytest.raises(ValueError, match=re.escape(f"{folder / 'index.json'}: ") + f".*({why})"):
            ShardTable.open(str(folder))
        assert not leftovers(folder) and not any((folder / name).exists() for name in TABLE_FILES)

    def damaged(name: str, change) -> Path:
        folder = tmp_path / f"damaged-{name}"
        shutil.copytree(prepared, folder)
        change(folder / name)
        return folder

    for name, change in [("shard_table.json", lambda p: p.write_text("{not json")),
                         ("shard_table.json", lambda p: p.write_text('{"format": "other"}')),
                         ("shard_table.npy", lambda p: p.write_bytes(p.read_bytes()[:-8])),
                         ("shard_table.npy", lambda p: p.unlink()),
                         ("shard_table.jsonl", lambda p: p.write_bytes(p.read_bytes()[:-1])),
                         ("shard_table.jsonl", lambda p: p.unlink())]:
        folder = damaged(name, change)
        with pytest.raises(ValueError, match=re.escape(str(folder / name))):
            ShardTable.open(str(folder))
        shutil.rmtree(folder)
    folder = damaged("shard_table.jsonl", lambda p: p.write_bytes(p.read_bytes().replace(b"{", b"(", 1)))
    table = ShardTable.open(str(folder))
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'shard_table.jsonl'}: shard 0's entry is garbled")):
        table.entry(0)
