"""The training data loader: MDS blocks (local or remote) -> mixed, shuffled, rank-partitioned rows.

Exactly resumable: `state_dict()` then `load_state_dict()` on a new loader continues bit for bit.

How: one `streaming.StreamingDataset` (a `Stream` per `StreamSpec`, proportions passed through) gives
each epoch's global block order with streaming's own resampling and shuffle, generated for a world of one
(`generate_work`, batch size 1), so it depends on the data, `seed` and `num_canonical_nodes` (default 1;
larger values let streaming pad an epoch with a few repeated blocks), never on the number of ranks.
`StreamingDataset.get_item` reads blocks, downloading remote shards into `cache_dir/<hash of the URL>`
(shared by the ranks of a node through streaming's shared memory when RANK, WORLD_SIZE, LOCAL_WORLD_SIZE
are set; then every process must build its loader, as streaming synchronises them). Data-parallel rank r
takes global positions r, r + world, r + 2 world... of each epoch. The rows of `shuffle_buffer_blocks`
consecutive blocks of a rank are permuted with an RNG seeded by (seed, epoch, the buffer's first global
position). StreamingDataset's iterator and its state_dict/load_state_dict are not used: they need one
process per rank and a global sample count, whereas this position is per rank and per row.

State: {"epoch", "offset" (global position where this world's share of the epoch starts), "blocks_done"
(this rank's blocks before its current buffer), "row_in_buffer", "rank", "world", "config"}.
Resuming with a different number of data-parallel ranks:
  * same world and rank: exact (the same rows in the same order, bit for bit), even with another batch size;
  * another world (or a state from `merge_rank_states`): block-exact at global position
    offset + blocks_done * old_world: the blocks before it count as read, the new ranks read every block
    from it on. So the old ranks' current buffers are read again (at most shuffle_buffer_blocks * old_world
    blocks), nothing is skipped, and the row order differs from the old world's. Ranks share one global
    position when their blocks give equal numbers of rows; a file's last block gives fewer, so pass
    `merge_rank_states(every rank's state)` (the least advanced) to be sure no block is skipped;
  * refused (ValueError): another rank's state in the same world, or a change of streams, proportions,
    seed, seq_len, block size, shuffle settings, num_canonical_nodes or number of blocks.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import urllib.parse
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from tempfile import gettempdir

import numpy as np
import torch

from data_pipeline import format as fmt

STATE_VERSION = 1
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
    tmp = Path(root, f".{name}.{os.getpid()}.tmp")
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


def _build_dataset(specs: list[StreamSpec], roots: list[str], *, seed: int, shuffle: bool,
                   num_canonical_nodes: int, predownload: int):
    from streaming import Stream, StreamingDataset

    streams = [Stream(remote=spec.path if spec.is_remote else None, local=root, proportion=spec.proportion)
               for spec, root in zip(specs, roots)]
    try:
        # batch_size=1: the global order is generated for a world of one (see the module docstring).
        return StreamingDataset(streams=streams, shuffle=shuffle, shuffle_seed=seed, batch_size=1,
                                num_canonical_nodes=num_canonical_nodes, predownload=predownload,
                                shuffle_block_size=max(4_000_000 // num_canonical_nodes, 1 << 18))
    except Exception as err:
        for spec, root in zip(specs, roots):
            if not os.path.isfile(os.path.join(root, INDEX_FILE)):
                raise ValueError(f"{_not_prepared(spec.path, INDEX_FILE)} ({err})") from err
        raise


def _pick_hash(hashes: dict) -> str | None:
    for algo in _HASH_PREFERENCE:
        if algo in hashes:
            return algo
    return min(hashes, default=None)


class StreamingRows:
    """Micro-batches of rows for one data-parallel rank; see the module docstring."""

    def __init__(self, streams: list[StreamSpec], *, seq_len: int, seed: int, cache_dir: str | os.PathLike | None,
                 shuffle: bool = True, shuffle_buffer_blocks: int = 8, rank: int = 0, world: int = 1,
                 num_canonical_nodes: int | None = None, validate_hash: bool = True,
                 predownload: int | None = None):
        specs = [StreamSpec(s) if isinstance(s, str) else s for s in streams]
        _check_streams(specs)
        if not 0 <= rank < world:
            raise ValueError(f"data rank {rank} is not in [0, {world})")
        if shuffle_buffer_blocks < 1:
            raise ValueError(f"shuffle_buffer_blocks={shuffle_buffer_blocks} must be >= 1")
        roots = [_stream_root(s, cache_dir) for s in specs]
        metas = [_read_meta(s, r) for s, r in zip(specs, roots)]
        _check_agreement(specs, metas)
        self.meta, self.seq_len, self.seed, self.rank, self.world = metas[0], seq_len, seed, rank, world
        self.rows_per_block = fmt.rows_per_block(self.block_tokens, seq_len)
        self.shuffle, self.buffer_blocks = shuffle, shuffle_buffer_blocks
        self.predownload = shuffle_buffer_blocks if predownload is None else predownload
        ncn = num_canonical_nodes or 1
        self._specs = specs
        self._ds = _build_dataset(specs, roots, seed=seed, shuffle=shuffle, num_canonical_nodes=ncn,
                                  predownload=max(self.predownload, 1))
        self._hash = self._hash_algorithms(validate_hash)
        self.num_blocks = int(self._ds.epoch_size)
        if self.num_blocks < world:
            raise ValueError(f"the data has {self.num_blocks} blocks per epoch, fewer than {world} ranks")
        self._config = {"streams": [[s.path, s.proportion] for s in specs], "seed": seed, "seq_len": seq_len,
                        "block_tokens": self.block_tokens, "shuffle": shuffle, "num_canonical_nodes": ncn,
                        "shuffle_buffer_blocks": shuffle_buffer_blocks, "num_blocks": self.num_blocks}
        self._verified: set[int] = set()
        self._pending: dict[int, Future] = {}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="liquid-data-prefetch")
        self._start_epoch(0, offset=0)

    @property
    def block_tokens(self) -> int:
        return int(self.meta["block_tokens"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def _hash_algorithms(self, validate_hash: bool) -> list[str | None]:
        """One algorithm per stream, also handed to streaming, which checks downloads and zips with it."""
        algos = []
        for stream_id, stream in enumerate(self._ds.streams):
            raw_info, _ = self._ds.shards[self._ds.shard_offset_per_stream[stream_id]].file_pairs[0]
            algo = _pick_hash(raw_info.hashes) if validate_hash else None
            if validate_hash and algo is None:
                warnings.warn(f"{self._specs[stream_id].path}: the index records no shard hashes; "
                              "only shard sizes are checked")
            stream.validate_hash = algo
            algos.append(algo)
        return algos

    # ---- position -------------------------------------------------------------------------------

    def _start_epoch(self, epoch: int, *, offset: int, blocks_done: int = 0, row: int = 0) -> None:
        """Set the position; the epoch's order is generated when first read (`_rank_blocks`), so a resume,
        which sets the position twice (construction, then the checkpoint's), generates it once."""
        self.epoch, self.offset, self.blocks_done, self.row = epoch, offset, blocks_done, row
        self._blocks: np.ndarray | None = None
        self._buffer: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._epoch_rows = 0 if (offset, blocks_done, row) == (0, 0, 0) else None

    def _rank_blocks(self) -> np.ndarray:
        """This rank's sample ids of the current epoch, in order."""
        if self._blocks is None:
            from streaming.base.batching import generate_work
            from streaming.base.world import World

            order = generate_work(self._ds.batching_method, self._ds, World(1, 1, 1, 0), self.epoch, 0).reshape(-1)
            order = order[order >= 0]
            self._blocks = order[self.offset + self.rank::self.world].copy()
        return self._blocks

    def _load_buffer(self) -> None:
        while True:
            if self.blocks_done >= len(self._rank_blocks()):
                if self._epoch_rows == 0:
                    raise ValueError(f"rank {self.rank}'s share of an epoch yields no rows: every block is padding")
                self._start_epoch(self.epoch + 1, offset=0)
                continue
            sample_ids = self._rank_blocks()[self.blocks_done:self.blocks_done + self.buffer_blocks]
            self._prefetch(self.blocks_done + len(sample_ids))
            rows = self._buffer_rows(sample_ids)
            if len(rows[0]):
                self._buffer = rows
                if self._epoch_rows is not None:
                    self._epoch_rows += len(rows[0])
                return
            self.blocks_done += len(sample_ids)

    def _buffer_rows(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        parts = [self._block_rows(self._read_block(int(sample_id))) for sample_id in sample_ids]
        inputs, labels, doc = (np.concatenate(column) for column in zip(*parts))
        if self.shuffle:
            first = self.offset + self.rank + self.blocks_done * self.world  # global position of the buffer
            perm = np.random.default_rng([self.seed, self.epoch, first]).permutation(len(inputs))
            inputs, labels, doc = inputs[perm], labels[perm], doc[perm]
        return inputs, labels, doc

    def _block_rows(self, sample: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row i = tokens[i*seq : i*seq+seq+1]; rows that are all padding are dropped."""
        tokens, num_tokens, seq = sample["tokens"], int(sample["num_tokens"]), self.seq_len
        if len(tokens) != self.block_tokens:
            raise DataCorruptionError(f"a block has {len(tokens)} tokens, the metadata says {self.block_tokens}")
        num_rows = min(self.rows_per_block, max(0, (num_tokens + seq - 2) // seq))
        index = np.arange(num_rows)[:, None] * seq + np.arange(seq + 1)[None, :]  # [rows, seq + 1]
        window = tokens[index].astype(np.int64)
        labels = window[:, 1:].copy()
        labels[index[:, 1:] >= num_tokens] = IGNORE_INDEX
        doc_starts = np.asarray(sample["doc_starts"], dtype=np.int64)
        starts = np.zeros(self.block_tokens, dtype=bool)
        starts[doc_starts[doc_starts < num_tokens]] = True  # a block with no start stores [block_tokens]
        return window[:, :-1], labels, starts[index[:, :-1]]

    # ---- shards ---------------------------------------------------------------------------------

    def _read_block(self, sample_id: int) -> dict:
        shard_id = int(self._ds.spanner[sample_id][0])
        pending = self._pending.pop(shard_id, None)
        if pending is not None:
            pending.result()  # re-raises what the prefetch found
        self._ensure_shard(shard_id)
        return self._ds.get_item(sample_id)

    def _prefetch(self, start: int) -> None:
        for sample_id in self._rank_blocks()[start:start + self.predownload]:
            shard_id = int(self._ds.spanner[int(sample_id)][0])
            if shard_id not in self._verified and shard_id not in self._pending:
                self._pending[shard_id] = self._executor.submit(self._ensure_shard, shard_id)

    def _ensure_shard(self, shard_id: int) -> None:
        """Make the shard local and checked: files already there are hashed here, downloads by streaming."""
        if shard_id in self._verified:
            return
        stream_id = int(self._ds.stream_per_shard[shard_id])
        stream, spec, algo = self._ds.streams[stream_id], self._specs[stream_id], self._hash[stream_id]
        raw_info, zip_info = self._ds.shards[shard_id].file_pairs[0]
        raw = os.path.join(stream.local, stream.split, raw_info.basename)
        zipped = zip_info and os.path.join(stream.local, stream.split, zip_info.basename)
        if os.path.isfile(raw):
            self._check_file(raw, raw_info, algo, spec)
        elif not spec.is_remote and not (zipped and os.path.isfile(zipped)):
            raise DataCorruptionError(f"shard {raw_info.basename} listed in {spec.path}/{INDEX_FILE} is missing")
        else:
            try:
                self._ds.prepare_shard(shard_id)
            except ValueError as err:
                if "Checksum failure" not in str(err):
                    raise
                self._drop_cached(spec, raw, zipped)
                raise DataCorruptionError(f"shard {(zip_info or raw_info).basename} of {spec.path} does not "
                                          f"match the {algo} hash in its index: the data is corrupt") from err
        self._verified.add(shard_id)

    def _check_file(self, path: str, info, algo: str | None, spec: StreamSpec) -> None:
        from streaming.base.hashing import get_hash

        data = Path(path).read_bytes()
        problem = (f"has {len(data)} bytes where its index says {info.bytes}" if len(data) != info.bytes else
                   f"does not match the {algo} hash in its index"
                   if algo and get_hash(algo, data) != info.hashes[algo] else None)
        if problem:
            self._drop_cached(spec, path, None)
            raise DataCorruptionError(f"shard {info.basename} of {spec.path} ({path}) {problem}: the file is "
                                      "truncated or corrupt; prepare or upload the data again")

    @staticmethod
    def _drop_cached(spec: StreamSpec, *paths: str | None) -> None:
        """A corrupt copy in the cache would fail again; local data is the user's and stays."""
        if spec.is_remote:
            for path in paths:
                if path:
                    Path(path).unlink(missing_ok=True)

    # ---- public ---------------------------------------------------------------------------------

    def next_batch(self, batch_size: int) -> dict:
        """The next `batch_size` rows of this rank: input_ids, labels (-100 at padding), doc_start."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        parts = []
        while batch_size > 0:
            if self._buffer is None:
                self._load_buffer()
            take = min(batch_size, len(self._buffer[0]) - self.row)
            parts.append([column[self.row:self.row + take] for column in self._buffer])
            self.row, batch_size = self.row + take, batch_size - take
            if self.row == len(self._buffer[0]):
                self.blocks_done += min(self.buffer_blocks, len(self._rank_blocks()) - self.blocks_done)
                self.row, self._buffer = 0, None
        inputs, labels, doc = (torch.from_numpy(np.concatenate(column)) for column in zip(*parts))
        return {"input_ids": inputs, "labels": labels, "doc_start": doc}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "offset": int(self.offset),
                "blocks_done": int(self.blocks_done), "row_in_buffer": int(self.row), "rank": self.rank,
                "world": self.world, "config": dict(self._config)}

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, self._config)
        if state["rank"] is not None and state["world"] == self.world:
            if state["rank"] != self.rank:
                raise ValueError(f"the data state is rank {state['rank']}'s, this loader is rank {self.rank}")
            self._start_epoch(state["epoch"], offset=state["offset"], blocks_done=state["blocks_done"],
                              row=state["row_in_buffer"])
            return
        # Past the epoch's end, the first buffer load moves on to the next epoch.
        self._start_epoch(state["epoch"], offset=state["offset"] + state["blocks_done"] * state["world"])

    def load_rank_states(self, states: list[dict]) -> None:
        """Resume from every rank's state of another layout (a checkpoint being resharded): from the least
        advanced position, so no block is skipped (see the module docstring)."""
        self.load_state_dict(merge_rank_states(states))

    def close(self) -> None:
        """Stop prefetching and release streaming's shared memory (another loader may reuse the cache)."""
        if getattr(self, "_executor", None) is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        ds = self.__dict__.pop("_ds", None)
        if ds is not None:
            _release(ds)

    def __enter__(self) -> StreamingRows:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


# The config key behind each setting of the data position (block_tokens, num_blocks: the prepared data).
STATE_KEYS = {"streams": "data.path / data.streams", "seed": "train.seed", "seq_len": "train.seq_len",
              "block_tokens": "the dataset's --block-tokens (prepared again?)", "shuffle": "data.shuffle",
              "num_canonical_nodes": "num_canonical_nodes", "shuffle_buffer_blocks": "data.shuffle_buffer_blocks",
              "num_blocks": "the dataset's blocks (data added or prepared again?)"}


def _check_state(state: dict, config: dict) -> None:
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"data state version {state.get('version')} is not {STATE_VERSION}")
    changed = [key for key in config if state["config"].get(key) != config[key]]
    if changed:
        raise ValueError("cannot resume the data position: " + ", ".join(
            f"{STATE_KEYS.get(key, key)} was {state['config'].get(key)!r}, now {config[key]!r}" for key in changed)
            + "; resume with the run's data settings, or start a new run")


def merge_rank_states(states: list[dict]) -> dict:
    """One world-independent state from every rank's: the least advanced global position (no skips)."""
    for state in states:
        _check_state(state, states[0]["config"])
    key = [(s["epoch"], s["offset"] + s["blocks_done"] * s["world"]) for s in states]
    epoch, position = min(key)
    return {**states[0], "epoch": epoch, "offset": position, "blocks_done": 0, "row_in_buffer": 0,
            "rank": None, "world": 1}


def _release(ds) -> None:
    """Free the dataset's shared memory and, when this process is alone on its node, its lock files."""
    try:
        ds._locals_shm.buf[:4] = np.int32(0).tobytes()
    except Exception:
        pass
    for holder in (ds._locals_shm, ds._shared_barrier._arr.shm, ds._next_epoch.arr.shm, ds._cache_usage.arr.shm,
                   ds._shard_states.shm, ds._shard_access_times.shm):
        holder.cleanup()
        # Once freed, the names may be taken by another process; streaming's exit hook would unlink them.
        atexit.unregister(holder.cleanup)
        holder.created_shms, holder.opened_shms = [], []
    if ds._unique_rank_world.ranks_per_node == 1:
        from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK
        from streaming.base.shared.prefix import _get_path

        for name in (BARRIER_FILELOCK, CACHE_FILELOCK):
            Path(gettempdir(), _get_path(ds._shm_prefix_int, name)).unlink(missing_ok=True)
