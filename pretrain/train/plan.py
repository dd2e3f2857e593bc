"""`liquid plan`: size a run before paying for it (parameters, FLOPs, memory per rank, throughput, days).

Memory is an estimate from the config (bf16 weights/grads, fp32 Adam state); the model is also built on
the meta device so the parameter count is checked against a real module.
"""
from __future__ import annotations

import torch

from data_pipeline.format import BLOCK_TOKENS
from pretrain.model.model import LiquidLM
from pretrain.train.flops import PEAK_FLOPS, count_params, flops_per_token

GIB = 1024**3


def activation_bytes(cfg, micro_batch: int, seq_len: int, *, dtype_bytes: int = 2,
                     checkpointing: str = "none", attention: str = "fused", cp: int = 1,
                     scan: str = "pytorch", loss: str = "torch") -> int:
    """Peak activation bytes of one micro-batch (forward activations plus backward temporaries) under
    train.activation_checkpointing, from the tensors the code saves for backward, counted per token in
    `_layer_bytes_per_token` and `head_bytes` (read off `liquid dryrun`'s saved tensors at the
    preset widths; `dtype_bytes` is the autocast dtype's size: 2 for bf16, 4 for fp32).

    none keeps every layer's tensors; selective keeps each block's input, its FFN norm and FFN, and
    backward holds one recomputed mixer at a time; full keeps each block's input and one recomputed block.
    On top comes the larger of the head's peak (`head_bytes`: all the logits, their fp32 copy, the
    log-softmax and its gradient; or with model.loss_chunk_tokens one chunk's, at the end of the forward) and
    the largest recomputed region (in backward, after the head is freed).
    `seq_len` is this rank's slice; with `cp` > 1 every attention layer also keeps the K/V it gathered
    from the whole row (the context-parallel all-gather's buffer).
    attention "blocks" (the CPU path) also keeps each block of queries' mask over its keys, in fp32.
    scan: "pytorch" (the chunked PyTorch form's saved chunk matrices) or "cpu_kernel" (the CPU's C++ kernel,
    pretrain/model/scan_cpu.py: one N x P state per chunk beside the inputs it shares with the mixer).
    loss: the chunked head's softmax cross-entropy, "torch" (torch's ops) or "cpu_kernel" (see head_bytes).
    """
    d, D = cfg.d_model, dtype_bytes
    parts = [_layer_bytes_per_token(cfg, mixer, ffn, D, cp=cp, scan=scan)
             for mixer, ffn in zip(cfg.layer_types(), cfg.ffn_types())]
    # (kept through the whole step, the most one recomputed region adds in backward)
    kept = {
        "none": lambda: (sum(m + f for m, f in parts), 0),
        "selective": lambda: (sum(D * d + f for _, f in parts), max(m for m, _ in parts)),
        "full": lambda: (len(parts) * D * d, max(m + f for m, f in parts)),
    }
    if checkpointing not in kept:
        raise ValueError(f"activation checkpointing must be one of {sorted(kept)}, got '{checkpointing}'")
    always, recomputed = kept[checkpointing]()
    if attention == "blocks":
        layers = sum(1 for t in cfg.layer_types() if t == "attention")
        always += layers * 4 * min(seq_len, 2048)  # the block's boolean mask, saved as fp32 by the CPU kernel
    tokens = micro_batch * seq_len
    if recomputed:  # while a recomputed region runs its backward: the gradients into its output and its input
        recomputed += 2 * D * d
    # The head's peak comes at the end of the forward, before backward recomputes anything.
    return tokens * always + max(head_bytes(cfg, tokens, D, loss=loss), tokens * recomputed)


def cpu_scan_kind() -> str:
    """The chunked scan's form on this machine's CPU: "cpu_kernel" where its C++ kernel builds, else
    "pytorch" (for the activation memory a CPU run keeps)."""
    from pretrain.model import scan

    return "cpu_kernel" if scan._cpu_kernel(chunked=True) is not None else "pytorch"


def cpu_loss_kind() -> str:
    """The chunked head loss's form on this machine's CPU: "cpu_kernel" where pretrain/model/loss_cpu.py's
    kernel builds, else "torch"."""
    from pretrain.model import loss

    kernel = loss._cpu_kernel()
    return "cpu_kernel" if kernel is not None and kernel.available() else "torch"


def kernel_kinds(device: str) -> dict:
    """The forms whose memory differs by device, for `memory_per_rank` (scan=, loss=): on CUDA the chunked
    scan's PyTorch form and torch's cross-entropy; on the CPU what this machine builds."""
    if device == "cuda":
        return {"scan": "pytorch", "loss": "torch"}
    return {"scan": cpu_scan_kind(), "loss": cpu_loss_kind()}


def _norm_bytes(width: int) -> int:
    """RMSNorm in fp32: its input and normalised output (4 bytes each), and the inverse RMS."""
    return 8 * width + 12


def head_bytes(cfg, tokens: int, D: int, *, loss: str = "torch") -> int:
    """The head's peak over a micro-batch of `tokens` (this rank's): the final norm, and
    - plain head (model.loss_chunk_tokens=0): the head's input and the loss over all tokens at once: bf16
      logits, their fp32 copy and log-softmax, the log-softmax's gradient (fp32 logits need no copy);
    - chunked (pretrain/model/loss.py): per token the gradient of the head's input (kept to backward) and,
      under bf16, the input's bf16 copy; the weight's fp32 gradient accumulator ([vocab, d]; under bf16 also
      the weight's bf16 copy); and the larger of one chunk's fp32 logits and log-softmax (which becomes their
      gradient in place), 8 bytes x vocab per token of min(chunk, tokens), and (bf16) the chunk's bf16
      logit gradient with its bf16 weight gradient before the fp32 sum. With loss "cpu_kernel"
      (pretrain/model/loss_cpu.py) the fp32 logits become their gradient in place: 4 bytes x vocab per token
      of the chunk, plus (bf16) their bf16 copy for the matmuls.
    `liquid dryrun` measures the real code (either path)."""
    d, V = cfg.d_model, cfg.vocab_size
    chunk = getattr(cfg, "loss_chunk_tokens", 0)
    if not chunk:
        # bf16: logits 2 + fp32 copy 4 + log-softmax 4 + its gradient 2 at the peak; fp32: 4 + 4 + 4 (no copy)
        return tokens * (_norm_bytes(d) + D * d + 12 * V)
    c = min(chunk, tokens)
    copies = 1 if D < 4 else 0  # the bf16 casts (fp32: none)
    kept = tokens * (_norm_bytes(d) + D * d * (1 + copies)) + V * d * (4 + D * copies)
    if loss == "cpu_kernel":
        return kept + c * V * (4 + D * copies) + copies * D * V * d
    return kept + max(8 * c * V, copies * D * (c * V + V * d))


def _layer_bytes_per_token(cfg, mixer: str, ffn: str, D: int, *, cp: int = 1,
                           scan: str = "pytorch") -> tuple[int, int]:
    """Bytes one layer saves per token: (mixer with its norm, FFN with its norm). D = autocast dtype bytes;
    the norms, the liquid scan and the router work in fp32."""
    d = cfg.d_model
    if mixer == "liquid":
        lc = cfg.liquid
        h, c = lc.heads, lc.chunk_size
        hn, hp = h * lc.key_dim, h * lc.value_dim
        mix = D * d + 8 * hn + 16 * h  # in_proj's input; q and k normalised in fp32
        mix += D * (3 * hn + 4 * hp) + h * c + 3 * h  # projections, conv, gated k; reset masks (bool)
        states = 4 * hn * lc.value_dim // c  # the state entering each chunk, fp32
        if scan == "cpu_kernel":
            mix += states
        elif scan == "pytorch":
            mix += 16 * h * c + 20 * hn + 12 * hp + states + 16 * h  # the chunk matrices, fp32
        else:
            raise ValueError(f"scan must be 'pytorch' or 'cpu_kernel', got '{scan}'")
        mix += D * 3 * hp + 8 * hp + 4 * h  # per-head norm (fp32), gate, out_proj's input
    elif mixer == "conv":
        mix = 9 * D * d
    elif mixer == "attention":
        a = cfg.attention
        q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
        mix = D * (d + 2 * q + 2 * kv) + 8 * (q + kv) + 4 * (a.heads + a.kv_heads) + 4 * a.heads + 4 * a.head_dim
        mix += D * 2 * kv * (cp - 1)  # the other slices' K/V, gathered
    else:
        raise ValueError(f"unknown mixer kind '{mixer}'")
    if ffn == "dense":
        feed = D * (d + 4 * cfg.dense_dim)
    else:
        m = cfg.moe
        feed = D * m.top_k * (2 * d + 4 * m.expert_dim) + 4 * d + 12 * m.num_experts + 24 * m.top_k
    return _norm_bytes(d) + mix, _norm_bytes(d) + feed


def rank_groups(cfg, ep: int) -> list[tuple[int, bool]]:
    """(elements held by one rank, is an expert group) for each optimizer group of the engine (decay and
    no-decay, dense and expert: parallel/engine.py's groups), from a model built on the meta device."""
    from parallel.engine import expert_parameters
    from pretrain.optim import param_groups

    with torch.device("meta"):
        model = LiquidLM(cfg)
    experts = {id(p) for p in expert_parameters(model)}
    groups = []
    for g in param_groups(model, 0.0):
        dense = sum(p.numel() for p in g["params"] if id(p) not in experts)
        expert = sum(p.numel() for p in g["params"] if id(p) in experts) // ep
        groups += [(n, is_expert) for n, is_expert in ((dense, False), (expert, True)) if n]
    return groups


def memory_per_rank(cfg, *, dp: int, ep: int, cp: int, zero_stage: int, micro_batch: int, seq_len: int,
                    checkpointing: str = "none", dtype_bytes: int = 2, attention: str = "fused",
                    scan: str = "pytorch", loss: str = "torch") -> dict:
    """Bytes per rank, by the lines `liquid dryrun` measures: parameters and gradients in the training
    dtype (`dtype_bytes`: 2 for bf16, 4 for fp32); the optimizer's fp32 master partition and Adam's two
    moments (ZeRO partitions each group over dp x cp, expert groups over the expert-data-parallel ranks;
    one rank keeps everything, without masters in fp32); stage 2 keeps only the gradient partition;
    DeepSpeed's reduction bucket; activations (`activation_bytes`). total: the peak, when backward starts
    (activations at their highest, gradients not yet) or at the step (every gradient, the fp32 gradient
    partition), whichever is higher."""
    from parallel.engine import reduce_bucket_elements

    world = dp * cp
    expert_dp = max(world // ep, 1)
    groups = rank_groups(cfg, ep)
    local = sum(n for n, _ in groups)
    if world == 1:
        partition = local
        optimizer = local * (8 if dtype_bytes == 4 else 12)
        communication = 0
    else:
        partition = sum(-(-n // (expert_dp if is_expert else world)) for n, is_expert in groups)
        optimizer = 12 * partition
        communication = reduce_bucket_elements(local) * dtype_bytes
    parameters = local * dtype_bytes
    gradients = (partition if zero_stage >= 2 and world > 1 else local) * dtype_bytes
    acts = activation_bytes(cfg, micro_batch, seq_len // cp, checkpointing=checkpointing, attention=attention,
                            dtype_bytes=dtype_bytes, cp=cp, scan=scan, loss=loss)
    at_step = gradients + 4 * partition  # + the fp32 gradient of the partition
    out = {"parameters": parameters, "gradients": gradients, "optimizer": optimizer, "activations": acts,
           "communication": communication}
    out["total"] = parameters + optimizer + communication + max(acts, at_step)
    return out


def _dtype_bytes(train_cfg) -> int:
    """Bytes of a weight in training: bf16 for train.dtype=bf16 (and auto on CUDA), else fp32."""
    return 2 if train_cfg.dtype == "bf16" or (train_cfg.dtype == "auto" and train_cfg.device == "cuda") else 4


def data_plan(*, tokens: float, block_tokens: int, vocab_size: int, shard_mb: float = 64.0,
              index_bytes_per_shard: int = 400) -> dict:
    """What a token budget means for the shard pipeline (uncompressed sizes; compression shrinks shards)."""
    bytes_per_token = 2 if vocab_size <= 2**16 else 4
    samples = tokens / block_tokens
    shards = tokens * bytes_per_token / (shard_mb * 2**20)
    return {
        "tokens": tokens,
        "block_tokens": block_tokens,
        "bytes_per_token": bytes_per_token,
        "samples_per_epoch": samples,
        "shards": shards,
        "dataset_tib": tokens * bytes_per_token / 2**40,
        "index_mib": shards * index_bytes_per_shard / 2**20,
        # mosaicml-streaming keeps the epoch's shuffled sample ids (int64) in shared memory on every node.
        "loader_mib_per_node": samples * 8 / 2**20,
        "per_sample_ids_if_rows_were_samples_gib": tokens / 4096 * 8 / 2**30,
    }


def phase_plan(config) -> list[dict]:
    """data.phases over the run's steps (train.max_steps, or max_tokens'): each phase's first and last
    step, its tokens, and each stream's expected tokens (its proportion of the phase's tokens: the order
    gives each stream exactly its share of every epoch of the phase, rounded to whole blocks, and about
    its share of a partial epoch). A phase starting after the last step has 0 steps (reached: false)."""
    from pretrain.config import phase_names, phase_start_steps
    from pretrain.train.loop import last_step

    t, d = config.train, config.data
    if not d.phases:
        return []
    last, per_step = last_step(t), t.global_batch_size * t.seq_len
    starts = phase_start_steps(d.phases, per_step)
    out = []
    for i, (name, start, ph) in enumerate(zip(phase_names(d.phases), starts, d.phases)):
        end = min(starts[i + 1] - 1 if i + 1 < len(starts) else last, last)
        steps = max(end - start + 1, 0)
        tokens = steps * per_step
        total = float(sum(ph.proportions))
        out.append({"name": name, "start_step": start, "end_step": end if steps else None, "steps": steps,
                    "tokens": tokens, "reached": steps > 0,
                    "streams": [{"path": s.path, "proportion": x / total, "tokens": tokens * x / total}
                                for s, x in zip(d.streams, ph.proportions)]})
    return out


def build_plan(config, *, mfu: float = 0.4, gpus: int | None = None, device: str = "H100",
               tokens: float | None = None, block_tokens: int = BLOCK_TOKENS) -> dict:
    """`tokens` (for the time and data lines) defaults to the run's budget: train.max_tokens, or max_steps'."""
    m, t, p = config.model, config.train, config.parallel
    if tokens is None:
        from pretrain.train.loop import last_step

        tokens = last_step(t) * t.global_batch_size * t.seq_len
    with torch.device("meta"):
        built = sum(x.numel() for x in LiquidLM(m).parameters())
    counts = count_params(m)
    assert built == counts.total, f"config count {counts.total} != built module {built}"
    gpus = gpus or config.cluster.num_workers
    fpt = flops_per_token(m, t.seq_len)
    peak = PEAK_FLOPS.get(device)
    if peak is None:
        raise ValueError(f"unknown device '{device}' for --device; choose one of "
                         f"{[k for k, v in PEAK_FLOPS.items() if v]}")
    tokens_per_s = mfu * peak * gpus / fpt
    mem = memory_per_rank(m, dp=p.dp, ep=p.ep, cp=p.cp, zero_stage=p.zero_stage,
                          micro_batch=t.micro_batch_size, seq_len=t.seq_len,
                          checkpointing=t.activation_checkpointing, dtype_bytes=_dtype_bytes(t),
                          attention="fused" if t.device == "cuda" else "blocks",
                          **kernel_kinds(t.device))
    return {
        "params_total": counts.total,
        "params_active": counts.active,
        "params_expert": counts.expert,
        "flops_per_token": fpt,
        "layout": {"dp": p.dp, "ep": p.ep, "cp": p.cp, "zero_stage": p.zero_stage,
                   "micro_batch": t.micro_batch_size, "seq_len": t.seq_len,
                   "activation_checkpointing": t.activation_checkpointing, "loss_chunk_tokens": m.loss_chunk_tokens},
        "memory_gib_per_rank": {k: round(v / GIB, 2) for k, v in mem.items()},
        "assumed": {"mfu": mfu, "gpus": gpus, "device": device, "peak_flops": peak, "tokens": tokens},
        "tokens_per_s": tokens_per_s,
        "days_to_tokens": tokens / tokens_per_s / 86400,
        "data": data_plan(tokens=tokens, block_tokens=block_tokens, vocab_size=m.vocab_size),
        "phases": phase_plan(config),
    }


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_plan(plan: dict) -> str:
    a, mem = plan["assumed"], plan["memory_gib_per_rank"]
    lay = plan["layout"]
    lines = [
        f"parameters      total {_count(plan['params_total'])}   active {_count(plan['params_active'])}"
        f"   (routed experts {_count(plan['params_expert'])})",
        f"FLOPs/token     {plan['flops_per_token'] / 1e9:.2f} GFLOP (training, seq {lay['seq_len']})",
        f"layout          dp={lay['dp']} ep={lay['ep']} cp={lay['cp']} zero={lay['zero_stage']}"
        f" micro_batch={lay['micro_batch']} activation_checkpointing={lay['activation_checkpointing']}"
        f" loss_chunk_tokens={lay.get('loss_chunk_tokens', 0)}",
        "memory/rank     " + "  ".join(f"{k} {v:.2f} GiB" for k, v in mem.items()),
        f"throughput      {plan['tokens_per_s']:,.0f} tokens/s on {a['gpus']} x {a['device']} at {a['mfu']:.0%} MFU",
        f"time            {plan['days_to_tokens']:.1f} days to {_count(a['tokens'])} tokens",
    ]
    d = plan["data"]
    lines += [
        f"data            {_count(d['tokens'])} tokens = {d['dataset_tib']:.1f} TiB uncompressed"
        f" ({d['bytes_per_token']} B/token), blocks of {d['block_tokens']:,} tokens",
        f"                {_count(d['samples_per_epoch'])} samples/epoch, {_count(d['shards'])} shards of 64 MiB,"
        f" index ~{d['index_mib']:,.0f} MiB, loader ~{d['loader_mib_per_node']:,.0f} MiB/node"
        f" (vs {d['per_sample_ids_if_rows_were_samples_gib']:,.0f} GiB if each 4096-token row were a sample)",
    ]
    if plan.get("phases"):
        phases = plan["phases"]
        last = max((p["end_step"] for p in phases if p["end_step"]), default=0)
        lines.append(f"data phases     over the run's {last:,} steps; tokens per stream are expected: the phase's "
                     "tokens x the stream's proportion")
        width = max(len(p["name"]) for p in phases)
        spans = [f"steps {p['start_step']:,}-{p['end_step']:,}" for p in phases if p["reached"]]
        span_width = max(map(len, spans))
        for p, span in zip(phases, spans + [""] * len(phases)):
            if not p["reached"]:
                lines.append(f"  {p['name']:<{width}}  from step {p['start_step']:,}: after the run's last step,"
                             " not reached")
                continue
            streams = "  ".join(f"{s['path']} {_count(s['tokens'])} ({s['proportion']:.0%})" for s in p["streams"])
            lines.append(f"  {p['name']:<{width}}  {span:<{span_width}}  {_count(p['tokens'])} tokens:  {streams}")
    return "\n".join(lines)
