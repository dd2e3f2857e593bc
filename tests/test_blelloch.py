"""The Blelloch anchor of `liquid bench scan` equals the token-by-token liquid scan (N = 1): outputs, final
state and gradients, with resets, an initial state and lengths that are not powers of two."""
import pytest
import torch
import torch.nn.functional as F

from pretrain.bench.blelloch import blelloch_scan
from pretrain.model.scan import liquid_scan_reference

TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(batch, seq, heads, p, *, resets=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, 1, generator=g)
    k = torch.randn(batch, seq, heads, 1, generator=g)
    v = torch.randn(batch, seq, heads, p, generator=g)
    log_decay = -F.softplus(torch.randn(batch, seq, heads, generator=g))
    if resets:
        where = torch.rand(batch, seq, heads, generator=g) < 0.15
        where[:, 0] = True  # a reset on the first token drops the initial state
        log_decay = log_decay.masked_fill(where, float("-inf"))
    state = torch.randn(batch, heads, 1, p, generator=g)
    return q, k, v, log_decay, state


@pytest.mark.parametrize("seq", [1, 2, 3, 7, 16, 33, 100])
@pytest.mark.parametrize("resets", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_forward_matches_reference(seq, resets, with_state):
    q, k, v, ld, state = _inputs(2, seq, 3, 5, resets=resets, seed=seq)
    init = state if with_state else None
    y, final = blelloch_scan(q, k, v, ld, initial_state=init)
    y_ref, final_ref = liquid_scan_reference(q, k, v, ld, initial_state=init)
    assert y.shape == (2, seq, 3, 5) and y.dtype == v.dtype
    assert final.shape == (2, 3, 1, 5) and final.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(final, final_ref, **TOL)


def test_reset_mid_sequence_drops_the_state():
    q, k, v, ld, state = _inputs(1, 9, 2, 3, seed=1)
    ld = ld.clone()
    ld[:, 4] = float("-inf")
    y, final = blelloch_scan(q, k, v, ld, initial_state=state)
    # After the reset the outputs are those of a fresh scan started at token 4.
    y_tail, final_tail = blelloch_scan(q[:, 4:], k[:, 4:], v[:, 4:], ld[:, 4:])
    torch.testing.assert_close(y[:, 4:], y_tail, **TOL)
    torch.testing.assert_close(final, final_tail, **TOL)


@pytest.mark.parametrize("seq", [5, 32, 45])
@pytest.mark.parametrize("resets", [False, True])
def test_gradients_match_reference(seq, resets):
    base = _inputs(2, seq, 2, 4, resets=resets, seed=100 + seq)
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(2, seq, 2, 4, generator=g)
    dstate = torch.randn(2, 2, 1, 4, generator=g)

    def grads(fn):
        xs = [t.clone().requires_grad_() for t in base]
        y, final = fn(*xs[:4], initial_state=xs[4])
        ((y * dy).sum() + (final * dstate).sum()).backward()
        return [x.grad for x in xs]

    got, want = grads(blelloch_scan), grads(liquid_scan_reference)
    for name, a, b in zip(("q", "k", "v", "log_decay", "initial_state"), got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_empty_sequence_and_shape_checks():
    q, k, v, ld, state = _inputs(1, 0, 2, 3)
    y, final = blelloch_scan(q, k, v, ld, initial_state=state)
    assert y.shape == (1, 0, 2, 3)
    torch.testing.assert_close(final, state)
    q2 = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="heads, 1"):
        blelloch_scan(q2, q2, torch.zeros(1, 4, 2, 3), torch.zeros(1, 4, 2))
