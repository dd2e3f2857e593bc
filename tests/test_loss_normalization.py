"""The training loss is token-weighted over the whole global batch (pretrain/train/step.py): one step over the
same rows gives the same loss and gradients whatever (micro_batch_size, grad_accum), equal to one forward over
the concatenated rows; micro-batches of padding rows (labels all -100) add nothing and never NaN.
One process; the multi-rank layouts are in tests/distributed/test_loss_normalization.py."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from parallel.engine import build_engine
from parallel.topology import Topology
from pretrain.config import ParallelConfig
from pretrain.model.model import IGNORE_INDEX, build_model, label_counts
from pretrain.train.step import Placement, train_step
from tests.distributed.test_engine import MODEL, OPTIM

ROWS, SEQ = 4, 16
RTOL = 1e-5
LAYOUTS = [(1, 4), (2, 2), (4, 1)]  # (micro_batch_size, grad_accum)


def uneven_batch(rows: int = ROWS, seq: int = SEQ, seed: int = 7) -> dict:
    """Rows with very different label counts: full, padded from position 5 on, all padding, a few holes."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MODEL.vocab_size, (rows, seq + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[1, 5:] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX
    labels[3, [0, 3, 4, 9]] = IGNORE_INDEX
    doc_start = torch.zeros(rows, seq, dtype=torch.bool)
    doc_start[:, 0] = True
    doc_start[0, 7] = doc_start[3, 10] = True
    return {"input_ids": ids[:, :-1], "labels": labels, "doc_start": doc_start}


def _engine(cfg, grad_accum: int):
    torch.manual_seed(0)
    return build_engine(build_model(cfg), OPTIM, ParallelConfig(), max_steps=10, grad_accum=grad_accum,
                        micro_batch_size=ROWS // grad_accum)


def _step(cfg, batch: dict, micro_batch_size: int, grad_accum: int) -> dict:
    engine = _engine(cfg, grad_accum)
    grads = {}
    micro = [{k: v[i * micro_batch_size:(i + 1) * micro_batch_size] for k, v in batch.items()}
             for i in range(grad_accum)]
    result = train_step(engine, micro, Placement(Topology.single(), torch.device("cpu")),
                        before_update=lambda: grads.update(engine.full_gradients()))
    weights = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    return {"loss": result.loss, "norm": result.grad_norm, "grads": grads, "weights": weights}


def _direct(cfg, batch: dict) -> dict:
    """One forward and backward of the whole batch, the loss written out: the sum of the token
    cross-entropies over the count of labels (+ per depth for multi-token prediction, + aux)."""
    torch.manual_seed(0)
    model = build_model(cfg)
    out = model(batch["input_ids"], labels=batch["labels"], doc_start=batch["doc_start"], return_logits=True)
    labels = batch["labels"]
    lm = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    lm = lm / (labels != IGNORE_INDEX).sum()
    loss = lm + out.aux_loss
    if cfg.mtp_depth:
        loss = loss + cfg.mtp_loss_weight * out.mtp_loss  # the whole batch's: a mean over each depth's targets
    loss.backward()
    return {"loss": lm.item(), "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}


def _close(a, b, what, floor=1e-12):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert torch.isfinite(a).all(), f"{what}: not finite"
    err = float((a - b).norm()) / max(float(b.norm()), floor)
    assert err <= RTOL, f"{what}: relative error {err:.3g}"


MTP = dataclasses.replace(MODEL, mtp_depth=2)


@pytest.mark.parametrize("cfg", [MODEL, MTP], ids=["lm", "mtp2"])
def test_layouts_equal_the_whole_batch_at_once(cfg):
    batch = uneven_batch()
    counts = label_counts(batch["labels"])
    assert counts.tolist() == [16 + 5 + 0 + 12] and (batch["labels"][2] == IGNORE_INDEX).all()
    direct = _direct(cfg, batch)
    runs = {layout: _step(cfg, batch, *layout) for layout in LAYOUTS}
    for layout, got in runs.items():
        _close(got["loss"], direct["loss"], f"{layout} loss")
        assert got["grads"].keys() == direct["grads"].keys(), layout
        for name, g in got["grads"].items():
            _close(g, direct["grads"][name], f"{layout} grad {name}", floor=1e-3 * got["norm"])
    first = runs[LAYOUTS[0]]
    for layout, got in runs.items():
        for name, w in got["weights"].items():
            _close(w, first["weights"][name], f"{layout} weight {name}")


def test_one_micro_batch_keeps_the_aux_loss():
    """The MoE aux loss still enters each micro-batch's loss with weight 1 (a micro-batch statistic): with the
    whole batch in one micro-batch the gradients are those of lm mean + aux."""
    cfg = dataclasses.replace(MODEL, moe=dataclasses.replace(MODEL.moe, aux_loss_coeff=0.1, z_loss_coeff=0.01))
    batch = uneven_batch()
    direct, got = _direct(cfg, batch), _step(cfg, batch, ROWS, 1)
    _close(got["loss"], direct["loss"], "loss")
    for name, g in got["grads"].items():
        _close(g, direct["grads"][name], f"grad {name}", floor=1e-3 * got["norm"])


@pytest.mark.parametrize("cfg", [MODEL, MTP], ids=["lm", "mtp2"])
def test_a_batch_without_labels_gives_zero_not_nan(cfg):
    batch = uneven_batch()
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    for layout in [(1, 4), (4, 1)]:
        got = _step(cfg, batch, *layout)
        assert got["loss"] == 0.0, layout
        assert got["norm"] == 0.0, layout  # aux_loss_coeff = 0: nothing to learn from
        for name, g in got["grads"].items():
            assert torch.isfinite(g).all() and not g.any(), (layout, name)
        for name, w in got["weights"].items():
            assert torch.isfinite(w).all(), (layout, name)
