"""The training data loader: MDS blocks (local or remote) -> the run's global row order -> this rank's rows.

The order (data_pipeline/order.py) is global and layout-free: global step s consumes global rows
[s * B, (s + 1) * B) (B = train.global_batch_size) whatever the number of data-parallel ranks, the
micro-batch size or the accumulation; data-parallel rank r of `world` reads rows r * B / world ... of
each step, in micro-batches. So the position is one number, the global rows consumed: a checkpoint taken
at one layout resumes at any other exactly (the same rows in every step), which is what resharding and
elastic resizing need.

Every block gives rows_per_block rows (seq_len + 1 tokens each, format.py); a row past a block's real
tokens is all padding (labels -100), so the row count of every block is known without reading it.
`liquid data prepare` packs the tails of files together, so such rows are rare; the training loss is
token-weighted over the global batch, so they weigh nothing.

Storage stays mosaicml-streaming's: MDS shards and index.json, its downloader (CloudDownloader), its
decompression and hashing, its shard readers (`reader_from_json`). What does not scale is replaced:
`StreamingDataset` loads every shard's index entry into each process (3 GiB and 29 s per rank at 10T
tokens) and builds each epoch's whole sample order; here a memory-mapped shard table
(data_pipeline/shard_table.py) locates a block, and the order is computed for the rows asked for.

Remote shards are downloaded into `cache_dir/<hash of the URL>` (one download per node: the ranks of a
node take a file lock per shard), hash-checked, and read from there.

State: {"version", "rows": global rows of the finished steps, "in_step": rows this rank took of the
current step, "rank", "world", "global_batch", "config"}. At a step boundary (in_step 0, where
checkpoints are taken) it does not depend on the rank or the world: any layout resumes from it exactly.
A change of streams, proportions, seed, seq_len, block size, shuffle settings or dataset is refused.

Data-mixture phases (`phases`, data.phases; order.py PhasedOrder): from its first step each phase draws
by its own proportions. The state's config records them; a resume may change or add phases that start
after the position (the order of a phase depends only on the phases before it), never one that has begun.
A run without phases resumes with phases whose first has the streams' proportions (the same order).
"""
from __future__ import annotations

import collections
import fcntl
import hashlib
import json
import os
import urllib.parse
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_pipeline import format as fmt

STATE_VERSION = 2
IGNORE_INDEX = -100
INDEX_FILE = "index.json"
AGREED_META = ("block_tokens", "dtype", "tokenizer_sha256")
_HASH_PREFERENCE = ("xxh3_64", "xxh64", "xxh128", "sha1", "md5", "sha256")


class DataCorruptionError(ValueError):
    """A shard whose bytes do not match the size or hash recorded in its index."""


@dataclass(frozen=True)
class StreamSpec:
    path: str  # a local directory or a URL such as s3://bucket/prefix
    proportion: float | None = None

    @property
    def is_remote(self) -> bool:
        return "://" in self.path and urllib.parse.urlparse(self.path).scheme != "file"


def _not_prepared(path: str, name: str) -> str:
    return f"{path} has no {name}: it is not a prepared dataset; run `liquid data prepare` to write one"


def _stream_root(spec: StreamSpec, cache_dir: str | os.PathLike | None) -> str:
    """Where streaming reads a stream: the directory itself, or a per-URL folder of the cache."""
    if not spec.is_remote:
        return os.path.abspath(spec.path)
    if cache_dir is None:
        raise ValueError(f"{spec.path} is remote: give a local cache directory (data.cache_dir)")
    digest = hashlib.sha256(spec.path.rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(os.path.abspath(cache_dir), digest)


def _read_meta(spec: StreamSpec, root: str) -> dict:
    if not spec.is_remote:
        for name in (fmt.META_FILE, INDEX_FILE):
            if not os.path.isfile(os.path.join(root, name)):
                raise ValueError(_not_prepared(spec.path, name))
        return json.loads(Path(root, fmt.META_FILE).read_text())
    return json.loads(_fetch_remote_meta(spec.path, root))


def _fetch_remote_meta(url: str, root: str) -> str:
    """Download the metadata afresh; a cached copy that differs means the cache holds older data."""
    try:
        tmp = _download(url, root, fmt.META_FILE)
    except Exception as err:  # each storage client raises its own types (botocore ClientError, ...)
        raise ValueError(f"{_not_prepared(url, fmt.META_FILE)} ({err})") from err
    try:
        text = tmp.read_text()
    finally:
        tmp.unlink(missing_ok=True)
    cached = Path(root, fmt.META_FILE)
    if cached.exists() and cached.read_text() != text:
        raise ValueError(f"the cache {root} holds an older copy of {url}, which has been rewritten "
                         f"since; delete {root} and start again")
    # The ranks of a node all fetch it: replace the cached copy atomically, so no rank reads it half-written.
    fresh = Path(root, f".{fmt.META_FILE}.{os.getpid()}.new")
    fresh.write_text(text)
    os.replace(fresh, cached)
    return text


def dataset_tokenizer(specs: list[StreamSpec], cache_dir: str | os.PathLike | None) -> str | None:
    """The tokenizer `liquid data prepare` stored beside the shards of the first stream that has one: the
    local file, or for a remote dataset a copy fetched into its stream cache. None when none has one."""
    for spec in specs:
        if not spec.is_remote:
            path = Path(spec.path) / fmt.TOKENIZER_FILE
            if path.exists():
                return str(path)
            continue
        fetched = _fetch_remote_file(spec.path, _stream_root(spec, cache_dir), fmt.TOKENIZER_FILE)
        if fetched is not None:
            return fetched
    return None


def _fetch_remote_file(url: str, root: str, name: str) -> str | None:
    """<url>/<name> downloaded to <root>/<name> (replaced atomically: the ranks of a node may fetch it
    together); None when the remote has no such file."""
    try:
        tmp = _download(url, root, name)
    except Exception:  # noqa: BLE001 - each storage client raises its own "not found"
        return None
    target = os.path.join(root, name)
    os.replace(tmp, target)
    return target


def _download(url: str, root: str, name: str) -> Path:
    """<url>/<name> into a file of this process's own under <root> (removed if the download fails)."""
    from streaming.base.storage import CloudDownloader

    os.makedirs(root, exist_ok=True)
    tmp = Path(root, f".{Path(name).name}.{os.getpid()}.tmp")
    try:
        CloudDownloader.direct_download(f"{url.rstrip('/')}/{name}", str(tmp))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _check_streams(specs: list[StreamSpec]) -> None:
    if not specs:
        raise ValueError("no data streams given")
    given = [s.proportion is not None for s in specs]
    if any(given) and not all(given):
        raise ValueError("give a proportion for every stream or for none: "
                         + ", ".join(f"{s.path}={s.proportion}" for s in specs))
    if any(s.proportion is not None and s.proportion < 0 for s in specs):
        raise ValueError("stream proportions must be >= 0: " + ", ".join(f"{s.path}={s.proportion}" for s in specs))
    if all(given) and sum(s.proportion for s in specs) <= 0:
        raise ValueError("stream proportions sum to 0")


def _check_agreement(specs: list[StreamSpec], metas: list[dict]) -> None:
    for key in AGREED_META:
        for spec, meta in zip(specs, metas):
            if key not in meta:
                raise ValueError(f"{spec.path}/{fmt.META_FILE} lacks {key!r}; re-run `liquid data prepare`")
            if meta[key] != metas[0][key]:
                raise ValueError(f"streams {specs[0].path} and {spec.path} disagree on {key} "
                                 f"({metas[0][key]!r} vs {meta[key]!r}); mix only data prepared with "
                                 "the same tokenizer and block size")


def _pick_hash(hashes: dict) -> str | None:
    for algo in _HASH_PREFERENCE:
        if algo in hashes:
            return algo
    return min(hashes, default=None)


class _Stream:
    """One prepared dataset: where its shards are read from, its shard table and its hash algorithm."""

    def __init__(self, spec: StreamSpec, root: str, cache_dir, validate_hash: bool):
        from data_pipeline.shard_table import ShardTable

        self.spec, self.root = spec, root
        fetch = (lambda name: _fetch_remote_file(spec.path, root, name)) if spec.is_remote else None
        # A dataset prepared before the table existed gets one built once, beside the cache, not in the user's data.
        build_dir = root if spec.is_remote else (_table_dir(spec, cache_dir) if cache_dir is not None else None)
        try:
            self.table = ShardTable.open(root, fetch=fetch, build_dir=build_dir)
        except FileNotFoundError as err:
            raise ValueError(f"{_not_prepared(spec.path, INDEX_FILE)} ({err})") from err
        first = self.table.entry(0)
        self.algo = _pick_hash(first["raw_data"].get("hashes") or {}) if validate_hash else None
        if validate_hash and self.algo is None:
            warnings.warn(f"{spec.path}: the index records no shard hashes; only shard sizes are checked")
        # Where decompressed copies of a local dataset's compressed-only shards go (the user's data stays as it is).
        self.unpacked = _table_dir(spec, cache_dir) if cache_dir is not None and not spec.is_remote else None
        self._readers: dict[int, object] = {}

    @property
    def num_blocks(self) -> int:
        return int(self.table.num_samples)

    def reader(self, shard_id: int, dirname: str):
        """streaming's reader of a shard made local and checked under `dirname` (StreamingRows._ensure_shard)."""
        reader = self._readers.get(shard_id)
        if reader is None:
            from streaming.base.format import reader_from_json

            reader = self._readers[shard_id] = reader_from_json(dirname, None, self.table.entry(shard_id))
        return reader


def _table_dir(spec: StreamSpec, cache_dir) -> str:
    digest = hashlib.sha256(os.path.abspath(spec.path).encode()).hexdigest()[:16]
    return os.path.join(os.path.abspath(cache_dir), "tables", digest)


class _ShardCache:
    """The decompressed shard files a node keeps under its cache folders, at most `limit` bytes (None:
    unbounded). The ranks of a node share it: before a shard is written, the least recently used shards
    (by mtime: set when a rank downloads or checks one) are deleted until the new one fits, except those
    the caller still needs. A rank whose shard was deleted under it fetches it again (StreamingRows._block)."""

    def __init__(self, roots: list[str], limit: int | None):
        self.roots, self.limit, self._warned = roots, limit, False

    def files(self) -> list[tuple[float, int, str]]:
        found = []
        for root in self.roots:
            for folder, _, names in os.walk(root):
                for name in names:
                    if name.startswith("shard.") and name.endswith(".mds"):
                        path = os.path.join(folder, name)
                        try:
                            st = os.stat(path)
                        except FileNotFoundError:  # another rank evicted it meanwhile
                            continue
                        found.append((st.st_mtime, st.st_size, path))
        return found

    def usage(self) -> int:
        return sum(size for _, size, _ in self.files())

    def make_room(self, need: int, keep: set[str]) -> None:
        if self.limit is None:
            return
        files = self.files()
        usage = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if usage + need <= self.limit:
                return
            if path not in keep:
                Path(path).unlink(missing_ok=True)
                usage -= size
        if usage + need > self.limit and not self._warned:
            self._warned = True
            warnings.warn(f"data.cache_limit_gb={self.limit / 2**30:.3g} is smaller than the shards the ranks "
                          f"of this node read at once ({(usage + need) / 2**30:.3g} GiB); raise it")


def default_cache_limit(roots: list[str]) -> int:
    """80% of what the cache's disk has free, counting the shards already cached as free."""
    import shutil

    for root in roots:
        os.makedirs(root, exist_ok=True)
    cached = _ShardCache(roots, None).usage()
    return int(0.8 * (shutil.disk_usage(roots[0]).free + cached))


MAX_DEFAULT_LANES = 64
PLAN_AHEAD = 1024  # rows of this rank's order worked out at once (StreamingRows._plan)


def default_lanes(global_batch: int, epoch_blocks: int) -> int:
    """The largest divisor of the global batch up to MAX_DEFAULT_LANES and the epoch's blocks: enough lanes
    for every node of a 64-node job to read its own shards."""
    return max(d for d in range(1, min(global_batch, MAX_DEFAULT_LANES, epoch_blocks) + 1) if global_batch % d == 0)


class StreamingRows:
    """Micro-batches of rows for one data-parallel rank; see the module docstring.

    global_batch: rows per global step (train.global_batch_size), a multiple of `world`; default `world`
    (one row per rank per step). lanes: data.lanes (default `default_lanes`), see data_pipeline/order.py. record: a path to which each `next_batch` appends one JSON line of the
    rows it gave (global row number, and epoch, block and row within the block), for accounting tests.
    """

    def __init__(self, streams: list[StreamSpec], *, seq_len: int, seed: int, cache_dir: str | os.PathLike | None,
                 shuffle: bool = True, shuffle_buffer_blocks: int = 8, rank: int = 0, world: int = 1,
                 global_batch: int | None = None, lanes: int | None = None, validate_hash: bool = True,
                 predownload: int | None = None, record: str | os.PathLike | None = None,
                 cache_limit: int | None = None, phases: list[tuple[int, list[float]]] | None = None,
                 phase_names: list[str] | None = None):
        from data_pipeline.order import BlockOrder, PhasedOrder, RowOrder

        specs = [StreamSpec(s) if isinstance(s, str) else s for s in streams]
        _check_streams(specs)
        if not 0 <= rank < world:
            raise ValueError(f"data rank {rank} is not in [0, {world})")
        global_batch = world if global_batch is None else int(global_batch)
        if global_batch < world or global_batch % world:
            raise ValueError(f"train.global_batch_size={global_batch} rows must be a multiple of the "
                             f"{world} data-parallel ranks")
        if shuffle_buffer_blocks < 1:
            raise ValueError(f"data.shuffle_buffer_blocks={shuffle_buffer_blocks} must be >= 1")
        roots = [_stream_root(s, cache_dir) for s in specs]
        metas = [_read_meta(s, r) for s, r in zip(specs, roots)]
        _check_agreement(specs, metas)
        self.meta, self.seq_len, self.seed, self.rank, self.world = metas[0], seq_len, seed, rank, world
        self.global_batch, self.per_rank = global_batch, global_batch // world
        self.rows_per_block = fmt.rows_per_block(self.block_tokens, seq_len)
        self._specs = specs
        self._streams = [_Stream(s, r, cache_dir, validate_hash) for s, r in zip(specs, roots)]
        stream_blocks = [s.num_blocks for s in self._streams]
        proportions = [s.proportion for s in specs] if specs[0].proportion is not None else None
        self._stream_offsets = np.concatenate([[0], np.cumsum(stream_blocks)]).astype(np.int64)
        phases = [[int(start), [float(x) for x in props]] for start, props in phases or []]
        _check_phases(phases, len(specs))
        self.phase_names = ([f"phase{i}" for i in range(len(phases))] if phase_names is None
                            else [str(n) for n in phase_names])
        if len(self.phase_names) != len(phases):
            raise ValueError(f"{len(phase_names)} phase names for {len(phases)} phases")
        blocks = BlockOrder(stream_blocks, seed=seed, shuffle=shuffle,
                            proportions=phases[0][1] if phases else proportions)
        lanes = default_lanes(global_batch, blocks.epoch_blocks) if lanes is None else int(lanes)
        if phases:
            self.order = PhasedOrder(stream_blocks, phases, rows_per_block=self.rows_per_block,
                                     window=shuffle_buffer_blocks, global_batch=global_batch, lanes=lanes, seed=seed,
                                     shuffle=shuffle)
        else:
            self.order = RowOrder(blocks, rows_per_block=self.rows_per_block, window=shuffle_buffer_blocks,
                                  global_batch=global_batch, lanes=lanes, seed=seed, shuffle=shuffle)
        self.phases = phases
        self._config = {"streams": [[s.path, s.proportion] for s in specs], "seed": seed, "seq_len": seq_len,
                        "block_tokens": self.block_tokens, "shuffle": shuffle,
                        "shuffle_buffer_blocks": shuffle_buffer_blocks, "stream_blocks": stream_blocks,
                        "global_batch": global_batch, "lanes": lanes}
        if phases:  # absent without phases: such a state is the same as before phases existed
            self._config["phases"] = phases
        cached = [s.root if s.spec.is_remote else s.unpacked for s in self._streams]
        cached = [c for c in cached if c is not None]
        if cache_limit is None and any(s.spec.is_remote for s in self._streams):
            cache_limit = default_cache_limit(cached)
        self.cache = _ShardCache(cached, cache_limit)
        self.predownload = self.per_rank if predownload is None else predownload
        self.record = Path(record) if record is not None else None
        self.rows, self.in_step = 0, 0  # the position: global rows of finished steps, this rank's rows of the next
        # Decoded blocks (sample id -> arrays), least recently used first: the windows this rank reads
        # from (its rows of a step span about per_rank / per_lane lanes), twice over.
        self._blocks: collections.OrderedDict[int, tuple] = collections.OrderedDict()
        self._keep_blocks = 2 * shuffle_buffer_blocks * (-(-self.per_rank // self.order.per_lane) + 1)
        self._ahead: tuple[int, tuple | None] = (0, None)  # (this rank's row it starts at, the planned order)
        self._verified: dict[tuple[int, int], str] = {}  # checked shards -> the directory they are read from
        self._pending: dict[tuple[int, int], Future] = {}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="liquid-data-prefetch")

    @property
    def block_tokens(self) -> int:
        return int(self.meta["block_tokens"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def epoch(self) -> int:
        """Epochs read (with phases: of the current phase's mixture, since the phase began)."""
        if not self.phases:
            return self.rows // self.order.rows_per_epoch
        p = int(self.order.phase_of(self.rows))
        return int(self.rows - self.order.first_rows[p]) // self.order.rows_per_epoch

    def phase_at(self, step: int) -> str | None:
        """The name of the data phase global step `step` (1-based) reads from; None without phases."""
        if not self.phases:
            return None
        return self.phase_names[int(self.order.phase_of(max(int(step) - 1, 0) * self.global_batch))]

    @property
    def phase(self) -> str | None:
        """The active data phase: that of the step being read, or when between steps of the last one read
        (so after a training step it is that step's phase), the first phase before any; None without phases."""
        step = self.rows // self.global_batch + (1 if self.in_step else 0)
        return self.phase_at(max(step, 1))

    # ---- the order --------------------------------------------------------------------------------

    def _global_rows(self, count: int, *, rows: int | None = None, in_step: int | None = None) -> np.ndarray:
        """The global row numbers of this rank's next `count` rows from a position (default: the current)."""
        rows = self.rows if rows is None else rows
        mine = (self.in_step if in_step is None else in_step) + np.arange(count, dtype=np.int64)
        step, within = np.divmod(mine, self.per_rank)
        return rows + step * self.global_batch + self.rank * self.per_rank + within

    def _locate(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(stream, shard within the stream, sample within the shard) of global sample ids."""
        stream = np.searchsorted(self._stream_offsets, sample_ids, side="right") - 1
        shard, index = np.empty_like(sample_ids), np.empty_like(sample_ids)
        for i in np.unique(stream):
            sel = stream == i
            shard[sel], index[sel] = self._streams[i].table.locate(sample_ids[sel] - self._stream_offsets[i])
        return stream, shard, index

    # ---- public -----------------------------------------------------------------------------------

    def next_batch(self, batch_size: int) -> dict:
        """The next `batch_size` rows of this rank: input_ids, labels (-100 at padding), doc_start."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        rows, epoch, sample, row, stream, shard, index = self._plan(batch_size)
        wanted = {int(s): (int(st), int(sh), int(ix)) for s, st, sh, ix in zip(sample, stream, shard, index)}
        for s, where in wanted.items():
            if s in self._blocks:
                self._blocks.move_to_end(s)
            else:
                self._blocks[s] = self._block(*where)
        while len(self._blocks) > max(self._keep_blocks, len(wanted)):  # least recently used first
            self._blocks.popitem(last=False)
        parts = [self._blocks[int(s)] for s in sample]
        seq, first = self.seq_len, (row * self.seq_len).tolist()  # row r holds tokens [r seq, r seq + seq + 1)
        window = np.stack([p[0][f:f + seq + 1] for p, f in zip(parts, first)]).astype(np.int64)
        doc = np.stack([p[2][f:f + seq] for p, f in zip(parts, first)])
        real = np.asarray([p[1] for p in parts]) - row * seq  # real tokens from each row's first
        labels = window[:, 1:].copy()
        labels[np.arange(1, seq + 1)[None, :] >= real[:, None]] = IGNORE_INDEX
        if self.record is not None:
            line = {"step": self.rows // self.global_batch + 1, "rows": rows.tolist(), "epoch": epoch.tolist(),
                    "block": sample.tolist(), "row": row.tolist()}
            if self.phases:
                line["phase"] = self.order.phase_of(rows).tolist()
            with self.record.open("a") as fh:
                fh.write(json.dumps(line) + "\n")
        self.in_step += batch_size
        self.rows += (self.in_step // self.per_rank) * self.global_batch
        self.in_step %= self.per_rank
        self._prefetch()
        return {"input_ids": torch.from_numpy(window[:, :-1]), "labels": torch.from_numpy(labels),
                "doc_start": torch.from_numpy(doc)}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "rows": int(self.rows), "in_step": int(self.in_step), "rank": self.rank,
                "world": self.world, "global_batch": self.global_batch, "config": dict(self._config)}

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, self._config)
        if state["in_step"] and (state["world"], state["global_batch"]) != (self.world, self.global_batch):
            raise _inside_a_step(state)
        if state["in_step"] and state["rank"] != self.rank:
            raise ValueError(f"the data state is rank {state['rank']}'s, this loader is rank {self.rank}")
        self.rows, self.in_step = int(state["rows"]), int(state["in_step"])
        self._blocks, self._ahead = collections.OrderedDict(), (0, None)

    def load_rank_states(self, states: list[dict]) -> None:
        """Resume from every rank's state of another layout (a checkpoint being resharded)."""
        self.load_state_dict(merge_rank_states(states))

    # ---- shards -----------------------------------------------------------------------------------

    def _block(self, stream_id: int, shard_id: int, index: int) -> tuple[np.ndarray, int, np.ndarray]:
        """(tokens, real tokens, document-start mask) of one block."""
        pending = self._pending.pop((stream_id, shard_id), None)
        if pending is not None:
            pending.result()  # re-raises what the prefetch found
        dirname = self._ensure_shard(stream_id, shard_id)
        try:
            sample = self._streams[stream_id].reader(shard_id, dirname)[index]
        except FileNotFoundError:  # another rank of the node evicted it from the cache: fetch it again
            self._verified.pop((stream_id, shard_id), None)
            dirname = self._ensure_shard(stream_id, shard_id)
            sample = self._streams[stream_id].reader(shard_id, dirname)[index]
        tokens, num_tokens = sample["tokens"], int(sample["num_tokens"])
        if len(tokens) != self.block_tokens:
            raise DataCorruptionError(f"a block has {len(tokens)} tokens, the metadata says {self.block_tokens}")
        doc_starts = np.asarray(sample["doc_starts"], dtype=np.int64)
        starts = np.zeros(self.block_tokens, dtype=bool)
        starts[doc_starts[doc_starts < num_tokens]] = True  # a block with no start stores [block_tokens]
        return tokens, num_tokens, starts

    def _plan(self, count: int) -> tuple[np.ndarray, ...]:
        """(global row, epoch, block, row in block, stream, shard, sample in shard) of this rank's next
        `count` rows. The order is worked out PLAN_AHEAD rows at a time and served in slices: its cost is
        mostly per call, not per row."""
        k = self.rows // self.global_batch * self.per_rank + self.in_step  # this rank's rows so far
        start, plan = self._ahead
        if plan is None or k < start or k + count > start + len(plan[0]):
            rows = self._global_rows(max(count, PLAN_AHEAD))
            epoch, sample, row = self.order(rows)
            plan = (rows, epoch, sample, row, *self._locate(sample))
            self._ahead, start = (k, plan), k
        return tuple(column[k - start:k - start + count] for column in plan)

    def upcoming_shards(self, count: int) -> set[tuple[int, int]]:
        """(stream, shard) of the blocks this rank's next `count` rows are in."""
        plan = self._plan(count)
        return set(zip(plan[4].tolist(), plan[5].tolist()))

    def _prefetch(self) -> None:
        """Fetch in the background the shards of this rank's next `predownload` rows."""
        if not self.predownload or not any(s.spec.is_remote for s in self._streams):
            return
        for key in self.upcoming_shards(self.predownload):
            if key not in self._verified and key not in self._pending:
                self._pending[key] = self._executor.submit(self._ensure_shard, *key)

    def _ensure_shard(self, stream_id: int, shard_id: int) -> str:
        """Make the shard local and checked; returns the directory to read it from. Local raw files are
        hashed once; a local shard stored only compressed, and every remote one, is fetched, checked,
        decompressed and written into the cache, by one process per node (a file lock per shard)."""
        done = self._verified.get((stream_id, shard_id))
        if done is not None:
            return done
        stream = self._streams[stream_id]
        entry = stream.table.entry(shard_id)
        raw_info, zip_info = entry["raw_data"], entry.get("zip_data")
        name = raw_info["basename"]
        if not stream.spec.is_remote and os.path.isfile(os.path.join(stream.root, name)):
            dirname = stream.root
            self._check_file(os.path.join(dirname, name), raw_info, stream)
        else:
            if not stream.spec.is_remote and not (zip_info and os.path.isfile(os.path.join(stream.root, zip_info["basename"]))):
                raise DataCorruptionError(f"shard {name} listed in {stream.spec.path}/{INDEX_FILE} is missing")
            if not stream.spec.is_remote and stream.unpacked is None:
                raise ValueError(f"{stream.spec.path} stores shard {name} compressed only: give a cache directory "
                                 "(data.cache_dir) to decompress it into")
            dirname = stream.root if stream.spec.is_remote else stream.unpacked
            raw = os.path.join(dirname, name)
            os.makedirs(os.path.dirname(raw), exist_ok=True)
            with open(f"{raw}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    if os.path.isfile(raw):
                        self._check_file(raw, raw_info, stream, cached=True)
                        os.utime(raw)  # recently used: evicted last
                    else:
                        # Decoded blocks need no file; a shard evicted before its block was read is fetched again.
                        self.cache.make_room(raw_info["bytes"], keep={raw})
                        self._fetch_shard(stream, raw_info, zip_info, raw)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        self._verified[(stream_id, shard_id)] = dirname
        return dirname

    def _fetch_shard(self, stream: _Stream, raw_info: dict, zip_info: dict | None, raw: str) -> None:
        """The shard's stored form (compressed when there is one) -> checked -> raw file at `raw`, atomically."""
        from streaming.base.compression import decompress

        info = zip_info or raw_info
        where = f"shard {info['basename']} of {stream.spec.path}"
        if stream.spec.is_remote:
            tmp = _download(stream.spec.path, os.path.dirname(raw), info["basename"])
            try:
                data = tmp.read_bytes()
            finally:
                tmp.unlink(missing_ok=True)
        else:
            data = Path(stream.root, info["basename"]).read_bytes()
        self._verify(data, info, stream, where)
        if zip_info:
            data = decompress(zip_info["basename"].rsplit(".", 1)[-1], data)
            self._verify(data, raw_info, stream, f"shard {raw_info['basename']} of {stream.spec.path}")
        part = Path(f"{raw}.{os.getpid()}.part")
        part.write_bytes(data)
        os.replace(part, raw)

    def _verify(self, data: bytes, info: dict, stream: _Stream, what: str) -> None:
        from streaming.base.hashing import get_hash

        algo = stream.algo
        if len(data) != info["bytes"]:
            raise DataCorruptionError(f"{what} has {len(data)} bytes where its index says {info['bytes']}: the "
                                      "file is truncated or corrupt; prepare or upload the data again")
        if algo and algo in info.get("hashes", {}) and get_hash(algo, data) != info["hashes"][algo]:
            raise DataCorruptionError(f"{what} does not match the {algo} hash in its index: the data is corrupt")

    def _check_file(self, path: str, info: dict, stream: _Stream, *, cached: bool = False) -> None:
        try:
            self._verify(Path(path).read_bytes(), info, stream, f"shard {info['basename']} of {stream.spec.path} ({path})")
        except DataCorruptionError:
            if cached:  # a corrupt copy in the cache would fail again; the user's own data stays
                Path(path).unlink(missing_ok=True)
            raise

    def close(self) -> None:
        """Stop prefetching."""
        if getattr(self, "_executor", None) is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> StreamingRows:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


# The config key behind each setting of the data position (block_tokens, stream_blocks: the prepared data).
STATE_KEYS = {"streams": "data.path / data.streams", "seed": "train.seed", "seq_len": "train.seq_len",
              "global_batch": "train.global_batch_size", "lanes": "data.lanes",
              "block_tokens": "the dataset's --block-tokens (prepared again?)", "shuffle": "data.shuffle",
              "shuffle_buffer_blocks": "data.shuffle_buffer_blocks",
              "stream_blocks": "the dataset's blocks (data added or prepared again?)"}


def _check_phases(phases: list, streams: int) -> None:
    starts = [start for start, _ in phases]
    if phases and (starts[0] != 1 or any(a >= b for a, b in zip(starts, starts[1:]))):
        raise ValueError(f"data.phases must start at step 1, then at increasing steps, got steps {starts}")
    for i, (_, props) in enumerate(phases):
        if len(props) != streams or any(x < 0 for x in props) or sum(props) <= 0:
            raise ValueError(f"data.phases[{i}].proportions={props} needs one proportion >= 0 per stream "
                             f"({streams}) with a positive sum")


def _phases_begun(config: dict, steps: int) -> list:
    """[first step, shares] of the phases that had begun by global step `steps` (1-based); a run without
    phases is one phase of the streams' proportions. Shares: the proportions over their sum, as the order
    uses them ([7, 3] and [0.7, 0.3] are the same mixture)."""
    phases = config.get("phases") or [[1, [p for _, p in config["streams"]]]]
    return [[int(start), None if None in props else [float(x) / float(sum(props)) for x in props]]
            for start, props in phases if start <= steps]


def _check_state(state: dict, config: dict) -> None:
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"data state version {state.get('version')} is not {STATE_VERSION}: it was saved by an "
                         "older loader, whose order differs; start a new run")
    changed = [key for key in config if key != "phases" and state["config"].get(key) != config[key]]
    if changed:
        raise ValueError("cannot resume the data position: " + ", ".join(
            f"{STATE_KEYS.get(key, key)} was {state['config'].get(key)!r}, now {config[key]!r}" for key in changed)
            + "; resume with the run's data settings, or start a new run")
    # Phases may change where the state has not read them yet: the order of a phase depends on those before it.
    steps = int(state["rows"]) // int(config["global_batch"]) + (1 if state.get("in_step") else 0)
    was, now = _phases_begun(state["config"], steps), _phases_begun(config, steps)
    if was != now:
        raise ValueError(f"cannot resume the data position: data.phases changed at or before step {steps}, where the "
                         f"data already is: the phases begun by then (first step, proportions) were {was}, now {now}; "
                         f"only phases starting after step {steps} may be changed or added")


def _inside_a_step(state: dict) -> ValueError:
    return ValueError(f"the data state is in the middle of a step (rank {state['rank']} of {state['world']} had "
                      f"read {state['in_step']} of its rows); only a state taken between steps resumes at another layout")


def merge_rank_states(states: list[dict]) -> dict:
    """One layout-free state from every rank's, taken between steps (as checkpoints are): the global rows
    of the finished steps, which every rank agrees on."""
    for state in states:
        _check_state(state, states[0]["config"])
    inside = [s for s in states if s["in_step"]]
    if inside:
        raise _inside_a_step(inside[0])
    if len({s["rows"] for s in states}) > 1:
        raise ValueError("the ranks' data states disagree on the rows consumed "
                         f"({sorted({s['rows'] for s in states})}): the checkpoint is inconsistent")
    return {**states[0], "in_step": 0, "rank": None, "world": None}
