"""The global data order: permutations are bijections, proportions hold, and nothing scales with the data."""
import resource
import time

import numpy as np
import pytest

from data_pipeline.order import BlockOrder, Permutation, RowOrder, key, split_by_proportion


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 1000, 4097])
def test_a_permutation_is_a_bijection_and_depends_on_its_key(n):
    values = Permutation(n, key(0, n))(np.arange(n))
    assert sorted(values.tolist()) == list(range(n))
    if n > 4:
        assert not np.array_equal(values, Permutation(n, key(1, n))(np.arange(n)))
        assert not np.array_equal(values, np.arange(n))
    with pytest.raises(IndexError):
        Permutation(n, 0)([n])


def test_an_epoch_is_every_block_once_and_epochs_differ():
    order = BlockOrder([10, 30, 1], seed=0, span=4, chunk=16)
    epochs = [order(e, np.arange(41)) for e in range(3)]
    for blocks in epochs:
        assert sorted(blocks.tolist()) == list(range(41))
    assert not np.array_equal(epochs[0], epochs[1])
    assert np.array_equal(BlockOrder([10, 30, 1], seed=0, shuffle=False)(0, np.arange(41)), np.arange(41))


def test_proportions_up_and_down_sample_without_early_repeats():
    """Stream 0 (10 blocks) gets 3/4 of 40 slots: each block 3 times; stream 1 (30 blocks) gets 10 a
    epoch: three epochs see all 30 once."""
    order = BlockOrder([10, 30], seed=1, proportions=[0.75, 0.25], span=4, chunk=8)
    assert order.per_epoch.tolist() == [30, 10] and split_by_proportion(10, [1, 1, 1]) == [4, 3, 3]
    first = order(0, np.arange(40))
    assert np.array_equal(np.bincount(first[first < 10], minlength=10), np.full(10, 3))
    down = np.concatenate([(b := order(e, np.arange(40)))[b >= 10] for e in range(3)])
    assert sorted(down.tolist()) == list(range(10, 40))


def test_rows_cover_each_epoch_once_window_by_window():
    order = RowOrder(BlockOrder([7, 5], seed=3), rows_per_block=4, window=3, global_batch=1, lanes=1, seed=3)
    epoch, block, row = order(np.arange(96))
    assert sorted(zip(epoch.tolist(), block.tolist(), row.tolist())) == \
        [(e, b, r) for e in (0, 1) for b in range(12) for r in range(4)]
    positions = BlockOrder([7, 5], seed=3)(0, np.arange(12))
    for w in range(4):  # the rows of window w are those of the epoch's blocks 3w..3w+2
        assert set(block[w * 12:(w + 1) * 12].tolist()) == set(positions[3 * w:3 * w + 3].tolist())


def test_lanes_read_their_own_blocks_and_each_block_once_an_epoch():
    """4 lanes of a global batch of 8 rows: each step takes 2 rows of every lane; lane l's rows come from
    its own quarter of the epoch's positions; 48 steps read each of the 96 blocks' 4 rows once."""
    blocks = BlockOrder([60, 36], seed=5, span=8, chunk=32)
    order = RowOrder(blocks, rows_per_block=4, window=2, global_batch=8, lanes=4, seed=5)
    epoch, block, row = order(np.arange(48 * 8))
    assert (epoch == 0).all() and sorted(zip(block.tolist(), row.tolist())) == [(b, r) for b in range(96) for r in range(4)]
    by_lane = block.reshape(48, 4, 2).transpose(1, 0, 2).reshape(4, -1)
    quarters = blocks(0, np.arange(96)).reshape(4, 24)
    for lane in range(4):
        assert set(by_lane[lane].tolist()) == set(quarters[lane].tolist())


def test_a_chunk_of_positions_uses_up_a_few_spans():
    """Shard locality: a chunk's positions (about 8192 of one stream of 1M blocks, spans of 512) are the
    blocks of 16 or 17 spans, each used up (but where a chunk boundary cuts one)."""
    blocks = BlockOrder([1_000_000], seed=0, span=512, chunk=8192)
    sample = blocks(0, np.arange(blocks._start[1]))
    spans = np.unique(sample // 512, return_counts=True)[1]
    assert len(spans) <= 17 and (spans == 512).sum() >= 15


def test_a_step_at_38t_tokens_is_computed_without_growing_memory():
    """580M blocks (38T tokens of 65,537-token blocks), 32 rows each: one step of 4096 rows deep into the
    third epoch is computed in milliseconds, with no structure the size of the data."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    order = RowOrder(BlockOrder([400_000_000, 180_000_000], seed=0, proportions=[0.6, 0.4]),
                     rows_per_block=32, window=8, global_batch=4096, lanes=64, seed=0)
    start = time.perf_counter()
    epoch, block, row = order(2 * order.rows_per_epoch + 10**9 + np.arange(4096))
    seconds = time.perf_counter() - start
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert (epoch == 2).all() and block.max() < 580_000_000 and len(set(block.tolist())) <= 64 * 16  # a window a lane
    assert seconds < 1.0 and grown_mib < 50
