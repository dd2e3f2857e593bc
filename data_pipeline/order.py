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
  * `PhasedOrder` (data.phases): each phase, from its first step on, has its own proportions: its own
    `BlockOrder` and `RowOrder`, read from the phase's first row as from row 0. Every stream's walk goes
    on where the earlier phases left it: phase p starts stream i's walk after every epoch the earlier
    phases touched (whole epochs: the unread rest of a phase's last epoch is skipped), so within a pass
    over a stream no block comes back in a later phase; the chunk and window shuffles are keyed by the
    phase. A phase's order depends only on the phases before it, never on its own length or later phases.

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


def _phase_key(seed: int, phase: int, *parts) -> int:
    """The key of a shuffle of data phase `phase`; phase 0's are those of a run without phases."""
    return key(seed, *parts) if not phase else key(seed, "phase", phase, *parts)


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
                 chunk: int = 8192, walk_offset: list[int] | None = None, phase: int = 0):
        """walk_offset: where each stream's walk starts (blocks the earlier phases reserved); phase: the
        phase's index, which keys the chunk shuffles (phase 0: the same keys as a run without phases)."""
        if any(n < 1 for n in stream_blocks):
            raise ValueError(f"every stream needs at least one block, got {stream_blocks}")
        if span < 1 or chunk < 1:
            raise ValueError(f"span={span} and chunk={chunk} must be >= 1")
        self.stream_blocks = [int(n) for n in stream_blocks]
        self.offsets = np.concatenate([[0], np.cumsum(self.stream_blocks)]).astype(np.int64)
        self.seed, self.shuffle, self.span, self.phase = seed, shuffle, int(span), int(phase)
        self.walk_offset = np.zeros(len(self.stream_blocks), dtype=np.int64) if walk_offset is None \
            else np.asarray(walk_offset, dtype=np.int64)
        if self.walk_offset.shape != (len(self.stream_blocks),) or (self.walk_offset < 0).any():
            raise ValueError(f"walk_offset={walk_offset} needs one count >= 0 per stream")
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
                slot[sel] = Permutation(size, _phase_key(self.seed, self.phase, "chunk", epoch, int(c)))(offset[sel])
        cum = np.cumsum(self._stream_counts(chunk), axis=1)
        stream = (slot[:, None] >= cum).sum(axis=1)
        rank = slot - np.where(stream > 0, cum[np.arange(len(slot)), np.maximum(stream - 1, 0)], 0)
        walked = epoch * self.per_epoch[stream] + self._before[chunk, stream] + rank + self.walk_offset[stream]
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
                 seed: int, shuffle: bool = True, phase: int = 0):
        if window < 1:
            raise ValueError(f"data.shuffle_buffer_blocks={window} must be >= 1")
        if lanes < 1 or global_batch % lanes:
            raise ValueError(f"data.lanes={lanes} must divide train.global_batch_size={global_batch}")
        if blocks.epoch_blocks < lanes:
            raise ValueError(f"the data has {blocks.epoch_blocks} blocks per epoch, fewer than data.lanes={lanes}")
        self.blocks, self.rows_per_block, self.window = blocks, int(rows_per_block), int(window)
        self.lanes, self.per_lane, self.global_batch = int(lanes), global_batch // lanes, int(global_batch)
        self.seed, self.shuffle, self.phase = seed, shuffle, int(phase)
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
                slot[sel] = Permutation(size, _phase_key(self.seed, self.phase, "window", int(l_), int(e),
                                                         int(w)))(within[sel])
        position, row = np.divmod(slot, self.rows_per_block)
        position += self._start[lane] + window * self.window
        sample = np.empty_like(rows)
        for e in np.unique(epoch):
            sel = epoch == e
            sample[sel] = self.blocks(int(e), position[sel])
        return epoch, sample, row

    def epochs(self, steps: int) -> int:
        """How many of `blocks`' epochs the rows of the first `steps` steps touch (the lane with the fewest
        blocks goes furthest)."""
        if steps < 1:
            return 0
        lane_blocks = int(np.diff(self._start).min())
        return (steps * self.per_lane - 1) // (lane_blocks * self.rows_per_block) + 1


class PhasedOrder:
    """Global row g -> (epoch within its phase, global sample id, row within the block) under data-mixture
    phases (see the module docstring). phases: (first global step, 1-based, proportions) of each phase, the
    first at step 1, in increasing order. `epoch` counts the epochs of the row's own phase."""

    def __init__(self, stream_blocks: list[int], phases: list[tuple[int, list[float]]], *, rows_per_block: int,
                 window: int, global_batch: int, lanes: int, seed: int, shuffle: bool = True, span: int = 512,
                 chunk: int = 8192):
        starts = [int(s) for s, _ in phases]
        if not starts or starts[0] != 1 or any(a >= b for a, b in zip(starts, starts[1:])):
            raise ValueError(f"phases must start at step 1, then at increasing steps, got {starts}")
        self.starts, self.global_batch = starts, int(global_batch)
        self.first_rows = np.asarray([(s - 1) * self.global_batch for s in starts], dtype=np.int64)
        self.orders: list[RowOrder] = []
        self.walk_offsets: list[list[int]] = []
        offset = np.zeros(len(stream_blocks), dtype=np.int64)
        for p, (start, proportions) in enumerate(phases):
            if p:  # the walk goes on after every epoch the previous phase touched
                prev = self.orders[-1]
                offset = offset + prev.epochs(start - starts[p - 1]) * prev.blocks.per_epoch
            blocks = BlockOrder(stream_blocks, seed=seed, shuffle=shuffle, proportions=list(proportions), span=span,
                                chunk=chunk, walk_offset=offset.tolist(), phase=p)
            self.walk_offsets.append(offset.tolist())
            self.orders.append(RowOrder(blocks, rows_per_block=rows_per_block, window=window,
                                        global_batch=global_batch, lanes=lanes, seed=seed, shuffle=shuffle, phase=p))
        first = self.orders[0]
        self.lanes, self.per_lane, self.rows_per_epoch = first.lanes, first.per_lane, first.rows_per_epoch

    def phase_of(self, rows) -> np.ndarray:
        """The phase index of each global row."""
        return np.searchsorted(self.first_rows, np.asarray(rows, dtype=np.int64), side="right") - 1

    def __call__(self, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and rows.min() < 0:
            raise IndexError("row numbers start at 0")
        phase = self.phase_of(rows)
        epoch, sample, row = (np.empty_like(rows) for _ in range(3))
        for p in np.unique(phase):
            sel = phase == p
            epoch[sel], sample[sel], row[sel] = self.orders[int(p)](rows[sel] - self.first_rows[p])
        return epoch, sample, row
