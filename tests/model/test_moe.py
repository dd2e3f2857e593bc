"""Dropless top-k MoE with sigmoid router and aux-loss-free balancing, checked against a naive per-token loop."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import MoEConfig
from pretrain.model.ffn import MoE

D_MODEL = 12


def make_moe(seed=0, **overrides):
    cfg = MoEConfig(**{"num_experts": 6, "top_k": 2, "expert_dim": 20, "routed_scaling": 1.0,
                       "bias_update_rate": 1e-2, **overrides})
    torch.manual_seed(seed)
    moe = MoE(D_MODEL, cfg)
    with torch.no_grad():  # Experts are allocated with torch.empty; the model initialises them.
        for p in (moe.experts.w1, moe.experts.w3, moe.experts.w2):
            p.normal_(std=0.3)
        moe.router.gate.weight.normal_(std=0.5)
    return moe


def naive_moe(moe, x):
    """Per token: top-k of (sigmoid scores + bias); weights = chosen sigmoid scores renormalised x scaling."""
    flat = x.reshape(-1, x.shape[-1])
    ex, cfg = moe.experts, moe.cfg
    rows = []
    for tok in flat:
        scores = torch.sigmoid(moe.router.gate.weight @ tok)
        chosen = (scores + moe.router.expert_bias).topk(cfg.top_k).indices
        w = scores[chosen] / scores[chosen].sum() * cfg.routed_scaling
        out = torch.zeros_like(tok)
        for weight, e in zip(w, chosen.tolist()):
            h = F.silu(ex.w1[e] @ tok) * (ex.w3[e] @ tok)
            out = out + weight * (ex.w2[e] @ h)
        rows.append(out)
    return torch.stack(rows).view_as(x)


@pytest.mark.parametrize("top_k,scaling", [(1, 1.0), (2, 2.5), (3, 1.0), (6, 0.7)])
def test_dropless_equals_naive_loop(top_k, scaling):
    moe = make_moe(top_k=top_k, routed_scaling=scaling)
    torch.manual_seed(1)
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.randn(6) * 0.3)  # a non-trivial bias that changes selections
    x = torch.randn(3, 7, D_MODEL)
    moe.eval()
    y, _ = moe(x)
    y_ref = naive_moe(moe, x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * max(1.0, y_ref.abs().max().item()))

    # Gradients agree with the naive loop too (w.r.t. input, expert weights and router gate).
    params = [moe.experts.w1, moe.experts.w3, moe.experts.w2, moe.router.gate.weight]
    xg = x.clone().requires_grad_(True)
    g = torch.randn_like(x)
    grads = torch.autograd.grad((moe(xg)[0] * g).sum(), [xg, *params])
    xg2 = x.clone().requires_grad_(True)
    grads_ref = torch.autograd.grad((naive_moe(moe, xg2) * g).sum(), [xg2, *params])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))


def test_bias_selects_but_does_not_weight():
    moe = make_moe(top_k=2, routed_scaling=1.0)
    moe.eval()
    torch.manual_seed(2)
    x = torch.randn(4, 5, D_MODEL)
    flat = x.reshape(-1, D_MODEL)
    with torch.no_grad():
        moe.router.expert_bias[3] = 100.0
        idx, weights, logits, scores = moe.router(flat)
    # Every token picks expert 3 (once), whatever its score.
    assert (idx == 3).any(-1).all()
    assert ((idx == 3).sum(-1) == 1).all()
    expected_scores = torch.sigmoid(flat @ moe.router.gate.weight.T)
    torch.testing.assert_close(scores, expected_scores)
    # The other expert is the best sigmoid score among the rest (bias 0 there).
    rest = expected_scores.clone()
    rest[:, 3] = -1
    other = rest.argmax(-1)
    assert ((idx == other[:, None]).any(-1)).all()
    # Weights are the chosen sigmoid scores renormalised, with no bias in them.
    chosen = expected_scores.gather(-1, idx)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True))
    assert (weights < 0.99).all()  # a +100 bias would make expert 3's weight ~1 if it leaked in
    # Expert 3's weight is its own score share, which is below 1/2 for tokens that score it lower.
    w3 = weights[idx == 3]
    s3 = expected_scores[:, 3]
    torch.testing.assert_close(w3, s3 / (s3 + expected_scores.gather(-1, other[:, None])[:, 0]))
    with torch.no_grad():
        y, _ = moe(x)
    torch.testing.assert_close(y, naive_moe(moe, x), rtol=1e-5, atol=1e-5)


def test_uniform_bias_shift_changes_nothing():
    """Adding the same constant to every expert's bias keeps the selection, and the weights ignore the bias."""
    moe = make_moe(top_k=2)
    moe.eval()
    torch.manual_seed(3)
    x = torch.randn(2, 9, D_MODEL)
    with torch.no_grad():
        y1, _ = moe(x)
        moe.router.expert_bias += 5.0
        y2, _ = moe(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-6)


def test_bias_update_direction_and_reset():
    moe = make_moe(top_k=2, bias_update_rate=0.01)
    moe.train()
    torch.manual_seed(4)
    x = torch.randn(4, 16, D_MODEL)
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.tensor([0.4, 0.0, 0.0, -0.3, 0.0, 0.1]))  # make the load uneven
        idx, _, _, _ = moe.router(x.reshape(-1, D_MODEL))
        expected_counts = torch.bincount(idx.flatten(), minlength=6).float()
        moe(x)
        torch.testing.assert_close(moe.tokens_per_expert, expected_counts)
        assert moe.tokens_per_expert.sum().item() == x.shape[0] * x.shape[1] * 2
        moe(x)  # counts accumulate over forwards until the update
        torch.testing.assert_close(moe.tokens_per_expert, 2 * expected_counts)
    counts = moe.tokens_per_expert.clone()
    assert counts.max() > counts.min(), "test needs an uneven load"
    before = moe.router.expert_bias.clone()
    moe.update_expert_bias()
    delta = moe.router.expert_bias - before
    mean = counts.mean()
    assert (delta[counts < mean] > 0).all()
    assert (delta[counts > mean] < 0).all()
    assert (delta[counts == mean] == 0).all()
    torch.testing.assert_close(delta.abs()[counts != mean], torch.full_like(delta[counts != mean], 0.01))
    assert (moe.tokens_per_expert == 0).all()
    # A second update with no new tokens changes nothing.
    after = moe.router.expert_bias.clone()
    moe.update_expert_bias()
    torch.testing.assert_close(moe.router.expert_bias, after, rtol=0, atol=0)


def test_bias_update_with_external_counts():
    moe = make_moe(bias_update_rate=0.5)
    counts = torch.tensor([10.0, 0.0, 5.0, 5.0, 5.0, 5.0])  # mean 5
    moe.update_expert_bias(counts)
    torch.testing.assert_close(moe.router.expert_bias, torch.tensor([-0.5, 0.5, 0.0, 0.0, 0.0, 0.0]))


def test_no_counting_in_eval_mode_and_no_update_when_disabled():
    moe = make_moe()
    moe.eval()
    torch.manual_seed(5)
    x = torch.randn(2, 8, D_MODEL)
    with torch.no_grad():
        moe(x)
    assert (moe.tokens_per_expert == 0).all()
    before = moe.router.expert_bias.clone()
    moe.update_expert_bias()
    torch.testing.assert_close(moe.router.expert_bias, before, rtol=0, atol=0)

    frozen = make_moe(bias_update_rate=0.0)
    frozen.train()
    with torch.no_grad():
        frozen(x)
    assert frozen.tokens_per_expert.sum() > 0
    frozen.update_expert_bias()
    assert (frozen.router.expert_bias == 0).all()
    assert (frozen.tokens_per_expert == 0).all()


def test_expert_bias_is_a_buffer_not_a_parameter():
    moe = make_moe()
    names = {n for n, _ in moe.named_parameters()}
    assert not any("expert_bias" in n for n in names)
    assert "router.expert_bias" in moe.state_dict()
    assert "tokens_per_expert" not in moe.state_dict()


@pytest.mark.parametrize("aux,z", [(0.01, 0.0), (0.0, 1e-3), (0.01, 1e-3)])
def test_aux_and_z_loss(aux, z):
    moe = make_moe(aux_loss_coeff=aux, z_loss_coeff=z)
    moe.train()
    torch.manual_seed(6)
    x = torch.randn(3, 10, D_MODEL)
    _, loss = moe(x)
    assert loss.dim() == 0 and loss.item() > 0
    # Value against the formulas.
    with torch.no_grad():
        logits = x.reshape(-1, D_MODEL) @ moe.router.gate.weight.T
        scores = logits.sigmoid()
        idx = (scores + moe.router.expert_bias).topk(2).indices
        frac = torch.bincount(idx.flatten(), minlength=6).float() / idx.numel()
        prob = (scores / scores.sum(-1, keepdim=True)).mean(0)
        expected = aux * 6 * (frac * prob).sum() + z * torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-8)
    (grad,) = torch.autograd.grad(loss, moe.router.gate.weight)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


def test_aux_loss_zero_when_disabled():
    moe = make_moe(aux_loss_coeff=0.0, z_loss_coeff=0.0)
    moe.train()
    torch.manual_seed(7)
    _, loss = moe(torch.randn(2, 5, D_MODEL))
    assert loss.item() == 0.0
    assert not loss.requires_grad


def test_gradients_reach_every_used_expert():
    moe = make_moe(top_k=2)
    moe.train()
    torch.manual_seed(8)
    with torch.no_grad():
        moe.router.expert_bias[5] = -100.0  # expert 5 never chosen
    x = torch.randn(4, 12, D_MODEL, requires_grad=True)
    y, _ = moe(x)
    counts = moe.tokens_per_expert.clone()
    assert counts[5] == 0 and (counts[:5] > 0).all()
    y.pow(2).sum().backward()
    for name in ("w1", "w3", "w2"):
        grad = getattr(moe.experts, name).grad
        assert grad is not None
        per_expert = grad.flatten(1).abs().sum(-1)
        assert (per_expert[:5] > 0).all(), f"{name}: an expert with tokens got no gradient"
        assert per_expert[5] == 0
    assert moe.router.gate.weight.grad.abs().max() > 0  # through the routing weights
    assert x.grad.abs().max() > 0


def test_single_token_and_no_token_batches():
    moe = make_moe()
    moe.eval()
    x = torch.randn(1, 1, D_MODEL)
    with torch.no_grad():
        y, _ = moe(x)
    torch.testing.assert_close(y, naive_moe(moe, x), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        y0, _ = moe(torch.randn(2, 0, D_MODEL))
    assert y0.shape == (2, 0, D_MODEL)


def test_fp32_weights_under_bf16_autocast():
    """One process training with train.dtype=bf16 keeps fp32 weights and runs under bf16 autocast: the
    experts then compute in bf16 while the residual stream stays fp32. Forward and backward run, the output
    stays fp32 and is close to the fp32 forward."""
    moe = make_moe(seed=3)
    x = torch.randn(2, 16, moe.router.gate.in_features)
    ref, _ = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = moe(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=5e-2, atol=5e-2)
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in moe.experts.parameters())


def test_combine_is_independent_of_the_slot_order():
    """The combine gathers each token's k outputs back and sums them in k order: the same bits whatever
    order the slots arrive in (a scatter-add on CUDA adds them in the order its atomics land)."""
    from pretrain.model.ffn import combine_top_k

    g = torch.Generator().manual_seed(0)
    tokens, k, d = 64, 4, 32
    outs = torch.randn(tokens, k, d, generator=g)  # the output of slot (token, j)
    weights = torch.rand(tokens, k, generator=g)
    expected = (outs * weights[..., None]).sum(1)
    for seed in range(3):
        order = torch.randperm(tokens * k, generator=torch.Generator().manual_seed(seed))
        got = combine_top_k(outs.reshape(-1, d)[order], order, weights, dtype=torch.float32)
        assert torch.equal(got, expected), seed


def test_router_scores_are_fp32_under_bf16_autocast():
    """Top-k is chosen from fp32 scores: bf16-rounded scores would hide the expert bias's 1e-3 steps."""
    moe = make_moe(seed=5)
    x = torch.randn(256, moe.router.gate.in_features)
    with torch.no_grad():
        ref = moe.router(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = moe.router(x)
    assert got[2].dtype == torch.float32
    assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_token_copies_and_combine_backward_equal_plain_indexing(k):
    """The MoE's gathers (each token's k copies in expert order, and back) have gather-only backwards
    (_GatherRows): their gradients equal autograd's for plain indexing, bit for bit at k <= 2 (a sum of two
    is the same either way round) and to rounding at k = 3 (the k copies summed in slot order)."""
    from pretrain.model.ffn import _GatherRows, combine_top_k, slots_of

    g = torch.Generator().manual_seed(k)
    tokens, d = 50, 16
    flat = torch.randn(tokens, d, generator=g, requires_grad=True)
    order = torch.randperm(tokens * k, generator=g)
    weights = torch.rand(tokens, k, generator=g)
    grad = torch.randn(tokens, d, generator=g)

    def plain(x):
        copies = x[order // k]
        per_token = copies[slots_of(order)].view(tokens, k, d)
        return (per_token * weights[..., None]).sum(1)

    def ours(x):
        slots = slots_of(order)
        return combine_top_k(_GatherRows.apply(x, order // k, slots, k), order, weights, dtype=x.dtype, slots=slots)

    (want,), (got,) = (torch.autograd.grad(f(flat), [flat], grad) for f in (plain, ours))
    assert torch.equal(ours(flat), plain(flat))
    if k <= 2:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
