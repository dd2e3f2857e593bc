"""Raw document sources: .txt, .jsonl, .jsonl.gz, .jsonl.zst and .parquet files -> document texts.

Bad records are either a clear error naming the file and line, or a counted skip (invalid UTF-8), never
silently dropped; the counts end up in the prepare summary.
"""
from __future__ import annotations

import contextlib
import glob
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")


@dataclass
class SourceStats:
    documents: int = 0
    bytes: int = 0
    skipped_invalid_utf8: int = 0
    skipped_empty: int = 0
    skipped_where: list[str] = field(default_factory=list)  # first few places, for the summary

    def skip(self, kind: str, where: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.skipped_where) < 20:
            self.skipped_where.append(f"{kind}: {where}")


def source_format(path: str | Path) -> str:
    name = str(path).lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"{path}: unsupported input format; expected one of {', '.join(FORMATS)}")


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Paths, directories (searched recursively for supported files) and globs -> sorted unique files."""
    files: set[Path] = set()
    for pattern in patterns:
        # An existing path is taken as it is, even when its name holds glob characters ("[", "*", "?").
        matches = [Path(pattern)] if Path(pattern).exists() else [Path(p) for p in glob.glob(pattern, recursive=True)]
        if not matches:
            raise ValueError(f"input '{pattern}' matches no file")
        for m in matches:
            if m.is_dir():
                files.update(p for p in m.rglob("*") if p.is_file() and _supported(p))
            else:
                source_format(m)  # raises for an unsupported file named explicitly
                files.add(m)
    if not files:
        raise ValueError(f"inputs {patterns} contain no {', '.join(FORMATS)} files")
    return sorted(files)


def _supported(path: Path) -> bool:
    try:
        source_format(path)
        return True
    except ValueError:
        return False


def _decode(raw: bytes, stats: SourceStats, where: str) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.skip("skipped_invalid_utf8", where)
        return None
    if not text.strip():
        stats.skip("skipped_empty", where)
        return None
    return text


def _open_lines(path: Path, fmt: str):
    if fmt == ".jsonl.gz":
        return gzip.open(path, "rb")
    if fmt == ".jsonl.zst":
        return contextlib.closing(_zstd_lines(path))
    return path.open("rb")


def _zstd_lines(path: Path, chunk_bytes: int = 1 << 20):
    """The lines of a .zst file (one frame or several). zstandard's stream reader ends quietly where a
    truncated file ends; here a file that stops inside a frame raises ZstdError."""
    import zstandard

    decoder, in_frame, pending = zstandard.ZstdDecompressor().decompressobj(), False, b""
    with path.open("rb") as fh:
        while data := fh.read(chunk_bytes):
            while data:
                in_frame = True
                pending += decoder.decompress(data)
                data = b""
                if decoder.eof:  # a frame ended: what follows in this chunk starts the next one
                    data, in_frame = decoder.unused_data, False
                    decoder = zstandard.ZstdDecompressor().decompressobj()
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line + b"\n"
    if in_frame:
        raise zstandard.ZstdError("the file ends inside a compressed frame (truncated)")
    if pending:
        yield pending


def _corrupt_input_errors() -> tuple[type[BaseException], ...]:
    """What the decompressors raise on a truncated or garbled file (EOFError: gzip's truncated stream)."""
    import zlib

    errors: list[type[BaseException]] = [gzip.BadGzipFile, EOFError, zlib.error]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def _jsonl_texts(path: Path, fmt: str, text_field: str, stats: SourceStats):
    try:
        yield from _jsonl_records(path, fmt, text_field, stats)
    except _corrupt_input_errors() as err:
        raise ValueError(f"{path}: corrupt {fmt} input ({type(err).__name__}: {err}); "
                         "re-create or remove the file") from None


def _jsonl_records(path: Path, fmt: str, text_field: str, stats: SourceStats):
    with _open_lines(path, fmt) as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                stats.skip("skipped_invalid_utf8", where)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{where}: no text field '{text_field}' (found {keys}); set --text-field")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{where}: field '{text_field}' is {type(text).__name__}, not a string")
            if not text.strip():
                stats.skip("skipped_empty", where)
                continue
            if not _encodable(text):  # a JSON "\ud800" escape (lone surrogate) is no UTF-8
                stats.skip("skipped_invalid_utf8", where)
                continue
            yield text


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _parquet_texts(path: Path, text_field: str, stats: SourceStats):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{path}: corrupt .parquet input ({err}); re-create or remove the file") from None
    if text_field not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column '{text_field}' (columns {pf.schema_arrow.names}); set --text-field")
    kind = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)):
        raise ValueError(f"{path}: column '{text_field}' is {kind}, not a string column")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is None or (isinstance(value, str) and not value.strip()):
                stats.skip("skipped_empty", f"{path}:row {row}")
                continue
            if isinstance(value, bytes):
                value = _decode(value, stats, f"{path}:row {row}")
                if value is None:
                    continue
            yield value


def iter_texts(path: str | Path, *, text_field: str = "text", stats: SourceStats | None = None):
    """Yield the documents of one file; a .txt file is one document."""
    path = Path(path)
    stats = stats if stats is not None else SourceStats()
    fmt = source_format(path)
    if fmt == ".txt":
        texts = (t for t in [_decode(path.read_bytes(), stats, str(path))] if t is not None)
    elif fmt == ".parquet":
        texts = _parquet_texts(path, text_field, stats)
    else:
        texts = _jsonl_texts(path, fmt, text_field, stats)
    for text in texts:
        stats.documents += 1
        stats.bytes += len(text.encode("utf-8"))
        yield text
