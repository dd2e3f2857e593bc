"""Host reads (a GPU waits for them) in one training step of the tiny model stay within a written budget.

Counted: `.item()`, `.tolist()`, `bool()`/`float()`/`int()` of a tensor, and ops whose output size CUDA
must read back (bincount, nonzero, unique, masked_select, repeat_interleave without output_size), when
called from project code (torch's own, e.g. the CPU optimizer's step counters, is not ours to change).
"""
import collections
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from parallel.engine import build_engine
from parallel.topology import Topology
from pretrain.config import ParallelConfig, load_config
from pretrain.model.model import build_model
from pretrain.train.step import Placement, train_step

ROOT = str(Path(__file__).resolve().parents[1])
READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "bincount", "unique",
         "masked_select"}
# The budget, by call site: the step's one read of its numbers; on the CPU only, the experts' loop reads
# each MoE layer's counts (CUDA runs grouped GEMMs without it) and the block attention reads the document
# starts once per forward (CUDA runs FlexAttention without it).
PER_STEP = {("pretrain/train/step.py", "train_step"): 1}
PER_MICRO_BATCH_PER_MOE_LAYER = {("pretrain/model/ffn.py", "forward"): 1}
PER_MICRO_BATCH = {("pretrain/model/mixers.py", "_block_starts"): 1}


class HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        sync = name in READS or (name == "repeat_interleave" and kwargs.get("output_size") is None
                                 and len(args) > 1 and torch.is_tensor(args[1]))
        if sync:
            caller = sys._getframe(1)
            path = caller.f_code.co_filename
            if path.startswith(ROOT) and "site-packages" not in path:
                self.sites[(str(Path(path).relative_to(ROOT)), caller.f_code.co_name)] += 1
        return func(*args, **kwargs)


def _batch(vocab: int, rows: int, seq: int, g) -> dict:
    ids = torch.randint(0, vocab, (rows, seq + 1), generator=g)
    doc_start = torch.zeros(rows, seq, dtype=torch.bool)
    doc_start[:, 0] = doc_start[0, seq // 3] = True
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "doc_start": doc_start}


def test_one_training_step_reads_the_host_within_budget():
    cfg = load_config("tiny", ["parallel.dp=1", "parallel.ep=1", "cluster.num_workers=1"]).model
    engine = build_engine(build_model(cfg, seed=0), load_config("tiny").optim, ParallelConfig(), max_steps=10,
                          grad_accum=2)
    place = Placement(Topology.single(), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    train_step(engine, [_batch(cfg.vocab_size, 2, 64, g) for _ in range(2)], place)  # warm-up
    with HostReads() as reads:
        train_step(engine, [_batch(cfg.vocab_size, 2, 64, g) for _ in range(2)], place)
    moe_layers = len(engine.model.moe_layers())
    budget = collections.Counter(PER_STEP)
    budget.update({k: 2 * moe_layers * v for k, v in PER_MICRO_BATCH_PER_MOE_LAYER.items()})
    budget.update({k: 2 * v for k, v in PER_MICRO_BATCH.items()})
    over = {site: n for site, n in reads.sites.items() if n > budget.get(site, 0)}
    assert not over, f"host reads over budget (site: count): {over}; budget {dict(budget)}"


def test_the_counter_sees_a_host_read():
    with HostReads() as reads:
        bool(torch.ones(2).any())
    assert sum(reads.sites.values()) == 1
