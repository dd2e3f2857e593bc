"""Raw document sources: every format, skips counted with their place, clear errors."""
import gzip
import json
import re

import pytest

from data_pipeline.sources import SourceStats, expand_inputs, iter_texts


def lines(*records) -> bytes:
    return b"".join(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n" for r in records)


def read(path, **kw):
    stats = SourceStats()
    return list(iter_texts(path, stats=stats, **kw)), stats


def test_every_format_yields_its_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = ["first doc", "zweites Dokument ü", "第三"]
    (tmp_path / "a.txt").write_text("a whole file\nis one document\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_bytes(lines(*({"text": d} for d in docs)))
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(lines(*({"text": d} for d in docs))))
    (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines(*({"text": d} for d in docs))))
    pq.write_table(pa.table({"text": docs}), tmp_path / "e.parquet")
    pq.write_table(pa.table({"text": [d.encode() for d in docs]}), tmp_path / "f.parquet")  # binary column
    assert read(tmp_path / "a.txt")[0] == ["a whole file\nis one document\n"]
    for name in ("b.jsonl", "c.jsonl.gz", "d.jsonl.zst", "e.parquet", "f.parquet"):
        texts, stats = read(tmp_path / name)
        assert texts == docs, name
        assert stats.documents == 3 and stats.bytes == sum(len(d.encode()) for d in docs)


def test_multi_frame_zstd_is_read_to_the_end(tmp_path):
    import zstandard

    frames = [zstandard.ZstdCompressor().compress(lines(*({"text": f"doc {i}"} for i in range(k, k + 50))))
              for k in range(0, 200, 50)]
    (tmp_path / "m.jsonl.zst").write_bytes(b"".join(frames))  # as `zstd` / pzstd write large files
    assert read(tmp_path / "m.jsonl.zst")[0] == [f"doc {i}" for i in range(200)]


def test_invalid_utf8_lone_surrogates_and_empty_are_counted_skips(tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_bytes(lines({"text": "ok"}, b'{"text": "bad \xff"}\n', b'{"text": "half \\ud800 pair"}\n',
                          {"text": " \n "}, b"\n", {"text": "ok again"}))
    texts, stats = read(src)
    assert texts == ["ok", "ok again"]
    assert (stats.skipped_invalid_utf8, stats.skipped_empty, stats.documents) == (2, 1, 2)
    assert stats.skipped_where == [f"skipped_invalid_utf8: {src}:2", f"skipped_invalid_utf8: {src}:3",
                                   f"skipped_empty: {src}:4"]
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    assert read(tmp_path / "bad.txt")[1].skipped_invalid_utf8 == 1


def test_bad_records_name_file_and_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "x.jsonl"
    src.write_bytes(lines({"text": "ok"}, {"body": "no text"}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(src))}:2: no text field 'text' \(found \['body'\]\)"):
        read(src)
    src.write_bytes(lines({"text": "ok"}, b"{not json\n"))
    with pytest.raises(ValueError, match=rf"{re.escape(str(src))}:2: not valid JSON"):
        read(src)
    src.write_bytes(lines({"text": 5}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(src))}:1: field 'text' is int"):
        read(src)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"p.parquet: no column 'text'"):
        read(tmp_path / "p.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "q.parquet")
    with pytest.raises(ValueError, match=r"q.parquet: column 'text' is int64, not a string column"):
        read(tmp_path / "q.parquet")


def test_expand_inputs_sorts_dedups_and_recurses(tmp_path):
    for name in ("b.jsonl", "sub/a.txt", "sub/deep/c.parquet", "notes.md", "sub/x.csv"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    got = expand_inputs([str(tmp_path), str(tmp_path / "*.jsonl")])
    assert got == sorted([tmp_path / "b.jsonl", tmp_path / "sub/a.txt", tmp_path / "sub/deep/c.parquet"])
    with pytest.raises(ValueError, match="unsupported input format"):
        expand_inputs([str(tmp_path / "notes.md")])
    with pytest.raises(ValueError, match="matches no file"):
        expand_inputs([str(tmp_path / "missing*.jsonl")])


def test_an_existing_path_with_glob_characters_is_taken_literally(tmp_path):
    odd = tmp_path / "crawl[2024]" / "part*1.jsonl"
    odd.parent.mkdir()
    odd.write_text('{"text": "x"}\n')
    assert expand_inputs([str(odd)]) == [odd]
    assert expand_inputs([str(odd.parent)]) == [odd]


@pytest.mark.parametrize("kind", ["truncated", "garbled"])
def test_corrupt_compressed_inputs_are_one_line_errors_naming_the_file(tmp_path, kind):
    """A truncated or garbled .jsonl.zst, .jsonl.gz or .parquet is a ValueError naming the file (not the
    decompressor's own exception from inside a Ray task, and not a truncated .zst read as a shorter file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    body = lines(*({"text": f"document {i} " * 50} for i in range(200)))
    whole = {"z.jsonl.zst": zstandard.ZstdCompressor().compress(body), "g.jsonl.gz": gzip.compress(body)}
    pq.write_table(pa.table({"text": ["a parquet document"] * 100}), tmp_path / "whole.parquet")
    whole["p.parquet"] = (tmp_path / "whole.parquet").read_bytes()
    for name, data in whole.items():
        if kind == "truncated":
            bad = data[: len(data) // 2]
        else:
            bad = bytearray(data)
            for i in range(len(bad) // 3, len(bad) // 3 + 64):
                bad[i] ^= 0xFF
            bad = bytes(bad)
            if name.endswith(".parquet"):  # the footer is what pyarrow reads first
                bad = data[:-8] + b"\x00" * 8
        src = tmp_path / name
        src.write_bytes(bad)
        # (deflate decodes garbage until its checksum: a garbled .gz may first fail as JSON, file and line named)
        with pytest.raises(ValueError, match=rf"{re.escape(str(src))}(: corrupt|:\d+: not valid JSON)"):
            read(src)
