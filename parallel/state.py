"""The training state in a layout-free form: every tensor by its single-process name, whole or as a slice
of rows, whatever the DP / EP / ZeRO layout that holds it.

A checkpoint stores this form, so it loads under another layout (resharding):
- dense weights and their Adam moments are gathered from the ZeRO partitions and written once, by an
  owner rank chosen round-robin over the ranks that replicate them;
- expert weights [E, ...] stay sharded: each EP rank's slice of rows [ep_rank * E_local, ...) is written
  by one rank of its expert-data-parallel group, and a rank of any other EP size reads the rows it holds.

`collect(engine, topology)` (collective: every rank calls it) returns this rank's `Piece`s;
`restore(engine, topology, read, step)` puts a checkpoint's values back, reading only what it holds.
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
    """Where each parameter lives: its full shape, its rows, the ranks that replicate it, its owner."""

    def __init__(self, engine, topology):
        self.topology = topology
        experts = _expert_ids(engine)
        self.entries = []
        for i, (name, p) in enumerate(engine.model.named_parameters()):
            is_expert = id(p) in experts
            shape, rows = tuple(p.shape), None
            if is_expert and topology.ep > 1:
                local = p.shape[0]
                rows = (topology.ep_rank * local, (topology.ep_rank + 1) * local)
                shape = (local * topology.ep,) + tuple(p.shape[1:])
            group = topology.expert_dp_group if is_expert else topology.dp_cp_group
            replicas = topology.expert_dp if is_expert else topology.world
            ranks = dist.get_process_group_ranks(group) if group is not None else [topology.rank]
            owner = ranks[i % replicas]
            self.entries.append((canonical_name(name), p, shape, rows, group, owner))


def collect(engine, topology, buffers: dict | None = None) -> list[Piece]:
    """This rank's share of the training state (collective over every rank; host copies, reusing
    `buffers` from an earlier save that is no longer being written)."""
    layout = _Layout(engine, topology)
    pieces = []
    for name, p, shape, rows, group, owner in layout.entries:
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
    out = {name: shape for name, _, shape, _, _, _ in _Layout(engine, topology).entries}
    params = {id(p) for p in engine.model.parameters()}
    for name, t in engine.model.state_dict(keep_vars=True).items():
        if id(t) not in params:
            out[canonical_name(name)] = tuple(t.shape)
    return out


def restore(engine, topology, read: Callable[[str, str, tuple[int, int] | None], torch.Tensor | None]) -> None:
    """Load weights, Adam moments and steps from `read(kind, name, rows)` (None when the checkpoint has no
    such entry, e.g. the moments of a parameter that never had a gradient)."""
    layout = _Layout(engine, topology)
    with torch.no_grad():
        for name, p, _, rows, _, _ in layout.entries:
            values = {kind: read(kind, name, None if kind == "step" else rows) for kind in KINDS}
            if values["model"] is None:
                raise ValueError(f"the checkpoint has no weights for {name}")
            engine.set_full_state(p, values)
        params = {id(p) for p in engine.model.parameters()}
        for name, t in engine.model.state_dict(keep_vars=True).items():
            if id(t) not in params:
                value = read("model", canonical_name(name), None)
                if value is None:
                    raise ValueError(f"the checkpoint has no buffer {canonical_name(name)}")
                t.copy_(value)
