"""Parameter counts and training FLOPs per token, computed from a ModelConfig alone.

Convention (used for MFU everywhere in the project):
  flops/token = 6 * (active parameters that do matmuls: every Linear / expert weight a token passes through,
                     the output head included, the embedding lookup excluded, norms/biases/conv taps excluded)
              + attention: 6 * attention_layers * seq * heads * head_dim   (causal: half of QK^T and AV)
              + liquid scan: 3 * 2 * heads * (chunk * (N + P) + 2 * N * P) per liquid layer
                (intra-chunk QK^T and AV over a full chunk, plus the state update and read-out; x3 for backward)
MTP modules, when enabled, are training compute and are counted; export drops them.

MFU (model FLOPs utilisation), as the training loop logs it for each log window:
  MFU = tokens_per_s * flops_per_token(model, train.seq_len) / (devices * peak FLOP/s of one device)
where tokens_per_s is the whole job's (all ranks) and devices = world size. The peak is dense bf16 (no
sparsity), looked up by the CUDA device name in PEAK_FLOPS below; where it is unknown (CPU, other GPUs)
MFU is not reported (null in metrics.jsonl, "n/a" on the progress line).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParamCounts:
    total: int  # every trainable parameter of the module
    active: int  # parameters one token uses (top_k of E experts)
    matmul_active: int  # active parameters that do matmuls (the FLOPs convention above)
    expert: int  # routed-expert parameters (sharded by EP)
    embedding: int


def mixer_params(kind: str, cfg) -> tuple[int, int]:
    """(all params, matmul params) of one mixer."""
    d = cfg.d_model
    if kind == "liquid":
        lc = cfg.liquid
        hn, hp = lc.heads * lc.key_dim, lc.heads * lc.value_dim
        mat = d * (2 * hn + 2 * hp) + d * lc.heads + hp * d
        other = lc.heads + lc.heads + hp * lc.conv_kernel + lc.value_dim  # rate bias, l_h, conv taps, norm
        return mat + other, mat
    if kind == "conv":
        mat = 3 * d * d + d * d
        return mat + d * cfg.conv_kernel, mat
    if kind == "attention":
        a = cfg.attention
        mat = d * a.heads * a.head_dim + 2 * d * a.kv_heads * a.head_dim + a.heads * a.head_dim * d
        return mat + 2 * a.head_dim, mat
    raise ValueError(f"unknown mixer kind '{kind}'")


def _ffn_params(kind: str, cfg) -> tuple[int, int, int]:
    """(all params, active matmul params, expert params) of one FFN."""
    d = cfg.d_model
    if kind == "dense":
        n = 3 * d * cfg.dense_dim
        return n, n, 0
    m = cfg.moe
    expert = 3 * d * m.expert_dim
    router = d * m.num_experts
    return router + m.num_experts * expert, router + m.top_k * expert, m.num_experts * expert


def count_params(cfg) -> ParamCounts:
    d = cfg.d_model
    embedding = cfg.vocab_size * d
    total, active, matmul, experts = embedding + d, embedding + d, embedding, 0  # + final norm; head is tied
    blocks = list(zip(cfg.layer_types(), cfg.ffn_types()))
    blocks += [(cfg.layer_types()[-1], "dense")] * cfg.mtp_depth
    for mixer, ffn in blocks:
        m_all, m_mat = mixer_params(mixer, cfg)
        f_all, f_active, f_expert = _ffn_params(ffn, cfg)
        total += m_all + f_all + 2 * d
        active += m_all + f_active + 2 * d
        matmul += m_mat + f_active
        experts += f_expert
    mtp_extra = cfg.mtp_depth * (2 * d + 2 * d * d)  # two norms + projection per depth
    total += mtp_extra
    active += mtp_extra
    matmul += cfg.mtp_depth * 2 * d * d
    return ParamCounts(total=total, active=active, matmul_active=matmul, expert=experts, embedding=embedding)


def scan_flops_per_token(cfg) -> int:
    """Forward + backward FLOPs of the chunked scan, all liquid layers (see the module docstring)."""
    lc = cfg.liquid
    per_layer = 3 * 2 * lc.heads * (lc.chunk_size * (lc.key_dim + lc.value_dim) + 2 * lc.key_dim * lc.value_dim)
    return per_layer * sum(1 for t in cfg.layer_types() if t == "liquid")


def attention_flops_per_token(cfg, seq_len: int) -> int:
    a = cfg.attention
    return 6 * sum(1 for t in cfg.layer_types() if t == "attention") * seq_len * a.heads * a.head_dim


def flops_per_token(cfg, seq_len: int) -> int:
    """Training (forward + backward) FLOPs per token at sequence length `seq_len`."""
    return 6 * count_params(cfg).matmul_active + attention_flops_per_token(cfg, seq_len) + scan_flops_per_token(cfg)


def recompute_flops_per_token(cfg, seq_len: int, checkpointing: str) -> int:
    """FLOPs per token that activation checkpointing adds (a second forward of what backward recomputes:
    every block under "full", every mixer under "selective"); not model FLOPs, so MFU leaves them out."""
    if checkpointing == "none":
        return 0
    if checkpointing not in ("selective", "full"):
        raise ValueError(f"activation checkpointing must be none, selective or full, got '{checkpointing}'")
    # The recompute stops once it has rebuilt every tensor backward needs: a region's last projection
    # (the mixer's out_proj; for "full" a dense FFN's w2) produces no saved tensor and does not run again.
    blocks = list(zip(cfg.layer_types(), cfg.ffn_types())) + [(cfg.layer_types()[-1], "dense")] * cfg.mtp_depth
    d = cfg.d_model
    if checkpointing == "selective":
        extra = sum(2 * (mixer_params(mixer, cfg)[1] - _out_projection(mixer, cfg)) for mixer, _ in blocks)
    else:
        extra = sum(2 * (mixer_params(mixer, cfg)[1] + _ffn_params(ffn, cfg)[1] - _ffn_output(ffn, cfg))
                    for mixer, ffn in blocks)
    return extra + attention_flops_per_token(cfg, seq_len) // 3 + scan_flops_per_token(cfg) // 3


def _out_projection(kind: str, cfg) -> int:
    """Matmul parameters of a mixer's output projection (into d_model)."""
    if kind == "liquid":
        return cfg.liquid.heads * cfg.liquid.value_dim * cfg.d_model
    if kind == "attention":
        return cfg.attention.heads * cfg.attention.head_dim * cfg.d_model
    return cfg.d_model * cfg.d_model  # conv


def _ffn_output(kind: str, cfg) -> int:
    """Active matmul parameters of an FFN's output projection that a recompute skips: the dense w2. The
    experts' w2 runs again (the top-k combine saves its outputs for the routing weights' gradient)."""
    return cfg.dense_dim * cfg.d_model if kind == "dense" else 0


# Dense bf16 peak FLOP/s per device (no sparsity), matched as a substring of the device name
# (torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3"), first match wins: the more specific names
# come first. None = unknown (CPU): MFU is not reported there.
PEAK_FLOPS = {
    "H100 PCIe": 756e12,  # H100 PCIe
    "H100": 989e12,  # H100 SXM
    "H200": 989e12,  # H200 SXM: the H100 SXM's tensor cores, more and faster memory
    "A100": 312e12,  # A100 SXM and PCIe
    "cpu": None,
}


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of the device called `device_name`, or None when unknown."""
    for key, value in PEAK_FLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None
