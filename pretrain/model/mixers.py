"""Sequence mixers: `liquid` (input-dependent time-constant recurrence), `conv` (LFM2 gated short conv), `attention`.

Each mixer maps x [batch, seq, d_model] -> [batch, seq, d_model], never lets information cross a document
start, and has an incremental `step` with its own state for generation. Built through `MIXERS`.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.model.layers import (RMSNorm, apply_rope, causal_depthwise_conv, doc_ids, no_halo,
                                   positions_in_doc, rope_cos_sin)
from pretrain.model.scan import liquid_scan


class LiquidMixer(nn.Module):
    """Per head: lam_t = exp(l_h) + softplus(w_h . x_t + b_h), a_t = exp(-lam_t dt_t),
    S_t = a_t S_{t-1} + (1 - a_t) k_t v_t^T, y_t = S_t^T q_t; then per-head norm, SiLU gate, out projection.

    q and k are L2-normalised per head; with the (1 - a_t) gain the state is a convex mix of k v^T,
    so it stays bounded at any length. A short causal conv on the value path adds local context (LFM2-style).
    """

    def __init__(self, d_model: int, cfg, norm_eps: float = 1e-5):
        super().__init__()
        self.h, self.n, self.p = cfg.heads, cfg.key_dim, cfg.value_dim
        self.chunk_size, self.recompute = cfg.chunk_size, cfg.recompute
        self.kernel = cfg.conv_kernel
        hn, hp = self.h * self.n, self.h * self.p
        self.in_proj = nn.Linear(d_model, 2 * hn + 2 * hp, bias=False)  # q, k, v, gate
        self.rate_proj = nn.Linear(d_model, self.h, bias=True)  # input-driven part of the rate
        self.tau_range = (cfg.tau_min, cfg.tau_max)
        self.log_base_rate = nn.Parameter(torch.empty(self.h))  # l_h: exp(l_h) = 1 / tau_h
        self.conv = nn.Conv1d(hp, hp, self.kernel, groups=hp, bias=False) if self.kernel > 0 else None
        self.norm = RMSNorm(self.p, eps=norm_eps)
        self.out_proj = nn.Linear(hp, d_model, bias=False)
        # Hooks that context parallelism (parallel/context_parallel.py) replaces; the defaults are single-device.
        self.scan = liquid_scan  # the recurrence, same signature as liquid_scan
        self.halo = no_halo  # (v, doc_start, K-1) -> inputs before position 0 for the value conv, or None
        self.reset_fixed()
        with torch.no_grad():
            self.rate_proj.weight.mul_(0.1)

    @torch.no_grad()
    def reset_fixed(self):
        """The state whose initial value is fixed (see LiquidLM.init_weights): time constants spread
        log-uniformly over tau_range, and the rate's bias."""
        lo, hi = self.tau_range
        taus = torch.exp(torch.linspace(math.log(lo), math.log(hi), self.h, device=self.log_base_rate.device))
        self.log_base_rate.copy_(-taus.log())
        self.rate_proj.bias.fill_(-4.0)  # softplus(-4) ~ 0.018: start close to the base time constants

    def _project(self, x, dt):
        """x [batch, seq, d] -> q, k [b, s, h, n], v, gate [b, s, h*p], log_a [b, s, h] (no resets yet)."""
        hn, hp = self.h * self.n, self.h * self.p
        q, k, v, gate = self.in_proj(x).split([hn, hn, hp, hp], dim=-1)
        shape = x.shape[:2]
        q = F.normalize(q.view(*shape, self.h, self.n).float(), dim=-1).to(x.dtype)
        k = F.normalize(k.view(*shape, self.h, self.n).float(), dim=-1).to(x.dtype)
        rate = self.log_base_rate.float().exp() + F.softplus(self.rate_proj(x).float())  # [b, s, h]
        if dt is not None:
            rate = rate * dt.float()[..., None]
        return q, k, v, gate, -rate

    def _finish(self, y, gate, shape):
        y = self.norm(y).reshape(*shape, self.h * self.p)
        return self.out_proj(y * F.silu(gate))

    def forward(self, x, *, doc_start=None, dt=None):
        batch, seq, _ = x.shape
        docs = doc_ids(doc_start, batch, seq, x.device)
        q, k, v, gate, log_a = self._project(x, dt)
        if self.conv is not None:
            v = causal_depthwise_conv(v, self.conv.weight, docs, tail=self.halo(v, doc_start, self.kernel - 1))
        # The gain 1 - a_t uses the real rate even at a document start, as when the document runs alone.
        k = k * (-torch.expm1(log_a))[..., None].to(k.dtype)
        if doc_start is not None:
            log_a = log_a.masked_fill(doc_start.bool()[..., None], float("-inf"))
        y, _ = self.scan(q, k, v.view(batch, seq, self.h, self.p), log_a, chunk_size=self.chunk_size,
                         recompute=self.recompute)
        return self._finish(y, gate, (batch, seq))

    def init_state(self, batch, device, dtype):
        state = {"S": torch.zeros(batch, self.h, self.n, self.p, device=device, dtype=torch.float32)}
        if self.conv is not None:
            state["conv"] = torch.zeros(batch, self.kernel - 1, self.h * self.p, device=device, dtype=dtype)
        return state

    def step(self, x, state, *, dt=None):
        """x [batch, 1, d] -> y [batch, 1, d], O(1) state: S [b, h, n, p] plus the conv tail."""
        batch = x.shape[0]
        q, k, v, gate, log_a = self._project(x, dt)
        if self.conv is not None:
            tail = state["conv"]
            v_out = causal_depthwise_conv(v, self.conv.weight, None, tail=tail)
            state["conv"] = torch.cat([tail, v], dim=1)[:, 1:]
            v = v_out
        a = log_a[:, 0].exp()  # [b, h]
        kk = k[:, 0].float() * (1 - a)[..., None]
        vv = v.view(batch, self.h, self.p).float()
        state["S"] = a[..., None, None] * state["S"] + kk[..., :, None] * vv[..., None, :]
        y = torch.einsum("bhn,bhnp->bhp", q[:, 0].float(), state["S"]).to(x.dtype)
        return self._finish(y[:, None], gate, (batch, 1)), state


class ConvMixer(nn.Module):
    """LFM2 gated short convolution: B, C, x = in_proj(h); out_proj(C * conv_k(B * x))."""

    def __init__(self, d_model: int, kernel: int = 3):
        super().__init__()
        self.kernel = kernel
        self.in_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.conv = nn.Conv1d(d_model, d_model, kernel, groups=d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.halo = no_halo  # hook: (bx, doc_start, K-1) -> inputs before position 0, or None (single device)

    def forward(self, x, *, doc_start=None, dt=None):
        b_gate, c_gate, xx = self.in_proj(x).chunk(3, dim=-1)
        docs = doc_ids(doc_start, x.shape[0], x.shape[1], x.device)
        bx = b_gate * xx
        tail = self.halo(bx, doc_start, self.kernel - 1)
        return self.out_proj(c_gate * causal_depthwise_conv(bx, self.conv.weight, docs, tail=tail))

    def init_state(self, batch, device, dtype):
        return {"conv": torch.zeros(batch, self.kernel - 1, self.conv.in_channels, device=device, dtype=dtype)}

    def step(self, x, state, *, dt=None):
        b_gate, c_gate, xx = self.in_proj(x).chunk(3, dim=-1)
        bx = b_gate * xx
        y = causal_depthwise_conv(bx, self.conv.weight, None, tail=state["conv"])
        state["conv"] = torch.cat([state["conv"], bx], dim=1)[:, 1:]
        return self.out_proj(c_gate * y), state


class AttentionMixer(nn.Module):
    """Causal GQA with RMSNorm on q and k and RoPE; positions restart at every document start."""

    def __init__(self, d_model: int, cfg, norm_eps: float = 1e-5):
        super().__init__()
        self.h, self.kv, self.hd, self.theta = cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.rope_theta
        self.q_proj = nn.Linear(d_model, self.h * self.hd, bias=False)
        self.k_proj = nn.Linear(d_model, self.kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d_model, self.kv * self.hd, bias=False)
        self.out_proj = nn.Linear(self.h * self.hd, d_model, bias=False)
        self.q_norm = RMSNorm(self.hd, eps=norm_eps)
        self.k_norm = RMSNorm(self.hd, eps=norm_eps)
        # Hooks that context parallelism replaces: where this slice's queries sit among all keys.
        self.layout = local_attention_layout  # (doc_start, b, seq, device) -> (positions, DocumentMask or None)
        self.gather_kv = local_kv  # (k, v) -> (k, v) of every key position the mask refers to

    def _qkv(self, x, positions):
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.h, self.hd))
        k = self.k_norm(self.k_proj(x).view(b, s, self.kv, self.hd))
        v = self.v_proj(x).view(b, s, self.kv, self.hd)
        cos, sin = rope_cos_sin(positions, self.hd, self.theta)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _attend(self, q, k, v, mask, causal=True):
        """mask None: plain causal attention (queries and keys aligned at 0), or every key with causal=False
        (one generated token); else a DocumentMask."""
        gqa = self.h != self.kv
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, s, hd]
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        else:
            out = mask.attend(q, k, v, enable_gqa=gqa)
        b, _, s, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, s, self.h * self.hd))

    def forward(self, x, *, doc_start=None, dt=None):
        b, s, _ = x.shape
        positions, mask = self.layout(doc_start, b, s, x.device)
        q, k, v = self._qkv(x, positions)
        k, v = self.gather_kv(k, v)
        return self._attend(q, k, v, mask)

    def init_state(self, batch, device, dtype):
        empty = torch.zeros(batch, 0, self.kv, self.hd, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone(), "pos": 0}

    def step(self, x, state, *, dt=None):
        b = x.shape[0]
        pos = torch.full((b, 1), state["pos"], device=x.device, dtype=torch.long)
        q, k, v = self._qkv(x, pos)
        state["k"] = torch.cat([state["k"], k], dim=1)
        state["v"] = torch.cat([state["v"], v], dim=1)
        state["pos"] += 1
        return self._attend(q, state["k"], state["v"], None, causal=False), state


ATTENTION_BLOCK = 2048  # queries per block of document-masked attention (DocumentMask.blocks)
ATTENTION_ENV = "LIQUID_ATTENTION"  # "flex" or "blocks": overrides attention_backend()


@functools.cache
def _flex_module():
    """torch.nn.attention.flex_attention, or None where this torch has none (an exported model may be loaded
    by an older torch: it then keeps the block path)."""
    try:
        from torch.nn.attention import flex_attention
    except ImportError:
        return None
    return flex_attention


@functools.cache
def _compiled_flex_attention():
    """flex_attention compiled once per process: uncompiled it is the reference path that builds every score."""
    return torch.compile(_flex_module().flex_attention)


def attention_backend(device, *, head_dim: int = 64, group: int = 1) -> str:
    """The kernel DocumentMask.attend uses on `device`: "flex" (compiled FlexAttention, document bounds in a
    block mask) on CUDA, "blocks" (SDPA block by block with a boolean mask) elsewhere. `group`: query heads
    per KV head. Env LIQUID_ATTENTION=flex|blocks overrides it (flex on the CPU: forward only)."""
    forced = os.environ.get(ATTENTION_ENV, "")
    if forced:
        if forced not in ("flex", "blocks"):
            raise ValueError(f"{ATTENTION_ENV} must be 'flex' or 'blocks'; got {forced!r}")
        return forced
    # A boolean mask sends CUDA SDPA to its math backend (fp32 scores saved for backward). Triton's flex
    # kernels need head_dim >= 16 (tl.dot) and, for short query slices, a power-of-2 GQA group.
    fits = head_dim >= 16 and (group & (group - 1)) == 0
    return "flex" if torch.device(device).type == "cuda" and fits and _flex_module() is not None else "blocks"


def document_mask_mod(docs: torch.Tensor | None, q_offset: int):
    """FlexAttention mask_mod of a DocumentMask: query q_idx sits at position q_offset + q_idx among the keys,
    and sees the keys up to itself in its own document."""
    if docs is None:
        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + q_offset
        return causal

    def causal_same_document(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + q_offset) & (docs[b, q_idx + q_offset] == docs[b, kv_idx])
    return causal_same_document


class DocumentMask:
    """Causal attention inside documents for the queries at positions q_offset .. q_offset + q_len - 1 of a
    row whose keys are at positions 0 .. q_offset + q_len - 1 (q_offset > 0: a context-parallel slice).
    docs [b, q_offset + q_len]: the document index of every position, nondecreasing
    along the row (None: the row is one document; then `device` places the masks).

    `attend` runs the kernel `attention_backend` picks. On CUDA, FlexAttention with a block mask built once
    per DocumentMask (`block_mask()`, no host sync; every attention layer of a forward shares it when the
    layout is shared). Elsewhere, `blocks()`: the queries split into blocks of ATTENTION_BLOCK, each given
    only the keys it can see: from the start of the document its first query is in (the earliest over the
    batch) up to its last query. A dense [s, s] mask is never built: memory is one block's mask,
    [b, 1, block, keys], and compute skips every key before a block's first document."""

    def __init__(self, docs: torch.Tensor | None, q_offset: int, q_len: int, device=None):
        self.docs, self.q_offset, self.q_len = docs, q_offset, q_len
        self.device = docs.device if docs is not None else device
        self._block_mask, self._starts = None, {}

    def blocks(self, block: int | None = None):
        """(a, b, lo, hi, mask): queries a..b-1 (local indices) see keys lo..hi-1 through mask [b|1, 1, b-a, hi-lo]."""
        block = block or ATTENTION_BLOCK
        firsts = list(range(0, self.q_len, block))
        for a, lo in zip(firsts, self._block_starts(block, firsts)):
            b = min(a + block, self.q_len)
            yield a, b, lo, self.q_offset + b, self._mask(a, b, lo)

    def _block_starts(self, block: int, firsts: list[int]) -> list[int]:
        """Where the document of each block's first query starts, earliest over the batch: one host read per
        DocumentMask, shared by the attention layers of a forward (they share the mask, see shared_layout)."""
        if self.docs is None:
            return [0] * len(firsts)
        if block not in self._starts:
            first_docs = self.docs[:, [self.q_offset + a for a in firsts]]
            self._starts[block] = torch.searchsorted(self.docs, first_docs).amin(0).tolist()
        return self._starts[block]

    def block_mask(self):
        """FlexAttention BlockMask [b|1, 1, q_len, q_offset + q_len], built on first use and kept."""
        if self._block_mask is None:
            docs = None if self.docs is None else self.docs.contiguous()
            self._block_mask = _flex_module().create_block_mask(
                document_mask_mod(docs, self.q_offset), None if docs is None else docs.shape[0], None,
                self.q_len, self.q_offset + self.q_len, device=self.device)
        return self._block_mask

    def attend(self, q, k, v, *, enable_gqa: bool = False, backend: str | None = None) -> torch.Tensor:
        """q [b, heads, q_len, d], k and v [b, kv_heads, q_offset + q_len, d] -> [b, heads, q_len, d].
        backend: "flex" or "blocks"; None: attention_backend(q.device, ...)."""
        backend = backend or attention_backend(q.device, head_dim=q.shape[-1], group=q.shape[1] // k.shape[1])
        if backend == "flex":
            # Compiled on CUDA only: the CPU runs flex_attention's eager reference, forward only.
            flex = _compiled_flex_attention() if q.is_cuda else _flex_module().flex_attention
            return flex(q, k, v, block_mask=self.block_mask(), enable_gqa=enable_gqa)
        if backend != "blocks":
            raise ValueError(f"attention backend must be 'flex' or 'blocks'; got {backend!r}")
        return torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, lo:hi], v[:, :, lo:hi],
                                                         attn_mask=mask, enable_gqa=enable_gqa)
                          for a, b, lo, hi, mask in self.blocks()], dim=2)

    def dense(self) -> torch.Tensor:
        """The whole mask [b|1, 1, q_len, q_offset + q_len] (tests compare blocks() against it)."""
        return self._mask(0, self.q_len, 0)

    def _mask(self, a: int, b: int, lo: int) -> torch.Tensor:
        """Queries a..b-1 (local) over keys lo..q_offset+b-1: [b|1, 1, b-a, q_offset+b-lo]."""
        hi = self.q_offset + b
        query = torch.arange(self.q_offset + a, hi, device=self.device)[:, None]
        mask = torch.arange(lo, hi, device=query.device)[None, :] <= query
        if self.docs is not None:
            mask = mask & (self.docs[:, self.q_offset + a:hi, None] == self.docs[:, None, lo:hi])
        return (mask if mask.dim() == 3 else mask[None])[:, None]


_last_layout: list = []  # [doc_start, key, layout] of the latest shared_layout call


def shared_layout(doc_start, key: tuple, build):
    """build(), or the layout the previous call built when it had this same doc_start tensor (or None), unmodified,
    and an equal key. Every attention layer of a forward asks with the same doc_start, so they share one
    DocumentMask and FlexAttention builds one block mask per forward."""
    if torch.compiler.is_compiling() or (doc_start is not None and doc_start.is_inference()):
        return build()  # no Python-side cache under tracing; inference tensors have no version counter
    key = (None if doc_start is None else doc_start._version, *key)
    if _last_layout and _last_layout[0] is doc_start and _last_layout[1] == key:
        return _last_layout[2]
    layout = build()
    _last_layout[:] = [doc_start, key, layout]
    return layout


def local_attention_layout(doc_start, batch: int, seq: int, device):
    """positions [b, s] restarting at every document, and the DocumentMask of the row (None when the row is
    one document: plain causal attention)."""
    if doc_start is None:
        return positions_in_doc(None, batch, seq, device), None
    return shared_layout(doc_start, ("local", batch, seq, torch.device(device)), lambda: (
        positions_in_doc(doc_start, batch, seq, device), DocumentMask(doc_ids(doc_start, batch, seq, device), 0, seq)))


def local_kv(k, v):
    return k, v


def build_mixer(kind: str, d_model: int, model_cfg):
    builders = {
        "liquid": lambda: LiquidMixer(d_model, model_cfg.liquid, model_cfg.norm_eps),
        "conv": lambda: ConvMixer(d_model, model_cfg.conv_kernel),
        "attention": lambda: AttentionMixer(d_model, model_cfg.attention, model_cfg.norm_eps),
    }
    if kind not in builders:
        raise ValueError(f"unknown mixer kind '{kind}'; choose one of {sorted(builders)}")
    return builders[kind]()


MIXERS = ("liquid", "conv", "attention")
