"""`liquid bench gpu`: the liquid-8b-a1b preset on one device: scan bandwidth and FLOP/s against causal
attention, a training step's tokens/s and MFU, and peak memory against sequence length.

One JSON line per measurement goes to stdout (and is appended to `--out`), then one summary line;
progress goes to stderr. Made for one CUDA device at the preset's shapes; `--quick --device cpu` runs the
same code at tiny widths and lengths (CI: the schema and code paths, not the speed). Everything runs in
this process: a scan-section measurement is `--warmup` untimed runs, then `--repeats` timed ones (device
synchronised around each); `seconds` is their median and peak_added_bytes the peak memory it added, its
inputs included (PEAK_MEM_METHOD).

scan (per seq of `--seqs`, default 4096..65536, batch 1; the preset's liquid and attention shapes)
  * case liquid_scan: forward+backward of the scan with q, k, v in bf16 and log_decay in fp32 (what
    LiquidMixer feeds it with bf16 weights), gradients given for y and the final state. impl "pytorch" is
    the chunked PyTorch path (LIQUID_SCAN_TRITON=0 while the section runs, and scan.pytorch_forms: not the
    CPU's C++ kernel); the Triton impls (TRITON_IMPLS:
    "triton" the sequential kernels forward and backward, "triton_recompute" the same forward with the
    PyTorch recomputation as backward, "triton_parallel" the chunk-parallel form) call
    `scan_triton.liquid_scan_triton` (CUDA with triton importable only, a skipped line otherwise). Each line
    also times the forward alone (forward_seconds, no_grad). bytes_per_s = `scan_bytes` / seconds (the byte model in
    its docstring), bandwidth_fraction = bytes_per_s / PEAK_BANDWIDTH of the device, flops_per_s = the
    scan term of pretrain/train/flops.py for one liquid layer / seconds.
  * case sdpa: causal F.scaled_dot_product_attention, forward+backward, bf16, with the preset's attention
    shapes (heads, kv_heads, head_dim; GQA as AttentionMixer calls it); torch picks the backend (named in
    `backend`); flops_per_s by flops.py's attention term (causal: half of QK^T and AV).
  * case mixers: a whole LiquidMixer (per scan impl) against a whole AttentionMixer at the preset's
    d_model, forward+backward of bf16 weights and input under bf16 autocast; liquid_faster_than_attention.
  A measurement is skipped when its memory, extrapolated from the same case's previous seq (linear;
  quadratic for SDPA's MATH backend), exceeds MEM_FRACTION of the memory available, or when it runs out of
  memory (the line says which).

step: a training step of a slice of the preset: layers SLICE_START .. SLICE_START+SLICE_LAYERS-1 (4-7:
  liquid, liquid, attention, liquid; all MoE, so one period of the repeating layer pattern without the
  dense first layers), every width, expert and the vocabulary as in the preset, all experts local
  (dp = ep = cp = 1). One optimizer step as one rank of the preset takes it: `--grad-accum` micro-batches
  (default the preset's global_batch_size / (micro_batch_size x dp) = 4) of `--batch` rows (default its
  micro_batch_size, 4) of `--step-seq` tokens (4096). Three variants, one model and engine for all (see
  step_variants): the scan liquid_scan dispatches to (Triton on CUDA unless LIQUID_SCAN_TRITON=0), the
  PyTorch scan where that differs, and packed documents of `--step-doc-len` tokens (the loader's doc_start:
  attention under a DocumentMask, FlexAttention on CUDA); one document per row otherwise (causal SDPA).
  Precision as the preset trains (train.dtype=bf16): bf16 weights and gradients under bf16 autocast, fp32
  master weights and AdamW state, gradient clipping (`build_engine(..., dtype=torch.bfloat16)` on one
  process: LocalEngine's bf16 mode, DeepSpeed's bf16 mode without the sharding); the step is
  `pretrain.train.step.train_step`, the one the training loop runs. `--warmup` steps, then `--steps` timed
  ones:
    tokens_per_s = grad_accum * batch * seq / mean step time;  MFU = tokens_per_s * flops_per_token(slice,
    seq) / peak_flops(device) (flops.py's convention; null where the peak is unknown, e.g. on the CPU).
  mfu_fwd_bwd uses the forward+backward time alone (the optimizer's share shrinks as a rank's step holds
  more tokens: ZeRO shards its state over the data-parallel ranks). Each line also counts one step's host
  synchronisations (count_host_syncs) and is followed by a profile line (profile_summary).

memory: peak memory of one forward+backward of the same slice (bf16 weights) at each of `--memory-seqs`
  (4096, 32768, 131072; batch 1, CP=1), once as one document (doc_len null) and once as packed documents
  of `--doc-len` tokens (4096; the way the loader's rows come, attention under a DocumentMask) where
  doc_len < seq; out of memory is reported per line. Each line also gives the size
  of one liquid layer's recurrent state (constant in seq) next to one attention layer's K/V cache at that
  seq, and an estimate (weights + gradients + pretrain.train.plan.activation_bytes); on the CPU a seq whose
  estimate exceeds MEM_FRACTION of the available memory is skipped.

summary: device, torch, how peak memory is measured (PEAK_MEM_METHOD), the measured values behind the
  targets, and the targets (null = not measured):
  mfu_at_least_0_40, scan_bandwidth_at_least_0_60_of_peak (the best liquid_scan line),
  liquid_faster_than_flash_at_32768 (the faster liquid_scan impl against sdpa at seq 32768).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from pretrain.bench.common import (MEM_FRACTION, PeakMemory, available_bytes, device_name, gib, log, sdpa_backend,
                                   sync, time_runs)
from pretrain.config import load_config
from pretrain.train.flops import (attention_flops_per_token, count_params, flops_per_token, mixer_params,
                                  peak_flops, scan_flops_per_token)

PRESET = "liquid-8b-a1b"
SLICE_START, SLICE_LAYERS = 4, 4
SECTIONS = ("scan", "step", "memory")
DEFAULTS = {"seqs": (4096, 8192, 16384, 32768, 65536), "memory_seqs": (4096, 32768, 131072), "doc_len": 4096,
            "step_seq": 4096, "step_doc_len": 1024,
            "steps": 10, "warmup": 3, "repeats": 5}
QUICK = {"seqs": (256, 512), "memory_seqs": (256, 512, 1024), "doc_len": 128, "step_seq": 256, "step_doc_len": 64, "steps": 2,
         "warmup": 1,
         "repeats": 1}
# --quick: the preset with tiny widths, a tiny vocabulary and few experts.
QUICK_OVERRIDES = ["model.vocab_size=512", "model.d_model=128", "model.dense_dim=256", "model.liquid.heads=2",
                   "model.liquid.key_dim=16", "model.liquid.value_dim=32", "model.liquid.chunk_size=32",
                   "model.attention.heads=4", "model.attention.kv_heads=2", "model.attention.head_dim=32",
                   "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_dim=128"]
TARGET_MFU, TARGET_BANDWIDTH_FRACTION, TARGET_SEQ = 0.40, 0.60, 32768
# The Triton scan's measured variants: impl -> liquid_scan_triton's keywords. "triton": the sequential
# kernels (the default) with their backward kernels; "triton_recompute": the same forward, backward by the
# PyTorch recomputation it replaced; "triton_parallel": the chunk-parallel form (scan_triton_parallel.py).
TRITON_IMPLS = {"triton": {"backward": "triton", "form": "sequential"},
                "triton_recompute": {"backward": "recompute", "form": "sequential"},
                "triton_parallel": {"backward": "triton", "form": "parallel"}}
SEED = 0
# Peak memory bandwidth in bytes/s, matched as a substring of torch.cuda.getdevice_name() like
# flops.PEAK_FLOPS (first match wins: the more specific names come first). CPU: unknown (None).
PEAK_BANDWIDTH = {
    "H100 PCIe": 2.0e12,
    "H100 NVL": 3.9e12,
    "H100": 3.35e12,  # H100 SXM (HBM3)
    "H200": 4.8e12,
    "A100 80GB PCIe": 1.935e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100": 1.555e12,  # A100 40GB, SXM and PCIe
}
PEAK_MEM_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated (peak_bytes), minus what was allocated when the measurement "
            "started (peak_added_bytes)",
    "cpu": "peak RSS of this process (VmHWM, reset through /proc/self/clear_refs; peak_bytes), minus its RSS "
           "when the measurement started (peak_added_bytes); approximate (allocator reuse, other threads), "
           "null where the peak cannot be reset",
}


def peak_bandwidth(device_name: str) -> float | None:
    """Peak memory bandwidth (bytes/s) of the CUDA device called `device_name`, or None when unknown."""
    for key, value in PEAK_BANDWIDTH.items():
        if key.lower() in device_name.lower():
            return value
    return None


def scan_bytes(batch: int, seq: int, heads: int, key_dim: int, value_dim: int, *, act_bytes: int = 2,
               decay_bytes: int = 4, state_bytes: int = 4) -> int:
    """The byte model: minimum memory traffic of one forward+backward of liquid_scan.

    Forward reads q, k [batch, seq, heads, N], v [.., P] and log_decay [batch, seq, heads] once and writes
    y [.., P] and the final state [batch, heads, N, P]; backward reads q, k, v, log_decay, dy and the final
    state's gradient once and writes dq, dk, dv, dlog_decay once:
        bytes = 3 * (q + k + v + log_decay) + 2 * y + 2 * state
    Anything else an implementation moves (the PyTorch path's fp32 chunk matrices and saved intermediates,
    the Triton path's recomputation in backward) is not counted, so bytes/s measures how close a run comes
    to this memory-bound ideal, not the traffic it really causes.
    """
    tokens = batch * seq * heads
    inputs = tokens * ((2 * key_dim + value_dim) * act_bytes + decay_bytes)
    y = tokens * value_dim * act_bytes
    state = batch * heads * key_dim * value_dim * state_bytes
    return 3 * inputs + 2 * y + 2 * state


# ---- configs and FLOPs ----------------------------------------------------------------------------------


def slice_overrides(model_cfg, start: int = SLICE_START, count: int = SLICE_LAYERS) -> list[str]:
    """Overrides that keep layers start .. start+count-1 of `model_cfg` (their mixers and FFN kinds)."""
    types = model_cfg.layer_types()
    if start < 0 or count < 1 or start + count > len(types):
        raise ValueError(f"layers {start}..{start + count - 1} are not all in the preset's 0..{len(types) - 1}")
    part = types[start:start + count]

    def where(kind):
        return "[" + ",".join(str(i) for i, t in enumerate(part) if t == kind) + "]"

    return [f"model.num_layers={count}", f"model.attention_layers={where('attention')}",
            f"model.conv_layers={where('conv')}",
            f"model.dense_layers={min(max(model_cfg.dense_layers - start, 0), count)}"]


def bench_config(*, quick: bool, seq: int, batch: int, sliced: bool):
    """The preset (tiny widths with quick) on one device; `sliced`: only the slice's layers."""
    overrides = (QUICK_OVERRIDES if quick else []) + [
        "parallel.dp=1", "parallel.ep=1", "parallel.cp=1", "cluster.num_workers=1", f"train.seq_len={seq}",
        f"train.micro_batch_size={batch}", f"train.global_batch_size={batch}"]
    cfg = load_config(PRESET, overrides)
    return load_config(PRESET, overrides + slice_overrides(cfg.model)) if sliced else cfg


def _one_layer(model_cfg, kind: str):
    return dataclasses.replace(model_cfg, num_layers=1, mixer=kind, attention_layers=[], conv_layers=[])


def mixer_flops_per_token(model_cfg, kind: str, seq: int, *, matmuls: bool = True) -> int:
    """flops.py's training FLOPs per token of one `kind` mixer: 6 x its matmul parameters (if `matmuls`)
    plus its scan or attention term."""
    one = _one_layer(model_cfg, kind)
    core = scan_flops_per_token(one) if kind == "liquid" else attention_flops_per_token(one, seq)
    return (6 * mixer_params(kind, model_cfg)[1] if matmuls else 0) + core


# ---- measuring ------------------------------------------------------------------------------------------


def _free_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can still get: free device memory plus the allocator's unused cache."""
    if device.type == "cuda":
        return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                - torch.cuda.memory_allocated(device))
    return available_bytes(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _attempt(fn, device: torch.device):
    """fn() -> (result, None); (None, {"skipped": why}) when it ran out of memory, (None, {"error": ...})
    when it failed otherwise (traceback on stderr). Memory is released after a failure."""
    try:
        return fn(), None
    except torch.cuda.OutOfMemoryError as err:
        fail = {"skipped": "out of memory: " + str(err).strip().splitlines()[0][:300]}
    except Exception as err:  # one failed measurement must not cost the others their run
        traceback.print_exc(file=sys.stderr)
        fail = {"error": f"{type(err).__name__}: {str(err).strip()[:300]}"}
    _release(device)
    return None, fail


def _sig(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")


# ---- section scan ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _scoped_env(values: dict):
    """The environment variables in `values` set while the block runs (liquid_scan reads
    LIQUID_SCAN_TRITON and LIQUID_SCAN_TRITON_FORM on every call)."""
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


def scan_impls(device: torch.device) -> dict:
    """impl -> the scan function (liquid_scan's signature), or the reason it is not measured here."""
    from pretrain.model.scan import liquid_scan, pytorch_forms

    def pytorch_scan(*args, **kwargs):  # the PyTorch form even where the CPU kernel would be taken
        with pytorch_forms():
            return liquid_scan(*args, **kwargs)

    impls = {"pytorch": pytorch_scan}
    for impl in TRITON_IMPLS:
        impls[impl] = "the Triton scan runs on CUDA only"
    if device.type == "cuda":
        from pretrain.model import scan_triton

        for impl, kwargs in TRITON_IMPLS.items():
            impls[impl] = (functools.partial(scan_triton.liquid_scan_triton, **kwargs)
                           if scan_triton.triton_available() else "triton is not importable")
    return impls


def dispatched_scan_impl(device: torch.device) -> str:
    """The impl liquid_scan takes inside the model here, named as in TRITON_IMPLS: "triton" (or
    "triton_parallel" with LIQUID_SCAN_TRITON_FORM=parallel) where scan_triton.use_triton says so for a
    tensor on `device` (CUDA with triton, unless LIQUID_SCAN_TRITON=0); on the CPU "cpu_kernel" where the
    chunked scan's C++ kernel is available (pretrain/model/scan_cpu.py); else "pytorch"."""
    from pretrain.model import scan_triton

    if not scan_triton.use_triton(torch.empty(0, device=device)):
        from pretrain.train.plan import cpu_scan_kind

        return cpu_scan_kind() if device.type == "cpu" else "pytorch"
    return "triton_parallel" if os.environ.get(scan_triton.FORM_ENV) == "parallel" else "triton"


def _randn(g, device, *shape):
    return torch.randn(*shape, generator=g, device=device)


def _scan_run(scan, lc, batch: int, seq: int, device: torch.device, *, backward: bool = True):
    g = torch.Generator(device=device).manual_seed(SEED)
    h, n, p = lc.heads, lc.key_dim, lc.value_dim
    q = F.normalize(_randn(g, device, batch, seq, h, n), dim=-1).bfloat16().requires_grad_()
    k = F.normalize(_randn(g, device, batch, seq, h, n), dim=-1).bfloat16().requires_grad_()
    v = _randn(g, device, batch, seq, h, p).bfloat16().requires_grad_()
    log_decay = (-F.softplus(_randn(g, device, batch, seq, h))).requires_grad_()
    dy, dstate = _randn(g, device, batch, seq, h, p).bfloat16(), _randn(g, device, batch, h, n, p)

    def run():
        for t in (q, k, v, log_decay):
            t.grad = None
        y, state = scan(q, k, v, log_decay, chunk_size=lc.chunk_size)
        torch.autograd.backward([y, state], [dy, dstate])

    def forward_only():
        with torch.no_grad():
            scan(q, k, v, log_decay, chunk_size=lc.chunk_size)

    return run if backward else forward_only


def _sdpa_run(ac, batch: int, seq: int, device: torch.device, label: dict):
    g = torch.Generator(device=device).manual_seed(SEED)
    q = _randn(g, device, batch, ac.heads, seq, ac.head_dim).bfloat16().requires_grad_()
    k = _randn(g, device, batch, ac.kv_heads, seq, ac.head_dim).bfloat16().requires_grad_()
    v = _randn(g, device, batch, ac.kv_heads, seq, ac.head_dim).bfloat16().requires_grad_()
    dout = _randn(g, device, batch, ac.heads, seq, ac.head_dim).bfloat16()
    label["backend"] = sdpa_backend(q, k, v, enable_gqa=True)
    gqa = ac.heads != ac.kv_heads

    def run():
        for t in (q, k, v):
            t.grad = None
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).backward(dout)

    return run


def _mixer_run(mixer, d_model: int, batch: int, seq: int, device: torch.device):
    g = torch.Generator(device=device).manual_seed(SEED)
    x = _randn(g, device, batch, seq, d_model).bfloat16().requires_grad_()
    dout = _randn(g, device, batch, seq, d_model).bfloat16()

    def run():
        x.grad = None
        mixer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = mixer(x)
        out.backward(dout)

    return run


def _memory_skip(prior, seq: int, device: torch.device) -> str | None:
    """Why the measurement at `seq` is skipped, from the case's previous (seq, peak bytes, power), or None."""
    if prior is None or prior[1] is None:
        return None
    last_seq, last_bytes, power = prior
    est = last_bytes * (seq / last_seq) ** power
    avail = _free_bytes(device)
    if avail is None or est <= MEM_FRACTION * avail:
        return None
    how = "quadratic" if power == 2 else "linear"
    return (f"estimated peak memory {gib(est)} ({how} extrapolation from the measured {gib(last_bytes)} at seq "
            f"{last_seq}; an estimate, not measured) exceeds {MEM_FRACTION:g} of the {gib(avail)} available")


def _measure(make_run, key, seq, last: dict, device: torch.device, args, label: dict | None = None):
    """Times make_run()'s run (inputs included in the peak memory) unless the memory estimate says no.
    Returns (measurement dict, None) or (None, fail dict); records the peak in `last[key]`."""
    label = {} if label is None else label
    why = _memory_skip(last.get(key), seq, device)
    if why:
        return None, {"skipped": why}

    def go():
        with PeakMemory(device) as mem:
            runs = time_runs(make_run(), device, warmup=args.warmup, repeats=args.repeats)
        return {"seconds": round(statistics.median(runs), 9), "runs": [round(r, 9) for r in runs],
                "peak_added_bytes": mem.added}

    got, fail = _attempt(go, device)
    if got is not None:
        power = 2 if label.get("backend") == "MATH" else 1
        last[key] = (seq, got["peak_added_bytes"], power)
    return got, fail


def bench_scan(cfg, device: torch.device, args, emit) -> None:
    """The scan section (module docstring): one line per (case, impl, seq)."""
    from pretrain.model.mixers import build_mixer

    m = cfg.model
    lc, ac = m.liquid, m.attention
    batch = 1
    peak_bw = peak_bandwidth(device_name(device)) if device.type == "cuda" else None
    impls = scan_impls(device)
    torch.manual_seed(SEED)
    attention_mixer = build_mixer("attention", m.d_model, m).to(device, torch.bfloat16)
    liquid_mixers = {}
    for impl, fn in impls.items():
        if callable(fn):
            liquid_mixers[impl] = build_mixer("liquid", m.d_model, m).to(device, torch.bfloat16)
            liquid_mixers[impl].scan = fn  # the mixer's scan hook
    scan_shape = {"batch": batch, "heads": lc.heads, "key_dim": lc.key_dim, "value_dim": lc.value_dim,
                  "chunk_size": lc.chunk_size, "dtype": "q, k, v bfloat16; log_decay float32"}
    last: dict = {}
    profile_seq = TARGET_SEQ if TARGET_SEQ in args.seqs else max(args.seqs)
    for seq in args.seqs:
        tokens = batch * seq
        for impl, fn in impls.items():
            head = {"section": "scan", "case": "liquid_scan", "impl": impl, "seq": seq, **scan_shape}
            if not callable(fn):
                emit({**head, "skipped": fn})
                continue
            got, fail = _measure(lambda: _scan_run(fn, lc, batch, seq, device), ("scan", impl), seq, last,
                                 device, args)
            if fail:
                emit({**head, **fail})
                continue
            # The forward alone (no_grad), to see which half dominates; backward_seconds is the difference.
            fwd, _ = _attempt(lambda: statistics.median(time_runs(
                _scan_run(fn, lc, batch, seq, device, backward=False), device, warmup=args.warmup,
                repeats=args.repeats)), device)
            nbytes = scan_bytes(batch, seq, lc.heads, lc.key_dim, lc.value_dim)
            flops = mixer_flops_per_token(m, "liquid", seq, matmuls=False) * tokens
            rate = nbytes / got["seconds"]
            if seq == profile_seq:
                prof, _ = _attempt(lambda: profile_summary(_scan_run(fn, lc, batch, seq, device), device), device)
                if prof is not None:
                    emit({"section": "profile", "what": "liquid_scan", "impl": impl, "seq": seq, **prof})
            emit({**head, **got, "forward_seconds": None if fwd is None else round(fwd, 9),
                  "backward_seconds": None if fwd is None else round(got["seconds"] - fwd, 9),
                  "tokens_per_s": round(tokens / got["seconds"], 1), "bytes": nbytes,
                  "bytes_per_s": _sig(rate), "peak_bandwidth": peak_bw,
                  "bandwidth_fraction": _sig(rate / peak_bw) if peak_bw else None,
                  "flops": flops, "flops_per_s": _sig(flops / got["seconds"])})

        head = {"section": "scan", "case": "sdpa", "seq": seq, "batch": batch, "heads": ac.heads,
                "kv_heads": ac.kv_heads, "head_dim": ac.head_dim, "dtype": "bfloat16"}
        label: dict = {}
        got, fail = _measure(lambda: _sdpa_run(ac, batch, seq, device, label), ("sdpa",), seq, last, device,
                             args, label)
        if fail:
            emit({**head, **fail})
        else:
            flops = mixer_flops_per_token(m, "attention", seq, matmuls=False) * tokens
            emit({**head, "backend": label.get("backend"), **got, "tokens_per_s": round(tokens / got["seconds"], 1),
                  "flops": flops, "flops_per_s": _sig(flops / got["seconds"])})

        attn, attn_fail = _measure(lambda: _mixer_run(attention_mixer, m.d_model, batch, seq, device),
                                   ("mixer", "attention"), seq, last, device, args)
        for impl, fn in impls.items():
            head = {"section": "scan", "case": "mixers", "liquid_impl": impl, "seq": seq, "batch": batch,
                    "d_model": m.d_model, "dtype": "bfloat16 weights and input, bf16 autocast"}
            if not callable(fn):
                emit({**head, "skipped": fn})
                continue
            if attn_fail:
                emit({**head, **{k: f"attention mixer: {v}" for k, v in attn_fail.items()}})
                continue
            liq, fail = _measure(lambda: _mixer_run(liquid_mixers[impl], m.d_model, batch, seq, device),
                                 ("mixer", impl), seq, last, device, args)
            if fail:
                emit({**head, **{k: f"liquid mixer: {v}" for k, v in fail.items()}})
                continue
            lf = mixer_flops_per_token(m, "liquid", seq) * tokens
            af = mixer_flops_per_token(m, "attention", seq) * tokens
            emit({**head, "liquid_seconds": liq["seconds"], "attention_seconds": attn["seconds"],
                  "liquid_flops_per_s": _sig(lf / liq["seconds"]), "attention_flops_per_s": _sig(af / attn["seconds"]),
                  "liquid_peak_added_bytes": liq["peak_added_bytes"],
                  "attention_peak_added_bytes": attn["peak_added_bytes"],
                  "attention_over_liquid_time": _sig(attn["seconds"] / liq["seconds"]),
                  "liquid_faster_than_attention": liq["seconds"] < attn["seconds"]})


# ---- sections step and memory ---------------------------------------------------------------------------


def _random_batch(vocab: int, batch: int, seq: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    return {"input_ids": ids[:, :-1].to(device), "labels": ids[:, 1:].to(device), "doc_start": None}


def _slice_facts(model_cfg, seq: int) -> dict:
    counts = count_params(model_cfg)
    return {"layers": f"{SLICE_START}-{SLICE_START + SLICE_LAYERS - 1} of {PRESET}",
            "layer_types": model_cfg.layer_types(), "ffn_types": model_cfg.ffn_types(),
            "d_model": model_cfg.d_model, "vocab_size": model_cfg.vocab_size,
            "num_experts": model_cfg.moe.num_experts, "top_k": model_cfg.moe.top_k,
            "params_total": counts.total, "params_active": counts.active,
            "flops_per_token": flops_per_token(model_cfg, seq)}


def count_host_syncs(fn, device: torch.device) -> dict | None:
    """The synchronising CUDA calls fn() makes, by torch.cuda.set_sync_debug_mode("warn") (each warns):
    {"count": n, "where": {"file:line": n, ...}} (the Python frames that made them, most first); None
    off CUDA."""
    if device.type != "cuda":
        return None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where: dict[str, int] = {}
    for w in syncs:
        key = f"{os.path.relpath(w.filename)}:{w.lineno}"
        where[key] = where.get(key, 0) + 1
    return {"count": len(syncs), "where": dict(sorted(where.items(), key=lambda kv: -kv[1])[:10])}


KERNEL_CLASSES = (("scan", ("liquid_scan",)), ("attention", ("flash", "fmha", "attention", "flex")),
                  ("matmul", ("gemm", "matmul", "nvjet", "cutlass", "wgmma", "xmma", "cublas", "grouped_mm",
                              "aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm")))


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((cls for cls, keys in KERNEL_CLASSES if any(k in low for k in keys)), "other")


def profile_summary(fn, device: torch.device, *, top: int = 12) -> dict:
    """torch.profiler over fn(): the device kernels (CPU: the aten ops) by self time, the top ones and the
    share of each class (matmul, scan, attention, other)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        sync(device)
    if cuda:
        # Kernels only: a record_function range (e.g. "Optimizer.step#AdamW.step") also shows up with device
        # time, the kernels inside it counted a second time.
        rows = [(e.key, e.self_device_time_total, e.count) for e in prof.key_averages()
                if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0
                and not getattr(e, "is_user_annotation", False) and "#" not in e.key]
    else:
        rows = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()
                if e.key.startswith("aten::") and e.self_cpu_time_total > 0]
    total = sum(r[1] for r in rows) or 1.0
    shares: dict[str, float] = {}
    for name, us, _ in rows:
        shares[kernel_class(name)] = shares.get(kernel_class(name), 0.0) + us / total
    rows.sort(key=lambda r: -r[1])
    return {"timer": "self device time of CUDA kernels" if cuda else "self CPU time of aten ops",
            "total_ms": round(total / 1e3, 3), "kernels": len(rows),
            "share": {k: round(v, 4) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])},
            "top": [{"name": name[:140], "ms": round(us / 1e3, 3), "calls": n, "share": round(us / total, 4)}
                    for name, us, n in rows[:top]]}


def step_variants(device: torch.device, args) -> list[dict]:
    """The step section's runs: the scan impl liquid_scan dispatches to on this device (one document per
    row: causal attention); where that is Triton, its chunk-parallel form and the PyTorch scan beside it;
    and packed documents of args.step_doc_len tokens (attention under the DocumentMask, as the loader's
    rows come)."""
    runs = [{"env": {}, "doc_len": None}]
    if dispatched_scan_impl(device) in TRITON_IMPLS:
        runs.append({"env": {"LIQUID_SCAN_TRITON_FORM": "parallel"}, "doc_len": None})
        runs.append({"env": {"LIQUID_SCAN_TRITON": "0"}, "doc_len": None})
    if args.step_doc_len < args.step_seq:
        runs.append({"env": {}, "doc_len": args.step_doc_len})
    return runs


def preset_accumulation() -> tuple[int, int]:
    """(micro_batch_size, grad_accum) of one rank of the preset as it trains: rows per micro-batch, and
    global batch / (micro-batch x dp) micro-batches per optimizer step."""
    train, dp = load_config(PRESET).train, load_config(PRESET).parallel.dp
    return train.micro_batch_size, max(1, train.global_batch_size // (train.micro_batch_size * dp))


def bench_train_step(cfg, device: torch.device, args, emit) -> None:
    """The step section (module docstring): one line per step_variants entry, then a profile line each.
    One model and engine serve every variant (building 1.6B parameters costs more than the steps)."""
    from parallel.engine import build_engine
    from parallel.topology import Topology
    from pretrain.model.model import build_model
    from pretrain.train.step import Placement

    variants = step_variants(device, args)

    def build():
        torch.manual_seed(SEED)
        model = build_model(cfg.model, device)
        topology = Topology.single()
        steps = len(variants) * (args.warmup + args.steps + 2)
        engine = build_engine(model, cfg.optim, cfg.parallel, topology, max_steps=steps,
                              grad_accum=args.grad_accum, micro_batch_size=args.batch, dtype=torch.bfloat16)
        return model.train(), engine, Placement(topology, device, autocast_dtype=torch.bfloat16)

    built, fail = _attempt(build, device)
    for variant in variants:
        with _scoped_env(variant["env"]):
            _bench_one_step(cfg, device, args, emit, built, fail, doc_len=variant["doc_len"])
    del built
    _release(device)


def _bench_one_step(cfg, device: torch.device, args, emit, built, build_fail, *, doc_len: int | None) -> None:
    from pretrain.model.mixers import attention_backend
    from pretrain.train.step import train_step

    seq, batch, accum = args.step_seq, args.batch, args.grad_accum
    a = cfg.model.attention
    if doc_len is None:  # causal SDPA: the backend torch picks for the mixer's q, k, v
        probe = [torch.empty(batch, h, seq, a.head_dim, device=device, dtype=torch.bfloat16)
                 for h in (a.heads, a.kv_heads, a.kv_heads)]
        attn = "sdpa " + str(sdpa_backend(*probe, enable_gqa=a.heads != a.kv_heads))
        del probe
    else:
        attn = "document mask: " + attention_backend(device, head_dim=a.head_dim, group=a.heads // a.kv_heads)
    head = {"section": "step", "seq": seq, "batch": batch, "grad_accum": accum, "tokens_per_step": accum * batch * seq,
            "doc_len": doc_len, **_slice_facts(cfg.model, seq),
            "precision": "bf16 weights and gradients, bf16 autocast, fp32 master weights and AdamW state",
            "liquid_scan_impl": dispatched_scan_impl(device), "attention_backend": attn,
            "warmup": args.warmup, "steps": args.steps}
    peak = peak_flops(device_name(device)) if device.type == "cuda" else None
    if build_fail:
        emit({**head, **build_fail})
        return
    model, engine, place = built

    def go():
        data = _random_batch(cfg.model.vocab_size, batch, seq, device)
        if doc_len is not None:
            data["doc_start"] = (torch.arange(seq, device=device) % doc_len == 0).expand(batch, seq).contiguous()
        micro = [data] * accum

        def step():
            start, backward_done = time.perf_counter(), []

            def before_update():
                sync(device)
                backward_done.append(time.perf_counter())

            result = train_step(engine, micro, place, before_update=before_update)
            sync(device)
            return time.perf_counter() - start, backward_done[0] - start, result.loss

        for _ in range(args.warmup):
            step()
        with PeakMemory(device) as mem:
            runs = [step() for _ in range(args.steps)]
        # One more step each under the sync counter and the profiler (the step as the loop runs it: no
        # synchronisation of the bench's own in it).
        syncs = count_host_syncs(lambda: train_step(engine, micro, place), device)
        profile = profile_summary(lambda: train_step(engine, micro, place), device)
        return runs, mem.peak, syncs, profile

    got, fail = _attempt(go, device)
    if fail:
        emit({**head, **fail})
        return
    runs, peak_bytes, syncs, profile = got
    step_s = statistics.mean(r[0] for r in runs)
    fwd_bwd_s = statistics.mean(r[1] for r in runs)
    tokens = head["tokens_per_step"]
    tps = tokens / step_s
    fpt = head["flops_per_token"]
    emit({**head, "step_seconds": round(step_s, 9), "fwd_bwd_seconds": round(fwd_bwd_s, 9),
          "optimizer_seconds": round(step_s - fwd_bwd_s, 9), "runs": [round(r[0], 9) for r in runs],
          "tokens_per_s": round(tps, 1), "peak_flops": peak,
          "mfu": _sig(tps * fpt / peak) if peak else None,
          "mfu_fwd_bwd": _sig(tokens / fwd_bwd_s * fpt / peak) if peak else None,
          "peak_bytes": peak_bytes, "host_syncs_per_step": syncs["count"] if syncs else None,
          "host_sync_sites": syncs["where"] if syncs else None, "last_loss": round(runs[-1][2], 4)})
    emit({"section": "profile", "what": "step", "seq": seq, "doc_len": doc_len,
          "liquid_scan_impl": head["liquid_scan_impl"], **profile})


def _estimate_bytes(model_cfg, seq: int) -> int:
    """bf16 weights and gradients plus pretrain.train.plan's activation estimate (batch 1)."""
    from pretrain.train.plan import activation_bytes

    return 4 * count_params(model_cfg).total + activation_bytes(model_cfg, 1, seq)


def bench_memory(cfg, device: torch.device, args, emit) -> None:
    """The memory section (module docstring): one line per seq."""
    from pretrain.model.mixers import AttentionMixer, LiquidMixer, attention_backend
    from pretrain.model.model import build_model

    m = cfg.model

    def bf16_model():
        torch.manual_seed(SEED)
        model = build_model(m, device)
        for p in model.parameters():  # the weights as the engine's bf16 mode holds them; buffers stay fp32
            p.data = p.data.to(torch.bfloat16)
        return model.train()

    model, fail = _attempt(bf16_model, device)
    mixers = [layer.mixer for layer in model.layers] if model is not None else []
    liquid = [x for x in mixers if isinstance(x, LiquidMixer)]
    state = liquid[0].init_state(1, device, torch.bfloat16) if liquid else {}
    facts = {"batch": 1, "layer_types": m.layer_types(), "liquid_scan_impl": dispatched_scan_impl(device),
             "liquid_state_bytes_per_layer": sum(t.numel() * t.element_size() for t in state.values()),
             "liquid_layers": len(liquid), "attention_layers": sum(isinstance(x, AttentionMixer) for x in mixers)}
    for seq, doc_len in [(seq, d) for seq in args.memory_seqs for d in (None, args.doc_len) if d is None or d < seq]:
        a = m.attention
        head = {"section": "memory", "seq": seq, "doc_len": doc_len, **facts,
                "attention_kv_bytes_per_layer": 2 * seq * a.kv_heads * a.head_dim * 2,  # bf16 K and V cache
                "logits_bytes": seq * m.vocab_size * 4,  # fp32 logits of the loss
                "estimated_bytes": _estimate_bytes(m, seq),
                "attention_backend": "sdpa causal" if doc_len is None else "document mask: " + attention_backend(
                    device, head_dim=a.head_dim, group=a.heads // a.kv_heads)}
        if fail:
            emit({**head, **fail})
            continue
        avail = available_bytes(device)
        if device.type == "cpu" and avail is not None and head["estimated_bytes"] > MEM_FRACTION * avail:
            emit({**head, "skipped": f"estimated {gib(head['estimated_bytes'])} exceeds {MEM_FRACTION:g} of the "
                                     f"{gib(avail)} available (an estimate, not measured)"})
            continue
        data = _random_batch(m.vocab_size, 1, seq, device)
        if doc_len is not None:
            data["doc_start"] = (torch.arange(seq, device=device) % doc_len == 0)[None]

        def go():
            with PeakMemory(device) as mem:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    out = model(data["input_ids"], labels=data["labels"], doc_start=data["doc_start"])
                out.loss.backward()
            return mem

        mem, seq_fail = _attempt(go, device)
        model.zero_grad(set_to_none=True)
        if seq_fail:
            emit({**head, **seq_fail})
        else:
            emit({**head, "peak_bytes": mem.peak, "peak_added_bytes": mem.added,
                  "peak_over_estimate": _sig(mem.peak / head["estimated_bytes"]) if mem.peak else None})
        _release(device)


# ---- summary and CLI ------------------------------------------------------------------------------------


def summarize(lines: list[dict], device: torch.device, *, quick: bool, wall_s: float) -> dict:
    """The summary line: the values behind the targets and whether each is met (None = not measured)."""
    scans = [d for d in lines if d.get("case") == "liquid_scan" and "seconds" in d]
    with_bw = [d for d in scans if d.get("bandwidth_fraction") is not None]
    best = max(with_bw, key=lambda d: d["bandwidth_fraction"]) if with_bw else None
    step = next((d for d in lines if d["section"] == "step" and "tokens_per_s" in d), None)
    mfu = step["mfu"] if step else None
    at = [d for d in scans if d["seq"] == TARGET_SEQ]
    liquid_at = min(at, key=lambda d: d["seconds"]) if at else None
    sdpa_at = next((d for d in lines if d.get("case") == "sdpa" and d["seq"] == TARGET_SEQ and "seconds" in d), None)
    name = device_name(device)
    return {
        "section": "summary", "device": name, "device_type": device.type, "torch": torch.__version__,
        "quick": quick, "peak_flops": peak_flops(name) if device.type == "cuda" else None,
        "peak_bandwidth": peak_bandwidth(name) if device.type == "cuda" else None,
        "peak_mem_method": PEAK_MEM_METHOD[device.type],
        "mfu": mfu, "step_tokens_per_s": step["tokens_per_s"] if step else None,
        "step_liquid_scan_impl": step["liquid_scan_impl"] if step else None,
        "step_attention_backend": step["attention_backend"] if step else None,
        "step_host_syncs": step["host_syncs_per_step"] if step else None,
        "best_scan_bandwidth_fraction": best["bandwidth_fraction"] if best else None,
        "best_scan_bandwidth_at": {"impl": best["impl"], "seq": best["seq"]} if best else None,
        f"liquid_scan_seconds_at_{TARGET_SEQ}": liquid_at["seconds"] if liquid_at else None,
        f"liquid_scan_impl_at_{TARGET_SEQ}": liquid_at["impl"] if liquid_at else None,
        f"sdpa_seconds_at_{TARGET_SEQ}": sdpa_at["seconds"] if sdpa_at else None,
        f"sdpa_backend_at_{TARGET_SEQ}": sdpa_at["backend"] if sdpa_at else None,
        "targets": {
            "mfu_at_least_0_40": None if mfu is None else mfu >= TARGET_MFU,
            "scan_bandwidth_at_least_0_60_of_peak":
                None if best is None else best["bandwidth_fraction"] >= TARGET_BANDWIDTH_FRACTION,
            f"liquid_faster_than_flash_at_{TARGET_SEQ}":
                None if liquid_at is None or sdpa_at is None else liquid_at["seconds"] < sdpa_at["seconds"],
        },
        "wall_s": round(wall_s, 1),
    }


_PROGRESS = (("seconds", "{:.4g} s"), ("liquid_seconds", "liquid {:.4g} s"),
             ("attention_seconds", "attention {:.4g} s"), ("step_seconds", "step {:.4g} s"),
             ("tokens_per_s", "{:,.0f} tok/s"), ("bytes_per_s", "{:.4g} B/s"),
             ("bandwidth_fraction", "{:.3g} of peak bandwidth"), ("flops_per_s", "{:.4g} FLOP/s"),
             ("mfu", "MFU {:.3g}"), ("peak_bytes", "peak {:,} B"), ("backend", "backend {}"))


def _progress(d: dict) -> None:
    what = " ".join(str(d[k]) for k in ("section", "what", "case", "impl", "liquid_impl", "liquid_scan_impl")
                    if d.get(k) is not None)
    where = (f" seq={d['seq']}" if "seq" in d else "") + (f" doc_len={d['doc_len']}" if d.get("doc_len") else "")
    if d["section"] == "profile":
        msg = f"{d['timer']} {d['total_ms']} ms, shares {d['share']}"
    elif "skipped" in d or "error" in d:
        msg = f"skipped: {d['skipped']}" if "skipped" in d else f"ERROR: {d['error']}"
    else:
        msg = ", ".join(fmt.format(d[k]) for k, fmt in _PROGRESS if d.get(k) is not None)
    log("gpu", f"{what}{where}: {msg}")


def _int_list(text: str) -> tuple[int, ...]:
    values = tuple(int(s) for s in text.split(",") if s.strip())
    if not values or min(values) < 1:
        raise ValueError
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="liquid bench gpu", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny widths and sizes (CPU/CI): " + ", ".join(
        f"{k} {','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in QUICK.items()))
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available, else cpu")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma list of scan, step, memory (default all)")
    p.add_argument("--seqs", default=None, help="scan section seqs, comma list (default 4096,...,65536)")
    p.add_argument("--memory-seqs", default=None, help="memory section seqs (default 4096,32768,131072)")
    p.add_argument("--doc-len", type=int, default=None,
                   help="memory section: also packed documents of this many tokens (default 4096)")
    p.add_argument("--step-seq", type=int, default=None, help="step section seq (default 4096)")
    p.add_argument("--step-doc-len", type=int, default=None,
                   help="step section: also a step on packed documents of this many tokens (default 1024)")
    p.add_argument("--batch", type=int, default=None,
                   help="step section rows per micro-batch (default: the preset's micro_batch_size, 4; quick 1)")
    p.add_argument("--grad-accum", type=int, default=None,
                   help="step section micro-batches per optimizer step (default: one rank of the preset, "
                        "global_batch_size / (micro_batch_size x dp) = 4; quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs before each measurement (default 3)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per scan-section measurement (default 5)")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    for key in ("step_seq", "step_doc_len", "steps", "warmup", "repeats", "doc_len"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    for key, flag in (("seqs", "--seqs"), ("memory_seqs", "--memory-seqs")):
        text = getattr(args, key)
        try:
            setattr(args, key, base[key] if text is None else _int_list(text))
        except ValueError:
            p.error(f"{flag} must be a comma list of positive integers, got '{text}'")
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    bad = [s for s in sections if s not in SECTIONS]
    if not sections or bad:
        p.error(f"--sections: unknown {bad or 'none given'}; choose from {', '.join(SECTIONS)}")
    args.sections = sections
    if args.batch is None or args.grad_accum is None:
        micro, accum = (1, 1) if args.quick else preset_accumulation()
        args.batch = micro if args.batch is None else args.batch
        args.grad_accum = accum if args.grad_accum is None else args.grad_accum
    if min(args.step_seq, args.step_doc_len, args.batch, args.grad_accum, args.steps, args.repeats,
           args.doc_len) < 1 or args.warmup < 0:
        p.error("--step-seq, --step-doc-len, --batch, --grad-accum, --steps, --repeats and --doc-len must be >= 1, "
                "--warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible (use --device cpu)")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.out:
        try:
            with open(args.out, "a"):
                pass
        except OSError as err:
            p.error(f"--out {args.out}: {err.strerror}")
    return args


def main_gpu(argv=None) -> list[dict]:
    """CLI: one JSON line per measurement and a summary line on stdout; returns them, in order."""
    args = parse_args(argv)
    device = args.device
    started = time.perf_counter()
    lines: list[dict] = []

    def emit(d: dict) -> None:
        lines.append(d)
        text = json.dumps(d)
        print(text, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text + "\n")
        if d["section"] != "summary":
            _progress(d)

    log("gpu", f"{device_name(device)} ({device.type}), torch {torch.__version__}, sections "
               f"{','.join(args.sections)}{' (quick)' if args.quick else ''}")
    if "scan" in args.sections:
        with _scoped_env({"LIQUID_SCAN_TRITON": "0"}):
            bench_scan(bench_config(quick=args.quick, seq=max(args.seqs), batch=1, sliced=False), device, args, emit)
    for name, fn, seq, batch in (("step", bench_train_step, args.step_seq, args.batch),
                                 ("memory", bench_memory, max(args.memory_seqs), 1)):
        if name in args.sections:
            fn(bench_config(quick=args.quick, seq=seq, batch=batch, sliced=True), device, args, emit)
            _release(device)
    emit(summarize(lines, device, quick=args.quick, wall_s=time.perf_counter() - started))
    return lines


__all__ = ["main_gpu", "scan_bytes", "peak_bandwidth", "slice_overrides", "bench_config", "PEAK_BANDWIDTH"]

if __name__ == "__main__":
    main_gpu()
