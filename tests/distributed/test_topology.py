"""The megatron-core topology on real processes: group memberships, ranks, and config validation."""
import pytest
import torch
import torch.distributed as dist

from parallel.topology import Topology, build_topology, destroy_topology, group_ranks, validate_parallel
from pretrain.config import ParallelConfig
from tests.distributed.harness import run_distributed

GROUPS = ("dp_group", "cp_group", "ep_group", "expert_dp_group", "dp_cp_group", "mp_group")


def _layouts(rank, world, configs):
    """For each (dp, ep, cp): every group's ranks, this rank's coordinates, and one all_reduce per group."""
    out = []
    for dp, ep, cp in configs:
        topo = build_topology(ParallelConfig(dp=dp, ep=ep, cp=cp), seq_len=16, num_experts=4)
        groups = {name: group_ranks(getattr(topo, name)) for name in GROUPS}
        sums = {}
        for name in GROUPS:  # the groups really communicate: sum of global ranks over the group
            t = torch.tensor([float(rank)])
            dist.all_reduce(t, group=getattr(topo, name))
            sums[name] = t.item()
        coords = (topo.dp_rank, topo.cp_rank, topo.ep_rank, topo.expert_dp_rank, topo.dp_cp_rank)
        out.append((groups, sums, coords, topo.rank, topo.world))
        destroy_topology()
    return out


def _check(results, config, expected):
    """expected: group name -> list of the world's groups (each a list of ranks)."""
    for rank, (groups, sums, _, topo_rank, world) in enumerate(results):
        assert topo_rank == rank and world == len(results)
        for name, partition in expected.items():
            mine = next(g for g in partition if rank in g)
            assert groups[name] == mine, (config, rank, name, groups[name], mine)
            assert sums[name] == sum(mine)
        assert groups["mp_group"] == [rank]


def test_two_ranks_layouts():
    configs = [(2, 1, 1), (2, 2, 1), (1, 1, 2), (1, 2, 2)]
    results = run_distributed(_layouts, 2, configs)
    per_config = list(zip(*results))
    _check(per_config[0], configs[0], {"dp_group": [[0, 1]], "cp_group": [[0], [1]], "ep_group": [[0], [1]],
                                       "expert_dp_group": [[0, 1]], "dp_cp_group": [[0, 1]]})
    _check(per_config[1], configs[1], {"dp_group": [[0, 1]], "cp_group": [[0], [1]], "ep_group": [[0, 1]],
                                       "expert_dp_group": [[0], [1]], "dp_cp_group": [[0, 1]]})
    _check(per_config[2], configs[2], {"dp_group": [[0], [1]], "cp_group": [[0, 1]], "ep_group": [[0], [1]],
                                       "expert_dp_group": [[0, 1]], "dp_cp_group": [[0, 1]]})
    _check(per_config[3], configs[3], {"dp_group": [[0], [1]], "cp_group": [[0, 1]], "ep_group": [[0, 1]],
                                       "expert_dp_group": [[0], [1]], "dp_cp_group": [[0, 1]]})
    coords = [r[1][2] for r in results]  # dp=2 ep=2: (dp_rank, cp_rank, ep_rank, expert_dp_rank, dp_cp_rank)
    assert coords == [(0, 0, 0, 0, 0), (1, 0, 1, 0, 1)]


def test_four_ranks_layouts():
    configs = [(4, 2, 1), (2, 1, 2), (2, 2, 2), (2, 4, 2)]
    results = run_distributed(_layouts, 4, configs)
    per_config = list(zip(*results))
    everyone = [[0, 1, 2, 3]]
    singles = [[0], [1], [2], [3]]
    # dp=4, ep=2: experts split over consecutive pairs, each shard replicated over the other pair.
    _check(per_config[0], configs[0], {"dp_group": everyone, "cp_group": singles, "ep_group": [[0, 1], [2, 3]],
                                       "expert_dp_group": [[0, 2], [1, 3]], "dp_cp_group": everyone})
    # dp=2, cp=2: CP varies fastest.
    _check(per_config[1], configs[1], {"dp_group": [[0, 2], [1, 3]], "cp_group": [[0, 1], [2, 3]],
                                       "ep_group": singles, "expert_dp_group": everyone, "dp_cp_group": everyone})
    # dp=2, cp=2, ep=2: EP is carved out of dp x cp, so here an EP group is a CP group.
    _check(per_config[2], configs[2], {"dp_group": [[0, 2], [1, 3]], "cp_group": [[0, 1], [2, 3]],
                                       "ep_group": [[0, 1], [2, 3]], "expert_dp_group": [[0, 2], [1, 3]],
                                       "dp_cp_group": everyone})
    _check(per_config[3], configs[3], {"dp_group": [[0, 2], [1, 3]], "cp_group": [[0, 1], [2, 3]],
                                       "ep_group": everyone, "expert_dp_group": singles, "dp_cp_group": everyone})
    coords = [r[2][2] for r in results]  # dp=2 cp=2 ep=2
    assert coords == [(0, 0, 0, 0, 0), (0, 1, 1, 0, 1), (1, 0, 0, 1, 2), (1, 1, 1, 1, 3)]


def test_single_process_topology():
    topo = build_topology(ParallelConfig(), seq_len=16, num_experts=4)
    assert topo == Topology.single()
    assert all(getattr(topo, name) is None for name in GROUPS)
    assert (topo.world, topo.dp, topo.ep, topo.cp, topo.expert_dp, topo.dp_cp_rank) == (1, 1, 1, 1, 1, 0)


@pytest.mark.parametrize("cfg, world, kwargs, key", [
    (ParallelConfig(dp=2), 4, {}, "parallel.dp"),
    (ParallelConfig(dp=2, cp=2), 2, {}, "parallel.dp"),
    (ParallelConfig(dp=3, ep=2), 3, {}, "parallel.ep"),
    (ParallelConfig(dp=4, ep=4), 4, {"num_experts": 6}, "parallel.ep"),
    (ParallelConfig(dp=1, cp=4), 4, {"seq_len": 18}, "parallel.cp"),
    (ParallelConfig(dp=0), 1, {}, "parallel.dp"),
])
def test_validation_names_the_key(cfg, world, kwargs, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        validate_parallel(cfg, world=world, **kwargs)


def test_build_topology_checks_the_world():
    with pytest.raises(ValueError, match="'parallel.dp'.*1 ranks"):
        build_topology(ParallelConfig(dp=2), seq_len=16, num_experts=4)  # no process group: a world of 1


def test_expert_groups_across_nodes():
    from parallel.topology import expert_groups_across_nodes

    assert expert_groups_across_nodes(["a", "a", "b", "b"], 2) == []
    assert expert_groups_across_nodes(["a", "a", "a", "b"], 2) == [[2, 3]]
    assert expert_groups_across_nodes(["a", "b"], 1) == []
