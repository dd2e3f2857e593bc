"""The global data order: which block and row the g-th row of a run is, computed on demand.

Nothing here grows with the dataset: every shuffle is a keyed pseudo-random permutation (`Permutation`, a
Feistel network with cycle walking) evaluated for the positions asked for, never an array of every sample
id (at 38T tokens, 580M blocks, one epoch's order would be 4.6 GB of int64 per rank).

Layers, all keyed by the seed:
  * stream walk: stream i's u-th block, for u = 0, 1, ... forever. Each pass over the stream (u // n_i)
    permutes its spans of `span` consecutive blocks (about one shard) and the blocks inside each span. A
    run of consecutive u stays inside a few spans, so a reader downloads a shard and uses all of it.
  * `BlockOrder`: epoch e's position p -> a block (a global sample id over the streams). An epoch gives
    each stream its share of blocks (the proportions, or without them its size: each block once). Positions
    come in chunks of about `chunk` blocks; every chunk holds an even part of each stream's share, in a
    permuted order, and takes the next run of each stream's walk. A down-sampled stream sees new blocks
    each epoch, an up-sampled one repeats a block only after all its blocks.
  * `RowOrder`: global row g -> (epoch, block, row within the block). Each step's rows are split into
    `lanes` equal runs; lane l reads its own 1/lanes of every epoch's positions (so its own chunks, spans
    and shards), `window` blocks at a time with the window's rows permuted. When the data-parallel ranks of
    a node read whole lanes (nodes dividing lanes), each node reads its own shards; with any layout the rows
    are the same.

A run's row g is the same whatever the number of ranks, the micro-batch size or the accumulation: the
position to resume from is one number, the global rows consumed (see data_pipeline/loader.py).
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

_ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def key(*parts) -> int:
    """A 64-bit key from a tuple of ints and strings (stable across processes and Python versions)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scramble of 64-bit values (uint64 arithmetic wraps)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A keyed bijection of [0, n), evaluated element-wise: a balanced Feistel network on the smallest
    even number of bits that holds n, with cycle walking (values that land in [n, 2^bits) are encrypted
    again until they fall inside; the domain is at most 4n, so a few rounds on average)."""

    def __init__(self, n: int, key_: int):
        if n < 1:
            raise ValueError(f"a permutation needs at least one element, got {n}")
        self.n = int(n)
        self.half = max(1, math.ceil(max(1, (self.n - 1).bit_length()) / 2))
        self._mask = np.uint64((1 << self.half) - 1)
        seeds = _mix(np.arange(_ROUNDS, dtype=np.uint64) + np.uint64(key_ & (2**64 - 1)))
        self._keys = [np.uint64(k) for k in seeds]

    def __call__(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"positions outside [0, {self.n})")
        if self.n == 1:
            return np.zeros_like(x)
        out = self._encrypt(x.astype(np.uint64))
        outside = out >= np.uint64(self.n)
        while outside.any():
            out[outside] = self._encrypt(out[outside])
            outside = out >= np.uint64(self.n)
        return out.astype(np.int64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self._mask
        for k in self._keys:
            left, right = right, left ^ (_mix(right ^ k) & self._mask)
        return (left << half) | right


def split_by_proportion(total: int, proportions: list[float]) -> list[int]:
    """`total` slots shared by proportion (largest remainder; ties to the earlier stream)."""
    weights = np.asarray(proportions, dtype=np.float64) / float(sum(proportions))
    exact = weights * total
    counts = np.floor(exact).astype(np.int64)
    for i in sorted(range(len(counts)), key=lambda i: (-(exact[i] - counts[i]), i))[:total - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


class BlockOrder:
    """Epoch e, position p in [0, epoch_blocks) -> a global sample id (streams' blocks concatenated)."""

    def __init__(self, stream_blocks: list[int], *, seed: int, shuffle: bool = True,
                 proportions: list[float] | None = None, epoch_blocks: int | None = None, span: int = 512,
                 chunk: int = 8192):
        if any(n < 1 for n in stream_blocks):
            raise ValueError(f"every stream needs at least one block, got {stream_blocks}")
        if span < 1 or chunk < 1:
            raise ValueError(f"span={span} and chunk={chunk} must be >= 1")
        self.stream_blocks = [int(n) for n in stream_blocks]
        self.offsets = np.concatenate([[0], np.cumsum(self.stream_blocks)]).astype(np.int64)
        self.seed, self.shuffle, self.span = seed, shuffle, int(span)
        if proportions is None:
            self.per_epoch = np.asarray(self.stream_blocks, dtype=np.int64)
        else:
            self.per_epoch = np.asarray(split_by_proportion(epoch_blocks or int(self.offsets[-1]), proportions))
        self.epoch_blocks = int(self.per_epoch.sum())
        if self.epoch_blocks < 1:
            raise ValueError("an epoch of these streams and proportions has no blocks")
        # Chunk c holds floor((c+1) k / chunks) - floor(c k / chunks) of each stream's k blocks of an epoch;
        # its first position is the sum of those before it (one int64 per chunk: 70K at 38T tokens).
        self.chunks = -(-self.epoch_blocks // chunk)
        self._before = (np.arange(self.chunks + 1, dtype=np.int64)[:, None] * self.per_epoch[None, :]) // self.chunks
        self._start = self._before.sum(axis=1)

    def _stream_counts(self, chunk: np.ndarray) -> np.ndarray:
        return self._before[chunk + 1] - self._before[chunk]  # [positions, streams]

    def __call__(self, epoch: int, positions) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        chunk = np.searchsorted(self._start, positions, side="right") - 1
        offset = positions - self._start[chunk]
        slot = offset.copy()
        if self.shuffle:
            for c in np.unique(chunk):
                sel = chunk == c
                size = int(self._start[c + 1] - self._start[c])
                slot[sel] = Permutation(size, key(self.seed, "chunk", epoch, int(c)))(offset[sel])
        cum = np.cumsum(self._stream_counts(chunk), axis=1)
        stream = (slot[:, None] >= cum).sum(axis=1)
        rank = slot - np.where(stream > 0, cum[np.arange(len(slot)), np.maximum(stream - 1, 0)], 0)
        walked = epoch * self.per_epoch[stream] + self._before[chunk, stream] + rank
        out = np.empty_like(positions)
        for i in np.unique(stream):
            sel = stream == i
            out[sel] = self.offsets[i] + self._walk(int(i), walked[sel])
        return out

    def _walk(self, stream: int, walked: np.ndarray) -> np.ndarray:
        """The stream's walked-th block: pass walked // n, spans and blocks in them permuted per pass."""
        n = self.stream_blocks[stream]
        passes, within = np.divmod(walked, n)
        if not self.shuffle:
            return within
        span = min(self.span, n)
        spans = -(-n // span)
        out = np.empty_like(within)
        for p in np.unique(passes):
            sel = passes == p
            span_order = Permutation(spans, key(self.seed, "spans", stream, int(p)))
            inner = Permutation(span, key(self.seed, "inner", stream, int(p)))
            block = within[sel]
            todo = np.ones(len(block), dtype=bool)
            while todo.any():  # cycle walking: the last span may be short, so land inside [0, n)
                q, o = np.divmod(block[todo], span)
                t = span_order(q)
                block[todo] = t * span + inner((o + t * 40503) % span)  # a different inner order per span
                todo[todo] = block[todo] >= n
            out[sel] = block
        return out


class RowOrder:
    """Global row g -> (epoch, global sample id, row within that block); see the module docstring."""

    def __init__(self, blocks: BlockOrder, *, rows_per_block: int, window: int, global_batch: int, lanes: int,
                 seed: int, shuffle: bool = True):
        if window < 1:
            raise ValueError(f"data.shuffle_buffer_blocks={window} must be >= 1")
        if lanes < 1 or global_batch % lanes:
            raise ValueError(f"data.lanes={lanes} must divide train.global_batch_size={global_batch}")
        if blocks.epoch_blocks < lanes:
            raise ValueError(f"the data has {blocks.epoch_blocks} blocks per epoch, fewer than data.lanes={lanes}")
        self.blocks, self.rows_per_block, self.window = blocks, int(rows_per_block), int(window)
        self.lanes, self.per_lane, self.global_batch = int(lanes), global_batch // lanes, int(global_batch)
        self.seed, self.shuffle = seed, shuffle
        self.rows_per_epoch = blocks.epoch_blocks * self.rows_per_block
        # Lane l's positions of every epoch: [start[l], start[l + 1]).
        self._start = (np.arange(self.lanes + 1, dtype=np.int64) * blocks.epoch_blocks) // self.lanes

    def __call__(self, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and rows.min() < 0:
            raise IndexError("row numbers start at 0")
        step, k = np.divmod(rows, self.global_batch)
        lane, i = np.divmod(k, self.per_lane)
        lane_row = step * self.per_lane + i
        lane_blocks = self._start[lane + 1] - self._start[lane]
        epoch, within = np.divmod(lane_row, lane_blocks * self.rows_per_block)
        window, within = np.divmod(within, self.window * self.rows_per_block)
        slot = within.copy()
        if self.shuffle:
            keys = np.stack([lane, epoch, window], axis=1)
            for l_, e, w in np.unique(keys, axis=0):
                sel = (lane == l_) & (epoch == e) & (window == w)
                size = min(self.window, int(lane_blocks[sel][0]) - int(w) * self.window) * self.rows_per_block
                slot[sel] = Permutation(size, key(self.seed, "window", int(l_), int(e), int(w)))(within[sel])
        position, row = np.divmod(slot, self.rows_per_block)
        position += self._start[lane] + window * self.window
        sample = np.empty_like(rows)
        for e in np.unique(epoch):
            sel = epoch == e
            sample[sel] = self.blocks(int(e), position[sel])
        return epoch, sample, row
