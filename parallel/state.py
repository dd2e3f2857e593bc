"""The training state in a layout-free form: every tensor by its single-process name, whole or as a slice
of rows, whatever the DP / EP / ZeRO layout that holds it.

A checkpoint stores this form, so it loads under another layout (resharding):
- dense weights and their Adam moments are gathered from the ZeRO partitions and written once, by the
  rank whose partition the parameter starts in (its owner);
- expert weights [E, ...] stay sharded: each EP rank's slice of rows [ep_rank * E_local, ...) is written
  by one rank of its expert-data-parallel group, and a rank of any other EP size reads the rows it holds.

`collect(engine, topology)` (collective: every rank calls it) returns this rank's `Piece`s.
`restore(engine, topology, read)` (collective) puts a checkpoint's values back, reading of each tensor only
the rows that cover this rank's ZeRO fragment (under the same layout: from its own file and its
predecessor's); the ranks then sum their fragments of each weight, which every rank keeps whole.
Kinds: "model" (weights, fp32 masters under ZeRO, and persistent buffers), "exp_avg", "exp_avg_sq",
"step" (Adam's step per parameter, a scalar).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

MOMENTS = ("exp_avg", "exp_avg_sq")
KINDS = ("model",) + MOMENTS + ("step",)
Read = Callable[[str, str, tuple[int, int] | None], torch.Tensor | None]  # (kind, name, rows) -> tensor or None


@dataclass
class Piece:
    kind: str  # model | exp_avg | exp_avg_sq | step
    name: str  # the single-process state_dict name
    tensor: torch.Tensor  # a host copy, owned by the checkpoint
    rows: tuple[int, int] | None  # the slice of dim 0 of the full tensor; None = all of it
    shape: tuple[int, ...]  # the full tensor's shape

    @property
    def key(self) -> str:
        suffix = f"@{self.rows[0]}" if self.rows is not None else ""
        return f"{self.kind}/{self.name}{suffix}"


def canonical_name(name: str) -> str:
    """The single-process name of a parameter of a parallelized model (EP wraps the local experts)."""
    return name.replace(".experts.experts.", ".experts.")


def _expert_ids(engine) -> set[int]:
    from parallel.engine import expert_parameters

    return {id(p) for p in expert_parameters(engine.model)}


def _host(t: torch.Tensor, buffers: dict | None = None, key: str = "") -> torch.Tensor:
    """A private CPU copy (the training step goes on changing the original). With `buffers`, the copy goes
    into the buffer this key had at the previous save when it fits: copying into memory already touched is
    several times faster than into fresh pages, and the copy is the whole training stall of an async save."""
    t = t.detach()
    buf = buffers.get(key) if buffers is not None else None
    if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
        buf = torch.empty(t.shape, dtype=t.dtype, device="cpu")
        if buffers is not None:
            buffers[key] = buf
    return buf.copy_(t)


class _Layout:
    """Where each parameter lives: its full shape, its rows, the group of ranks that partition it, and
    (`owners()`, collective) the rank that writes it."""

    def __init__(self, engine, topology):
        self.engine, self.topology = engine, topology
        experts = _expert_ids(engine)
        self.entries = []
        for name, p in engine.model.named_parameters():
            is_expert = id(p) in experts
            shape, rows = tuple(p.shape), None
            if is_expert and topology.ep > 1:
                local = p.shape[0]
                rows = (topology.ep_rank * local, (topology.ep_rank + 1) * local)
                shape = (local * topology.ep,) + tuple(p.shape[1:])
            group = topology.expert_dp_group if is_expert else topology.dp_cp_group
            self.entries.append((canonical_name(name), p, shape, rows, group))

    def owners(self) -> list[int]:
        """The rank that writes each parameter: of the ranks that partition it, the first that keeps a fragment
        of it, i.e. the one whose ZeRO partition it starts in (collective: one all_gather of every rank's
        fragment sizes, which must cover each parameter). A rank then reads back, under the same layout, the
        parameters that start in its partition from its own file and the one reaching into its partition
        from the rank before: two files, whatever the number of ranks."""
        t = self.topology
        mine = [b - a for a, b in (self.engine.fragment(p) for _, p, *_ in self.entries)]
        sizes = {t.rank: mine}
        if t.world > 1 and dist.is_initialized():
            everyone = [None] * t.world
            dist.all_gather_object(everyone, mine)
            sizes = dict(enumerate(everyone))
        out = []
        for i, (name, p, _, _, group) in enumerate(self.entries):
            ranks = dist.get_process_group_ranks(group) if group is not None else [t.rank]
            held = [sizes[r][i] for r in ranks]
            assert sum(held) == p.numel(), f"the ranks' fragments of {name} do not cover it: {held}"
            out.append(next(r for r, n in zip(ranks, held) if n > 0))
        return out


def collect(engine, topology, buffers: dict | None = None) -> list[Piece]:
    """This rank's share of the training state (collective over every rank; host copies, reusing
    `buffers` from an earlier save that is no longer being written)."""
    layout = _Layout(engine, topology)
    pieces = []
    for (name, p, shape, rows, group), owner in zip(layout.entries, layout.owners(), strict=True):
        mine = owner == topology.rank
        for kind in ("model",) + MOMENTS:
            full = engine.full_state_tensor(p, kind, group=group, dst=owner)
            if mine and full is not None:
                piece = Piece(kind, name, None, rows, shape)
                piece.tensor = _host(full, buffers, piece.key)
                pieces.append(piece)
        step = engine.optimizer_step_of(p)
        if mine and step is not None:
            pieces.append(Piece("step", name, torch.tensor(float(step), dtype=torch.float64), None, ()))
    params = {id(p) for p in engine.model.parameters()}
    if topology.rank == 0:
        for name, t in engine.model.state_dict(keep_vars=True).items():
            if id(t) not in params:  # persistent buffers (router expert bias): replicated, written by rank 0
                pieces.append(Piece("model", canonical_name(name), _host(t, buffers, f"buffer/{name}"), None,
                                    tuple(t.shape)))
    return pieces


def state_shapes(engine, topology) -> dict[str, tuple[int, ...]]:
    """The full shape of every model tensor by single-process name (what a checkpoint must provide)."""
    out = {name: shape for name, _, shape, _, _ in _Layout(engine, topology).entries}
    params = {id(p) for p in engine.model.parameters()}
    for name, t in engine.model.state_dict(keep_vars=True).items():
        if id(t) not in params:
            out[canonical_name(name)] = tuple(t.shape)
    return out


def restore(engine, topology, read: Read) -> None:
    """Load weights, Adam moments and steps from `read(kind, name, rows)` (None when the checkpoint has no
    such entry, e.g. the moments of a parameter that never had a gradient). Collective: each rank reads the
    rows covering its fragment of each parameter; a sum over the parameter's group makes the whole weight."""
    layout = _Layout(engine, topology)
    layout.owners()  # proves that the ranks' fragments cover every parameter: the sums below are whole
    with torch.no_grad():
        for name, p, _, rows, group in layout.entries:
            values = _read_fragment(read, name, p, rows, engine.fragment(p))
            if group is not None:
                dist.all_reduce(values["model"], group=group)  # zeros outside each rank's fragment
            engine.set_full_state(p, values)
        _restore_buffers(engine, topology, read)


def _restore_buffers(engine, topology, read: Read) -> None:
    """Persistent buffers (router expert bias) are replicated: rank 0 reads them (from its own file, where it
    wrote them) and broadcasts them."""
    params = {id(p) for p in engine.model.parameters()}
    collective = topology.world > 1 and dist.is_initialized()
    for name, t in engine.model.state_dict(keep_vars=True).items():
        if id(t) in params:
            continue
        if topology.rank == 0:
            value = read("model", canonical_name(name), None)
            if value is None:  # the manager checked the index against the model first: on every rank
                raise ValueError(f"the checkpoint has no buffer {canonical_name(name)}")
            t.copy_(value)
        if collective:
            dist.broadcast(t, src=0)


def _read_fragment(read: Read, name: str, p, rows: tuple[int, int] | None, span: tuple[int, int]) -> dict:
    """Whole-sized flat values of `p` holding the saved values in `span` (its flattened fragment) and zeros
    elsewhere, read as the rows that cover the span; "step" is read only for a non-empty fragment."""
    start, stop = span
    values = {"model": torch.zeros(p.numel(), dtype=torch.float32, device=p.device)}
    if start == stop:
        return values | {"exp_avg": None, "exp_avg_sq": None, "step": None}
    row = p[0].numel() if p.dim() > 0 else 1
    first, last = start // row, -(-stop // row)  # the rows [first, last) of p cover the span
    base = rows[0] if rows is not None else 0  # p is rows [base, ...) of the saved tensor (an EP shard)
    for kind in ("model",) + MOMENTS:
        saved = read(kind, name, (base + first, base + last) if p.dim() > 0 else None)
        if saved is None:
            if kind == "model":
                raise ValueError(f"the checkpoint has no weights for {name}")
            values[kind] = None
            continue
        if kind != "model":
            values[kind] = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        values[kind][start:stop] = saved.flatten()[start - first * row:stop - first * row].to(values[kind])
    values["step"] = read("step", name, None)
    return values
