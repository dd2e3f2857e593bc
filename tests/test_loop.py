"""The training loop over the one training step: what it keeps in memory and how it ends."""
import gc

import torch

from parallel.engine import build_engine
from parallel.topology import Topology
from pretrain.config import ParallelConfig, TrainConfig
from pretrain.model.model import build_model
from pretrain.train.loop import Position, train_loop
from pretrain.train.step import Placement
from tests.distributed.test_engine import MODEL, OPTIM, SEQ


class _Rows:
    """Random rows with documents, as the loader hands them out."""

    def __init__(self):
        self.g = torch.Generator().manual_seed(0)

    def next_batch(self, rows: int) -> dict:
        ids = torch.randint(0, MODEL.vocab_size, (rows, SEQ + 1), generator=self.g)
        doc_start = torch.zeros(rows, SEQ, dtype=torch.bool)
        doc_start[:, 0] = True
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "doc_start": doc_start}


class _Records:
    def __init__(self):
        self.steps = []

    def log(self, record: dict) -> None:
        self.steps.append(record["step"])  # keeps nothing of the record itself


def _records_alive() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is dict and "expert_load_per_layer" in o)


def test_loop_keeps_only_the_first_and_last_records():
    """A 38T-token run logs millions of records: the loop must not hold them (the summary needs two)."""
    train_cfg = TrainConfig(max_steps=30, seq_len=SEQ, global_batch_size=2, micro_batch_size=1, log_interval=1)
    torch.manual_seed(0)
    engine = build_engine(build_model(MODEL), OPTIM, ParallelConfig(), max_steps=30, grad_accum=2)
    logger, before = _Records(), _records_alive()
    result = train_loop(engine, _Rows(), Placement(Topology.single(), torch.device("cpu")), train_cfg=train_cfg,
                        logger=logger, start=Position(step=10, tokens=10 * 2 * SEQ))
    assert logger.steps == list(range(11, 31))
    assert (result.steps, result.tokens, result.stopped) == (30, 30 * 2 * SEQ, False)
    assert result.first_record["step"] == 11 and result.last_record["step"] == 30
    assert _records_alive() - before <= 2


def test_stop_request_ends_the_loop_at_that_step():
    train_cfg = TrainConfig(max_steps=20, seq_len=SEQ, global_batch_size=1, micro_batch_size=1, log_interval=10)
    torch.manual_seed(0)
    engine = build_engine(build_model(MODEL), OPTIM, ParallelConfig(), max_steps=20, grad_accum=1)
    asked = iter([False, False, True])
    logger = _Records()
    result = train_loop(engine, _Rows(), Placement(Topology.single(), torch.device("cpu")), train_cfg=train_cfg,
                        logger=logger, should_stop=lambda: next(asked))
    assert (result.steps, result.stopped) == (3, True) and logger.steps == [3]
