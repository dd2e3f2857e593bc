"""Context parallelism equals the single-process run: the liquid state exchange alone, and a whole hybrid
model (liquid, attention, conv, MoE) with documents crossing and starting at rank borders, on real gloo ranks."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist

from parallel.context_parallel import (apply_context_parallel, context_parallel_loss, context_parallel_scan,
                                       split_for_context_parallel)
from pretrain.config import AttentionConfig, LiquidConfig, ModelConfig, MoEConfig
from pretrain.model.layers import no_halo
from pretrain.model.mixers import AttentionMixer, ConvMixer, LiquidMixer, local_attention_layout, local_kv
from pretrain.model.model import IGNORE_INDEX, build_model
from pretrain.model.scan import liquid_scan
from tests.distributed.harness import run_distributed

TIMEOUT = 120.0  # a rank missing a collective would hang: fail instead


def assert_close(actual, expected, rtol=1e-5, name=""):
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")


# ---- the liquid exchange alone -----------------------------------------------------------------------

def scan_inputs(seq, *, resets, decay_range, seed, batch=2, heads=3, n=4, p=5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, n, generator=g)
    k = torch.randn(batch, seq, heads, n, generator=g) * 0.5
    v = torch.randn(batch, seq, heads, p, generator=g)
    lo, hi = decay_range
    log_decay = -(lo + (hi - lo) * torch.rand(batch, seq, heads, generator=g))
    for row, t in resets:
        log_decay[row, t] = float("-inf")
    out_grads = torch.randn(batch, seq, heads, p, generator=g), torch.randn(batch, heads, n, p, generator=g)
    return (q, k, v, log_decay), out_grads


def _check_exchange(rank, world, cases):
    for case in cases:
        (q, k, v, log_decay), (gy, gs) = scan_inputs(**case["inputs"])
        seq, chunk = q.shape[1], case["chunk_size"]
        part = seq // world
        mine = slice(rank * part, (rank + 1) * part)

        full = [x.clone().requires_grad_() for x in (q, k, v, log_decay)]
        y_ref, s_ref = liquid_scan(*full, chunk_size=chunk)
        ((y_ref * gy).sum() + (s_ref * gs).sum()).backward()
        _, s_ref_here = liquid_scan(*(x[:, :mine.stop] for x in (q, k, v, log_decay)), chunk_size=chunk)

        local = [x[:, mine].clone().requires_grad_() for x in (q, k, v, log_decay)]
        # Under bf16 autocast the exchange and its correction still accumulate in fp32 (the same numbers).
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.get("autocast", False)):
            y, state = context_parallel_scan(*local, group=dist.group.WORLD, chunk_size=chunk)
        loss = (y * gy[:, mine]).sum()
        if rank == world - 1:
            loss = loss + (state * gs).sum()
        loss.backward()

        label = f"{case['name']} rank {rank}"
        assert_close(y, y_ref[:, mine].detach(), name=f"{label} y")
        assert_close(state, s_ref_here, name=f"{label} state")
        for name, x_local, x_full in zip("q k v log_decay".split(), local, full):
            assert_close(x_local.grad, x_full.grad[:, mine], name=f"{label} grad {name}")
    return True


def test_liquid_exchange_two_ranks():
    cases = [
        # seq 24 -> slices of 12 over chunks of 4; resets inside both slices and one exactly at the border
        {"name": "resets", "chunk_size": 4,
         "inputs": dict(seq=24, resets=[(0, 3), (0, 17), (1, 12), (1, 20)], decay_range=(0.01, 0.5), seed=1)},
        # strong decay over long slices: every carried gain underflows to 0, nothing may turn NaN
        {"name": "strong decay", "chunk_size": 16,
         "inputs": dict(seq=512, resets=[(1, 300)], decay_range=(5.0, 40.0), seed=2)},
        {"name": "bf16 autocast", "chunk_size": 4, "autocast": True,
         "inputs": dict(seq=24, resets=[(0, 3), (1, 12)], decay_range=(0.01, 0.5), seed=5)},
    ]
    assert run_distributed(_check_exchange, 2, cases, timeout=TIMEOUT) == [True, True]


def test_liquid_exchange_four_ranks():
    all_reset = [(1, t) for t in range(16, 24)]  # row 1: slice 2 is nothing but resets
    cases = [
        # seq 32 -> slices of 8 over chunks of 3 (padded); resets inside slices and at the border 8
        {"name": "resets", "chunk_size": 3,
         "inputs": dict(seq=32, resets=[(0, 5), (0, 8), (0, 27), (1, 2)] + all_reset, decay_range=(0.01, 0.3),
                        seed=3)},
        {"name": "no resets", "chunk_size": 4, "inputs": dict(seq=32, resets=[], decay_range=(0.0, 0.2), seed=4)},
    ]
    assert run_distributed(_check_exchange, 4, cases, timeout=TIMEOUT) == [True] * 4


# ---- a whole hybrid model -----------------------------------------------------------------------------

MODEL_CFG = ModelConfig(
    vocab_size=61, d_model=32, num_layers=4, mixer="liquid", attention_layers=[2], conv_layers=[3],
    dense_layers=3, dense_dim=48,
    liquid=LiquidConfig(heads=2, key_dim=8, value_dim=8, chunk_size=4, conv_kernel=3),
    attention=AttentionConfig(heads=4, kv_heads=2, head_dim=8),
    moe=MoEConfig(num_experts=4, top_k=2, expert_dim=32),
)


def model_batch(seq, doc_starts, seed=0):
    """Two rows; doc_starts[row] lists the document start positions (row 1 opens mid-document)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, MODEL_CFG.vocab_size, (2, seq), generator=g)
    labels = torch.randint(0, MODEL_CFG.vocab_size, (2, seq), generator=g)
    labels[:, ::7] = IGNORE_INDEX
    doc_start = torch.zeros(2, seq, dtype=torch.bool)
    for row, starts in enumerate(doc_starts):
        doc_start[row, starts] = True
    return {"input_ids": input_ids, "labels": labels, "doc_start": doc_start}


def _check_model(rank, world, batches):
    group = dist.group.WORLD
    torch.manual_seed(0)
    model = build_model(MODEL_CFG)
    cp_model = apply_context_parallel(copy.deepcopy(model), group)
    assert copy.deepcopy(cp_model).layers[0].mixer.scan.group is group  # hooks survive deepcopy
    with pytest.raises(ValueError, match="mtp_depth"):
        apply_context_parallel(build_model(dataclasses.replace(MODEL_CFG, mtp_depth=1)), group)
    for batch in batches:
        model.zero_grad(set_to_none=True)
        cp_model.zero_grad(set_to_none=True)
        ref = model(**batch)
        ref.loss.backward()

        local = split_for_context_parallel(batch, rank, world)
        loss = context_parallel_loss(cp_model(**local), local["labels"], group)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)
        assert_close(total, ref.loss.detach(), name="loss")
        for (name, p_ref), p in zip(model.named_parameters(), cp_model.parameters()):
            grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad, group=group)
            expected = p_ref.grad if p_ref.grad is not None else torch.zeros_like(p_ref)
            assert_close(grad, expected, name=f"rank {rank} grad {name}")
    return True


def test_hybrid_model_two_ranks():
    seq = 32  # slices of 16: four scan chunks each
    batches = [
        # row 0: documents crossing the border (start 5 runs to 16) and one starting exactly at it (16);
        # row 1 opens mid-document and a document starts on rank 0's last token (the conv halo spans it)
        model_batch(seq, [[0, 5, 16, 27], [15, 22]], seed=1),
        model_batch(seq, [[], []], seed=2),  # no document starts at all
    ]
    batches[1]["doc_start"] = None
    assert run_distributed(_check_model, 2, batches, timeout=TIMEOUT) == [True, True]


def test_hybrid_model_four_ranks():
    seq = 32  # slices of 8: two scan chunks each
    batches = [model_batch(seq, [[0, 3, 8, 12, 30], [7, 15, 17]], seed=3)]
    assert run_distributed(_check_model, 4, batches, timeout=TIMEOUT) == [True] * 4


# ---- without ranks ------------------------------------------------------------------------------------

def test_split_for_context_parallel():
    batch = model_batch(12, [[0, 4], []])
    batch["dt"] = torch.rand(2, 12)
    batch["note"] = "kept"
    parts = [split_for_context_parallel(batch, r, 3) for r in range(3)]
    for key in ("input_ids", "labels", "doc_start", "dt"):
        assert torch.equal(torch.cat([p[key] for p in parts], dim=1), batch[key])
        assert parts[1][key].shape[1] == 4
    assert parts[2]["note"] == "kept"
    with pytest.raises(ValueError, match="divisible"):
        split_for_context_parallel(batch, 0, 5)
    with pytest.raises(ValueError, match="cp_rank"):
        split_for_context_parallel(batch, 3, 3)


def test_apply_without_group_is_a_no_op():
    class Topology:
        cp_group = None

    model = build_model(MODEL_CFG)
    assert apply_context_parallel(model, None) is model
    assert apply_context_parallel(model, Topology()) is model
    mixers = [layer.mixer for layer in model.layers]
    assert [type(m) for m in mixers] == [LiquidMixer, LiquidMixer, AttentionMixer, ConvMixer]
    assert mixers[0].scan is liquid_scan and mixers[0].halo is no_halo and mixers[3].halo is no_halo
    assert mixers[2].layout is local_attention_layout and mixers[2].gather_kv is local_kv
