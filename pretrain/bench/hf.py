"""`liquid bench hf`: our training step against transformers 5's Lfm2MoeForCausalLM at the same configuration,
side by side on this CPU, plus a torch.profiler split of our step into matmul and the rest.

The configuration (the issue "speed against the anchors"): vocab 8192, d_model 256, 6 layers with mixers
conv/conv/attention repeating, the first FFN dense (768) and the rest 8 experts top-2 (expert_dim 256),
attention 4 heads x 64 (kv 4), seq 512, batch 4 (one micro-batch), AdamW, fp32, one process: 12.14M
parameters on both sides (HF's config comes from `checkpoints.export.lfm2_moe_config`, the export's).

Each side runs in a worker process of its own, built once and warmed up; the parent then alternates
`--repeats` rounds of `--steps` timed steps over the sides (ours eager, ours with train.compile=true, HF), so
drifting machine load hits every side alike. Ours is the real step: `pretrain.train.step.train_step` on a
`LocalEngine` (AdamW, LR schedule, clipping, router-bias update); HF's is forward with labels, backward,
clip_grad_norm_, torch.optim.AdamW with the same hyper-parameters. Both get the same random token rows
(whole rows, no document starts: HF's model has none). transformers 5 comes from `.venv-hf5` (`make
venv-hf5`) put first on the HF worker's PYTHONPATH; without it the HF side is reported as skipped.

matmul_frac: of our eager step's profiled CPU time (sum of self times of every op inside the step
windows; the step's own Python is the `liquid_bench::step` window's self time), the share in matmul
ops (MATMUL_OPS; `matmul_frac_with_attention` also counts the SDPA kernels). top_non_matmul: the
largest remaining ops by self time. sampled: each side's step sampled by Linux perf and split by the code
its training thread ran (pretrain/bench/sampled.py): it sees inside ops, flash attention's products
included, where the profiler sees only op boundaries; skipped with the reason where perf cannot run. Progress
goes to stderr; exactly one JSON line goes to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from pretrain.bench.common import log, machine_name, print_json

REPO = Path(__file__).resolve().parents[2]
HF5_DIR = REPO / ".venv-hf5"
MODEL_OVERRIDES = [
    "model.vocab_size=8192", "model.d_model=256", "model.num_layers=6", "model.mixer=conv",
    "model.attention_layers=[2,5]", "model.conv_kernel=3", "model.dense_layers=1", "model.dense_dim=768",
    "model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.expert_dim=256",
    "model.attention.heads=4", "model.attention.kv_heads=4", "model.attention.head_dim=64",
]
TRAIN_OVERRIDES = ["train.seq_len=512", "train.global_batch_size=4", "train.micro_batch_size=4",
                   "train.device=cpu", "train.dtype=fp32", "parallel.dp=1", "parallel.ep=1", "cluster.num_workers=1"]
QUICK_OVERRIDES = ["model.vocab_size=512", "model.d_model=64", "model.num_layers=3", "model.dense_dim=128",
                   "model.moe.expert_dim=64", "model.attention.heads=2", "model.attention.kv_heads=2",
                   "model.attention.head_dim=32", "model.attention_layers=[2]", "train.seq_len=64",
                   "train.global_batch_size=2", "train.micro_batch_size=2"]
# Ops whose self time is matrix multiplication (forward and backward).
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::matmul",
              "aten::linear", "aten::mv", "aten::addmv", "aten::dot", "aten::_grouped_mm", "aten::einsum",
              "aten::addmm_", "aten::_addmm_activation", "aten::mkldnn_linear", "aten::_mkldnn_linear"}
ATTENTION_OPS = {"aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
                 "aten::scaled_dot_product_attention", "aten::_scaled_dot_product_attention_math"}
STEP_EVENT = "liquid_bench::step"
SETTLE_FAULTS = 256  # minor page faults (4 KiB each) of a settled step: 1 MiB of freshly mapped memory
SETTLE_MAX_STEPS = 8
PROFILE_HEAP_RESERVE = 1 << 30  # bytes; see _settle
SIDES = ("ours", "ours_compiled", "hf")


def _log(msg: str) -> None:
    log("hf", msg)


def bench_config(quick: bool = False):
    from pretrain.config import load_config

    return load_config("tiny", MODEL_OVERRIDES + TRAIN_OVERRIDES + (QUICK_OVERRIDES if quick else []))


def _rows(cfg, seed: int):
    """Endless (input_ids, labels) micro-batches of random tokens; labels are the next tokens."""
    t, vocab = cfg.train, cfg.model.vocab_size
    g = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.randint(0, vocab, (t.micro_batch_size, t.seq_len + 1), generator=g)
        yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


# ---- the sides (each in a worker process) -------------------------------------------------------------


def _ours(cfg, *, compiled: bool):
    from parallel.engine import build_engine
    from parallel.parallelize import parallelize
    from parallel.topology import single_process_topology
    from pretrain.model.model import build_model
    from pretrain.train.step import Placement, train_step

    t = cfg.train
    torch.manual_seed(t.seed)
    topology = single_process_topology()
    place = Placement(topology, torch.device("cpu"))
    model = parallelize(build_model(cfg.model, device="cpu", seed=t.seed), topology)
    model.set_activation_checkpointing(t.activation_checkpointing)
    if compiled:
        from pretrain.train.worker import compile_blocks

        compile_blocks(model)
    engine = build_engine(model, cfg.optim, cfg.parallel, topology, max_steps=10**6, grad_accum=1,
                          micro_batch_size=t.micro_batch_size)
    model.train()
    rows = _rows(cfg, t.seed)

    def step() -> float:
        ids, labels = next(rows)
        return train_step(engine, [{"input_ids": ids, "labels": labels}], place).loss

    return step, sum(p.numel() for p in model.parameters()), {}


def _hf(cfg):
    from transformers import Lfm2MoeConfig, Lfm2MoeForCausalLM

    from checkpoints.export import lfm2_moe_config

    import transformers

    t, o = cfg.train, cfg.optim
    torch.manual_seed(t.seed)
    hf_cfg = Lfm2MoeConfig(**{k: v for k, v in lfm2_moe_config(cfg.model, seq_len=t.seq_len).items()
                              if k not in ("architectures", "model_type")})
    hf_cfg.use_cache = False
    model = Lfm2MoeForCausalLM(hf_cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay)
    rows = _rows(cfg, t.seed)

    def step() -> float:
        ids, labels = next(rows)
        # HF shifts labels itself: give it the inputs as labels (the same next-token targets).
        loss = model(input_ids=ids, labels=torch.cat([ids, labels[:, -1:]], 1)[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    info = {"transformers": transformers.__version__,
            "attn_implementation": getattr(hf_cfg, "_attn_implementation", None),
            "experts_implementation": getattr(hf_cfg, "_experts_implementation", None)}
    return step, sum(p.numel() for p in model.parameters()), info


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _settle(step) -> int:
    """Untimed steps under the profiler until one takes fewer than SETTLE_FAULTS minor page faults (at most
    SETTLE_MAX_STEPS); returns how many ran.

    Why: with freed host memory kept (`keep_freed_host_memory`, as `liquid pretrain` runs) an unprofiled step
    takes 0-2 page faults, but under the profiler about 12,000 (48 MiB) a step: the profiler's own small
    allocations split the freed blocks, so the step's largest tensors (the head's logits, 64 MiB here) land
    on freshly mapped memory every step, and the op that first writes them (the head's matmul, or
    log_softmax) took up to 120 ms more a step in the profile. So profile_split first frees a touched block
    of PROFILE_HEAP_RESERVE bytes (the heap keeps it mapped), from which those allocations are then served,
    and reports the faults of the profiled steps (`page_faults_per_step`)."""
    for done in range(1, SETTLE_MAX_STEPS + 1):
        before = _minor_faults()
        step()
        if _minor_faults() - before < SETTLE_FAULTS:
            return done
    return SETTLE_MAX_STEPS


def profile_split(step, steps: int, top: int = 12) -> dict:
    """Profile `steps` calls of step() (after profiled warm-up calls until the heap settles, see _settle):
    matmul share of the CPU time and the top non-matmul ops by self time, and the page faults of the
    profiled steps."""
    from torch.profiler import ProfilerActivity, profile, record_function

    reserve = torch.empty(PROFILE_HEAP_RESERVE // 4)  # see _settle
    reserve.fill_(0.0)
    del reserve
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        warmup = _settle(step)
        prof.step_num = 0
        faults = _minor_faults()
        with record_function("liquid_bench::window"):
            for _ in range(steps):
                with record_function(STEP_EVENT):
                    step()
        faults = _minor_faults() - faults
    events = prof.events()
    window = [e for e in events if e.name == "liquid_bench::window"][0].time_range
    selfs: dict[str, float] = {}
    counts: dict[str, int] = {}
    for e in events:
        if e.name == "liquid_bench::window" or e.time_range.start < window.start or e.time_range.end > window.end:
            continue
        selfs[e.name] = selfs.get(e.name, 0.0) + e.self_cpu_time_total
        counts[e.name] = counts.get(e.name, 0) + 1
    total = sum(selfs.values())
    mm = sum(v for k, v in selfs.items() if k in MATMUL_OPS)
    attn = sum(v for k, v in selfs.items() if k in ATTENTION_OPS)
    rest = sorted(((k, v) for k, v in selfs.items() if k not in MATMUL_OPS), key=lambda kv: -kv[1])
    mm_ops = sorted(((k, v) for k, v in selfs.items() if k in MATMUL_OPS), key=lambda kv: -kv[1])
    return {
        "profiled_step_ms": round(total / 1e3 / steps, 2), "profiled_warmup_steps": warmup,
        "page_faults_per_step": round(faults / steps, 1),
        "matmul_frac": round(mm / total, 4), "matmul_frac_with_attention": round((mm + attn) / total, 4),
        "matmul_ops": {k: round(v / 1e3 / steps, 2) for k, v in mm_ops},
        "top_non_matmul": [{"op": k, "ms_per_step": round(v / 1e3 / steps, 2), "frac": round(v / total, 4),
                            "calls_per_step": round(counts[k] / steps, 1)} for k, v in rest[:top]],
    }


def worker_main(side: str, spec: dict) -> None:
    """A side's worker: build, warm up, say `ready`, then answer `time N` / `profile N` / `quit` on stdin
    with one JSON line each on the original stdout (everything else printed goes to stderr)."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec.get("host_malloc") == "all" or (spec.get("host_malloc") == "ours" and side != "hf"):
        from pretrain.train.host_memory import keep_freed_host_memory

        keep_freed_host_memory()
    cfg = bench_config(spec["quick"])
    start = time.perf_counter()
    try:
        step, params, info = _hf(cfg) if side == "hf" else _ours(cfg, compiled=side == "ours_compiled")
    except Exception as err:  # noqa: BLE001 - reported as this side's result
        out.write(json.dumps({"error": f"{type(err).__name__}: {err}"}) + "\n")
        return
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    losses = [step() for _ in range(spec["warmup"])]
    out.write(json.dumps({"ready": True, "params": params, "build_s": round(build_s, 2),
                          "warmup_s": round(time.perf_counter() - start, 2), "warmup_losses": losses,
                          "threads": torch.get_num_threads(), **info}) + "\n")
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "time":
            times, loss = [], None
            for _ in range(int(arg)):
                t0 = time.perf_counter()
                loss = step()
                times.append(time.perf_counter() - t0)
            out.write(json.dumps({"seconds": times, "loss": loss}) + "\n")
        elif cmd == "profile":
            out.write(json.dumps(profile_split(step, int(arg))) + "\n")
        elif cmd == "sample":
            from pretrain.bench.sampled import sampled_split

            out.write(json.dumps(sampled_split(step, int(arg))) + "\n")
        else:
            break


class Worker:
    def __init__(self, side: str, spec: dict, timeout: float):
        env = dict(os.environ)
        if side == "hf":
            env["PYTHONPATH"] = os.pathsep.join([str(HF5_DIR), str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
        self.side, self.timeout = side, timeout
        self.proc = subprocess.Popen([sys.executable, "-m", "pretrain.bench.hf", "--worker", side,
                                      "--spec", json.dumps(spec)], cwd=REPO, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            return {"error": f"worker exited (rc {self.proc.wait()})"}
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def hf_available() -> str | None:
    """None when transformers 5 is importable from .venv-hf5, else why not."""
    if not HF5_DIR.is_dir():
        return f"{HF5_DIR.name} is absent (build it with `make venv-hf5`)"
    return None


def main_hf(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="liquid bench hf", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="timed steps per side and repeat (default 1; --quick 2)")
    p.add_argument("--repeats", type=int, default=None,
                   help="alternating rounds over the sides (default 12; --quick 1): step by step, bursts of load "
                        "from other processes hit every side alike")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per side (default 3; --quick 1)")
    p.add_argument("--profile-steps", type=int, default=None, help="profiled steps of ours (default 3; --quick 1)")
    p.add_argument("--sample-steps", type=int, default=None,
                   help="steps of each side sampled by Linux perf for the split by code (pretrain/bench/sampled.py; "
                        "default 3, --quick 1; 0: none)")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma list of {', '.join(SIDES)}")
    p.add_argument("--quick", action="store_true", help="a tiny configuration (for tests)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: torch's)")
    p.add_argument("--host-malloc", choices=("ours", "all", "system"), default="ours",
                   help="which sides keep freed host memory for reuse: ours (as `liquid pretrain` on the CPU does, "
                        "train.keep_host_memory; HF with glibc's defaults, as a user runs it), all, or none "
                        "(system) (default ours)")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main(args.worker, json.loads(args.spec))
        return {}
    q = args.quick
    steps = args.steps or (2 if q else 1)
    repeats = args.repeats or (1 if q else 12)
    warmup = args.warmup if args.warmup is not None else (1 if q else 3)
    prof_steps = args.profile_steps if args.profile_steps is not None else (1 if q else 3)
    sample_steps = args.sample_steps if args.sample_steps is not None else (1 if q else 3)
    sides = [s for s in args.sides.split(",") if s]
    if any(s not in SIDES for s in sides):
        p.error(f"--sides: choose from {', '.join(SIDES)}")
    cfg = bench_config(q)
    tokens = cfg.train.seq_len * cfg.train.global_batch_size
    spec = {"quick": q, "warmup": warmup, "threads": args.threads, "host_malloc": args.host_malloc}
    started = time.perf_counter()
    skipped, workers = {}, {}
    if "hf" in sides and (why := hf_available()):
        skipped["hf"] = why
    for side in sides:
        if side in skipped:
            continue
        _log(f"{side}: building and warming up ({warmup} steps)")
        w = Worker(side, spec, args.timeout)
        if "error" in w.hello:
            skipped[side] = w.hello["error"]
            w.close()
            continue
        workers[side] = w
        _log(f"{side}: ready ({w.hello})")
    times = {s: [] for s in workers}
    try:
        for r in range(repeats):
            for side, w in workers.items():
                times[side] += w.ask(f"time {steps}")["seconds"]
            _log(f"repeat {r + 1}/{repeats}: " + ", ".join(
                f"{s} {tokens / statistics.median(times[s]):,.0f} tok/s" for s in workers))
        profile = workers["ours"].ask(f"profile {prof_steps}") if "ours" in workers and prof_steps else None
        compiled_profile = (workers["ours_compiled"].ask(f"profile {prof_steps}")
                            if "ours_compiled" in workers and prof_steps else None)
        hf_profile = workers["hf"].ask(f"profile {prof_steps}") if "hf" in workers and prof_steps else None
        sampled = {s: w.ask(f"sample {sample_steps}") for s, w in workers.items()} if sample_steps else {}
    finally:
        for w in workers.values():
            w.close()
    results = {}
    for side, w in workers.items():
        ts = times[side]
        results[side] = {"tokens_per_s": round(tokens / statistics.median(ts), 1),
                         "step_ms_median": round(1e3 * statistics.median(ts), 2),
                         "step_ms_min": round(1e3 * min(ts), 2), "params": w.hello["params"],
                         "build_s": w.hello["build_s"], "warmup_s": w.hello["warmup_s"],
                         **{k: v for k, v in w.hello.items() if k in ("transformers", "attn_implementation",
                                                                       "experts_implementation", "threads")}}
    ratios, ratios_best = {}, {}  # best: from each side's fastest step (the least disturbed by other load)
    pairs = [(f"{s}_vs_hf", s, "hf") for s in ("ours", "ours_compiled")] + [("compiled_vs_eager", "ours_compiled", "ours")]
    for name, a, b in pairs:
        if a in results and b in results:
            ratios[name] = round(results[a]["tokens_per_s"] / results[b]["tokens_per_s"], 3)
            ratios_best[name] = round(results[b]["step_ms_min"] / results[a]["step_ms_min"], 3)
    out = {
        "bench": "hf", "machine": machine_name(), "cores": os.cpu_count(), "torch": torch.__version__,
        "quick": q, "tokens_per_step": tokens, "seq_len": cfg.train.seq_len, "batch": cfg.train.global_batch_size,
        "dtype": "float32", "host_malloc": args.host_malloc, "steps": steps, "repeats": repeats, "warmup": warmup,
        "results": results, "ratios": ratios, "ratios_best": ratios_best, "skipped": skipped,
        "targets": {"ours_vs_hf": 1.3, "matmul_frac": 0.75},
        "ours_profile": profile, "ours_compiled_profile": compiled_profile, "hf_profile": hf_profile,
        "sampled": sampled,
        "wall_s": round(time.perf_counter() - started, 1),
        "note": ("tokens_per_s = tokens per step / median step time over all repeats; ratios_best compare the "
                 "fastest steps; sides alternate repeat by repeat in their own warmed-up processes; matmul_frac "
                 "is of our eager step (profiler self times), ours_compiled_profile and hf_profile the same split "
                 "of our compiled step (the fused kernels' self time counts as not matmul) and of HF's step; "
                 "sampled: each side's training thread's perf samples by the code they ran (gemm: BLAS products "
                 "from any op, flash attention's included; see pretrain/bench/sampled.py)"),
    }
    print_json(out)
    return out


if __name__ == "__main__":
    main_hf()
