"""The element-wise path of liquid_scan (key_dim 1: one decay per head, a scalar state per channel)
against the token-by-token reference: values, final state and gradients, with resets, initial states,
padding to the chunk length, recomputation, bf16 inputs and context-parallel-style state passing."""
from __future__ import annotations

import pytest
import torch

from pretrain.model import scan as scan_module
from pretrain.model.scan import liquid_scan, liquid_scan_reference
from tests.model.test_scan import (assert_close, check_against_reference, make_inputs, results_at_thread_counts,
                                   run_with_grads)

from pretrain.model import scan_cpu


@pytest.fixture(autouse=True, params=["cpu_kernel", "pytorch"])
def form(request, monkeypatch):
    """Every test runs both forms of the element-wise scan on the CPU: the fused C++ loop (scan_cpu) and the
    PyTorch form (_ElementwiseScan, the fallback where no compiler is found, and the form on other devices)."""
    if request.param == "cpu_kernel":
        if not scan_cpu.available():
            pytest.skip("the CPU scan kernel did not build here (see the warning)")
        assert scan_module._cpu_kernel() is scan_cpu.ElementwiseScanCPU
    else:
        monkeypatch.setattr(scan_module, "_cpu_kernel", lambda chunked=False: None)
    return request.param


def test_key_dim_1_takes_the_elementwise_path(monkeypatch):
    calls = []
    real = scan_module._liquid_scan_elementwise
    monkeypatch.setattr(scan_module, "_liquid_scan_elementwise", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, ld, _ = make_inputs(1, 20, 2, 1, 3)
    liquid_scan(q, k, v, ld)
    assert calls == [1]
    q, k, v, ld, _ = make_inputs(1, 20, 2, 2, 3)
    liquid_scan(q, k, v, ld)  # key_dim 2: the chunked matmul form
    assert calls == [1]


# Lengths below, at and across the chunk length (8 at these lengths, 16 at 300, 64 at 4096), with and
# without an initial state, with resets at chunk starts, ends and inside.
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("seq", [1, 7, 8, 9, 16, 37, 300])
def test_matches_reference(seq, with_state):
    check_against_reference(*make_inputs(2, seq, 3, 1, 5, with_state=with_state, reset_prob=0.1, seed=seq), 64)


@pytest.mark.parametrize("channels", [(2048, 1), (4, 128)], ids=["2048x1", "4x128"])
def test_matches_reference_wide_and_narrow(channels):
    heads, p = channels
    check_against_reference(*make_inputs(1, 70, heads, 1, p, with_state=True, resets=(0, 15, 16, 31, 63)), 64)


@pytest.mark.parametrize("p", [1, 6])
@pytest.mark.parametrize("block", [1, 16, 64, 4096])
def test_backward_products_by_blocks_of_positions(monkeypatch, block, p):
    """The backward's products (_products_p1_ at P = 1, the channel sums _channel_sums_ at P > 1) run a
    block of positions at a time: blocks of one position, blocks that divide the length, that leave a
    remainder (70 and the 69 of the shifted product), and one block for the whole length."""
    monkeypatch.setattr(scan_module, "BLOCK_ELEMENTS", block * 2 * 3 * p)  # batch 2, 3 heads
    assert scan_module._block_len(torch.empty(2, 70, 3, p)) == block
    check_against_reference(*make_inputs(2, 70, 3, 1, p, with_state=True, resets=(0, 33), seed=block), 64)


def test_every_token_a_reset_and_reset_drops_initial_state():
    q, k, v, ld, init = make_inputs(1, 24, 2, 1, 3, with_state=True)
    ld[:] = float("-inf")
    check_against_reference(q, k, v, ld, init, 64)
    y, _ = liquid_scan(q, k, v, ld, initial_state=init)
    assert_close(y, q * k * v)  # every state is k_t v_t alone


def test_recompute_matches():
    inputs = make_inputs(2, 50, 3, 1, 4, with_state=True, reset_prob=0.1)
    plain = run_with_grads(liquid_scan, *inputs, 64)
    recomputed = run_with_grads(lambda *a, **kw: liquid_scan(*a, recompute=True, **kw), *inputs, 64)
    for a, b in zip([plain[0], plain[1], *plain[2]], [recomputed[0], recomputed[1], *recomputed[2]]):
        assert torch.equal(a, b)


def test_bf16_inputs_keep_float32_state_and_accumulation():
    q, k, v, ld, _ = make_inputs(1, 40, 2, 1, 4)
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    y, state = liquid_scan(qb, kb, vb, ld)
    y_ref, s_ref = liquid_scan_reference(qb.float(), kb.float(), vb.float(), ld)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert_close(state, s_ref)
    torch.testing.assert_close(y.float(), y_ref, rtol=1e-2, atol=1e-2)


def test_halves_with_state_passing_equal_the_whole():
    """What context parallelism relies on: scanning the second half from the first half's final state."""
    q, k, v, ld, init = make_inputs(1, 64, 2, 1, 3, with_state=True, resets=(20,))
    y, s = liquid_scan(q, k, v, ld, initial_state=init)
    y1, s1 = liquid_scan(q[:, :29], k[:, :29], v[:, :29], ld[:, :29], initial_state=init)
    y2, s2 = liquid_scan(q[:, 29:], k[:, 29:], v[:, 29:], ld[:, 29:], initial_state=s1)
    assert_close(torch.cat([y1, y2], 1), y)
    assert_close(s2, s)


def test_long_strong_decay_is_finite():
    q, k, v, ld, _ = make_inputs(1, 4096, 2, 1, 2)
    ld = ld * 20  # decays down to exp(-40) per token: no log-space differences to overflow
    y, s = liquid_scan(q, k, v, ld)
    y_ref, s_ref = liquid_scan_reference(q[:, -300:], k[:, -300:], v[:, -300:], ld[:, -300:])
    assert torch.isfinite(y).all()
    # 200 tokens of decays averaging e^-20 each forget the state before them: a scan of the last 300 alone
    # gives the same last 100 outputs.
    assert_close(y[:, -100:], y_ref[:, -100:])


def test_cpu_kernel_is_independent_of_the_thread_count_and_equals_the_pytorch_form(form, monkeypatch):
    """The kernel splits (batch, head) pairs over torch's threads, each channel in time order in one thread:
    the same bits at 1 and 3 threads; and the PyTorch form's values and gradients to fp32 rounding."""
    if form != "cpu_kernel":
        pytest.skip("a property of the kernel")
    inputs = make_inputs(2, 77, 5, 1, 6, with_state=True, resets=(0, 40))
    one, three = results_at_thread_counts(inputs, 64, (1, 3))
    assert all(torch.equal(a, b) for a, b in zip(one, three))
    monkeypatch.setattr(scan_module, "_cpu_kernel", lambda chunked=False: None)
    y, s, grads = run_with_grads(liquid_scan, *inputs, 64)
    for a, b in zip(one, [y, s, *grads]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cpu_kernel_ops_pass_opcheck_and_compile_in_one_graph(form):
    """The kernel's custom ops (liquid::elementwise_scan and its backward): schema, shape functions and
    autograd registration (torch.library.opcheck), with and without kept states and an initial state; and
    torch.compile traces liquid_scan at key_dim 1 as one graph with eager's values and gradients."""
    if form != "cpu_kernel":
        pytest.skip("a property of the kernel")
    g = torch.Generator().manual_seed(3)
    batch, seq, heads, p = 2, 30, 3, 4
    q, k, ld = torch.randn(batch, seq, heads, generator=g), torch.randn(batch, seq, heads, generator=g), \
        -torch.rand(batch, seq, heads, generator=g)
    v, h0 = torch.randn(batch, seq, heads, p, generator=g), torch.randn(batch, heads, p, generator=g)
    for keep, init in ((True, None), (False, h0)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, ld)]
        torch.library.opcheck(scan_cpu.elementwise_scan, (*leaves, init, keep))
        with torch.no_grad():
            y, final, states = scan_cpu.elementwise_scan(q, k, v, ld, init, keep)
        torch.library.opcheck(scan_cpu.elementwise_scan_backward,
                              (q, k, v, ld, init, states, torch.randn_like(y), torch.randn_like(final),
                               init is not None))

    def loss(q4, k4, v, ld):
        y, s = liquid_scan(q4 * 2, k4, v, ld)
        return (y * 3).sum() + s.sum()

    q4 = q[..., None].clone().requires_grad_()
    eager = loss(q4, k[..., None], v, ld)
    (g_eager,) = torch.autograd.grad(eager, q4)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss)(q4, k[..., None], v, ld)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(loss)(q4, k[..., None], v, ld)
    (g_compiled,) = torch.autograd.grad(compiled, q4)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=0)
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-6, atol=1e-6)
