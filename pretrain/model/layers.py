"""Small building blocks shared by the mixers: RMSNorm, RoPE, document ids and a causal depthwise conv.

Everything here is single-device PyTorch; document boundaries arrive as a bool `doc_start` [batch, seq].
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    @torch.no_grad()
    def reset_fixed(self):
        """The state whose initial value is fixed (see LiquidLM.init_weights): a gain of one."""
        self.weight.fill_(1.0)

    def forward(self, x):
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # the same numbers, fewer ops
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def doc_ids(doc_start: torch.Tensor | None, batch: int, seq: int, device) -> torch.Tensor | None:
    """Document index per token [batch, seq]; None when the whole row is one document."""
    if doc_start is None:
        return None
    if tuple(doc_start.shape) != (batch, seq):
        raise ValueError(f"doc_start must be [batch, seq] = {(batch, seq)}; got {tuple(doc_start.shape)}")
    return doc_start.to(device=device, dtype=torch.long).cumsum(-1)


def positions_in_doc(doc_start: torch.Tensor | None, batch: int, seq: int, device) -> torch.Tensor:
    """Position of each token inside its document [batch, seq] (restarting at 0 at every doc start)."""
    idx = torch.arange(seq, device=device).expand(batch, seq)
    if doc_start is None:
        return idx
    start_idx = torch.where(doc_start.to(device).bool(), idx, torch.zeros_like(idx))
    return idx - start_idx.cummax(-1).values


def no_halo(x: torch.Tensor, doc_start: torch.Tensor | None, width: int) -> None:
    """The single-device halo: nothing precedes position 0 (context parallelism supplies the previous
    rank's last `width` inputs instead, see parallel/context_parallel.py)."""
    return None


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, docs: torch.Tensor | None,
                          tail: torch.Tensor | None = None) -> torch.Tensor:
    """y_t = sum_i weight[:, i] * x_{t-K+1+i}, never reaching across a document start.

    x [batch, seq, channels]; weight [channels, 1, K] (nn.Conv1d layout); tail [batch, K-1, channels]
    holds inputs before position 0 (the previous CP rank's halo, or zeros).
    """
    kernel = weight.shape[-1]
    batch, seq, channels = x.shape
    if docs is None and not torch.compiler.is_compiling():
        # Eager: one depthwise convolution over the padded sequence (the same sum, to fp32 rounding). Compiled,
        # the shifted sums below: inductor fuses them with the gates around them (ConvMixer forward + backward
        # at 4 x 512 x 256 on the CPU: 14.7 ms compiled against 16.5 with the convolution; eager the
        # convolution is the faster).
        if tail is None and x.device.type == "cpu":
            # [B, T, C] memory is the channels-last (NHWC) layout of [B, C, 1, T]: oneDNN's conv2d reads it as
            # it is, where conv1d needs [B, C, T] copies of x and of the gradients (eager ConvMixer forward +
            # backward, same shapes: 16.9 ms against 19.6-20.1). Padded on both sides; the last K-1 outputs
            # are dropped.
            y = F.conv2d(x.transpose(1, 2).unsqueeze(2), weight.to(x.dtype).unsqueeze(2), padding=(0, kernel - 1),
                         groups=channels)
            return y[..., :seq].squeeze(2).transpose(1, 2)
        xt = x.transpose(1, 2)
        xt = F.pad(xt, (kernel - 1, 0)) if tail is None else torch.cat([tail.to(x.dtype).transpose(1, 2), xt], 2)
        return F.conv1d(xt, weight.to(x.dtype), groups=channels).transpose(1, 2)
    # [K, channels]: compiled, each tap's weights contiguous through an op inductor does not look into; it
    # vectorises the loops over channels only with contiguous loads (reading weight[:, 0, j], a stride-K
    # gather, the backward's kernel ran scalar).
    w = conv_taps(weight) if torch.compiler.is_compiling() else weight[:, 0, :].t()
    if tail is None:
        tail = x.new_zeros(batch, kernel - 1, channels)
    xp = torch.cat([tail, x], dim=1)
    y = x * w[-1]
    for j in range(1, kernel):  # j = how far back
        shifted = xp[:, kernel - 1 - j: kernel - 1 - j + seq]
        if docs is not None:
            same = torch.zeros_like(docs, dtype=torch.bool)
            if j < seq:
                same[:, j:] = docs[:, j:] == docs[:, :-j]
            # Tokens within j of the row start look into the tail: valid only if no doc start so far.
            head = min(j, seq)
            same[:, :head] = docs[:, :head] == 0
            shifted = shifted * same[..., None].to(x.dtype)
        y = y + shifted * w[kernel - 1 - j]
    return y


@torch.library.custom_op("liquid::conv_taps", mutates_args=())
def conv_taps(weight: torch.Tensor) -> torch.Tensor:
    """A depthwise conv's weight [channels, 1, K] as [K, channels], contiguous (a copy)."""
    return weight[:, 0, :].t().contiguous()


@conv_taps.register_fake
def _(weight):
    return weight.new_empty(weight.shape[2], weight.shape[0])


def _conv_taps_backward(ctx, grad):
    return grad.t().unsqueeze(1).contiguous()


conv_taps.register_autograd(_conv_taps_backward)


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float):
    """cos, sin [batch, seq, dim/2] for integer positions [batch, seq].

    In a compiled CPU graph through an opaque op (rope_table): inductor otherwise fuses the cos and sin into
    each kernel that applies them, one evaluation per element of q and of k (every head) and again in the
    backward, about 6 ms of a 440 ms CPU step at 2 attention layers x 4 heads; materialised once they are a
    load each. Elsewhere (eager, CUDA) the formula itself."""
    if positions.device.type == "cpu" and torch.compiler.is_compiling():
        return rope_table(positions, dim, theta)
    return _rope_cos_sin(positions, dim, theta)


def _rope_cos_sin(positions: torch.Tensor, dim: int, theta: float):
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    ang = positions.float()[..., None] * inv
    return ang.cos(), ang.sin()


@torch.library.custom_op("liquid::rope_table", mutates_args=())
def rope_table(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_cos_sin as an op torch.compile does not look into (positions are integers: no gradient)."""
    return _rope_cos_sin(positions, dim, theta)


@rope_table.register_fake
def _(positions, dim, theta):
    shape = (*positions.shape, dim // 2)
    return positions.new_empty(shape, dtype=torch.float32), positions.new_empty(shape, dtype=torch.float32)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, seq, heads, dim]; rotate-half convention."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def swiglu(x, w1, w3, w2):
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
