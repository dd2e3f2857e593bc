"""Activation checkpointing (train.activation_checkpointing) trades compute for memory and changes no number:
losses, gradients, expert counts, bias updates and the RNG equal the run without it, on one process through
the real training step and on two gloo ranks under expert and context parallelism; the saved activations
shrink from none to selective to full.
"""
import dataclasses

import numpy as np
import pytest
import torch

from parallel.engine import build_engine
from parallel.topology import Topology
from pretrain.config import ParallelConfig, load_config
from pretrain.model.model import ACTIVATION_CHECKPOINTING, build_model
from pretrain.train.step import Placement
from tests.distributed.harness import run_distributed
from tests.distributed.test_engine import (MAX_STEPS, MODEL, OPTIM, ROWS, SEQ, _batches, _check_equal,
                                           _reference, _step)

MODES = ("none", "selective", "full")
# Every kind of block: liquid with the scan's own recompute (nested checkpoints), attention, conv, dense and MoE
# FFNs, and a multi-token-prediction block.
ONE_PROCESS_MODEL = dataclasses.replace(MODEL, num_layers=4, conv_layers=[3], mtp_depth=1,
                                        liquid=dataclasses.replace(MODEL.liquid, recompute=True))
# (dp, cp, ep, zero_stage, grad_accum) on two ranks: experts and the sequence split over the same two ranks with
# ZeRO-2 sharding the gradients over both (dense ones are reduced over dp x cp) and two micro-batches per step;
# data and expert parallelism with ZeRO-1.
LAYOUTS = [(1, 2, 2, 2, 2), (2, 1, 2, 1, 1)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, as each spawned rank has: small CPU ops on a shared machine stall in OpenMP waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _identical(a, b, where="result"):
    """Bitwise equality of nested results (numpy arrays, floats, lists, dicts)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _identical(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, (where, a, b)


def _one_process(mode: str, dtype=None, *, grad_accum: int = 2) -> list[dict]:
    """Two steps of the real training step on one process, plus the RNG state after each."""
    torch.manual_seed(0)
    model = build_model(ONE_PROCESS_MODEL).set_activation_checkpointing(mode)
    engine = build_engine(model, OPTIM, ParallelConfig(), max_steps=MAX_STEPS, grad_accum=grad_accum, dtype=dtype)
    place = Placement(Topology.single(), torch.device("cpu"), dtype)
    size = ROWS // grad_accum
    steps = []
    for batch in _batches():
        micro = [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(grad_accum)]
        steps.append(_step(engine, micro, place) | {"rng": torch.get_rng_state().numpy()})
    return steps


def test_the_config_key_is_validated():
    assert load_config("tiny").train.activation_checkpointing == "none"
    assert load_config("tiny", ["train.activation_checkpointing=full"]).train.activation_checkpointing == "full"
    with pytest.raises(ValueError, match="'train.activation_checkpointing'.*none, selective or full"):
        load_config("tiny", ["train.activation_checkpointing=some"])
    with pytest.raises(ValueError, match="activation checkpointing must be one of"):
        build_model(MODEL).set_activation_checkpointing("mixer")
    assert set(MODES) == set(ACTIVATION_CHECKPOINTING)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_process_steps_are_bitwise_those_without_checkpointing(dtype):
    """The recompute is deterministic on the CPU: the same numbers to the bit, in fp32 and under bf16
    autocast with bf16 weights (LocalEngine's master-weight mode)."""
    plain = _one_process("none", dtype)
    assert any(c for step in plain for row in step["counts"] for c in row)  # experts saw tokens
    for mode in ("selective", "full"):
        _identical(_one_process(mode, dtype), plain, mode)


def test_the_recomputed_forward_counts_no_tokens_and_draws_no_random_numbers():
    """Backward reruns every MoE forward under full checkpointing: the counts stay one forward's (each
    token counted top_k times per MoE layer) and torch's generator stays where the forward left it."""
    torch.manual_seed(0)
    model = build_model(ONE_PROCESS_MODEL).set_activation_checkpointing("full")
    batch = _batches()[0]
    rng = torch.get_rng_state()
    out = model(batch["input_ids"], labels=batch["labels"], doc_start=batch["doc_start"])
    counted = [m.tokens_per_expert.clone() for m in model.moe_layers()]
    out.loss.backward()
    assert torch.equal(torch.get_rng_state(), rng)
    for moe, forward_counts in zip(model.moe_layers(), counted, strict=True):
        assert torch.equal(moe.tokens_per_expert, forward_counts)
        assert moe.tokens_per_expert.sum() == ROWS * SEQ * MODEL.moe.top_k
        assert moe.count_tokens  # the pause ended with the recompute


class SavedActivations:
    """Peak bytes autograd keeps for backward (saved_tensors_hooks): distinct storages, the parameters
    excluded. Deterministic, unlike the process's RSS. A checkpointed region's own saved tensors go
    through torch.utils.checkpoint's hooks instead: what is left here is what stays from forward to
    backward (the recompute then holds one region's activations at a time)."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.live: dict[int, list] = {}  # storage pointer -> [bytes, holders]
        self.now = self.peak = 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.tensor)

    def _pack(self, tensor):
        return _Held(self, tensor)

    def add(self, ptr: int, nbytes: int):
        entry = self.live.setdefault(ptr, [nbytes, 0])
        entry[1] += 1
        if entry[1] == 1:
            self.now += nbytes
            self.peak = max(self.peak, self.now)

    def remove(self, ptr: int):
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[ptr]


class _Held:
    def __init__(self, counter: SavedActivations, tensor):
        self.tensor, self.counter = tensor, None
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in counter.params:
            self.counter, self.ptr = counter, ptr
            counter.add(ptr, tensor.untyped_storage().nbytes())

    def __del__(self):
        if self.counter is not None:
            self.counter.remove(self.ptr)


def _saved_bytes(mode: str) -> int:
    """Peak saved activations of one forward + backward of the tiny preset's model (d 128, 4 layers,
    8 experts) on a row of 256 tokens."""
    cfg = load_config("tiny").model
    torch.manual_seed(0)
    model = build_model(cfg, seed=0).set_activation_checkpointing(mode)
    ids = torch.randint(0, cfg.vocab_size, (1, 257))
    counter = SavedActivations(model)
    with counter.hooks:
        model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    assert counter.now == 0  # backward released everything it kept
    return counter.peak


def test_checkpointing_keeps_fewer_activations():
    saved = {mode: _saved_bytes(mode) for mode in MODES}
    print("saved activation bytes:", saved)
    assert saved["full"] < saved["selective"] < saved["none"]


# ---- two gloo ranks ----------------------------------------------------------------------------------


def _layouts(rank, world):
    """Every mode on every layout: this rank's steps, from the same seed as the reference."""
    from parallel.parallelize import parallelize
    from parallel.topology import build_topology, destroy_topology

    results = {}
    for dp, cp, ep, stage, grad_accum in LAYOUTS:
        topology = build_topology(ParallelConfig(dp=dp, cp=cp, ep=ep), seq_len=SEQ, num_experts=MODEL.moe.num_experts)
        place = Placement(topology, torch.device("cpu"))
        size = ROWS // dp // grad_accum
        lo = topology.dp_rank * (ROWS // dp)
        for mode in MODES:
            torch.manual_seed(0)
            model = parallelize(build_model(MODEL), topology).set_activation_checkpointing(mode)
            engine = build_engine(model, OPTIM, ParallelConfig(dp=dp, cp=cp, ep=ep, zero_stage=stage), topology,
                                  max_steps=MAX_STEPS, grad_accum=grad_accum, micro_batch_size=size)
            results[(dp, cp, ep, mode)] = [
                _step(engine, [{k: v[lo + i * size:lo + (i + 1) * size] for k, v in batch.items()}
                               for i in range(grad_accum)], place)
                for batch in _batches()]
        destroy_topology()
    return results


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(_layouts, 2)


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"dp{d}-cp{c}-ep{e}-zero{z}" for d, c, e, z, _ in LAYOUTS])
def test_two_ranks_equal_the_single_process_run_in_every_mode(two_ranks, layout):
    """The recompute reruns the all_to_alls (full) and the context all-gathers in backward, in the same
    order on every rank: the numbers equal the run without checkpointing to the bit, and the single
    process to float noise."""
    dp, cp, ep = layout[:3]
    reference = _reference()
    for rank in two_ranks:
        for mode in ("selective", "full"):
            _identical(rank[(dp, cp, ep, mode)], rank[(dp, cp, ep, "none")], mode)
    for mode in MODES:
        _check_equal([r[(dp, cp, ep, mode)] for r in two_ranks], reference, ep=ep)
        for step, ref in enumerate(reference):
            for r in two_ranks:
                got = r[(dp, cp, ep, mode)][step]
                assert got["counts"] == ref["counts"], (mode, step)
                _identical(got["biases"], ref["biases"], f"{mode} step {step} biases")
