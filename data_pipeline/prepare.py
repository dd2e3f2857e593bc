"""`liquid data prepare`: raw documents -> tokenized blocks (data_pipeline/format.py) -> MDS shards.

One Ray task (or an in-process call) per input file writes <output>/parts/NNNNN; one index.json lists them all.
"""
from __future__ import annotations

import collections
import copy
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import numpy as np

from data_pipeline import format as fmt
from data_pipeline.sources import SourceStats, expand_inputs, iter_texts
from data_pipeline.tokenizer import TextTokenizer

PARTS_DIR = "parts"
INDEX_FILE = "index.json"
ENCODE_BATCH = 256  # documents per TextTokenizer.encode_batch call
SKIP_KINDS = ("skipped_invalid_utf8", "skipped_empty")
SHARD_KEYS = ("raw_data", "zip_data", "raw_meta", "zip_meta")


class BlockPacker:
    """Token stream -> blocks of exactly `block_tokens`, each with the offsets where documents start.

    MDS cannot encode an empty ndarray, so a block inside one long document (no start in it) stores
    doc_starts = [block_tokens]: past every block's end, dropped by `doc_starts[doc_starts < num_tokens]`.
    """

    def __init__(self, block_tokens: int, dtype: str, eos_id: int, fill_id: int, emit):
        self.buf = np.empty(block_tokens, dtype=dtype)
        self.eos_id, self.fill_id, self.emit = eos_id, fill_id, emit
        self.fill, self.starts, self.blocks, self.tokens = 0, [], 0, 0

    def add(self, ids: list[int]) -> None:
        """One document: its tokens then EOS. It starts in the block where its first token lands."""
        doc = np.asarray(ids + [self.eos_id], dtype=self.buf.dtype)
        self.starts.append(self.fill)  # fill < block_tokens: a full block is emitted at once
        pos = 0
        while pos < len(doc):
            n = min(len(doc) - pos, len(self.buf) - self.fill)
            self.buf[self.fill:self.fill + n] = doc[pos:pos + n]
            self.fill, pos = self.fill + n, pos + n
            if self.fill == len(self.buf):
                self._emit()
        self.tokens += len(doc)

    def finish(self) -> None:
        if self.fill:
            self._emit()

    def _emit(self) -> None:
        self.buf[self.fill:] = self.fill_id
        starts = self.starts or [len(self.buf)]  # see the class docstring
        self.emit({"tokens": self.buf.copy(), "doc_starts": np.asarray(starts, dtype=np.int32),
                   "num_tokens": int(self.fill)})
        self.fill, self.starts, self.blocks = 0, [], self.blocks + 1


def _is_remote(output: str) -> bool:
    return urllib.parse.urlparse(str(output)).scheme != ""


def _batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class BadInput(ValueError):
    """An input file that cannot be read (corrupt, not valid JSON, no text field): its message names it."""


def _input_texts(path, text_field: str, stats: SourceStats):
    try:
        yield from iter_texts(path, text_field=text_field, stats=stats)
    except ValueError as err:
        raise BadInput(str(err)) from None


def prepare_file(index: int, path: str, output: str, tokenizer: str, *, eos_token: str | None = None,
                 text_field: str = "text", block_tokens: int = fmt.BLOCK_TOKENS, compression: str | None = "zstd",
                 hashes=("sha1",), size_limit="64mb", on_batch=None, skip_bad: bool = False) -> dict:
    """Input file number `index` -> shards in <output>/parts/{index:05d}; returns its stats and part index.
    skip_bad: a file that cannot be read leaves no shards and is reported in the result ("bad_input")
    instead of stopping the run (a remote output may keep the objects uploaded before the error; the
    index never refers to them)."""
    from streaming import MDSWriter

    start = time.perf_counter()
    tok = TextTokenizer(tokenizer, eos_token=eos_token)
    part = f"{output.rstrip('/')}/{PARTS_DIR}/{index:05d}"
    cache = tempfile.mkdtemp(prefix="liquid-prepare-") if _is_remote(output) else None  # shards until uploaded
    writer = MDSWriter(out=(f"{cache}/{index:05d}", part) if cache else part, compression=compression,
                       columns=fmt.mds_columns(tok.vocab_size), hashes=list(hashes), size_limit=size_limit,
                       exist_ok=True)  # exist_ok: a retried task starts its part afresh
    fill_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
    packer = BlockPacker(block_tokens, fmt.token_dtype(tok.vocab_size), tok.eos_id, fill_id, writer.write)
    stats = SourceStats()
    try:
        seen = (0, 0, 0)
        for batch in _batches(_input_texts(path, text_field, stats), ENCODE_BATCH):
            for ids in tok.encode_batch(batch):
                packer.add(ids)
            if on_batch is not None:
                now = (stats.documents, packer.tokens, stats.bytes)
                on_batch(*(a - b for a, b in zip(now, seen)))
                seen = now
        packer.finish()
        writer.finish()
    except BadInput as err:
        writer.cancel_future_jobs()
        if not skip_bad:
            raise
        if not _is_remote(output):
            shutil.rmtree(part, ignore_errors=True)
        return {"index": index, "path": str(path), "documents": 0, "tokens": 0, "blocks": 0, "bytes_in": 0,
                "shards": 0, "bytes_written": 0, "skipped": {k: 0 for k in SKIP_KINDS}, "skipped_where": [],
                "seconds": round(time.perf_counter() - start, 3), "part_index": {"version": 2, "shards": []},
                "bad_input": str(err)}
    except BaseException:
        writer.cancel_future_jobs()
        raise
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    part_index = {"version": 2, "shards": writer.shards}
    return {"index": index, "path": str(path), "documents": stats.documents, "tokens": packer.tokens,
            "blocks": packer.blocks, "bytes_in": stats.bytes, "shards": len(writer.shards),
            "bytes_written": sum(_shard_file(s)["bytes"] for s in writer.shards),
            "skipped": {k: getattr(stats, k) for k in SKIP_KINDS}, "skipped_where": stats.skipped_where,
            "seconds": round(time.perf_counter() - start, 3), "part_index": part_index}


def _shard_file(shard: dict) -> dict:
    """The file a shard is stored as: the compressed one when there is one."""
    return shard.get("zip_data") or shard["raw_data"]


def merge_parts(part_indexes: list[tuple[str, dict]]) -> dict:
    """[(relative dir, part index)] -> one MDS index whose basenames are relative to the dataset root.

    The same layout `streaming.base.util.merge_index` writes, but it keeps only the last directory
    name of a partition, which would lose the `parts/` level.
    """
    shards = []
    for rel, part in part_indexes:
        for shard in copy.deepcopy(part["shards"]):
            for key in SHARD_KEYS:
                if shard.get(key):
                    shard[key]["basename"] = f"{rel}/{shard[key]['basename']}"
            shards.append(shard)
    return {"version": 2, "shards": shards}


class Progress:
    """One self-overwriting line on stderr: files, documents, tokens, input MB/s."""

    def __init__(self, enabled: bool, files: int, every_s: float = 0.25):
        self.enabled, self.files, self.every_s = enabled, files, every_s
        self.start = self.last = time.perf_counter()
        self.done = self.documents = self.tokens = self.bytes = 0

    def add(self, documents: int, tokens: int, nbytes: int, files: int = 0) -> None:
        self.documents, self.tokens, self.bytes = self.documents + documents, self.tokens + tokens, self.bytes + nbytes
        self.done += files
        now = time.perf_counter()
        if self.enabled and (files or now - self.last >= self.every_s):
            self.last = now
            mb_s = self.bytes / max(now - self.start, 1e-9) / 1e6
            sys.stderr.write(f"\r[prepare] files {self.done}/{self.files}  documents {self.documents:,}  "
                             f"tokens {self.tokens:,}  {mb_s:.1f} MB/s ")
            sys.stderr.flush()

    def close(self, tail: str) -> None:
        """The final line: the finished progress line and `tail`."""
        if self.enabled:
            sys.stderr.write(f"\r[prepare] files {self.done}/{self.files}  documents {self.documents:,}  "
                             f"tokens {self.tokens:,}  {self.bytes / 1e6:.1f} MB in; {tail}\n")
            sys.stderr.flush()


def _run_in_process(jobs: list[dict], progress: Progress) -> list[dict]:
    results = []
    for job in jobs:
        results.append(prepare_file(**job, on_batch=progress.add))
        progress.add(0, 0, 0, files=1)
    return results


def _run_ray(jobs: list[dict], ray_init: dict | None, num_tasks: int | None, progress: Progress) -> list[dict]:
    """One Ray task per file, at most `num_tasks` in flight (default: twice the cluster's CPUs); reuses an
    initialised Ray, stops only its own."""
    import logging

    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(**{**ray_init, "include_dashboard": False}, logging_level=logging.WARNING)
    task = ray.remote(num_cpus=1)(prepare_file)
    # In flight: enough to keep every CPU of the cluster busy, not every file at once (a corpus of 100K files
    # would hold 100K task refs and make each ray.wait scan them all: quadratic in the number of files).
    limit = num_tasks or max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
    queue, pending, results = collections.deque(jobs), {}, []
    try:
        while queue or pending:
            while queue and len(pending) < limit:
                job = queue.popleft()
                pending[task.remote(**job)] = job
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                pending.pop(ref)
                res = ray.get(ref)
                results.append(res)
                progress.add(res["documents"], res["tokens"], res["bytes_in"], files=1)
    except ray.exceptions.RayTaskError as err:
        for ref in pending:
            ray.cancel(ref)
        raise (err.cause if isinstance(err.cause, Exception) else err) from None
    finally:
        if started:
            ray.shutdown()
    return sorted(results, key=lambda r: r["index"])


def _check_ray(use_ray: bool, ray_init: dict | None) -> None:
    """Which Ray to start, and where its processes may listen, is the caller's decision (cluster/safety.py)."""
    if use_ray and ray_init is None:
        import ray

        if not ray.is_initialized():
            raise ValueError("prepare: Ray is not running; pass ray_init (the ray.init arguments, e.g. "
                             "cluster.safety.ray_init_kwargs(address)) or use_ray=False")


def _check_args(block_tokens: int, compression, hashes, size_limit, tok: TextTokenizer) -> None:
    from streaming.base.compression import get_compressions, is_compression
    from streaming.base.hashing import get_hashes, is_hash
    from streaming.base.util import bytes_to_int

    if not 2 <= block_tokens < 2**31:
        raise ValueError(f"--block-tokens {block_tokens}: a block needs at least 2 tokens (and fewer than 2**31)")
    if tok.padded_vocab_size > 2**32:
        raise ValueError(f"{tok.path}: padded vocabulary {tok.padded_vocab_size} does not fit uint32 token ids")
    if compression is not None and not is_compression(compression):
        raise ValueError(f"--compression {compression!r}: expected one of {sorted(get_compressions())} or none")
    bad = [h for h in hashes if not is_hash(h)]
    if bad:
        raise ValueError(f"--hashes {bad}: unknown; expected some of {sorted(get_hashes())}")
    # Worst case: every document is one token + EOS, so half the offsets are document starts.
    biggest = block_tokens * (np.dtype(fmt.token_dtype(tok.vocab_size)).itemsize + 2) + 1024
    if bytes_to_int(size_limit) < biggest:
        raise ValueError(f"--size-limit {size_limit} is smaller than one block ({biggest} bytes at most)")


def _remote_exists(url: str, name: str) -> bool:
    from streaming.base.storage.upload import CloudUploader

    with tempfile.TemporaryDirectory() as tmp:
        uploader = CloudUploader.get((tmp, url), exist_ok=True)
        key = os.path.join(urllib.parse.urlparse(url).path.lstrip("/"), name)
        return key in (uploader.list_objects(name) or [])


def _prepare_output(output: str, overwrite: bool) -> None:
    """Refuse a finished dataset unless overwrite; clear what an earlier run of ours left locally."""
    exists = _remote_exists(output, INDEX_FILE) if _is_remote(output) else (Path(output) / INDEX_FILE).exists()
    if exists and not overwrite:
        raise ValueError(f"{output} already holds a dataset ({INDEX_FILE}); choose another output or pass --overwrite (overwrite=True)")
    if not _is_remote(output):
        shutil.rmtree(Path(output) / PARTS_DIR, ignore_errors=True)
        for name in (INDEX_FILE, fmt.META_FILE, fmt.SUMMARY_FILE):
            (Path(output) / name).unlink(missing_ok=True)


def _publish(output: str, index: dict, meta: dict, summary: dict, tokenizer: Path) -> None:
    """Metadata, summary and the tokenizer first, index.json last: a dataset with an index is complete.
    The tokenizer travels with the shards, so a run on them can export and evaluate with it."""
    from streaming.base.storage.upload import CloudUploader

    with tempfile.TemporaryDirectory() as tmp:
        uploader = CloudUploader.get((tmp, output), keep_local=True) if _is_remote(output) else None
        stage = Path(tmp) if uploader else Path(output)
        stage.mkdir(parents=True, exist_ok=True)
        fmt.write_meta(stage, meta)
        (stage / fmt.SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True))
        shutil.copyfile(tokenizer, stage / fmt.TOKENIZER_FILE)
        (stage / f".{INDEX_FILE}.tmp").write_text(json.dumps(index, sort_keys=True))
        os.replace(stage / f".{INDEX_FILE}.tmp", stage / INDEX_FILE)
        for name in (fmt.META_FILE, fmt.SUMMARY_FILE, fmt.TOKENIZER_FILE, INDEX_FILE) if uploader else ():
            uploader.upload_file(name)


def _skip_report(results: list[dict]) -> tuple[dict, list[str]]:
    skipped = {k.removeprefix("skipped_"): sum(r["skipped"][k] for r in results) for k in SKIP_KINDS}
    where = [w for r in results for w in r["skipped_where"]][:20]
    return skipped, where


PADDING_WARNING = 0.10  # summary_line points out a padding fraction above this


def _summarize(results: list[dict], output: str, seconds: float, block_tokens: int) -> dict:
    skipped, where = _skip_report(results)
    keys = ("documents", "tokens", "blocks", "shards", "bytes_in", "bytes_written")
    total = {k: sum(r[k] for r in results) for k in keys}
    files = [{k: v for k, v in r.items() if k != "part_index"} for r in results]
    seconds = max(seconds, 1e-6)
    # Each input file ends in a block of its own: many small files make mostly padding.
    padding = 1 - total["tokens"] / max(total["blocks"] * block_tokens, 1)
    return {"output": output, **total, "padding_fraction": round(max(padding, 0.0), 4), "seconds": round(seconds, 3),
            "tokens_per_s": round(total["tokens"] / seconds, 1),
            "mb_per_s": round(total["bytes_in"] / seconds / 1e6, 3), "skipped": skipped, "skipped_where": where,
            "num_inputs": len(results), "inputs": [r["path"] for r in results], "files": files,
            "bad_inputs": [r["bad_input"] for r in results if "bad_input" in r]}


def prepare(inputs: list[str], output: str, tokenizer: str, *, text_field: str = "text",
            block_tokens: int = fmt.BLOCK_TOKENS, compression: str | None = "zstd", hashes=("sha1",),
            ray_init: dict | None = None, num_tasks: int | None = None, progress: bool = True,
            size_limit="64mb", overwrite: bool = False, use_ray: bool = True, eos_token: str | None = None,
            skip_bad: bool = False) -> dict:
    """Tokenize `inputs` into MDS shards under `output` (a directory or a remote URL); returns the summary.
    skip_bad: input files that cannot be read are left out and listed in the summary ("bad_inputs")
    instead of stopping the run.

    use_ray: one Ray task per file, on the Ray this process runs, else one started with `ray_init` (the
    `ray.init` arguments; `liquid data prepare` passes cluster.safety.ray_init_kwargs(--ray-address)) and
    stopped at the end. use_ray=False runs every file in this process. num_tasks: most Ray tasks in flight
    (default twice the cluster's CPUs).
    Same inputs and tokenizer -> byte-identical shards and index.json, with Ray or without.
    """
    start = time.perf_counter()
    compression = None if compression in (None, "", "none") else compression
    hashes = list(hashes or ())
    tok = TextTokenizer(tokenizer, eos_token=eos_token)
    _check_args(block_tokens, compression, hashes, size_limit, tok)
    _check_ray(use_ray, ray_init)
    files = expand_inputs([inputs] if isinstance(inputs, (str, Path)) else list(inputs))
    output = str(output).removeprefix("file://")
    output = output.rstrip("/") if _is_remote(output) else str(Path(output).resolve())
    _prepare_output(output, overwrite)
    jobs = [dict(index=i, path=str(p.resolve()), output=output, tokenizer=str(tok.path.resolve()),
                 eos_token=eos_token, text_field=text_field, block_tokens=block_tokens, compression=compression,
                 hashes=hashes, size_limit=size_limit, skip_bad=skip_bad) for i, p in enumerate(files)]
    bar = Progress(progress, len(jobs))
    if not use_ray:
        results = _run_in_process(jobs, bar)
    else:
        results = _run_ray(jobs, ray_init, num_tasks, bar)
    if sum(r["documents"] for r in results) == 0:
        _fail_empty(results, output)
    summary = _summarize(results, output, time.perf_counter() - start, block_tokens)
    index = merge_parts([(f"{PARTS_DIR}/{r['index']:05d}", r["part_index"]) for r in results])
    meta = {"block_tokens": block_tokens, "dtype": fmt.token_dtype(tok.vocab_size), "vocab_size": tok.vocab_size,
            "padded_vocab_size": tok.padded_vocab_size, "eos_id": tok.eos_id, "bos_id": tok.bos_id,
            "pad_id": tok.pad_id if tok.pad_id is not None else tok.eos_id, "tokenizer_sha256": tok.sha256,
            "documents": summary["documents"], "tokens": summary["tokens"], "blocks": summary["blocks"],
            "num_inputs": len(results), "text_field": text_field, "compression": compression, "hashes": hashes}
    _publish(output, index, meta, summary, tok.path)
    bar.close(f"done in {summary['seconds']:.1f}s: {summary['blocks']:,} blocks, {summary['shards']:,} shards, "
              f"{summary['bytes_written'] / 1e6:.1f} MB -> {output}")
    return summary


def _fail_empty(results: list[dict], output: str) -> None:
    skipped, where = _skip_report(results)
    if not _is_remote(output):
        shutil.rmtree(Path(output) / PARTS_DIR, ignore_errors=True)
    kinds = ", ".join(f"{k}: {n}" for k, n in skipped.items())
    bad = [r["bad_input"] for r in results if "bad_input" in r]
    raise ValueError(f"no documents in {len(results)} input file(s): {sum(skipped.values())} records skipped "
                     f"({kinds})" + (f"; first: {', '.join(where[:3])}" if where else "")
                     + (f"; {len(bad)} file(s) cannot be read: {'; '.join(bad[:3])}" if bad else ""))


def summary_line(summary: dict) -> str:
    skipped = ", ".join(f"{n:,} {k}" for k, n in summary["skipped"].items() if n)
    return (f"{summary['documents']:,} documents, {summary['tokens']:,} tokens -> {summary['blocks']:,} blocks in "
            f"{summary['shards']:,} shards ({summary['bytes_written'] / 1e6:.1f} MB) from {summary['num_inputs']} "
            f"file(s) in {summary['seconds']:.1f}s ({summary['tokens_per_s']:,.0f} tokens/s, "
            f"{summary['mb_per_s']:.1f} MB/s)" + (f"; skipped {skipped}" if skipped else "")
            + f" -> {summary['output']}" + _bad_inputs_note(summary) + _padding_note(summary))


def _bad_inputs_note(summary: dict) -> str:
    bad = summary.get("bad_inputs", [])
    if not bad:
        return ""
    return f"\nleft out {len(bad)} input file(s) that cannot be read: " + "; ".join(bad[:3]) + (
        " ..." if len(bad) > 3 else "")


def _padding_note(summary: dict) -> str:
    fraction = summary.get("padding_fraction", 0.0)
    if fraction <= PADDING_WARNING:
        return ""
    return (f"\nwarning: {fraction:.0%} of the blocks' tokens are padding (each of the {summary['num_inputs']} "
            "input files ends in a block of its own; join small files into larger ones, or lower --block-tokens)")


def verify_shards(root: str | Path) -> list[str]:
    """Re-hash every shard file index.json lists (compressed and/or raw, whichever is present) against
    the sizes and hashes recorded there; returns the basenames of missing or corrupt shards."""
    from streaming.base.hashing import get_hash

    root = Path(root)
    bad = []
    for shard in json.loads((root / INDEX_FILE).read_text())["shards"]:
        infos = [shard[k] for k in ("zip_data", "raw_data")
                 if shard.get(k) and (root / shard[k]["basename"]).exists()]
        ok = bool(infos)
        for info in infos:
            data = (root / info["basename"]).read_bytes()
            ok = ok and len(data) == info["bytes"] and all(
                get_hash(algo, data) == want for algo, want in info.get("hashes", {}).items())
        if not ok:
            bad.append(_shard_file(shard)["basename"])
    return bad
