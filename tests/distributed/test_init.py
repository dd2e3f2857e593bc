"""Initial weights do not depend on the layout: a rank that builds the model on the meta device, applies
expert parallelism and materialises only what it keeps holds exactly the single-process model's values."""
import numpy as np
import torch

from parallel.parallelize import parallelize
from parallel.state import canonical_name
from pretrain.config import ParallelConfig
from pretrain.model.model import build_model, materialize
from tests.distributed.harness import run_distributed
from tests.distributed.test_engine import MODEL, SEQ

SEED = 7


def _rank_model(rank, world):
    from parallel.topology import build_topology, destroy_topology

    topology = build_topology(ParallelConfig(dp=world, ep=world), seq_len=SEQ, num_experts=MODEL.moe.num_experts)
    model = parallelize(build_model(MODEL, device="meta"), topology)
    assert all(p.is_meta for p in model.parameters())  # nothing allocated before materialize
    model = materialize(model, "cpu", seed=SEED)
    destroy_topology()
    state = {canonical_name(n): t.detach().numpy() for n, t in model.state_dict().items()}
    return {"ep_rank": topology.ep_rank, "state": state,
            "marked": all(p.allreduce is False for m in model.moe_layers() for p in m.experts.parameters())}


def test_expert_parallel_ranks_hold_the_single_process_slices():
    full = {n: t.numpy() for n, t in build_model(MODEL, seed=SEED).state_dict().items()}
    ranks = run_distributed(_rank_model, 2)
    local = MODEL.moe.num_experts // 2
    for r in ranks:
        assert r["state"].keys() == full.keys() and r["marked"]
        for name, value in r["state"].items():
            expected = full[name]
            if ".experts.w" in name:
                expected = expected[r["ep_rank"] * local:(r["ep_rank"] + 1) * local]
            assert value.shape == expected.shape and np.array_equal(value, expected), name


def test_meta_build_equals_a_direct_build_and_seeds_differ():
    direct = build_model(MODEL, seed=SEED).state_dict()
    meta = materialize(build_model(MODEL, device="meta"), "cpu", seed=SEED).state_dict()
    assert all(torch.equal(direct[k], meta[k]) for k in direct)
    other = build_model(MODEL, seed=SEED + 1).state_dict()
    assert not torch.equal(direct["embed.weight"], other["embed.weight"])
    torch.manual_seed(0)  # no seed: drawn from torch's generator, so manual_seed decides
    a = build_model(MODEL).state_dict()["embed.weight"]
    torch.manual_seed(0)
    assert torch.equal(a, build_model(MODEL).state_dict()["embed.weight"])
