"""Apply the parallel forms to a built single-device model, in one fixed order.

1. expert parallelism: each MoE layer keeps its EP rank's experts; tokens travel by all_to_all;
2. context parallelism: mixers exchange state (liquid), halos (conv) and K/V (attention) over the CP group;
3. data parallelism: applied by the engine (DeepSpeed ZeRO), which reduces dense gradients over DP x CP
   and expert gradients over the expert-data-parallel group.
"""
from __future__ import annotations


def parallelize(model, topology):
    if topology.ep > 1:
        from parallel.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, topology.ep_group)
    if topology.cp > 1:
        from parallel.context_parallel import apply_context_parallel

        apply_context_parallel(model, topology.cp_group)
    return model
