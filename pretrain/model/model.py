"""The liquid MoE language model: pre-norm residual blocks of (mixer, FFN), RMSNorm, tied embeddings.

Plain single-device PyTorch. `forward` trains on packed rows with document starts; `step` generates
token by token with O(1) state per recurrent layer.
"""
from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from pretrain.model.ffn import MoE, build_ffn
from pretrain.model.layers import RMSNorm
from pretrain.model.loss import linear_cross_entropy_sum
from pretrain.model.mixers import build_mixer

IGNORE_INDEX = -100
ACTIVATION_CHECKPOINTING = ("none", "selective", "full")  # see Block


@dataclass
class ModelOutput:
    loss: torch.Tensor | None  # lm_loss + mtp_loss_weight * mtp_loss + aux_loss
    lm_loss: torch.Tensor | None  # mean over the tokens with a label (NaN without any, as F.cross_entropy)
    mtp_loss: torch.Tensor | None  # mean over the depths of each depth's mean over its targets
    aux_loss: torch.Tensor
    logits: torch.Tensor | None  # [batch, seq, vocab]; None when labels were given and logits not asked for
    # The sums behind the means (0 without labels): training weighs tokens over the whole global batch
    # (pretrain/train/step.py divides them by the global counts of `label_counts`).
    lm_loss_sum: torch.Tensor | None = None  # sum of the token cross-entropies (fp32)
    mtp_loss_sums: torch.Tensor | None = None  # [mtp_depth]: per depth, the sum over its targets


def label_counts(labels: torch.Tensor, mtp_depth: int = 0) -> torch.Tensor:
    """[1 + mtp_depth] int64, on labels' device: the tokens with a label (the language-model loss's
    terms), then for each multi-token-prediction depth d its targets (labels shifted d further:
    labels[:, d:]). No host read."""
    valid = labels != IGNORE_INDEX
    return torch.stack([valid[:, d:].sum() for d in range(mtp_depth + 1)])


class Block(nn.Module):
    """h += mixer(mixer_norm(h)); h += ffn(ffn_norm(h)), with optional activation checkpointing.

    `checkpointing` (set through `LiquidLM.set_activation_checkpointing`) says what backward recomputes
    instead of keeping from the forward:
    - "none": nothing; autograd keeps every activation of the block.
    - "full": the whole block; only its input stays between forward and backward (about d values per
      token and layer), and backward holds one block's activations at a time. Costs a second forward of
      every block, the MoE's routing, all_to_alls and expert matmuls included.
    - "selective": the sequence mixer and its norm only; the FFN keeps its activations. The mixer holds
      most of a block's activations per unit of compute (the liquid scan's fp32 chunk matrices, q/k/v and
      gate, attention's q/k/v and scores statistics), while the MoE is the opposite: its expert matmuls are
      most of a block's FLOPs and under expert parallelism its forward is two all_to_alls, which backward
      would otherwise run again. The mixer's own collectives under context parallelism are small (one
      state all-gather per liquid layer, a conv halo) except attention's K/V gather, on a few layers.
    The recompute runs under the forward's autocast and RNG state (torch.utils.checkpoint, non-reentrant)
    and with the MoE's token counting paused: the tokens were counted once, in the forward. Collectives
    that parallel forms put inside a recomputed region run again in backward, in the same order on every
    rank (every rank recomputes the same regions).
    """

    def __init__(self, mixer_kind: str, ffn_kind: str, cfg):
        super().__init__()
        self.mixer_kind, self.ffn_kind = mixer_kind, ffn_kind
        self.checkpointing = "none"
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = build_mixer(mixer_kind, cfg.d_model, cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = build_ffn(ffn_kind, cfg.d_model, cfg)
        self._compiled = None  # compile_body(): torch.compile'd _block, _mix and _ffn

    def compile_body(self, **compile_kwargs) -> "Block":
        """torch.compile the block's computation (train.compile): the whole block, or under "selective"
        checkpointing its mixer part and FFN part apart (the recompute wraps the compiled mixer). Parameters,
        buffers and state_dict names are untouched; the first calls compile (and again when the MoE's token
        counting is paused for a recompute)."""
        self._compiled = {name: torch.compile(getattr(self, name), **compile_kwargs)
                          for name in ("_block", "_mix", "_ffn")}
        return self

    def _fn(self, name: str):
        return self._compiled[name] if self._compiled is not None else getattr(self, name)

    def forward(self, h, *, doc_start=None, dt=None):
        if self.checkpointing == "full" and torch.is_grad_enabled():
            return self._recomputed(self._fn("_block"), h, doc_start, dt)
        if self.checkpointing == "selective" and torch.is_grad_enabled():
            h = h + self._recomputed(self._fn("_mix"), h, doc_start, dt)
            y, aux = self._fn("_ffn")(h)
            return h + y, aux
        return self._fn("_block")(h, doc_start, dt)

    def _block(self, h, doc_start, dt):
        h = h + self._mix(h, doc_start, dt)
        y, aux = self._ffn(h)
        return h + y, aux

    def _mix(self, h, doc_start, dt):
        return self.mixer(self.mixer_norm(h), doc_start=doc_start, dt=dt)

    def _ffn(self, h):
        return self.ffn(self.ffn_norm(h))

    def _recomputed(self, fn, *args):
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False,
                                                 context_fn=lambda: (nullcontext(), tokens_not_counted(self)))

    def step(self, h, state, *, dt=None):
        y, state = self.mixer.step(self.mixer_norm(h), state, dt=dt)
        h = h + y
        y, _ = self.ffn(self.ffn_norm(h))
        return h + y, state


@contextmanager
def tokens_not_counted(module: nn.Module):
    """The MoE layers inside `module` do not add to `tokens_per_expert` (a recomputed forward)."""
    moes = [m for m in module.modules() if isinstance(m, MoE)]
    for moe in moes:
        moe.count_tokens = False
    try:
        yield
    finally:
        for moe in moes:
            moe.count_tokens = True


class MTPModule(nn.Module):
    """One multi-token-prediction depth (DeepSeek-V3 style): combine the previous depth's hidden state
    with the embedding of the next input token, run one block, predict one token further ahead."""

    def __init__(self, cfg, mixer_kind: str):
        super().__init__()
        self.h_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.e_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.block = Block(mixer_kind, "dense", cfg)

    def forward(self, h, emb_next, *, doc_start=None, dt=None):
        h = self.proj(torch.cat([self.h_norm(h), self.e_norm(emb_next)], dim=-1))
        h, _ = self.block(h, doc_start=doc_start, dt=dt)
        return h


class LiquidLM(nn.Module):
    def __init__(self, cfg, *, seed: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(
            Block(m, f, cfg) for m, f in zip(cfg.layer_types(), cfg.ffn_types())
        )
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.layer_types()[-1]) for _ in range(cfg.mtp_depth))
        for name, module in self.named_modules():
            module.init_key = name  # seeds its weights; kept when parallel forms rewrap or shard the module
        if self.embed.weight.device.type != "meta":  # on meta: `materialize` initialises what a rank keeps
            self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """Initialise every weight from a generator of its own, seeded by (seed, its name in this
        single-device model, and for experts the expert's index in the layer): the values do not depend on
        the layout, so a rank that keeps only its experts, or a model built on the meta device and
        materialised after the parallel forms, starts from exactly the single-process weights. seed None:
        drawn from torch's global generator (torch.manual_seed decides). Fixed state (norm gains, base
        rates, biases, counters) comes from each module's `reset_fixed`."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        for module in self.modules():
            if hasattr(module, "reset_fixed"):
                module.reset_fixed()
            for name, p in module.named_parameters(recurse=False):
                std = self._init_std(module, name, p)
                if std is not None:
                    _init_normal(p, std, seed=seed, key=f"{module.init_key}.{name}",
                                 first_index=getattr(module, "expert_offset", None))

    def _init_std(self, module, name: str, p) -> float | None:
        """The normal's std for a weight (None: fixed by its module): std for matrices, std / sqrt(2 layers)
        for the projections into the residual stream, 1 / sqrt(kernel) for conv taps."""
        if isinstance(module, nn.Conv1d) and name == "weight":
            return 1.0 / math.sqrt(module.kernel_size[0])
        if p.dim() < 2:
            return None
        key = f"{module.init_key}.{name}"
        is_out = key.endswith(("out_proj.weight", "w2.weight", "experts.w2"))
        return self.cfg.init_std / math.sqrt(2 * self.cfg.num_layers) if is_out else self.cfg.init_std

    def head(self, h):
        return F.linear(self.norm(h), self.embed.weight)  # tied embeddings

    def head_loss_sum(self, h, labels, *, chunked: bool = True):
        """Sum of the token cross-entropies of head(h) against labels (fp32; ignored labels add 0). With
        model.loss_chunk_tokens > 0 (and `chunked`) a slice of tokens at a time, so the [batch, seq, vocab]
        logits never exist whole (pretrain/model/loss.py); else the plain head and F.cross_entropy."""
        chunk = getattr(self.cfg, "loss_chunk_tokens", 0)
        if chunked and chunk:
            return linear_cross_entropy_sum(self.norm(h), self.embed.weight, labels, chunk_tokens=chunk,
                                            ignore_index=IGNORE_INDEX)
        return F.cross_entropy(self.head(h).float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")

    def forward(self, input_ids, *, labels=None, doc_start=None, dt=None, return_logits=None):
        """input_ids, labels [batch, seq]; doc_start bool [batch, seq]; dt float [batch, seq]."""
        h = self.embed(input_ids)
        aux = h.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            h, layer_aux = layer(h, doc_start=doc_start, dt=dt)
            aux = aux + layer_aux
        want_logits = labels is None if return_logits is None else return_logits
        if labels is None:
            return ModelOutput(None, None, None, aux, self.head(h))
        counts = label_counts(labels, len(self.mtp))
        # Logits asked for: the plain head (they exist whole anyway); else the chunked loss when configured.
        logits = self.head(h) if want_logits else None
        if logits is not None:
            lm_loss_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                          reduction="sum")
        else:
            lm_loss_sum = self.head_loss_sum(h, labels)
        lm_loss = lm_loss_sum / counts[0]
        mtp_loss = mtp_loss_sums = None
        if self.mtp:
            mtp_loss_sums = self._mtp_loss_sums(h, labels, doc_start, dt, chunked=not want_logits)
            mtp_loss = (mtp_loss_sums / counts[1:]).mean()
        loss = lm_loss + aux
        if mtp_loss is not None:
            loss = loss + self.cfg.mtp_loss_weight * mtp_loss
        return ModelOutput(loss, lm_loss, mtp_loss, aux, logits, lm_loss_sum, mtp_loss_sums)

    def _mtp_loss_sums(self, h, labels, doc_start, dt, *, chunked: bool = True):
        """Depth d predicts labels shifted d further: token t+1+d from position t. Returns [depth] sums of
        the token cross-entropies (their counts: `label_counts`), by `head_loss_sum` (`chunked`: see there)."""
        losses = []
        for d, module in enumerate(self.mtp, start=1):
            # The input at t+d is labels[t+d-1]; positions past the row end get an ignored target.
            nxt = torch.cat([labels[:, d - 1:], labels.new_full((labels.shape[0], d - 1), IGNORE_INDEX)], 1)
            emb = self.embed(nxt.clamp_min(0))
            h = module(h, emb, doc_start=doc_start, dt=dt)
            target = torch.cat([labels[:, d:], labels.new_full((labels.shape[0], d), IGNORE_INDEX)], 1)
            losses.append(self.head_loss_sum(h, target, chunked=chunked))
        return torch.stack(losses)

    @torch.no_grad()
    def init_state(self, batch: int):
        p = self.embed.weight
        return [layer.mixer.init_state(batch, p.device, p.dtype) for layer in self.layers]

    @torch.no_grad()
    def step(self, input_ids, state, *, dt=None):
        """One token per row: input_ids [batch] -> logits [batch, vocab], updated state."""
        h = self.embed(input_ids)[:, None]
        dt = dt[:, None] if dt is not None else None
        for i, layer in enumerate(self.layers):
            h, state[i] = layer.step(h, state[i], dt=dt)
        return self.head(h)[:, 0], state

    def set_activation_checkpointing(self, mode: str) -> "LiquidLM":
        """What backward recomputes instead of keeping: "none", "selective" (each mixer and its norm) or
        "full" (each block), for every block, the multi-token-prediction ones included (see Block)."""
        if mode not in ACTIVATION_CHECKPOINTING:
            raise ValueError(f"activation checkpointing must be one of {ACTIVATION_CHECKPOINTING}, got '{mode}'")
        for module in self.modules():
            if isinstance(module, Block):
                module.checkpointing = mode
        return self

    def compile_blocks(self, **compile_kwargs) -> "LiquidLM":
        """torch.compile every block (train.compile), the multi-token-prediction ones included: see
        Block.compile_body. The embedding, head and loss stay eager. Tags torch's compile caches with
        this package's source (compile_cache_tag)."""
        tag = compile_cache_tag()
        if tag not in torch.compiler.config.cache_key_tag:
            torch.compiler.config.cache_key_tag += tag
        for module in self.modules():
            if isinstance(module, Block):
                module.compile_body(**compile_kwargs)
        return self

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def update_expert_bias(self):
        for moe in self.moe_layers():
            moe.update_expert_bias()


def compile_cache_tag(package: Path | None = None) -> str:
    """A digest of the model package's source, for torch's compile caches (torch.compiler.config
    .cache_key_tag). Those key a compiled graph by its own code, not by what the custom ops it calls compute
    or return: when one of them changes (tried here: the CPU scan's saved states in another layout), a graph
    compiled before is loaded after it and fails on the old output shape. With the tag a changed package
    compiles afresh."""
    digest = hashlib.sha256()
    for path in sorted((package or Path(__file__).parent).glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"liquid-model-{digest.hexdigest()[:16]}"


def build_model(cfg, device=None, *, seed: int | None = None) -> LiquidLM:
    """The model on `device`, initialised (LiquidLM.init_weights). device="meta": nothing is allocated;
    apply the parallel forms, then `materialize` what this rank keeps."""
    with torch.device(device or "cpu"):
        return LiquidLM(cfg, seed=seed)


def materialize(model: LiquidLM, device, *, seed: int | None = None) -> LiquidLM:
    """Allocate a model built on the meta device on `device` and initialise it: the same values as
    `build_model(cfg, device, seed=seed)` for every tensor this model holds."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.device.type == "meta":
                real = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                # Attributes the parallel forms set (to_empty would drop them); not a fake tensor's own.
                real.__dict__.update({k: v for k, v in p.__dict__.items() if k not in real.__dict__})
                module._parameters[name] = real
        for name, b in list(module._buffers.items()):
            if b is not None and b.device.type == "meta":
                module._buffers[name] = torch.empty_like(b, device=device)
    model.init_weights(seed)
    return model


def _init_normal(p, std: float, *, seed: int, key: str, first_index: int | None) -> None:
    """p ~ N(0, std^2) from generators seeded by (seed, key); stacked experts (first_index not None) take
    one generator per expert, seeded by its index in the layer. Drawn on the CPU: the same values on
    every device."""
    parts = [(p, None)] if first_index is None else [(w, first_index + e) for e, w in enumerate(p.unbind(0))]
    for part, index in parts:
        g = torch.Generator().manual_seed(_seed_of(seed, key, index))
        part.copy_(torch.empty(part.shape, device="cpu").normal_(0.0, std, generator=g))


def _seed_of(seed: int, key: str, index: int | None) -> int:
    digest = hashlib.blake2b(f"{seed}/{key}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
