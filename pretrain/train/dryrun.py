"""`liquid dryrun`: one rank of the configured layout, at full size, through the real code, on fake tensors.

The real config, `build_model` on the meta device, `parallelize` (expert and context parallelism over a
process group of the layout's world size: torch's `fake` backend, collectives that move nothing), and
`materialize`, all under `FakeTensorMode` (fake tensors on the CPU; a CUDA config takes the kernels CUDA
takes, see below). Then one step of the one training step (`run_step`, which the
training loop runs; a full micro-batch, one accumulation step), with Adam's state as a first step leaves it,
under torch's `MemTracker` (live tensor bytes by kind, and their peak), and a second under `FlopCounterMode`.

Modeled, because it cannot run on fake tensors (each listed in the output):
- routing: the MoE's token counts are data; the dry run routes `imbalance` x the mean to one expert of
  this rank (1.0: every expert the same) and spreads the rest evenly, on every source rank;
- the engine: `parallel.zero_model.ModeledZeroEngine` lays out DeepSpeed ZeRO-1/2's partitions from the
  real optimizer groups (one rank: the real `LocalEngine`);
- attention kernels: on CUDA the compiled FlexAttention kernel is a stand-in with its memory contract
  (saves q, k, v, the output and the fp32 log-sum-exp; no scores) and FLOPs (the causal pairs); on the
  CPU the real block path runs with one document per row (every block sees its keys from 0, the most
  memory and compute);
- the device: the fake tensors live on the CPU (autograd's engine needs a real GPU for CUDA tensors, even
  fake ones); a CUDA config runs the kernels CUDA runs (the FlexAttention stand-in, the bf16 grouped-GEMM
  experts) under the CPU's autocast, which casts the same matmuls to bf16.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

GIB = 1024**3
LINES = ("parameters", "gradients", "optimizer", "activations", "communication", "total")


@dataclass(frozen=True)
class DryRunOptions:
    rank: int = 0
    imbalance: float = 1.0  # hottest expert's rows / the mean


def planned_counts(rows: int, num_experts: int, imbalance: float, hot: int = 0) -> list[int]:
    """Rows per expert for `rows` routed rows: expert `hot` gets `imbalance` x the mean, the rest split evenly."""
    if imbalance < 1.0:
        raise ValueError(f"--imbalance is the hottest expert's share over the mean and must be >= 1, got {imbalance}")
    if num_experts == 1:
        return [rows]
    first = min(round(rows / num_experts * imbalance), rows)
    base, extra = divmod(rows - first, num_experts - 1)
    others = [base + (1 if i < extra else 0) for i in range(num_experts - 1)]
    return others[:hot] + [first] + others[hot:]


# ---- what the dry run models -----------------------------------------------------------------------------


def _plan_routing(model, imbalance: float) -> None:
    """Give every MoE layer's experts planned counts instead of the data's (see the module docstring)."""
    from parallel.expert_parallel import ExpertParallelExperts
    from pretrain.model.ffn import MoE

    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        outer = moe.experts
        if isinstance(outer, ExpertParallelExperts):
            _plan_expert_parallel(outer, imbalance)
        else:
            _with_counts(outer, lambda rows, e=outer.num_experts: planned_counts(rows, e, imbalance))


def _with_counts(experts, counts_of_rows) -> None:
    run = experts.forward
    experts.forward = lambda x, counts: run(x, counts_of_rows(x.shape[0]))


def _plan_expert_parallel(ep_experts, imbalance: float) -> None:
    rank, size, local = dist.get_rank(ep_experts.group), ep_experts.ep_size, ep_experts.num_local_experts
    planned = {}

    def routing(counts, *, rows):
        # This rank's first expert is the hot one: the worst case for this rank's receive buffers.
        per_expert = planned_counts(rows, ep_experts.num_experts, imbalance, hot=rank * local)
        send = [sum(per_expert[r * local:(r + 1) * local]) for r in range(size)]
        mine = per_expert[rank * local:(rank + 1) * local]
        planned["local"] = [c * size for c in mine]  # every source rank routes the same way
        recv_counts = torch.tensor([mine] * size, dtype=torch.long, device=counts.device)
        return send, [send[rank]] * size, recv_counts

    ep_experts.routing = routing
    _with_counts(ep_experts.experts, lambda rows: planned["local"])


def _causal_pairs(q_len: int, q_offset: int) -> int:
    return q_len * q_offset + q_len * (q_len + 1) // 2


@torch.library.custom_op("liquid_dryrun::attention", mutates_args=())
def _modeled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    raise RuntimeError("the dry run's attention stand-in runs on fake tensors only")


@_modeled_attention.register_fake
def _(q, k, v, q_offset):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("liquid_dryrun::attention_backward", mutates_args=())
def _modeled_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                out: torch.Tensor, lse: torch.Tensor, q_offset: int
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    raise RuntimeError("the dry run's attention stand-in runs on fake tensors only")


@_modeled_attention_backward.register_fake
def _(grad, q, k, v, out, lse, q_offset):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, q_offset = inputs
    ctx.save_for_backward(q, k, v, *output)  # what FlexAttention's backward keeps: q, k, v, out, lse
    ctx.q_offset = q_offset


def _backward(ctx, grad, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _modeled_attention_backward(grad, q, k, v, out, lse, ctx.q_offset)
    return dq, dk, dv, None


_modeled_attention.register_autograd(_backward, setup_context=_setup)


def _register_flops():
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.liquid_dryrun.attention)
    def _forward_flops(q_shape, k_shape, v_shape, q_offset, *args, **kwargs) -> int:
        b, h, q_len, d = q_shape  # QK^T and PV over the causal pairs
        return 4 * b * h * _causal_pairs(q_len, q_offset) * d

    @register_flop_formula(torch.ops.liquid_dryrun.attention_backward)
    def _backward_flops(grad_shape, q_shape, *args, **kwargs) -> int:
        b, h, q_len, d = q_shape
        q_offset = args[-1] if args and isinstance(args[-1], int) else 0
        return 8 * b * h * _causal_pairs(q_len, q_offset) * d  # dV, dP, dQ, dK: twice the forward


    @register_flop_formula(torch.ops.aten._grouped_mm)
    def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        # torch's counter has no formula for the grouped GEMM the CUDA experts run: x [M, K] @ w [E, K, N]
        # (each row meets one group's weights), or the weight gradient a [K, M] @ b [M, N] -> [E, K, N]
        # (each of the M rows in one group).
        if len(b_shape) == 3:
            return 2 * a_shape[0] * a_shape[1] * b_shape[2]
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]


    # The CPU block path (SDPA with a boolean mask) has no formula in torch's counter; it is counted by the
    # convention of the plan (model FLOPs): the causal pairs of the block, queries at the end of its keys.
    # (The kernel computes the masked pairs too: up to twice this on the diagonal blocks.)
    cpu_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def _block_pairs(q_shape, k_shape) -> int:
        q_len, k_len = q_shape[-2], k_shape[-2]
        return _causal_pairs(q_len, k_len - q_len)

    @register_flop_formula(cpu_attention)
    def _cpu_attention_flops(q_shape, k_shape, *args, **kwargs) -> int:
        return 4 * q_shape[0] * q_shape[1] * _block_pairs(q_shape, k_shape) * q_shape[-1]

    @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _cpu_attention_backward_flops(grad_shape, q_shape, k_shape, *args, **kwargs) -> int:
        return 8 * q_shape[0] * q_shape[1] * _block_pairs(q_shape, k_shape) * q_shape[-1]


_register_flops()


def _flex_stand_in(q, k, v, *, block_mask=None, enable_gqa: bool = False):
    q_offset = k.shape[2] - q.shape[2]
    out, _ = _modeled_attention(q, k, v, q_offset)
    return out


@contextlib.contextmanager
def _modeled_kernels(cuda: bool, dtype):
    """The kernels the dry run replaces for the duration (see the module docstring). The fake tensors live
    on the CPU (autograd's engine wants a real GPU for CUDA tensors, fake or not); for a CUDA target the
    code takes the kernels it takes on CUDA: FlexAttention (the stand-in) and the grouped-GEMM experts, the
    liquid scan its PyTorch form (not the CPU's C++ kernel; the Triton kernel cannot run on fake tensors),
    which `liquid plan` models, and the head's cross-entropy torch's ops (not the CPU's kernel)."""
    from pretrain.model import ffn, loss_cpu, mixers, scan

    saved = (mixers.DocumentMask.attend, mixers.DocumentMask._block_starts, ffn._grouped_mm_dtype)
    forms = scan.pytorch_forms() if cuda else contextlib.nullcontext()
    loss_forms = loss_cpu.torch_ops() if cuda else contextlib.nullcontext()  # CUDA: torch's cross-entropy
    if cuda:
        def attend(self, q, k, v, *, enable_gqa=False, backend=None):
            self.block_mask()  # the real block mask (its memory is measured), then the kernel's stand-in
            return _flex_stand_in(q, k, v)

        mixers.DocumentMask.attend = attend
        ffn._grouped_mm_dtype = lambda x, w: torch.bfloat16 if dtype == torch.bfloat16 else None
    else:
        mixers.DocumentMask._block_starts = lambda self, block, firsts: [0] * len(firsts)
    try:
        with forms, loss_forms:
            yield
    finally:
        mixers.DocumentMask.attend, mixers.DocumentMask._block_starts, ffn._grouped_mm_dtype = saved


@contextlib.contextmanager
def fake_world(rank: int, world: int):
    """torch.distributed over the `fake` backend: `world` ranks in this one process, this one `rank`."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from parallel.topology import destroy_topology

    if dist.is_initialized():
        raise RuntimeError("liquid dryrun needs a process without torch.distributed initialised")
    if not 0 <= rank < world:
        raise ValueError(f"--rank must be in [0, {world}) for this layout (parallel.dp x parallel.cp = {world})")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        destroy_topology()
        dist.destroy_process_group()


# ---- the run -------------------------------------------------------------------------------------------------


def dry_run(cfg, options: DryRunOptions = DryRunOptions()) -> dict:
    """Measure one rank of `cfg`'s layout: bytes per line, FLOPs per token, the layout (see `report`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from parallel.topology import build_topology
    from pretrain.train.plan import kernel_kinds

    t, p = cfg.train, cfg.parallel
    world = p.dp * p.cp
    target = "cuda" if t.device == "cuda" else "cpu"
    device = torch.device("cpu")
    dtype = torch.bfloat16 if t.dtype == "bf16" or (t.dtype == "auto" and target == "cuda") else None
    started = time.perf_counter()
    with fake_world(options.rank, world), _modeled_kernels(target == "cuda", dtype):
        topology = build_topology(p, seq_len=t.seq_len, num_experts=cfg.model.moe.num_experts)
        with FakeTensorMode(allow_non_fake_inputs=True):
            measured = _measure(cfg, topology, device, dtype, options)
    measured["device"] = target
    measured.update(kernel_kinds(target))  # the chunked scan's and the head loss's forms it ran
    measured["seconds"] = round(time.perf_counter() - started, 1)
    return measured


def _measure(cfg, topology, device, dtype, options: DryRunOptions) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from parallel.parallelize import parallelize
    from parallel.zero_model import ModeledZeroEngine
    from pretrain.model.model import build_model, materialize
    from pretrain.train.step import Placement, run_step

    LineTracker, Kind = _line_tracker()
    t, p = cfg.train, cfg.parallel
    model = parallelize(build_model(cfg.model, device="meta"), topology)
    model = materialize(model, device, seed=t.seed)
    model.set_activation_checkpointing(t.activation_checkpointing)
    _plan_routing(model, options.imbalance)
    if topology.world == 1:
        from parallel.engine import LocalEngine

        engine = LocalEngine(model, cfg.optim, max_steps=1, grad_accum=1, dtype=dtype)
        kept = {"optimizer": engine.master_weights(), "gradients": [], "communication": []}
    else:
        engine = ModeledZeroEngine(model, cfg.optim, topology, zero_stage=p.zero_stage, dtype=dtype)
        kept = engine.persistent()
    place = Placement(topology, device, dtype)
    rows = t.micro_batch_size
    batch = {"input_ids": torch.zeros(rows, t.seq_len, dtype=torch.long, device=device),
             "labels": torch.zeros(rows, t.seq_len, dtype=torch.long, device=device),
             "doc_start": torch.zeros(rows, t.seq_len, dtype=torch.bool, device=device)}
    _create_adam_state(engine.optimizer)  # as after a first step
    tracker = LineTracker()
    tracker.track_external(model, engine.optimizer, *[x for xs in kept.values() for x in xs])
    step = engine.step

    def engine_step():
        tracker.in_engine_step = True
        return step()

    engine.step = engine_step
    with tracker:
        run_step(engine, [batch], place)
    engine.step = step
    # FLOPs in a step of their own: FlopCounterMode's module tracking holds every module's output until
    # backward passes it, which would keep what activation checkpointing frees out of the measured memory.
    with FlopCounterMode(display=False) as flops:
        run_step(engine, [batch], place)
    peak = tracker.get_tracker_snapshot("peak")[device]
    kept_bytes = {k: sum(x.numel() * x.element_size() for x in xs) for k, xs in kept.items()}
    highs = tracker.highs
    lines = {
        "parameters": peak.get(Kind.PARAM, 0) + peak.get(Kind.BUFFER, 0),
        "gradients": highs["gradients"] + kept_bytes["gradients"],
        "optimizer": peak.get(Kind.OPT, 0) + kept_bytes["optimizer"],  # the state (not the step's temporaries)
        "activations": highs["activations"],
        "communication": kept_bytes["communication"],
        "total": peak["Total"],
    }

    at_peak = {"gradients": peak.get(Kind.GRAD, 0) + kept_bytes["gradients"],
               "activations": peak.get(Kind.ACT, 0) + peak.get(Kind.TEMP, 0)}
    unexplained = peak.get(Kind.OTH, 0) - sum(kept_bytes.values())
    tokens = t.micro_batch_size * t.seq_len // topology.cp  # this rank's tokens per micro-batch
    return {"layout": _layout(cfg, topology), "device": str(device.type), "dtype": str(dtype or torch.float32),
            "bytes": lines, "at_peak": at_peak, "other_bytes": unexplained, "flops_per_token": flops.get_total_flops() / tokens,
            "tokens_per_rank": tokens, "imbalance": options.imbalance}


def _create_adam_state(optimizer) -> None:
    """Give `optimizer` the state a first step leaves (Adam's moments), without a forward and backward."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _line_tracker():
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    class LineTracker(MemTracker):
        """MemTracker that also keeps each line's own high-water mark over the run (gradients, optimizer
        state, activations = forward activations + backward temporaries); MemTracker keeps the total's."""

        def __init__(self):
            super().__init__()
            self.highs = {"gradients": 0, "optimizer": 0, "activations": 0}
            self.in_engine_step = False  # the engine's step: its temporaries are not activations

        def _update_peak_stats(self, peak_state):
            # MemTracker's own also walks every module's stats at every op: the dry run needs the totals only.
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev], self._peak_mem_snap[dev] = snap["Total"], dict(snap)
                now = {"gradients": snap.get(_MemRefType.GRAD, 0), "optimizer": snap.get(_MemRefType.OPT, 0),
                       "activations": snap.get(_MemRefType.ACT, 0) + snap.get(_MemRefType.TEMP, 0)}
                if self.in_engine_step:
                    now.pop("activations")
                for key, value in now.items():
                    self.highs[key] = max(self.highs[key], value)

    return LineTracker, _MemRefType


def _layout(cfg, topology) -> dict:
    t, p = cfg.train, cfg.parallel
    return {"world": topology.world, "rank": topology.rank, "cp_rank": topology.cp_rank, "dp": p.dp, "ep": p.ep, "cp": p.cp,
            "zero_stage": p.zero_stage, "micro_batch": t.micro_batch_size, "seq_len": t.seq_len,
            "activation_checkpointing": t.activation_checkpointing, "loss_chunk_tokens": cfg.model.loss_chunk_tokens}


# ---- report ----------------------------------------------------------------------------------------------------

DEVICE_MEMORY_GB = {"H100": 80, "H200": 141, "A100": 80, "cpu": None}  # decimal GB, as sold


def report(cfg, measured: dict, *, device: str = "H100") -> dict:
    """The dry run beside `liquid plan`: per line the measured bytes, the plan's, their ratio (measured /
    plan); the measured total in GiB; and whether it fits `device` (by DEVICE_MEMORY_GB)."""
    from pretrain.train.plan import memory_per_rank
    from pretrain.train.flops import flops_per_token, recompute_flops_per_token

    t, p = cfg.train, cfg.parallel
    dtype_bytes = 2 if measured["dtype"] == "torch.bfloat16" else 4
    plan = memory_per_rank(cfg.model, dp=p.dp, ep=p.ep, cp=p.cp, zero_stage=p.zero_stage,
                           micro_batch=t.micro_batch_size, seq_len=t.seq_len,
                           checkpointing=t.activation_checkpointing, dtype_bytes=dtype_bytes,
                           attention=_attention_kind(measured["device"]), scan=measured["scan"],
                           loss=measured["loss"])
    lines = {}
    for line in LINES:
        got, want = measured["bytes"][line], plan[line]
        lines[line] = {"measured_gib": round(got / GIB, 3), "plan_gib": round(want / GIB, 3),
                       "ratio": round(got / want, 3) if want else None}
    # The counter sees every matmul that runs, the recomputed ones too. Under context parallelism a rank's
    # queries see the keys of its own and the earlier slices: on average those of a row of (2 r + 1) slices
    # for CP rank r (the plan's seq_len is the row's average, slices (2 cp - 1) / 2 ... 1/2 for the ranks).
    seq = (2 * measured["layout"]["cp_rank"] + 1) * t.seq_len // p.cp
    fpt = flops_per_token(cfg.model, seq) + recompute_flops_per_token(cfg.model, seq, t.activation_checkpointing)
    lines["flops_per_token"] = {"measured": measured["flops_per_token"], "plan": fpt,
                                "ratio": round(measured["flops_per_token"] / fpt, 4)}
    out = {"config": cfg.run.name, "layout": measured["layout"], "device": measured["device"],
           "dtype": measured["dtype"], "lines": lines, "total_gib": lines["total"]["measured_gib"],
           "imbalance": measured["imbalance"], "modeled": MODELED, "seconds": measured.get("seconds")}
    capacity = DEVICE_MEMORY_GB.get(device) if measured["device"] == "cuda" else None
    if capacity is not None:
        budget = capacity * 1e9
        out["fits"] = {"device": device, "capacity_gib": round(budget / GIB, 2),
                       "fits": measured["bytes"]["total"] <= budget}
        if not out["fits"]["fits"]:
            out["fits"]["advice"] = advice(measured["bytes"], budget, measured["layout"])
    return out


MODELED = [
    "routing: planned counts (every expert the same rows x imbalance for this rank's first expert), not the data's",
    "engine: ZeRO-1/2 partitions laid out from the real optimizer groups (parallel/zero_model.py), not DeepSpeed's code",
    "attention on CUDA: a stand-in with FlexAttention's memory (q, k, v, out, fp32 lse) and causal FLOPs",
    "attention on the CPU: the real block path, one document per row (the most keys per block)",
    "tensors: fake, on the CPU; a CUDA config runs the kernels CUDA runs, under the CPU's bf16 autocast",
    "liquid scan on CUDA: the chunked PyTorch form's memory (the Triton kernel's is not modeled)",
]


def _attention_kind(device: str) -> str:
    return "fused" if device == "cuda" else "blocks"


def advice(lines: dict, budget: float, layout: dict) -> str:
    """Which line overflows `budget` (bytes) and by how much, and what to change."""
    over = lines["total"] - budget
    parts = {k: lines[k] for k in ("parameters", "gradients", "optimizer", "activations", "communication")}
    biggest = max(parts, key=parts.get)
    fixes = {
        "activations": [f"train.activation_checkpointing=selective or full (now {layout['activation_checkpointing']})",
                        f"a smaller train.micro_batch_size (now {layout['micro_batch']})",
                        f"more context parallelism, parallel.cp (now {layout['cp']}), with parallel.dp lowered to keep the world"],
        "parameters": [f"more expert parallelism, parallel.ep (now {layout['ep']})"],
        "gradients": [f"parallel.zero_stage=2 (now {layout['zero_stage']})",
                      f"more expert parallelism, parallel.ep (now {layout['ep']})"],
        "optimizer": [f"more data-parallel ranks to partition over (dp x cp now {layout['world']})",
                      f"more expert parallelism, parallel.ep (now {layout['ep']})"],
        "communication": ["a smaller DeepSpeed reduce bucket"],
    }[biggest]
    if biggest == "activations" and layout.get("loss_chunk_tokens", 1) == 0:
        fixes.append("the chunked head loss, model.loss_chunk_tokens=4096 (now 0: all the logits at once)")
    return (f"{over / GIB:.1f} GiB over the budget; the largest line is {biggest} "
            f"({parts[biggest] / GIB:.1f} GiB); try " + "; or ".join(fixes))


def format_report(rep: dict) -> str:
    lay = rep["layout"]
    head = (f"{rep['config']}: rank {lay['rank']} of {lay['world']} (dp={lay['dp']} ep={lay['ep']} cp={lay['cp']} "
            f"zero={lay['zero_stage']}), micro-batch {lay['micro_batch']} x {lay['seq_len']} tokens, "
            f"activation_checkpointing={lay['activation_checkpointing']}, "
            f"loss_chunk_tokens={lay.get('loss_chunk_tokens', 0)}, {rep['device']} {rep['dtype']}")
    rows = [head, f"{'':16}{'dry run':>12}{'plan':>12}{'ratio':>8}"]
    for line in LINES:
        v = rep["lines"][line]
        ratio = "n/a" if v["ratio"] is None else f"{v['ratio']:.3f}"
        rows.append(f"{line:16}{v['measured_gib']:>9.2f} GiB{v['plan_gib']:>8.2f} GiB{ratio:>8}")
    f = rep["lines"]["flops_per_token"]
    rows.append(f"{'FLOPs/token':16}{f['measured'] / 1e9:>8.3f} G{f['plan'] / 1e9:>9.3f} G{f['ratio']:>8.4f}")
    if "fits" in rep:
        fit = rep["fits"]
        rows.append(f"fits one {fit['device']} ({fit['capacity_gib']:.1f} GiB): " +
                    ("yes" if fit["fits"] else "NO: " + fit["advice"]))
    rows.append("modeled: " + "; ".join(rep["modeled"]))
    if rep.get("seconds") is not None:
        rows.append(f"(the dry run took {rep['seconds']:.0f} s)")
    return "\n".join(rows)


# ---- the check against a real run ---------------------------------------------------------------------------


def allocator_peak(fn) -> tuple[object, int]:
    """fn()'s result and the peak of the bytes the CPU allocator held for tensors allocated while it ran
    (torch.profiler's memory events, summed in time order): what the dry run's total is checked against."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return result, peak


def real_step_peak(cfg, *, steps: int = 2) -> int:
    """On a real CPU rank (torch.distributed initialised for cfg's layout, or one process): the worker's
    stages (topology, model on meta -> parallelize -> materialize, the real engine: DeepSpeed on many
    ranks) and `steps` training steps on random rows with one document per row, under `allocator_peak`."""
    from parallel.parallelize import parallelize
    from pretrain.model.model import build_model, materialize
    from pretrain.train.step import train_step
    from pretrain.train.worker import build_topology_for, engine_for, placement

    t = cfg.train
    topology = build_topology_for(cfg)
    place = placement(t, topology)
    rows = t.micro_batch_size
    ids = torch.randint(0, cfg.model.vocab_size, (rows, t.seq_len), generator=torch.Generator().manual_seed(topology.rank))
    starts = torch.zeros(rows, t.seq_len, dtype=torch.bool)
    starts[:, 0] = True
    batch = {"input_ids": ids, "labels": ids, "doc_start": starts}

    def run():
        model = parallelize(build_model(cfg.model, device="meta"), topology)
        model = materialize(model, place.device, seed=t.seed)
        model.set_activation_checkpointing(t.activation_checkpointing)
        engine = engine_for(cfg, model, topology, place)
        for _ in range(steps):
            train_step(engine, [batch] * engine.grad_accum, place)

    return allocator_peak(run)[1]
