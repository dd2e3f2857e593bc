"""`liquid data prepare`: raw documents -> tokenized blocks (data_pipeline/format.py) -> MDS shards.

Input files are grouped, in input order, into tasks of about `task_mb` MB (plan_tasks); one Ray task (or an
in-process call) per group packs its files' documents into one token stream, so only the group's last block is
padded, and writes <output>/parts/NNNNN (NNNNN: the task number); one index.json lists them all.
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
from data_pipeline.shard_table import TABLE_FILES, write_table
from data_pipeline.sources import SourceStats, expand_inputs, iter_texts
from data_pipeline.tokenizer import TextTokenizer

PARTS_DIR = "parts"
INDEX_FILE = "index.json"
ENCODE_BATCH = 256  # documents per TextTokenizer.encode_batch call
SKIP_KINDS = ("skipped_invalid_utf8", "skipped_empty")
SHARD_KEYS = ("raw_data", "zip_data", "raw_meta", "zip_meta")
# Input MB (2**20 bytes, on disk) per task; see plan_tasks. One padded block per task then costs at most ~0.1%
# (256 MB of text is ~64M tokens, ~1,000 blocks of 65,537), a task tokenizes in ~100 s on one CPU (so a retry or
# the slowest task stays short and a cluster's CPUs stay balanced), and a file buffered under --skip-bad-files
# (below this size) stays well under a GB of tokens.
TASK_MB = 256


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
        self.add_doc(np.asarray(ids + [self.eos_id], dtype=self.buf.dtype))

    def add_doc(self, doc: np.ndarray) -> None:
        """One document's tokens, already ending in EOS."""
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


def plan_tasks(sizes: list[int], target_bytes: int) -> list[list[int]]:
    """Input files (their sizes in bytes, in input order) -> tasks: lists of consecutive file numbers.

    Files join the open task, in input order, until it holds at least `target_bytes`; a file of
    `target_bytes` or more is a task of its own, so every file of a task of several is smaller than the
    target. Only the sizes decide: the same inputs give the same tasks, with Ray or without. 0: one task per file.
    """
    tasks, group, held = [], [], 0
    for i, size in enumerate(sizes):
        if size >= target_bytes:
            if group:
                tasks.append(group)
                group, held = [], 0
            tasks.append([i])
            continue
        group.append(i)
        held += size
        if held >= target_bytes:
            tasks.append(group)
            group, held = [], 0
    if group:
        tasks.append(group)
    return tasks


def _file_stats(index: int, task: int, path, stats: SourceStats, tokens: int, start: float) -> dict:
    return {"index": index, "task": task, "path": str(path), "documents": stats.documents, "tokens": tokens,
            "bytes_in": stats.bytes, "skipped": {k: getattr(stats, k) for k in SKIP_KINDS},
            "skipped_where": stats.skipped_where, "seconds": round(time.perf_counter() - start, 3)}


def _pack_file(index: int, task: int, path: str, tok: TextTokenizer, packer: BlockPacker, text_field: str, *,
               whole: bool, on_progress) -> dict:
    """Input file number `index` -> its documents into `packer`; returns the file's stats.

    whole: tokenize the whole file before any of it goes into the packer, so a file that cannot be read
    adds nothing and the error comes back in the stats ("bad_input"); memory: the file's tokens (the dataset's
    dtype). Else documents go in as they are read, and BadInput is raised."""
    start, stats, tokens, seen = time.perf_counter(), SourceStats(), 0, (0, 0, 0)
    held: list[tuple[np.ndarray, np.ndarray]] = []  # whole: (tokens of a batch's documents, where each ends)
    try:
        for batch in _batches(_input_texts(path, text_field, stats), ENCODE_BATCH):
            docs = [np.asarray(ids + [tok.eos_id], dtype=packer.buf.dtype) for ids in tok.encode_batch(batch)]
            tokens += sum(len(d) for d in docs)
            if whole:
                held.append((np.concatenate(docs), np.cumsum([len(d) for d in docs])[:-1]))
            else:
                for doc in docs:
                    packer.add_doc(doc)
            if on_progress is not None:
                now = (stats.documents, tokens, stats.bytes)
                on_progress(*(a - b for a, b in zip(now, seen)))
                seen = now
    except BadInput as err:
        if on_progress is not None:
            on_progress(*(-n for n in seen))  # its documents are not in the dataset after all
        if not whole:
            raise
        return {**_file_stats(index, task, path, SourceStats(), 0, start), "bad_input": str(err)}
    for flat, ends in held:
        for doc in np.split(flat, ends):
            packer.add_doc(doc)
    return _file_stats(index, task, path, stats, tokens, start)


def prepare_task(index: int, paths: list[str], output: str, tokenizer: str, *, first: int = 0,
                 eos_token: str | None = None, text_field: str = "text", block_tokens: int = fmt.BLOCK_TOKENS,
                 compression: str | None = "zstd", hashes=("sha1",), size_limit="64mb", on_progress=None,
                 skip_bad: bool = False) -> dict:
    """Task number `index`: input files `paths` (input numbers first, first + 1, ...) -> one token stream in
    blocks (only the last one padded) -> shards in <output>/parts/{index:05d}; returns the task's stats, each
    file's stats ("files") and the part index.
    skip_bad: a file that cannot be read adds no documents and is reported in its stats ("bad_input")
    instead of stopping the run. In a task of several files each file is tokenized whole before it is packed
    (those files are small: see plan_tasks), so the others keep all their documents; a task of one file then
    leaves no shards (a remote output may keep the objects uploaded before the error; the index never refers
    to them). on_progress(documents, tokens, bytes, files): called as documents are read and files finish."""
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
    whole = skip_bad and len(paths) > 1
    files = []
    try:
        for number, path in enumerate(paths, start=first):
            files.append(_pack_file(number, index, path, tok, packer, text_field, whole=whole,
                                    on_progress=on_progress))
            if on_progress is not None:
                on_progress(0, 0, 0, 1)
        packer.finish()
        writer.finish()
    except BadInput as err:  # a task of one file, or not skip_bad
        writer.cancel_future_jobs()
        if not skip_bad:
            raise
        if not _is_remote(output):
            shutil.rmtree(part, ignore_errors=True)
        if on_progress is not None:
            on_progress(0, 0, 0, 1)
        files = [{**_file_stats(first, index, paths[0], SourceStats(), 0, start), "bad_input": str(err)}]
        return _task_stats(index, files, 0, [], start)
    except BaseException:
        writer.cancel_future_jobs()
        raise
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    return _task_stats(index, files, packer.blocks, writer.shards, start)


def _task_stats(index: int, files: list[dict], blocks: int, shards: list[dict], start: float) -> dict:
    return {"index": index, "part": f"{PARTS_DIR}/{index:05d}", "inputs": [f["index"] for f in files],
            **{k: sum(f[k] for f in files) for k in ("documents", "tokens", "bytes_in")}, "blocks": blocks,
            "shards": len(shards), "bytes_written": sum(_shard_file(s)["bytes"] for s in shards),
            "seconds": round(time.perf_counter() - start, 3), "files": files,
            "part_index": {"version": 2, "shards": shards}}


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
    return [prepare_task(**job, on_progress=progress.add) for job in jobs]


def _run_ray(jobs: list[dict], ray_init: dict | None, num_tasks: int | None, progress: Progress) -> list[dict]:
    """One Ray task per job (a group of input files), at most `num_tasks` in flight (default: twice the
    cluster's CPUs); reuses an initialised Ray, stops only its own."""
    import logging

    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(**{**ray_init, "include_dashboard": False}, logging_level=logging.WARNING)
    task = ray.remote(num_cpus=1)(prepare_task)
    # In flight: enough to keep every CPU of the cluster busy, not every task at once (a corpus of 100K tasks
    # would hold 100K task refs and make each ray.wait scan them all: quadratic in the number of tasks).
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
                progress.add(res["documents"], res["tokens"], res["bytes_in"], files=len(res["files"]))
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


def _check_args(block_tokens: int, compression, hashes, size_limit, task_mb: float, tok: TextTokenizer) -> None:
    from streaming.base.compression import get_compressions, is_compression
    from streaming.base.hashing import get_hashes, is_hash
    from streaming.base.util import bytes_to_int

    if not 2 <= block_tokens < 2**31:
        raise ValueError(f"--block-tokens {block_tokens}: a block needs at least 2 tokens (and fewer than 2**31)")
    if not task_mb >= 0:
        raise ValueError(f"--task-mb {task_mb}: expected input MB per task, 0 or more (0: one task per input file)")
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
        for name in (INDEX_FILE, fmt.META_FILE, fmt.SUMMARY_FILE, *TABLE_FILES):
            (Path(output) / name).unlink(missing_ok=True)


def _publish(output: str, index: dict, meta: dict, summary: dict, tokenizer: Path) -> None:
    """Metadata, summary, the tokenizer and the shard table (data_pipeline/shard_table.py) first, index.json
    last: a dataset with an index is complete. The tokenizer travels with the shards, so a run on them can
    export and evaluate with it; the table lets the loader open the dataset without parsing index.json."""
    from streaming.base.storage.upload import CloudUploader

    with tempfile.TemporaryDirectory() as tmp:
        uploader = CloudUploader.get((tmp, output), keep_local=True) if _is_remote(output) else None
        stage = Path(tmp) if uploader else Path(output)
        stage.mkdir(parents=True, exist_ok=True)
        fmt.write_meta(stage, meta)
        (stage / fmt.SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True))
        shutil.copyfile(tokenizer, stage / fmt.TOKENIZER_FILE)
        text = json.dumps(index, sort_keys=True)
        tables = write_table(stage, index["shards"], index_bytes=len(text.encode()))
        (stage / f".{INDEX_FILE}.tmp").write_text(text)
        os.replace(stage / f".{INDEX_FILE}.tmp", stage / INDEX_FILE)
        for name in (fmt.META_FILE, fmt.SUMMARY_FILE, fmt.TOKENIZER_FILE, *tables, INDEX_FILE) if uploader else ():
            uploader.upload_file(name)


def _skip_report(files: list[dict]) -> tuple[dict, list[str]]:
    skipped = {k.removeprefix("skipped_"): sum(f["skipped"][k] for f in files) for k in SKIP_KINDS}
    where = [w for f in files for w in f["skipped_where"]][:20]
    return skipped, where


PADDING_WARNING = 0.10  # summary_line points out a padding fraction above this


def _summarize(results: list[dict], output: str, seconds: float, block_tokens: int, task_mb: float) -> dict:
    """The run's totals; "files": each input file's documents, tokens, bytes and skips (and "task", the part it
    went to); "tasks": each task's input file numbers ("inputs"), blocks, shards and bytes written."""
    files = [f for r in results for f in r["files"]]
    skipped, where = _skip_report(files)
    keys = ("documents", "tokens", "blocks", "shards", "bytes_in", "bytes_written")
    total = {k: sum(r[k] for r in results) for k in keys}  # a task's documents, tokens, bytes_in: its files'
    tasks = [{k: v for k, v in r.items() if k not in ("files", "part_index")} for r in results]
    seconds = max(seconds, 1e-6)
    # Each task ends in a padded block of its own: many small tasks make mostly padding.
    padding = 1 - total["tokens"] / max(total["blocks"] * block_tokens, 1)
    return {"output": output, **total, "padding_fraction": round(max(padding, 0.0), 4), "seconds": round(seconds, 3),
            "tokens_per_s": round(total["tokens"] / seconds, 1),
            "mb_per_s": round(total["bytes_in"] / seconds / 1e6, 3), "skipped": skipped, "skipped_where": where,
            "num_inputs": len(files), "inputs": [f["path"] for f in files], "files": files,
            "num_tasks": len(tasks), "task_mb": task_mb, "block_tokens": block_tokens, "tasks": tasks,
            "bad_inputs": [f["bad_input"] for f in files if "bad_input" in f]}


def prepare(inputs: list[str], output: str, tokenizer: str, *, text_field: str = "text",
            block_tokens: int = fmt.BLOCK_TOKENS, compression: str | None = "zstd", hashes=("sha1",),
            ray_init: dict | None = None, num_tasks: int | None = None, progress: bool = True,
            size_limit="64mb", overwrite: bool = False, use_ray: bool = True, eos_token: str | None = None,
            skip_bad: bool = False, task_mb: float = TASK_MB) -> dict:
    """Tokenize `inputs` into MDS shards under `output` (a directory or a remote URL); returns the summary.
    skip_bad: input files that cannot be read are left out and listed in the summary ("bad_inputs")
    instead of stopping the run.

    task_mb: input files are grouped, in input order, into tasks of at least this many MB (2**20 bytes on
    disk; a larger file is a task of its own, 0 makes every file one); a task's files share one token stream,
    so only its last block is padded (plan_tasks, prepare_task).
    use_ray: one Ray task per group, on the Ray this process runs, else one started with `ray_init` (the
    `ray.init` arguments; `liquid data prepare` passes cluster.safety.ray_init_kwargs(--ray-address)) and
    stopped at the end. use_ray=False runs every task in this process. num_tasks: most Ray tasks in flight
    (default twice the cluster's CPUs).
    Same inputs and tokenizer -> byte-identical shards and index.json, with Ray or without.
    """
    start = time.perf_counter()
    compression = None if compression in (None, "", "none") else compression
    hashes = list(hashes or ())
    tok = TextTokenizer(tokenizer, eos_token=eos_token)
    _check_args(block_tokens, compression, hashes, size_limit, task_mb, tok)
    _check_ray(use_ray, ray_init)
    files = expand_inputs([inputs] if isinstance(inputs, (str, Path)) else list(inputs))
    output = str(output).removeprefix("file://")
    output = output.rstrip("/") if _is_remote(output) else str(Path(output).resolve())
    _prepare_output(output, overwrite)
    tasks = plan_tasks([p.stat().st_size for p in files], int(task_mb * 2**20))
    jobs = [dict(index=t, paths=[str(files[i].resolve()) for i in group], first=group[0], output=output,
                 tokenizer=str(tok.path.resolve()), eos_token=eos_token, text_field=text_field,
                 block_tokens=block_tokens, compression=compression, hashes=hashes, size_limit=size_limit,
                 skip_bad=skip_bad) for t, group in enumerate(tasks)]
    bar = Progress(progress, len(files))
    if not use_ray:
        results = _run_in_process(jobs, bar)
    else:
        results = _run_ray(jobs, ray_init, num_tasks, bar)
    if sum(r["documents"] for r in results) == 0:
        _fail_empty(results, output)
    summary = _summarize(results, output, time.perf_counter() - start, block_tokens, task_mb)
    index = merge_parts([(r["part"], r["part_index"]) for r in results])
    meta = {"block_tokens": block_tokens, "dtype": fmt.token_dtype(tok.vocab_size), "vocab_size": tok.vocab_size,
            "padded_vocab_size": tok.padded_vocab_size, "eos_id": tok.eos_id, "bos_id": tok.bos_id,
            "pad_id": tok.pad_id if tok.pad_id is not None else tok.eos_id, "tokenizer_sha256": tok.sha256,
            "documents": summary["documents"], "tokens": summary["tokens"], "blocks": summary["blocks"],
            "num_inputs": len(files), "text_field": text_field, "compression": compression, "hashes": hashes}
    _publish(output, index, meta, summary, tok.path)
    bar.close(f"done in {summary['seconds']:.1f}s: {summary['blocks']:,} blocks, {summary['shards']:,} shards, "
              f"{summary['bytes_written'] / 1e6:.1f} MB -> {output}")
    return summary


def _fail_empty(results: list[dict], output: str) -> None:
    files = [f for r in results for f in r["files"]]
    skipped, where = _skip_report(files)
    if not _is_remote(output):
        shutil.rmtree(Path(output) / PARTS_DIR, ignore_errors=True)
    kinds = ", ".join(f"{k}: {n}" for k, n in skipped.items())
    bad = [f["bad_input"] for f in files if "bad_input" in f]
    raise ValueError(f"no documents in {len(files)} input file(s): {sum(skipped.values())} records skipped "
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
    tasks = summary.get("num_tasks", summary["num_inputs"])
    if tasks == 1:
        why = "the data fills few blocks and ends in a padded one; lower --block-tokens"
    else:
        why = (f"each of the {tasks} tasks ends in a padded block; raise --task-mb (input MB grouped into a task, "
               f"now {summary.get('task_mb', 0):g}), join small files into larger ones, or lower --block-tokens")
    return f"\nwarning: {fraction:.0%} of the blocks' tokens are padding ({why})"


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
