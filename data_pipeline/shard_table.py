"""A compact, memory-mapped table of a prepared dataset's shards, in place of streaming's in-memory index.

`streaming.StreamingDataset` parses index.json into objects in every process: 29 s and 3 GiB per rank at
10T tokens (298K shards), unusable at 38T (1.13M shards). The table opens in milliseconds and costs memory
only for the pages of its sample counts that a process touches; index.json, the MDS shards and streaming's
readers stay as they are.

Files beside index.json (TABLE_FILES, in the order they are written; the header last, as the commit):
  shard_table.npy    int64 [2, num_shards + 1]: row 0 the cumulative sample counts (0, s0, s0 + s1, ...),
                     row 1 the byte offset of each shard's line in shard_table.jsonl (and its end)
  shard_table.jsonl  one line per shard: the keys of its index.json entry that are not in the template
                     (basenames, sizes, hashes; any shared field a shard has otherwise), without "samples";
                     a shard that lacks some template keys is stored as [its keys, [the keys it lacks]]
  shard_table.json   the header: {"format", "version", "num_shards", "num_samples", "entries_bytes",
                     "template" (the first shard's fields other than VARYING), "index" (the size, and when
                     built from it the mtime_ns, of the index.json it was made from; null when unknown)}
A table whose "index" stamp does not match the index.json beside it is stale and is built again.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import uuid
from array import array
from typing import Callable, Iterable, Iterator

import numpy as np

from data_pipeline import format as fmt

INDEX_FILE = "index.json"
HEADER_FILE = "shard_table.json"
NPY_FILE, ENTRIES_FILE = "shard_table.npy", "shard_table.jsonl"
DATA_FILES = (NPY_FILE, ENTRIES_FILE)
TABLE_FILES = (*DATA_FILES, HEADER_FILE)
FORMAT, VERSION = "liquid-shard-table", 1
VARYING = ("raw_data", "zip_data", "raw_meta", "zip_meta", "samples")  # never in the template
_NONBLANK = re.compile(r"\S")
_LINE = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode


class ShardTable:
    """One stream's shards: sample ids -> (shard, index within it) and each shard's index.json entry."""

    def __init__(self, folder: str, header: dict):
        npy, jsonl, head = (os.path.join(folder, name) for name in TABLE_FILES)
        self.folder, self.num_shards, self.num_samples = folder, header["num_shards"], header["num_samples"]
        self._template = json.dumps(header["template"])
        try:
            arrays = np.load(npy, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"{npy}: unreadable shard table ({err}); {_REBUILD}") from None
        if arrays.dtype != np.dtype("<i8") or arrays.shape != (2, self.num_shards + 1):
            raise ValueError(f"{npy}: expected int64 [2, {self.num_shards + 1}] as {head} says, found "
                             f"{arrays.dtype} {list(arrays.shape)}; {_REBUILD}")
        self._cum, self._offsets = np.asarray(arrays[0]), np.asarray(arrays[1])
        size = os.path.getsize(jsonl) if os.path.exists(jsonl) else None
        if size != header["entries_bytes"]:
            raise ValueError(f"{jsonl}: {'missing' if size is None else f'{size} bytes'} where {head} says "
                             f"{header['entries_bytes']}; {_REBUILD}")
        ends = (int(self._cum[0]), int(self._cum[-1]), int(self._offsets[0]), int(self._offsets[-1]))
        if ends != (0, self.num_samples, 0, size):
            raise ValueError(f"{npy}: does not match {head} (first and last counts and offsets {ends}); {_REBUILD}")
        # Read with pread, not mapped: a long run reads many entries, and mapped pages would stay in its RSS.
        self._entries = open(jsonl, "rb")

    @classmethod
    def open(cls, root: str, *, fetch: Callable[[str], str | None] | None = None,
             build_dir: str | None = None) -> ShardTable:
        """The table of the dataset whose index.json is (or would be) in `root`.

        The table files are taken from root (fetched with `fetch(name) -> local path | None` when missing
        there and the stream is remote), else from build_dir (default root) when built there before, else
        built there once from index.json (fetched when missing). A table older than the index.json beside
        it is built again. Several processes may do this at once: each file is replaced atomically.
        """
        root = os.fspath(root)
        build_dir = os.fspath(build_dir or root)
        index = os.path.join(root, INDEX_FILE)
        if fetch is not None:
            _fetch_table(root, fetch)
        for folder in dict.fromkeys((root, build_dir)):
            header = _read_header(folder)
            if header is not None and _fresh(header, index):
                return cls(folder, header)
        if fetch is not None and not os.path.exists(index):
            fetch(INDEX_FILE)
        _build(index, build_dir)
        return cls(build_dir, _read_header(build_dir))

    def locate(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard id, index of the sample within its shard) of each of this stream's sample ids."""
        ids = np.asarray(sample_ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"sample ids must be integers, got {ids.dtype}")
        if ids.dtype == np.uint64 and ids.size and ids.max() >= 2**63:
            raise IndexError(f"sample id {ids.max()} is not in [0, {self.num_samples})")
        ids = ids.astype(np.int64, copy=False)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_samples):
            bad = ids.min() if ids.min() < 0 else ids.max()
            raise IndexError(f"sample id {bad} is not in [0, {self.num_samples}) ({self.folder})")
        shard = np.searchsorted(self._cum, ids, side="right") - 1  # past the empty shards before an id
        return shard, ids - self._cum[shard]

    def shard_samples(self, shard_id: int) -> int:
        i = self._check(shard_id)
        return int(self._cum[i + 1] - self._cum[i])

    def entry(self, shard_id: int) -> dict:
        """The shard's index.json entry, as streaming's `reader_from_json` takes it."""
        i = self._check(shard_id)
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        try:
            line = json.loads(os.pread(self._entries.fileno(), end - start, start))
        except ValueError as err:
            raise ValueError(f"{self._entries.name}: shard {i}'s entry is garbled ({err}); {_REBUILD}") from None
        own, absent = line if isinstance(line, list) else (line, ())
        entry = {**json.loads(self._template), **own, "samples": self.shard_samples(i)}
        for key in absent:
            del entry[key]
        return dict(sorted(entry.items()))

    def _check(self, shard_id: int) -> int:
        if not 0 <= shard_id < self.num_shards:
            raise IndexError(f"shard {shard_id} is not in [0, {self.num_shards}) ({self.folder})")
        return int(shard_id)


_REBUILD = f"delete the {', '.join(TABLE_FILES)} files to build them again from {INDEX_FILE}"


def _read_header(folder: str) -> dict | None:
    """The header of the table in `folder`; None when there is none (the data files alone do not count:
    they may be left from a build that stopped before its header)."""
    path = os.path.join(folder, HEADER_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            header = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable shard table header ({err}); {_REBUILD}") from None
    keys = ("num_shards", "num_samples", "entries_bytes", "template", "index")
    if not isinstance(header, dict) or header.get("format") != FORMAT or any(k not in header for k in keys):
        raise ValueError(f"{path}: not a {FORMAT} header; {_REBUILD}")
    if header.get("version") != VERSION:
        raise ValueError(f"{path}: shard table version {header.get('version')}, this code reads {VERSION}; "
                         + _REBUILD)
    return header


def _fresh(header: dict, index: str) -> bool:
    """False when the index.json beside the table is not the one it was made from."""
    stamp = header["index"]
    if not stamp or not os.path.exists(index):
        return True
    st = os.stat(index)
    return stamp.get("bytes") == st.st_size and stamp.get("mtime_ns", st.st_mtime_ns) == st.st_mtime_ns


def _fetch_table(root: str, fetch) -> None:
    """Download the table files root lacks; nothing when the remote has no table (an older dataset)."""
    if not os.path.exists(os.path.join(root, HEADER_FILE)) and fetch(HEADER_FILE) is None:
        return
    for name in DATA_FILES:
        if not os.path.exists(os.path.join(root, name)) and fetch(name) is None:
            raise ValueError(f"{root}: the remote dataset has {HEADER_FILE} but not {name}: its shard table "
                             "is incomplete; prepare or upload the dataset again")


# ---- writing --------------------------------------------------------------------------------------------


class _TableWriter:
    """Shard entries, one at a time, -> the table files under temporary names; `commit` moves them into
    place (header last), `discard` removes them."""

    def __init__(self, folder: str, source: str, template: dict | None = None):
        os.makedirs(folder, exist_ok=True)
        self.folder, self.source, tag = folder, source, f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self.tmp = {name: os.path.join(folder, f".{name}.{tag}.tmp") for name in TABLE_FILES}
        self.lines = open(self.tmp[ENTRIES_FILE], "xb")
        self.cum, self.offsets = array("q", [0]), array("q", [0])
        self.template = template

    def add(self, shard: dict) -> None:
        samples = shard.get("samples") if isinstance(shard, dict) else None
        if type(samples) is not int or samples < 0:
            raise ValueError(f"{self.source}: shard {len(self.cum) - 1} has no sample count: {str(shard)[:200]}")
        if self.template is None:
            self.template = {k: v for k, v in shard.items() if k not in VARYING}
        template = self.template
        own = {k: v for k, v in shard.items() if k != "samples" and (k not in template or template[k] != v)}
        absent = [k for k in template if k not in shard]
        self.append(samples, _LINE([own, absent] if absent else own))

    def append(self, samples: int, line: str) -> None:
        """One shard: its sample count and its line (its keys beyond the template, as JSON)."""
        data = line.encode() + b"\n"
        self.lines.write(data)
        self.cum.append(self.cum[-1] + samples)
        self.offsets.append(self.offsets[-1] + len(data))

    def commit(self, index_stamp: dict | None) -> list[str]:
        self.lines.close()
        arrays = np.stack([np.frombuffer(self.cum, np.int64), np.frombuffer(self.offsets, np.int64)])
        with open(self.tmp[NPY_FILE], "xb") as f:
            np.save(f, arrays.astype("<i8", copy=False))
        header = {"format": FORMAT, "version": VERSION, "num_shards": len(self.cum) - 1,
                  "num_samples": self.cum[-1], "entries_bytes": self.offsets[-1], "template": self.template or {},
                  "index": index_stamp}
        with open(self.tmp[HEADER_FILE], "x", encoding="utf-8") as f:
            json.dump(header, f, indent=1, sort_keys=True)
        for name in TABLE_FILES:
            os.replace(self.tmp[name], os.path.join(self.folder, name))
        return list(TABLE_FILES)

    def discard(self) -> None:
        self.lines.close()
        for path in self.tmp.values():
            if os.path.exists(path):
                os.unlink(path)


def write_table(root: str, shards: Iterable[dict], *, index_bytes: int | None = None) -> list[str]:
    """Write the table files of these index.json shard entries into root (atomically); returns their names.
    index_bytes: the size of the index.json they will be published in, so a table that no longer matches
    its index.json is noticed."""
    writer = _TableWriter(os.fspath(root), "the shard entries given")
    try:
        for shard in shards:
            writer.add(shard)
        return writer.commit({"bytes": index_bytes} if index_bytes is not None else None)
    except BaseException:
        writer.discard()
        raise


def _build(index: str, folder: str) -> None:
    """The table of `index` (an index.json) in `folder`; index.json is read once, one entry at a time."""
    try:
        f = open(index, encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{index} is missing: not a prepared dataset; run `liquid data prepare` to "
                         "write one") from None
    with f:
        st = os.fstat(f.fileno())
        writer = _TableWriter(folder, index)
        try:
            for shard in _index_shards(f, index):
                writer.add(shard)
            writer.commit({"bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
        except BaseException:
            writer.discard()
            raise


class _JsonReader:
    """One JSON document read in chunks, value by value, so that a huge array is walked element by element
    without holding the text or the parsed elements."""

    CHUNK = 1 << 22

    def __init__(self, file, path: str):
        self.file, self.path, self.buf, self.pos, self.base, self.eof = file, path, "", 0, 0, False
        self.decoder = json.JSONDecoder()

    def error(self, what: str, pos: int | None = None) -> ValueError:
        where = self.base + (self.pos if pos is None else pos)
        return ValueError(f"{self.path}: not a valid MDS index: {what} at character {where}")

    def _fill(self) -> bool:
        try:
            chunk = "" if self.eof else self.file.read(self.CHUNK)
        except UnicodeDecodeError as err:
            raise self.error(f"not UTF-8 ({err.reason})", len(self.buf)) from None
        self.eof = not chunk
        self.base += self.pos
        self.buf, self.pos = self.buf[self.pos:] + chunk, 0
        return bool(chunk)

    def peek(self) -> str:
        """The next non-blank character, "" at the end."""
        while True:
            found = _NONBLANK.search(self.buf, self.pos)
            if found:
                self.pos = found.start()
                return self.buf[self.pos]
            self.pos = len(self.buf)
            if not self._fill():
                return ""

    def expect(self, chars: str) -> str:
        char = self.peek()
        if not char or char not in chars:
            raise self.error(f"expected {' or '.join(map(repr, chars))}, found {char or 'the end'!r}")
        self.pos += 1
        return char

    def value(self):
        self.peek()
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof:  # else a number may go on in the next chunk
                    self.pos = end
                    return value
            except json.JSONDecodeError as err:
                if self.eof:
                    raise self.error(err.msg, err.pos) from None
            self._fill()


def _array_objects(reader: _JsonReader) -> Iterator[dict]:
    reader.expect("[")
    if reader.peek() == "]":
        reader.pos += 1
        return
    while True:
        shard = reader.value()
        if not isinstance(shard, dict):
            raise reader.error("a shard entry is not an object")
        yield shard
        if reader.expect(",]") == "]":
            return


def _index_shards(file, path: str) -> Iterator[dict]:
    """The entries of an index.json's "shards" list, one by one."""
    reader = _JsonReader(file, path)
    reader.expect("{")
    found = False
    if reader.peek() == "}":
        reader.pos += 1
    else:
        while True:
            key = reader.value()
            if not isinstance(key, str):
                raise reader.error("expected a key")
            reader.expect(":")
            if key == "shards":
                found = True
                yield from _array_objects(reader)
            else:
                reader.value()
            if reader.expect(",}") == "}":
                break
    if not found:
        raise reader.error('no "shards" list')
    if reader.peek():
        raise reader.error("data after the index")


# ---- simulated datasets ---------------------------------------------------------------------------------

SHARDS_PER_PART = 8  # a simulated input file's shards


def _entry_format(shared: dict, separators: tuple[str, str], keys: tuple[str, ...]) -> str:
    """json.dumps(entry, sort_keys=True) of a generated entry, as a %-format with a slot per key in `keys`."""
    slots = {key: f"\0{key}" for key in keys}
    text = json.dumps({**shared, **slots}, sort_keys=True, separators=separators).replace("%", "%%")
    for key, slot in slots.items():
        text = text.replace(json.dumps(slot), f"%({key})s")
    return text


def generate_index(root: str, *, tokens: float, block_tokens: int = fmt.BLOCK_TOKENS, blocks_per_shard: int = 512,
                   vocab_size: int = 65536, with_table: bool = True) -> dict:
    """A simulated prepared dataset of `tokens` tokens, for scale tests: liquid_data.json, index.json and
    (with_table) the shard table; no shard files. Every block is full but the last. Entries are formatted
    straight to text (what json.dumps(sort_keys=True) writes), never held. Returns {"shards", "blocks",
    "tokens", "seconds"}."""
    from data_pipeline.tokenizer import pad_vocab

    start = time.perf_counter()
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    tokens = int(tokens)
    blocks = max(1, math.ceil(tokens / block_tokens))
    shards = math.ceil(blocks / blocks_per_shard)
    dtype = fmt.token_dtype(vocab_size)
    block_bytes = block_tokens * np.dtype(dtype).itemsize + 64  # tokens, a few doc_starts, num_tokens, sizes
    shared = {"column_encodings": ["ndarray:int32", "int", f"ndarray:{dtype}"],
              "column_names": ["doc_starts", "num_tokens", "tokens"], "column_sizes": [None, 8, None],
              "compression": "zstd", "format": "mds", "hashes": ["sha1"], "size_limit": 1 << 26, "version": 2}
    entry = _entry_format(shared, (", ", ": "), ("raw_data", "samples", "zip_data"))
    line = _entry_format({}, (",", ":"), ("raw_data", "zip_data"))
    info = '{"basename": "%s", "bytes": %d, "hashes": {"sha1": "%s"}}'
    info_line = info.replace(", ", ",").replace(": ", ":")
    writer = _TableWriter(root, "generated", template=shared) if with_table else None
    index_tmp = os.path.join(root, f".{INDEX_FILE}.{os.getpid()}.tmp")
    try:
        with open(index_tmp, "w", encoding="utf-8") as out:
            out.write('{"shards": [')
            for i in range(shards):
                samples = min(blocks_per_shard, blocks - i * blocks_per_shard)
                name = "parts/{:05d}/shard.{:05d}.mds".format(*divmod(i, SHARDS_PER_PART))
                raw_bytes = 8 + 4 * (samples + 1) + samples * block_bytes
                raw = (name, raw_bytes, hashlib.sha1(name.encode()).hexdigest())
                zipped = (name + ".zstd", raw_bytes * (60 + i % 7) // 200,
                          hashlib.sha1(name.encode() + b".zstd").hexdigest())
                out.write((", " if i else "")
                          + entry % {"raw_data": info % raw, "samples": samples, "zip_data": info % zipped})
                if writer:
                    writer.append(samples, line % {"raw_data": info_line % raw, "zip_data": info_line % zipped})
            out.write('], "version": 2}')
        if writer:
            writer.commit({"bytes": os.path.getsize(index_tmp)})
        fmt.write_meta(root, {
            "block_tokens": block_tokens, "dtype": dtype, "vocab_size": vocab_size,
            "padded_vocab_size": pad_vocab(vocab_size), "eos_id": 0, "bos_id": 1, "pad_id": 2,
            "tokenizer_sha256": hashlib.sha256(b"generated").hexdigest(), "documents": tokens // 2000 + 1,
            "tokens": tokens, "blocks": blocks, "num_inputs": math.ceil(shards / SHARDS_PER_PART),
            "text_field": "text", "compression": "zstd", "hashes": ["sha1"]})
        os.replace(index_tmp, os.path.join(root, INDEX_FILE))
    except BaseException:
        if writer:
            writer.discard()
        if os.path.exists(index_tmp):
            os.unlink(index_tmp)
        raise
    return {"shards": shards, "blocks": blocks, "tokens": tokens, "seconds": round(time.perf_counter() - start, 3)}
