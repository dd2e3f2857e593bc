"""LocalEngine's clipping inside torch's fused AdamW (parallel/engine.py): the gradients are divided by
`grad_scale` in the optimizer's own pass instead of being multiplied in place first. The same update as
clip_grad_norm_ followed by the optimizer, clipping or not, and the norm it returns is the unclipped one."""
import dataclasses

import pytest
import torch

from parallel.engine import build_engine
from pretrain.config import ParallelConfig
from pretrain.model.model import build_model
from pretrain.optim import build_optimizer
from tests.distributed.test_engine import MODEL, OPTIM


@pytest.mark.parametrize("grad_clip", [1e-3, 1e6, 0.0])  # clipping, not clipping, off
def test_clipping_in_the_fused_optimizer_equals_clip_grad_norm(grad_clip):
    optim = dataclasses.replace(OPTIM, grad_clip=grad_clip)
    torch.manual_seed(0)
    model = build_model(MODEL)
    reference = build_model(MODEL)
    reference.load_state_dict(model.state_dict())
    engine = build_engine(model, optim, ParallelConfig(), max_steps=10, grad_accum=1)
    assert engine.optimizer.defaults.get("fused")
    opt, sched = build_optimizer(reference, optim, 10)
    ids = torch.randint(0, MODEL.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        engine.backward(model(ids, labels=ids).loss)
        norm = engine.step()
        reference(ids, labels=ids).loss.backward()
        want = torch.nn.utils.clip_grad_norm_(reference.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        assert norm.item() == pytest.approx(want.item(), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
