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
                     checkpointing: str = "none", attention: str = "fused") -> int:
    """Peak saved activations for one micro-batch, summed over layers, under train.activation_checkpointing.

    Per layer it counts the tensors autograd keeps: the two norm inputs and residual (3 x d), the mixer's
    projections and outputs, and the FFN's inputs and hidden states (top_k copies for MoE). The liquid scan
    adds its fp32 per-chunk decay and score matrices (2 x heads x chunk per token) and chunk-entry states.
    selective keeps the residual and FFN parts of every layer plus one mixer's part at a time (backward
    recomputes the mixers one by one); full keeps each block's input (d) plus one whole block at a time.
    The logits are kept in every mode. attention "blocks" (the CPU path) also keeps each query's scores
    over the keys of its block (fp32, counted for every key: the causal half and the mask's bytes).
    """
    parts = [_layer_values_per_token(cfg, mixer, ffn) for mixer, ffn in zip(cfg.layer_types(), cfg.ffn_types())]
    kept = {
        "none": lambda: sum(r + m + f for r, m, f in parts),
        "selective": lambda: sum(r + f for r, _, f in parts) + max(m for _, m, _ in parts),
        "full": lambda: len(parts) * cfg.d_model + max(r + m + f for r, m, f in parts),
    }
    if checkpointing not in kept:
        raise ValueError(f"activation checkpointing must be one of {sorted(kept)}, got '{checkpointing}'")
    total = kept[checkpointing]() + cfg.vocab_size * 2  # logits (fp32 for the loss, counted as 2 bf16 slots)
    if attention == "blocks":
        a = cfg.attention
        layers = sum(1 for t in cfg.layer_types() if t == "attention")
        total += layers * a.heads * min(seq_len, 2048) * 2 * 2 // dtype_bytes  # fp32 scores + probabilities
    return micro_batch * seq_len * total * dtype_bytes


def _layer_values_per_token(cfg, mixer: str, ffn: str) -> tuple[int, int, int]:
    """Values one layer keeps per token, in 2-byte units: (norm inputs and residual, mixer, FFN)."""
    d = cfg.d_model
    if mixer == "liquid":
        lc = cfg.liquid
        mix = 2 * lc.heads * (lc.key_dim + lc.value_dim) * 2 + lc.heads * lc.value_dim * 2
        mix += 2 * lc.heads * lc.chunk_size * 2  # fp32 chunk matrices, counted in 2-byte units
        mix += 2 * lc.heads * lc.key_dim * lc.value_dim // lc.chunk_size * 2
    elif mixer == "conv":
        mix = 3 * d + 2 * d
    else:
        a = cfg.attention
        mix = (a.heads + 2 * a.kv_heads) * a.head_dim + a.heads * a.head_dim + a.heads * 2  # + lse
    if ffn == "dense":
        feed = d + 3 * cfg.dense_dim
    else:
        feed = cfg.moe.num_experts * 2 + cfg.moe.top_k * (2 * d + 3 * cfg.moe.expert_dim)
    return 3 * d, mix, feed


def rank_groups(cfg, ep: int) -> list[tuple[int, bool]]:
    """(elements held by one rank, is an expert group) for each optimizer group of the engine (decay and
    no-decay, dense and expert: parallel/engine.py's groups), from a model built on the meta device."""
    from pretrain.optim import param_groups

    with torch.device("meta"):
        model = LiquidLM(cfg)
    experts = {id(p) for m in model.modules() if type(m).__name__ == "Experts" for p in m.parameters(recurse=False)}
    groups = []
    for g in param_groups(model, 0.0):
        dense = sum(p.numel() for p in g["params"] if id(p) not in experts)
        expert = sum(p.numel() for p in g["params"] if id(p) in experts) // ep
        groups += [(n, is_expert) for n, is_expert in ((dense, False), (expert, True)) if n]
    return groups


def memory_per_rank(cfg, *, dp: int, ep: int, cp: int, zero_stage: int, micro_batch: int, seq_len: int,
                    checkpointing: str = "none", dtype_bytes: int = 2, attention: str = "fused") -> dict:
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
                            dtype_bytes=dtype_bytes)
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
                          attention="fused" if t.device == "cuda" else "blocks")
    return {
        "params_total": counts.total,
        "params_active": counts.active,
        "params_expert": counts.expert,
        "flops_per_token": fpt,
        "layout": {"dp": p.dp, "ep": p.ep, "cp": p.cp, "zero_stage": p.zero_stage,
                   "micro_batch": t.micro_batch_size, "seq_len": t.seq_len,
                   "activation_checkpointing": t.activation_checkpointing},
        "memory_gib_per_rank": {k: round(v / GIB, 2) for k, v in mem.items()},
        "assumed": {"mfu": mfu, "gpus": gpus, "device": device, "peak_flops": peak, "tokens": tokens},
        "tokens_per_s": tokens_per_s,
        "days_to_tokens": tokens / tokens_per_s / 86400,
        "data": data_plan(tokens=tokens, block_tokens=block_tokens, vocab_size=m.vocab_size),
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
        f" micro_batch={lay['micro_batch']} activation_checkpointing={lay['activation_checkpointing']}",
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
    return "\n".join(lines)
