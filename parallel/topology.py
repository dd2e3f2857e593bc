"""The process-group topology of a run: which ranks share data, sequence slices and experts.

megatron-core's `parallel_state.initialize_model_parallel` builds the groups (tensor and pipeline
parallelism are 1), on the already-initialised torch.distributed world, gloo or NCCL alike.

Rank order (megatron's default order "tp-cp-ep-dp-pp" with tp = pp = 1):
  - dense layers:  rank = cp_rank + cp * dp_rank           (CP varies fastest)
      cp groups:      consecutive blocks of cp ranks    world 4, dp 2, cp 2: {0,1} {2,3}
      dp groups:      ranks with the same cp_rank        {0,2} {1,3}
      dp_cp group:    all dp x cp ranks (= the world)    {0,1,2,3}
  - experts:       rank = ep_rank + ep * expert_dp_rank     (EP varies fastest, CP ignored)
      ep groups:        consecutive blocks of ep ranks   world 4, ep 2: {0,1} {2,3}
      expert_dp groups: ranks with the same ep_rank      {0,2} {1,3}   (size dp x cp / ep)
Expert parallelism is carved out of the dp x cp ranks: an EP group may span CP ranks. DeepSpeed's own
expert groups (`groups._create_expert_and_data_parallel`) follow the same layout; the engine registers
these groups with DeepSpeed so both use the very same process groups.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    world: int
    rank: int
    dp: int
    ep: int
    cp: int
    dp_rank: int
    cp_rank: int
    ep_rank: int
    expert_dp_rank: int
    # Process groups; None when the world is one process.
    dp_group: Any = None  # same cp_rank, all dp ranks
    cp_group: Any = None  # the ranks that split one sequence
    ep_group: Any = None  # the ranks that split one MoE layer's experts
    expert_dp_group: Any = None  # replicas of the same expert shard: expert gradients are reduced here
    dp_cp_group: Any = None  # replicas of the dense weights: dense gradients are reduced here
    mp_group: Any = None  # tensor x pipeline parallel group: always this rank alone (DeepSpeed's mpu asks for it)

    @classmethod
    def single(cls) -> "Topology":
        return cls(world=1, rank=0, dp=1, ep=1, cp=1, dp_rank=0, cp_rank=0, ep_rank=0, expert_dp_rank=0)

    @property
    def expert_dp(self) -> int:
        return self.world // self.ep

    @property
    def dp_cp_rank(self) -> int:
        return self.cp_rank + self.cp * self.dp_rank


def single_process_topology() -> Topology:
    return Topology.single()


def _require(ok: bool, key: str, why: str):
    if not ok:
        raise ValueError(f"config key '{key}': {why}")


def validate_parallel(parallel_cfg, *, world: int, seq_len: Optional[int] = None,
                      num_experts: Optional[int] = None) -> None:
    dp, ep, cp = parallel_cfg.dp, parallel_cfg.ep, parallel_cfg.cp
    for key, val in (("parallel.dp", dp), ("parallel.ep", ep), ("parallel.cp", cp)):
        _require(val >= 1, key, f"must be >= 1, got {val}")
    _require(world == dp * cp, "parallel.dp",
             f"parallel.dp x parallel.cp = {dp * cp} but the process group has {world} ranks")
    _require(world % ep == 0, "parallel.ep", f"must divide parallel.dp x parallel.cp = {world}, got {ep}")
    if num_experts is not None:
        _require(num_experts % ep == 0, "parallel.ep",
                 f"model.moe.num_experts ({num_experts}) is not divisible by parallel.ep ({ep})")
    if seq_len is not None:
        _require(seq_len % cp == 0, "parallel.cp", f"train.seq_len ({seq_len}) is not divisible by parallel.cp ({cp})")


def _parallel_state():
    with warnings.catch_warnings():  # megatron warns at import that Transformer Engine / Apex are absent
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state
    return parallel_state


def build_topology(parallel_cfg, *, seq_len: Optional[int] = None, num_experts: Optional[int] = None) -> Topology:
    """Validate parallel_cfg against the running world and build its groups (collective: every rank calls it).

    A one-process run (dp x cp = 1, no process group needed) gets `Topology.single()`.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    validate_parallel(parallel_cfg, world=world, seq_len=seq_len, num_experts=num_experts)
    if world == 1:
        return Topology.single()
    ps = _parallel_state()
    # gloo duplicates of the groups are not needed: the default backend is gloo on CPU already, and
    # on NCCL nothing here runs CPU collectives.
    ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                 context_parallel_size=parallel_cfg.cp,
                                 expert_model_parallel_size=parallel_cfg.ep,
                                 create_gloo_process_groups=False)
    return Topology(
        world=world, rank=dist.get_rank(), dp=parallel_cfg.dp, ep=parallel_cfg.ep, cp=parallel_cfg.cp,
        dp_rank=ps.get_data_parallel_rank(), cp_rank=ps.get_context_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(), expert_dp_rank=ps.get_expert_data_parallel_rank(),
        dp_group=ps.get_data_parallel_group(), cp_group=ps.get_context_parallel_group(),
        ep_group=ps.get_expert_model_parallel_group(), expert_dp_group=ps.get_expert_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        mp_group=ps.get_model_parallel_group(),
    )


def group_ranks(group) -> list[int]:
    """Global ranks of a group; None (a one-process topology's groups) is this rank alone."""
    if group is None:
        return [dist.get_rank() if dist.is_initialized() else 0]
    return dist.get_process_group_ranks(group)


def destroy_topology() -> None:
    """Forget megatron's groups so that build_topology can run again (the torch world stays)."""
    if dist.is_initialized():
        _parallel_state().destroy_model_parallel()


def expert_groups_across_nodes(node_of_rank: list[str], ep: int) -> list[list[int]]:
    """The expert-parallel groups (consecutive ranks [k * ep, (k + 1) * ep), as build_topology lays them
    out) whose ranks sit on more than one node."""
    groups = [list(range(start, start + ep)) for start in range(0, len(node_of_rank), ep)]
    return [g for g in groups if len({node_of_rank[r] for r in g}) > 1]
