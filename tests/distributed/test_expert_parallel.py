"""Expert parallelism on real gloo processes equals the single-process MoE and LiquidLM (outputs and gradients).

Each rank feeds its own slice of a global batch; EP groups are contiguous ranks, expert-data-parallel replicas strided.
"""
from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.distributed as dist

from parallel.expert_parallel import ExpertParallelExperts, apply_expert_parallel, expert_load_stats
from pretrain.config import LiquidConfig, ModelConfig, MoEConfig
from pretrain.model.ffn import Experts, MoE
from pretrain.model.model import build_model
from tests.distributed.harness import backend, run_distributed

D_MODEL, NUM_EXPERTS = 16, 8
MOE_CFG = MoEConfig(num_experts=NUM_EXPERTS, top_k=2, expert_dim=24, bias_update_rate=0.0)
TOKENS = (3, 4)  # per rank: [batch, seq]
# Router biases (added to sigmoid scores in (0, 1), so +-5 decides the choice outright).
BIASES = {
    "one_empty_expert": [0, 0, 0, 0, 0, -5, 0, 0],  # expert 5 never chosen; splits uneven by chance
    "skewed": [1, 0.3, 0, 0, 0, 0, 0, 0],  # nearly every token picks expert 0 and most also pick 1
    "starved": [5, 5, -5, -5, -5, -5, -5, -5],  # everything goes to experts 0, 1: other ranks receive nothing
}
LM_CFG = ModelConfig(
    vocab_size=40, d_model=D_MODEL, num_layers=3, mixer="liquid", attention_layers=[], conv_layers=[],
    dense_layers=1, dense_dim=24,
    liquid=LiquidConfig(heads=2, key_dim=4, value_dim=4, chunk_size=4, conv_kernel=3, tau_min=1.0, tau_max=16.0),
    moe=MOE_CFG, init_std=0.1,
)
LM_ROWS, LM_SEQ = 2, 6  # per rank


def close(actual, expected):
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def make_moe(case: str) -> MoE:
    torch.manual_seed(0)
    moe = MoE(D_MODEL, MOE_CFG)
    with torch.no_grad():  # Experts are allocated with torch.empty; the model initialises them.
        for w in (moe.experts.w1, moe.experts.w3, moe.experts.w2):
            w.normal_(std=0.3)
        moe.router.gate.weight.normal_(std=0.5)
        moe.router.expert_bias.copy_(torch.tensor(BIASES[case], dtype=torch.float32))
    return moe


def global_batch(world: int):
    g = torch.Generator().manual_seed(1)
    return torch.randn(world, *TOKENS, D_MODEL, generator=g), torch.randn(world, *TOKENS, D_MODEL, generator=g)


def lm_batch(world: int):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, LM_CFG.vocab_size, (world, LM_ROWS, LM_SEQ + 1), generator=g)
    return ids[..., :-1], ids[..., 1:]


def ep_group(rank: int, world: int, ep: int):
    """Contiguous EP groups [i*ep, (i+1)*ep) (DeepSpeed's layout); every rank creates all of them."""
    mine = None
    for i in range(world // ep):
        ranks = list(range(i * ep, (i + 1) * ep))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


def rank_device() -> torch.device:
    """Where a rank computes: its GPU under NCCL (LIQUID_TEST_NCCL=1), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")


def grads_of(module) -> dict:
    return {n: p.grad.cpu().numpy() for n, p in module.named_parameters() if p.grad is not None}


# --- what each rank runs ---------------------------------------------------------------------------

def moe_case(rank, world, group, case):
    """One MoE case on this rank: checks in place, returns what the parent compares with the global run."""
    dev = rank_device()
    moe = make_moe(case).to(dev)
    reference = copy.deepcopy(moe)
    wrapper = types.SimpleNamespace(ep_group=group) if case == "skewed" else group  # a Topology-like object too
    apply_expert_parallel(moe, wrapper)
    ep, ep_rank = dist.get_world_size(group), dist.get_rank(group)
    n = NUM_EXPERTS // ep
    assert isinstance(moe.experts, ExpertParallelExperts) and type(moe.experts.experts) is Experts
    for name in ("w1", "w3", "w2"):
        local = getattr(moe.experts.experts, name)
        assert torch.equal(local, getattr(reference.experts, name)[ep_rank * n:(ep_rank + 1) * n])
        assert local.allreduce is False and local.group_name == f"ep_size_{ep}"

    x_all, g_all = (t.to(dev) for t in global_batch(world))
    x = x_all[rank].clone().requires_grad_(True)
    y, _ = moe(x)
    (y * g_all[rank]).sum().backward()
    close(y.detach(), reference(x_all[rank])[0].detach())  # (a) this rank's tokens, single-process MoE
    with torch.no_grad():
        close(moe(x_all[rank])[0], y.detach())  # the no-grad path agrees
    return {"ep_rank": ep_rank, "y": y.detach().cpu().numpy(), "x_grad": x.grad.cpu().numpy(), "grads": grads_of(moe),
            "tokens_received": _tokens_received(moe, x_all[rank], group)}


def moe_bf16_starved_case(rank, world, group):
    """Under bf16 autocast with one EP rank receiving no tokens: every rank must send the stream's dtype
    back (a rank returning fp32 while the others return bf16 mixes element sizes in the all_to_all)."""
    moe = make_moe("starved").to(rank_device())
    reference = copy.deepcopy(moe)
    apply_expert_parallel(moe, group)
    x_all, g_all = (t.to(rank_device()) for t in global_batch(world))
    x = x_all[rank].clone().requires_grad_(True)
    with torch.autocast(rank_device().type, dtype=torch.bfloat16):
        y, _ = moe(x)
        y_ref, _ = reference(x_all[rank])
    (y * g_all[rank]).sum().backward()
    assert y.dtype == x.dtype == torch.float32 and x.grad.dtype == torch.float32
    torch.testing.assert_close(y.detach(), y_ref.detach(), rtol=2e-2, atol=2e-2)
    return {"tokens_received": _tokens_received(moe, x_all[rank], group), "grads": grads_of(moe)}


def _tokens_received(moe, x, group):
    """Slots this rank's experts received from the whole EP group for input x."""
    counts = torch.bincount(moe.router(x.reshape(-1, D_MODEL))[0].flatten(), minlength=NUM_EXPERTS)
    dist.all_reduce(counts, group=group)
    n = NUM_EXPERTS // dist.get_world_size(group)
    return counts.view(-1, n).sum(1).tolist()  # [ep]: per EP rank


def lm_case(rank, world, group):
    torch.manual_seed(0)
    model = build_model(LM_CFG).to(rank_device())  # built on the CPU: the same init as the parent's
    reference = copy.deepcopy(model)
    apply_expert_parallel(model, group)
    assert len(model.moe_layers()) == 2
    ids, labels = (t.to(rank_device()) for t in lm_batch(world))
    loss = model(ids[rank], labels=labels[rank]).loss
    loss.backward()
    close(loss.detach(), reference(ids[rank], labels=labels[rank]).loss.detach())
    return {"ep_rank": dist.get_rank(group), "loss": loss.item(), "grads": grads_of(model),
            "load": expert_load_stats(model, dist.group.WORLD), "local_load": expert_load_stats(model)}


def run_two_ranks(rank, world):
    group = ep_group(rank, world, 2)
    results = {("moe", 2, case): moe_case(rank, world, group, case) for case in BIASES}
    results[("lm", 2)] = lm_case(rank, world, group)
    results["bf16_starved"] = moe_bf16_starved_case(rank, world, group)
    with pytest.raises(ValueError, match="divisible"):
        apply_expert_parallel(MoE(D_MODEL, MoEConfig(num_experts=3, top_k=1, expert_dim=8)), group)
    return results


def run_four_ranks(rank, world):
    groups = {ep: ep_group(rank, world, ep) for ep in (2, 4)}
    results = {("moe", ep, case): moe_case(rank, world, groups[ep], case) for ep in (2, 4) for case in BIASES}
    results[("lm", 2)] = lm_case(rank, world, groups[2])
    with pytest.raises(ValueError, match="divisible"):
        apply_expert_parallel(MoE(D_MODEL, MoEConfig(num_experts=6, top_k=1, expert_dim=8)), groups[4])
    return results


# --- the parent compares with the single-process run on the global batch -----------------------------

def sum_by_shard(per_rank: list[dict], name: str, ep: int):
    """Gradient of each expert shard, summed over the ranks that hold it (expert-data-parallel replicas)."""
    shards = [sum(torch.from_numpy(r["grads"][name]) for r in per_rank if r["ep_rank"] == s) for s in range(ep)]
    return torch.cat(shards)


def check_moe(per_rank: list[dict], ep: int, case: str):
    world = len(per_rank)
    moe = make_moe(case)
    x_all, g_all = global_batch(world)
    x = x_all.flatten(0, 1).clone().requires_grad_(True)  # ranks' batches concatenated
    y, _ = moe(x)
    (y * g_all.flatten(0, 1)).sum().backward()
    y, x_grad = y.detach().view_as(x_all), x.grad.view_as(x_all)
    for rank, r in enumerate(per_rank):
        close(r["y"], y[rank])
        close(r["x_grad"], x_grad[rank])
    close(sum(torch.from_numpy(r["grads"]["router.gate.weight"]) for r in per_rank), moe.router.gate.weight.grad)
    for name in ("w1", "w3", "w2"):
        close(sum_by_shard(per_rank, f"experts.experts.{name}", ep), getattr(moe.experts, name).grad)
    received = per_rank[0]["tokens_received"]  # the case does what its name says
    if case == "skewed":
        assert received[0] > 0.6 * sum(received) and sum(received[1:]) > 0
    if case == "starved":
        assert received[1:] == [0] * (ep - 1)


def check_lm(per_rank: list[dict]):
    world, ep = len(per_rank), 2
    torch.manual_seed(0)
    model = build_model(LM_CFG)
    ids, labels = lm_batch(world)
    loss = model(ids.flatten(0, 1), labels=labels.flatten(0, 1)).loss  # mean over tokens = mean of rank means
    loss.backward()
    close(sum(r["loss"] for r in per_rank) / world, loss.item())
    for name, p in model.named_parameters():
        if ".experts." in name:
            local = name.replace(".experts.", ".experts.experts.")
            close(sum_by_shard(per_rank, local, ep) / world, p.grad)
        else:
            close(sum(torch.from_numpy(r["grads"][name]) for r in per_rank) / world, p.grad)
    reference_load = expert_load_stats(model)
    assert [r["load"] for r in per_rank] == [reference_load] * world
    for i, layer in enumerate(reference_load):
        summed = torch.tensor([r["local_load"][i]["tokens_per_expert"] for r in per_rank]).sum(0)
        assert summed.tolist() == layer["tokens_per_expert"] and layer["max"] >= layer["mean"] > 0


def test_two_ranks_ep2():
    results = run_distributed(run_two_ranks, 2)
    for case in BIASES:
        check_moe([r[("moe", 2, case)] for r in results], 2, case)
    check_lm([r[("lm", 2)] for r in results])
    starved = [r["bf16_starved"] for r in results]
    assert starved[0]["tokens_received"][1] == 0  # rank 1's experts got nothing
    assert all((g == 0).all() for g in starved[1]["grads"].values() if g.ndim == 3)  # its experts: zero grads


def test_four_ranks_ep2_with_expert_replicas_and_ep4():
    results = run_distributed(run_four_ranks, 4)
    for ep in (2, 4):
        for case in BIASES:
            check_moe([r[("moe", ep, case)] for r in results], ep, case)
    check_lm([r[("lm", 2)] for r in results])


def test_no_group_is_a_no_op():
    moe = make_moe("skewed")
    experts = moe.experts
    assert apply_expert_parallel(moe, None) is moe and moe.experts is experts
    assert apply_expert_parallel(moe, types.SimpleNamespace(ep_group=None)).experts is experts
