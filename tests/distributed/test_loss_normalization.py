"""Token-weighted loss over the global batch across ranks (pretrain/train/step.py): data-parallel ranks whose rows
hold very different numbers of labels, and a context-parallel slice without any label, give the loss and the
updated weights of one process taking the whole global batch (gloo, real processes, DeepSpeed ZeRO)."""
import pytest
import torch

from parallel.engine import build_engine
from parallel.parallelize import parallelize
from parallel.topology import Topology
from pretrain.config import ParallelConfig
from pretrain.model.model import IGNORE_INDEX, build_model
from pretrain.train.step import Placement, train_step
from tests.distributed.harness import run_distributed
from tests.distributed.test_engine import MODEL, OPTIM, _close, _device, _plain

SEQ, MAX_STEPS = 16, 10


def _rows(rows: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MODEL.vocab_size, (rows, SEQ + 1), generator=g)
    doc_start = torch.zeros(rows, SEQ, dtype=torch.bool)
    doc_start[:, 0] = True
    doc_start[0, 6] = True
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:].clone(), "doc_start": doc_start}


def dp_batch() -> dict:
    """Two rows: 16 labels and 3 (a mean of the two rank means would weigh the 3 like the 16)."""
    batch = _rows(2, seed=11)
    batch["labels"][1, 3:] = IGNORE_INDEX
    return batch


def dp_accum_batch() -> dict:
    """Four rows, two per dp rank in micro-batches of one: rank 1's first micro-batch is all padding."""
    batch = _rows(4, seed=12)
    batch["labels"][1, 10:] = IGNORE_INDEX
    batch["labels"][2] = IGNORE_INDEX
    batch["labels"][3, :12] = IGNORE_INDEX
    return batch


def cp_batch() -> dict:
    """Two rows, one micro-batch each on cp = 2: row 0's second half (CP rank 1's slice) has no labels."""
    batch = _rows(2, seed=13)
    batch["labels"][0, SEQ // 2:] = IGNORE_INDEX
    batch["labels"][1, :2] = IGNORE_INDEX
    return batch


# name -> (dp, cp, zero_stage, grad_accum, the global batch)
CASES = {"dp2-mb1": (2, 1, 2, 1, dp_batch), "dp2-mb1-accum2": (2, 1, 1, 2, dp_accum_batch),
         "cp2-accum2": (1, 2, 2, 2, cp_batch)}


def _step(engine, micro_batches, place) -> dict:
    grads = {}
    result = train_step(engine, micro_batches, place, before_update=lambda: grads.update(engine.full_gradients()))
    return _plain({"loss": result.loss, "norm": result.grad_norm, "grads": grads,
                   "weights": {n: p.detach().clone() for n, p in engine.model.named_parameters()}})


def _reference(batch: dict) -> dict:
    """One process, the whole global batch in one micro-batch."""
    torch.manual_seed(0)
    engine = build_engine(build_model(MODEL), OPTIM, ParallelConfig(), max_steps=MAX_STEPS, grad_accum=1,
                          micro_batch_size=batch["input_ids"].shape[0])
    return _step(engine, [batch], Placement(Topology.single(), torch.device("cpu")))


def _ranks(rank, world, cases):
    from parallel.topology import build_topology, destroy_topology

    results = {}
    for name in cases:
        dp, cp, stage, grad_accum, make = CASES[name]
        batch = make()
        topology = build_topology(ParallelConfig(dp=dp, cp=cp), seq_len=SEQ, num_experts=MODEL.moe.num_experts)
        rows = batch["input_ids"].shape[0] // dp  # this dp rank's rows; each CP rank gets them whole
        size = rows // grad_accum
        lo = topology.dp_rank * rows
        micro = [{k: v[lo + i * size:lo + (i + 1) * size] for k, v in batch.items()} for i in range(grad_accum)]
        torch.manual_seed(0)
        device = _device()
        model = parallelize(build_model(MODEL).to(device), topology)
        engine = build_engine(model, OPTIM, ParallelConfig(dp=dp, cp=cp, zero_stage=stage), topology,
                              max_steps=MAX_STEPS, grad_accum=grad_accum, micro_batch_size=size)
        results[name] = _step(engine, micro, Placement(topology, device))
        destroy_topology()
    return results


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(_ranks, 2, list(CASES))


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process_with_the_whole_batch(two_ranks, name):
    ref = _reference(CASES[name][4]())
    for rank, got in enumerate(r[name] for r in two_ranks):
        assert all(map(torch.isfinite, map(torch.as_tensor, (got["loss"], got["norm"])))), (rank, got["loss"])
        _close(got["loss"], ref["loss"], f"rank {rank} loss")
        _close(got["norm"], ref["norm"], f"rank {rank} grad norm")
        assert got["grads"].keys() == ref["grads"].keys()
        for n, g in got["grads"].items():
            _close(g, ref["grads"][n], f"rank {rank} grad {n}", floor=1e-3 * ref["norm"])
        for n, w in got["weights"].items():
            _close(w, ref["weights"][n], f"rank {rank} weight {n}")
