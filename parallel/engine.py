"""The training engine behind one small interface: backward, step, lr, state_dict, grad_accum.

One process: plain PyTorch (`LocalEngine`). Many ranks: DeepSpeed ZeRO-1/2 (`ZeroEngine`) with
dense gradients reduced over dp x cp and expert gradients over the expert-data-parallel group. This is
the only module that imports deepspeed.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn

from parallel.topology import Topology
from pretrain.model.ffn import Experts, MoE
from pretrain.optim import lr_lambda, param_groups, build_optimizer


class LocalEngine:
    """One process. `dtype=torch.bfloat16` is DeepSpeed's bf16 mode without the sharding: the model's
    weights and gradients are bf16, fp32 master weights take the gradients (accumulated in fp32 across
    micro-batches, where bf16 sums would round), clipping and AdamW run on the masters, and the bf16
    weights are copied back after each step. Buffers (the routers' expert bias and counts) stay fp32."""

    def __init__(self, model, optim_cfg, *, max_steps: int, grad_accum: int, dtype=None):
        self.model = model
        self.grad_accum = grad_accum
        self.grad_clip = optim_cfg.grad_clip
        self._master = _bf16_with_masters(model) if dtype == torch.bfloat16 else {}
        self.optimizer, self.scheduler = build_optimizer(model, optim_cfg, max_steps, master=self._master)

    def master_weights(self) -> list[torch.Tensor]:
        """The fp32 master copies of the bf16 weights ([] in fp32)."""
        return list(self._master.values())

    def _trained(self, p):
        """The tensor the optimizer updates for parameter p: its fp32 master, or p itself."""
        return self._master.get(p, p)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()
        for p, master in self._master.items():
            if p.grad is not None:
                master.grad = p.grad.float() if master.grad is None else master.grad.add_(p.grad)
                p.grad = None

    def step(self) -> torch.Tensor:
        """Clip, step, zero the gradients; returns the gradient norm before clipping (on the device: the
        training step reads it back with its other numbers)."""
        params = [t for t in map(self._trained, self.model.parameters()) if t.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        if self.optimizer.defaults.get("fused"):
            # torch's fused AdamW divides the gradients by `grad_scale` inside its own pass over them (as it
            # unscales AMP's): clipping then costs the norm, not one more read and write of every gradient.
            # The factor is clip_grad_norm_'s: min(1, max_norm / (norm + 1e-6)), as a divisor.
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
            self.optimizer.grad_scale = ((norm + 1e-6) / max_norm).clamp_min(1.0)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self._master:
            with torch.no_grad():
                torch._foreach_copy_(list(self._master), list(self._master.values()))
        return norm.detach()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """The gradients of this step so far, by parameter name (call between backward and step)."""
        grads = {n: self._trained(p).grad for n, p in self.model.named_parameters()}
        return {n: g.clone() for n, g in grads.items() if g is not None}

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict()}
        if self._master:
            state["master"] = {n: self._master[p].detach().clone() for n, p in self.model.named_parameters()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if p in self._master:
                    self._master[p].copy_(state["master"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    # ---- the layout-free state (parallel/state.py) --------------------------------------------------

    def full_state_tensor(self, p, kind: str, *, group=None, dst: int = 0):
        """The whole fp32 weight ("model") or Adam moment of `p`; None when the optimizer has none yet."""
        trained = self._trained(p)
        if kind == "model":
            return trained.detach()
        return self.optimizer.state.get(trained, {}).get(kind)

    def fragment(self, p) -> tuple[int, int]:
        """[start, stop) of p's flattened elements whose master weight and Adam moments this rank keeps: all."""
        return 0, p.numel()

    def optimizer_step_of(self, p):
        state = self.optimizer.state.get(self._trained(p), {})
        return float(state["step"]) if "step" in state else None

    def set_full_state(self, p, values: dict) -> None:
        trained = self._trained(p)
        trained.copy_(values["model"].view(p.shape))
        if trained is not p:
            p.copy_(trained)
        if values.get("exp_avg") is not None and values.get("step") is not None:
            self.optimizer.state[trained] = {"step": _adam_step(values["step"]),
                                             "exp_avg": values["exp_avg"].view(p.shape).clone(),
                                             "exp_avg_sq": values["exp_avg_sq"].view(p.shape).clone()}


def _bf16_with_masters(model) -> dict:
    """Cast the parameters to bf16 in place (modules keep their Parameter objects) and return an fp32
    master copy of each, keyed by the parameter."""
    masters = {}
    for p in model.parameters():
        masters[p] = nn.Parameter(p.detach().float().clone(), requires_grad=p.requires_grad)
        p.data = p.data.to(torch.bfloat16)
    return masters


# ---------------------------------------------------------------------------------------------------
# DeepSpeed glue. ZeRO-1/2 reduce a parameter marked `allreduce = False` + `group_name` over
# groups._EXPERT_DATA_PARALLEL_GROUP[group_name] (divided by dp, like the dense ones), but the ZeRO
# optimizer only receives those groups when the engine finds a `deepspeed.moe.layer.MoE` module in the
# model at initialize (without one, backward fails in ZeRO's average_tensor). Our MoE is plain PyTorch,
# so a parameter-free stand-in MoE sits next to the model, and the topology's groups are registered
# under DeepSpeed's group name first (its own construction would give the same ranks, in new groups).
# ---------------------------------------------------------------------------------------------------


def _deepspeed():
    """Import deepspeed, on the CPU accelerator when no GPU is visible, without its shared-memory op."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # read once, when deepspeed first picks its accelerator
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # The CPU backend JIT-compiles a shared-memory all_reduce (a minute of C++ on a fresh machine)
        # used only by inference; training collectives go through torch.distributed. The op probe is a
        # module-level dict cached on first access, so the edit holds for the process.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def expert_group_name(ep: int) -> str:
    return f"ep_size_{ep}"


def expert_parameters(model) -> list[nn.Parameter]:
    """The stacked expert weights (w1/w3/w2 of every `Experts`, sharded or not)."""
    return [p for m in model.modules() if isinstance(m, Experts) for p in m.parameters(recurse=False)]


def mark_expert_parameters(model, ep: int) -> list[nn.Parameter]:
    params = expert_parameters(model)
    for p in params:
        p.allreduce = False  # DeepSpeed: not a dense parameter
        p.group_name = expert_group_name(ep)  # DeepSpeed: reduce over this expert-data-parallel group
    return params


class _MPU:
    """DeepSpeed's `mpu` protocol over our topology, in its sequence-parallel form: data parallel = dp,
    sequence parallel = cp, sequence-data parallel = dp x cp; no tensor or pipeline parallelism.

    ZeRO partitions and reduces over dp x cp and divides the summed gradients by dp (not dp x cp): the
    CP ranks' losses are shares that add up to their DP rank's loss (parallel.context_parallel), so their
    gradients must be summed, and the DP ranks' averaged. Expert gradients: summed over the
    expert-data-parallel group, divided by dp as well.
    """

    def __init__(self, topology: Topology):
        self.t = topology

    def get_data_parallel_group(self):
        return self.t.dp_group

    def get_data_parallel_world_size(self):
        return self.t.dp

    def get_data_parallel_rank(self):
        return self.t.dp_rank

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self.t.dp_group)

    def get_sequence_parallel_group(self):
        return self.t.cp_group

    def get_sequence_parallel_world_size(self):
        return self.t.cp

    def get_sequence_parallel_rank(self):
        return self.t.cp_rank

    def get_sequence_data_parallel_group(self):
        return self.t.dp_cp_group

    def get_sequence_data_parallel_world_size(self):
        return self.t.dp * self.t.cp

    def get_sequence_data_parallel_rank(self):
        return self.t.dp_cp_rank

    def get_model_parallel_group(self):
        return self.t.mp_group

    def get_model_parallel_world_size(self):
        return 1

    def get_model_parallel_rank(self):
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self):
        return self.t.rank

    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_rank(self):
        return 0


def _register_expert_groups(deepspeed, topology: Topology) -> str:
    """Make DeepSpeed's expert groups the topology's (the same layout as its own, see parallel/topology.py)."""
    groups = deepspeed.utils.groups
    name = expert_group_name(topology.ep)
    groups._EXPERT_PARALLEL_GROUP[name] = topology.ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(topology.ep_group)
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = topology.expert_dp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(topology.expert_dp_group)
    return name


def _moe_stand_in(deepspeed, *, num_experts: int, ep: int) -> nn.Module:
    """A parameter-free `deepspeed.moe.layer.MoE`: it only tells the engine that expert groups exist."""

    class ExpertGroupsMarker(deepspeed.moe.layer.MoE):
        def __init__(self):
            nn.Module.__init__(self)  # skip MoE.__init__: no gate, no experts
            self.num_experts, self.ep_size = num_experts, ep
            self.expert_group_name = expert_group_name(ep)

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # the groups were registered from the topology

        def forward(self, *args, **kwargs):
            raise RuntimeError("the expert-groups marker is not a layer")

    return ExpertGroupsMarker()


class _EngineModule(nn.Module):
    """What DeepSpeed wraps: the model (unchanged, the loop calls it directly) plus the MoE marker."""

    def __init__(self, model: nn.Module, marker: nn.Module | None):
        super().__init__()
        self.model = model
        self.marker = marker

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def _optimizer_groups(model, optim_cfg, expert_params, group_name: str) -> list[dict]:
    """optim.param_groups, with the expert parameters moved to groups of their own (DeepSpeed's 'moe')."""
    expert_ids = {id(p) for p in expert_params}
    out, moe = [], []
    for g in param_groups(model, optim_cfg.weight_decay):
        dense = [p for p in g["params"] if id(p) not in expert_ids]
        experts = [p for p in g["params"] if id(p) in expert_ids]
        out.append({**g, "params": dense})
        moe.append({**g, "params": experts, "moe": True, "name": group_name})
    return [g for g in out + moe if g["params"]]  # DeepSpeed drops empty groups; the scheduler must agree


REDUCE_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's zero_optimization.reduce_bucket_size default


def reduce_bucket_elements(parameters: int) -> int:
    """DeepSpeed's gradient reduction bucket for a rank holding `parameters` elements: its default (5e8),
    or the rank's parameters when fewer. DeepSpeed allocates the whole bucket whatever the model's size
    (a 2 GB fp32 buffer next to a 2M-parameter model, measured with `liquid dryrun`'s allocator check)."""
    return max(1, min(REDUCE_BUCKET_ELEMENTS, parameters))


def deepspeed_config(optim_cfg, *, zero_stage: int, grad_accum: int, micro_batch_size: int, dtype,
                     bucket_elements: int = REDUCE_BUCKET_ELEMENTS) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": {"stage": zero_stage, "reduce_bucket_size": bucket_elements},
        "gradient_clipping": max(optim_cfg.grad_clip, 0.0),
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if dtype == torch.bfloat16:
        cfg["bf16"] = {"enabled": True}
    return cfg


class ZeroEngine:
    """The LocalEngine interface over a deepspeed engine (ZeRO-1/2; dense and expert groups from the topology).

    backward() runs DeepSpeed's backward and, on every micro-batch but the last, DeepSpeed's step (which
    only advances its micro-step counter); step() is the accumulation boundary: reduce, clip, update.
    """

    def __init__(self, model, optim_cfg, topology: Topology, *, max_steps: int, grad_accum: int,
                 micro_batch_size: int, zero_stage: int, dtype=None):
        assert zero_stage in (1, 2), zero_stage
        ds = _deepspeed()
        name, marker, experts = expert_group_name(topology.ep), None, []
        if expert_parameters(model):
            experts = mark_expert_parameters(model, topology.ep)
            name = _register_expert_groups(ds, topology)
            num_experts = max(m.num_experts for m in model.modules() if isinstance(m, MoE))
            marker = _moe_stand_in(ds, num_experts=num_experts, ep=topology.ep)
        optimizer = torch.optim.AdamW(_optimizer_groups(model, optim_cfg, experts, name), lr=optim_cfg.lr,
                                      betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim_cfg, max_steps))
        config = deepspeed_config(optim_cfg, zero_stage=zero_stage, grad_accum=grad_accum,
                                  micro_batch_size=micro_batch_size, dtype=dtype,
                                  bucket_elements=reduce_bucket_elements(sum(p.numel() for p in model.parameters())))
        self.ds, _, _, _ = ds.initialize(model=_EngineModule(model, marker), optimizer=optimizer,
                                         lr_scheduler=scheduler, config=config, mpu=_MPU(topology))
        self.model, self.scheduler, self.grad_accum = model, scheduler, grad_accum
        self._micro = 0
        self._group_of = {id(p): i for i, group in enumerate(self.ds.optimizer.bit16_groups) for p in group}

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)  # scales by 1 / grad_accum itself
        self._micro += 1
        if self._micro < self.grad_accum:
            assert not self.ds.is_gradient_accumulation_boundary()
            self.ds.step()  # not a boundary: DeepSpeed only counts the micro-batch

    def step(self) -> torch.Tensor | float:
        """Reduce, clip, step, zero the gradients; returns the global gradient norm before clipping."""
        if self._micro != self.grad_accum:
            raise RuntimeError(f"step() after {self._micro} backward() calls; grad_accum is {self.grad_accum}")
        assert self.ds.is_gradient_accumulation_boundary()
        self.ds.step()
        self._micro = 0
        return self.ds.get_global_grad_norm()

    @property
    def lr(self) -> float:
        return self.ds.get_lr()[0]

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """The reduced gradients of this step by parameter name, gathered from the ZeRO partitions
        (collective: every rank calls it after the last backward of a step, before step()). Expert
        weights are this rank's shard."""
        from deepspeed.utils import safe_get_full_grad

        grads = {n: safe_get_full_grad(p) for n, p in self.model.named_parameters()}
        return {n: g.clone() for n, g in grads.items() if g is not None}

    def state_dict(self) -> dict:
        """This rank's state. With ZeRO the optimizer entry is this rank's partition (DeepSpeed's format):
        every rank saves its own, and loading needs the same world size and topology."""
        return {"model": self.model.state_dict(), "optimizer": _detached(self.ds.optimizer.state_dict()),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        group = self.ds.optimizer.dp_process_group  # dp x cp: DeepSpeed reads the entry of this rank in it
        per_rank = [None] * dist.get_world_size(group)
        per_rank[dist.get_rank(group)] = state["optimizer"]
        self.ds.optimizer.load_state_dict(per_rank, load_from_fp32_weights=True)
        self.scheduler.load_state_dict(state["scheduler"])

    # ---- the layout-free state (parallel/state.py) --------------------------------------------------
    # ZeRO-1/2 keep, per optimizer group, a flat fp32 partition per rank (and Adam's state of the same
    # shape). A parameter's `_hp_mapping` says which fragment of it lies in this rank's partition.

    def _flat(self, p):
        opt = self.ds.optimizer
        index = self._group_of[id(p)]
        return opt.single_partition_of_fp32_groups[index], opt.optimizer.state

    def full_state_tensor(self, p, kind: str, *, group=None, dst: int = 0):
        """Gather the fp32 master ("model") or an Adam moment of `p` onto rank `dst` (collective over
        `group`, the ranks that partition p's group). Returns it on dst, None elsewhere or when no
        optimizer state exists yet."""
        flat, state = self._flat(p)
        if kind == "model":
            source = flat
        else:
            if not state:  # before the first step (the same on every rank)
                return None
            source = state[flat][kind]
        buf = torch.zeros(p.numel(), dtype=torch.float32, device=flat.device)
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None:
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            buf.narrow(0, lp.start, lp.numel).copy_(source.narrow(0, hp.start, hp.numel))
        if group is None:
            return buf.view(p.shape)
        dist.reduce(buf, dst=dst, group=group)
        return buf.view(p.shape) if dist.get_rank() == dst else None

    def fragment(self, p) -> tuple[int, int]:
        """[start, stop) of p's flattened elements in this rank's ZeRO partition ((0, 0): none of them)."""
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            return 0, 0
        lp = mapping.lp_fragment_address
        return lp.start, lp.start + lp.numel

    def optimizer_step_of(self, p):
        flat, state = self._flat(p)
        return float(state[flat]["step"]) if flat in state else None

    def set_full_state(self, p, values: dict) -> None:
        """Put a whole tensor's values into this rank's fragments (no communication)."""
        flat, state = self._flat(p)
        p.copy_(values["model"].view(p.shape).to(p.dtype))
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            return
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        flat.narrow(0, hp.start, hp.numel).copy_(values["model"].flatten().narrow(0, lp.start, lp.numel))
        if values.get("exp_avg") is None or values.get("step") is None:
            return
        if flat not in state:
            state[flat] = {"step": _adam_step(values["step"]), "exp_avg": torch.zeros_like(flat),
                           "exp_avg_sq": torch.zeros_like(flat)}
        state[flat]["step"] = _adam_step(values["step"])
        for kind in ("exp_avg", "exp_avg_sq"):
            state[flat][kind].narrow(0, hp.start, hp.numel).copy_(
                values[kind].flatten().narrow(0, lp.start, lp.numel))


def _adam_step(value) -> torch.Tensor:
    """Adam's step counter as torch keeps it (a float32 scalar tensor on the CPU)."""
    return torch.tensor(float(value), dtype=torch.float32)


def _detached(obj):
    """DeepSpeed's state holds views that autograd tracks (copy.deepcopy refuses them); same storage."""
    if torch.is_tensor(obj):
        return obj.detach()
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detached(v) for v in obj)
    return obj


def build_engine(model, optim_cfg, parallel_cfg, topology: Topology | None = None, *, max_steps: int,
                 grad_accum: int, micro_batch_size: int = 1, dtype=None):
    """LocalEngine for one rank (any zero_stage); DeepSpeed ZeRO (parallel.zero_stage 1 or 2) for many.

    Many ranks: call after build_topology and after expert/context parallelism were applied to the model
    (the engine marks and groups the expert shards it finds). micro_batch_size (rows per rank and
    micro-batch) is DeepSpeed's bookkeeping only; dtype=torch.bfloat16 turns on DeepSpeed's bf16 mode
    (the model's weights become bf16, fp32 master copies live in the optimizer).
    """
    topology = topology or Topology.single()
    world = parallel_cfg.dp * parallel_cfg.cp
    if world != topology.world:
        raise ValueError(f"parallel.dp x parallel.cp = {world} but the topology has {topology.world} ranks; "
                         "build the topology from the same config")
    if world == 1:
        return LocalEngine(model, optim_cfg, max_steps=max_steps, grad_accum=grad_accum, dtype=dtype)
    if parallel_cfg.zero_stage == 0:
        raise ValueError("config key 'parallel.zero_stage': 0 (no ZeRO) is for one rank only; "
                         f"use 1 or 2 with parallel.dp x parallel.cp = {world}")
    if parallel_cfg.zero_stage == 3:
        # ZeRO-3 gathers a parameter only around its own module's forward; the model also reads weights
        # elsewhere (tied embeddings in the head, conv taps in the mixers), and DeepSpeed has no ZeRO-3
        # path for expert parameters outside its own MoE layers.
        raise ValueError("config key 'parallel.zero_stage': 3 is not supported (the model reads some weights "
                         "outside their own modules, and DeepSpeed's ZeRO-3 has no path for our experts); "
                         "use 1 or 2")
    return ZeroEngine(model, optim_cfg, topology, max_steps=max_steps, grad_accum=grad_accum,
                      micro_batch_size=micro_batch_size, zero_stage=parallel_cfg.zero_stage, dtype=dtype)
