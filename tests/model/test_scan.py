"""The chunked liquid scan against the token-by-token reference: values, final state and gradients.

Every test runs both CPU forms of the chunked scan: the C++ kernel over torch's sgemm (scan_cpu.ChunkedScanCPU)
and the PyTorch form (the fallback where the kernel cannot build, and the form on GPUs without Triton)."""
from __future__ import annotations

import pytest
import torch

from pretrain.model import scan as scan_module
from pretrain.model import scan_cpu
from pretrain.model.scan import DEFAULT_CHUNK_SIZE, liquid_scan, liquid_scan_reference

NEG_INF = float("-inf")


def _atol(ref: torch.Tensor) -> float:
    return 1e-5 * max(1.0, ref.detach().abs().max().item()) if ref.numel() else 1e-5


def assert_close(actual, expected, rtol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=_atol(expected))


def make_inputs(batch, seq, heads, n, p, *, reset_prob=0.0, resets=(), with_state=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, n, generator=g)
    k = torch.randn(batch, seq, heads, n, generator=g)
    v = torch.randn(batch, seq, heads, p, generator=g)
    # Mix of weak and moderate decays (per-token log decays in [-2, 0]).
    log_decay = -2.0 * torch.rand(batch, seq, heads, generator=g)
    if reset_prob:
        log_decay = log_decay.masked_fill(torch.rand(batch, seq, heads, generator=g) < reset_prob, NEG_INF)
    for pos in resets:
        if 0 <= pos < seq:
            log_decay[:, pos] = NEG_INF
    init = torch.randn(batch, heads, n, p, generator=g) if with_state else None
    return q, k, v, log_decay, init


@pytest.fixture(autouse=True, params=["cpu_kernel", "pytorch"])
def form(request, monkeypatch):
    """The form liquid_scan takes for key_dim > 1 in this test (key_dim 1 keeps its element-wise path)."""
    if request.param == "cpu_kernel":
        if not scan_cpu.chunked_available():
            pytest.skip("the chunked CPU scan kernel is not available here (see the warning)")
        assert scan_module._cpu_kernel(chunked=True) is scan_cpu.ChunkedScanCPU
    else:
        real = scan_module._cpu_kernel
        monkeypatch.setattr(scan_module, "_cpu_kernel", lambda chunked=False: None if chunked else real())
    return request.param


def run_with_grads(fn, q, k, v, log_decay, init, chunk_size, seed=1):
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, log_decay)]
    init_leaf = init.clone().requires_grad_(True) if init is not None else None
    y, state = fn(*leaves, initial_state=init_leaf, chunk_size=chunk_size)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g)
    gs = torch.randn(state.shape, generator=g)
    loss = (y * gy).sum() + (state * gs).sum()
    inputs = leaves + ([init_leaf] if init_leaf is not None else [])
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(inputs, grads)]
    return y.detach(), state.detach(), grads


def results_at_thread_counts(inputs, chunk_size, counts):
    """[y, state, *grads] of liquid_scan (run_with_grads) at each torch thread count in `counts`."""
    threads = torch.get_num_threads()
    out = []
    try:
        for count in counts:
            torch.set_num_threads(count)
            y, s, grads = run_with_grads(liquid_scan, *inputs, chunk_size)
            out.append([y, s, *grads])
    finally:
        torch.set_num_threads(threads)
    return out


def check_against_reference(q, k, v, log_decay, init, chunk_size):
    y, s, grads = run_with_grads(liquid_scan, q, k, v, log_decay, init, chunk_size)
    y_ref, s_ref, grads_ref = run_with_grads(liquid_scan_reference, q, k, v, log_decay, init, chunk_size)
    assert y.shape == y_ref.shape == v.shape
    assert s.shape == s_ref.shape == (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    assert s.dtype == torch.float32
    assert_close(y, y_ref)
    assert_close(s, s_ref)
    names = ["q", "k", "v", "log_decay", "initial_state"]
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert torch.isfinite(g).all(), f"non-finite gradient for {name}"
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=_atol(g_ref), msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("seq", [1, 63, 100, 1000])
def test_matches_reference_default_chunk(seq, with_state):
    torch.manual_seed(0)
    inputs = make_inputs(2, seq, 2, 4, 6, reset_prob=0.03, resets=(0,), with_state=with_state, seed=seq)
    check_against_reference(*inputs, chunk_size=DEFAULT_CHUNK_SIZE)


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("seq", [15, 16, 17, 31, 32, 33, 48])
def test_matches_reference_at_chunk_boundaries(seq, with_state):
    torch.manual_seed(0)
    chunk = 16
    # Resets at position 0, at the last token of a chunk and at the first token of the next one,
    # plus random ones.
    inputs = make_inputs(2, seq, 3, 5, 4, reset_prob=0.05, resets=(0, chunk - 1, chunk, 2 * chunk - 1),
                         with_state=with_state, seed=100 + seq)
    check_against_reference(*inputs, chunk_size=chunk)


@pytest.mark.parametrize("resets", [(), (0,), (7,), (8,), (7, 8), (0, 15, 16, 23, 24, 30)],
                         ids=["none", "first", "chunk_last", "chunk_first", "both_sides", "many"])
def test_reset_placement(resets):
    torch.manual_seed(0)
    inputs = make_inputs(2, 31, 2, 4, 4, resets=resets, with_state=True, seed=7)
    check_against_reference(*inputs, chunk_size=8)


def test_resets_differ_per_batch_and_head():
    torch.manual_seed(0)
    q, k, v, ld, init = make_inputs(2, 40, 3, 4, 4, with_state=True, seed=3)
    ld[0, 5, 0] = NEG_INF
    ld[1, 8, 2] = NEG_INF
    ld[0, 16, 1] = NEG_INF
    ld[1, 39, 0] = NEG_INF
    check_against_reference(q, k, v, ld, init, chunk_size=8)


def test_every_token_a_reset():
    torch.manual_seed(0)
    q, k, v, ld, init = make_inputs(2, 20, 2, 4, 4, with_state=True, seed=5)
    ld.fill_(NEG_INF)
    check_against_reference(q, k, v, ld, init, chunk_size=8)
    # With a reset at every token the state is just k_t v_t^T.
    y, s = liquid_scan(q, k, v, ld, initial_state=init, chunk_size=8)
    expected = torch.einsum("bthn,bthn,bthp->bthp", q, k, v)
    assert_close(y, expected)


def test_reset_drops_initial_state_exactly():
    """A reset at position r: outputs from r on do not depend on anything before r."""
    torch.manual_seed(0)
    q, k, v, ld, init = make_inputs(1, 40, 2, 4, 4, with_state=True, seed=11)
    r = 19
    ld[:, r] = NEG_INF
    y1, s1 = liquid_scan(q, k, v, ld, initial_state=init, chunk_size=8)
    q2, k2, v2, init2 = q.clone(), k.clone(), v.clone(), init * 100
    q2[:, :r] += 1.0
    k2[:, :r] -= 3.0
    v2[:, :r] *= 5.0
    y2, s2 = liquid_scan(q2, k2, v2, ld, initial_state=init2, chunk_size=8)
    torch.testing.assert_close(y1[:, r:], y2[:, r:], rtol=0, atol=1e-6)
    torch.testing.assert_close(s1, s2, rtol=0, atol=1e-6)
    assert not torch.allclose(y1[:, :r], y2[:, :r])


def test_initial_state_equals_sequential_halves():
    torch.manual_seed(0)
    q, k, v, ld, init = make_inputs(2, 87, 2, 4, 6, reset_prob=0.05, with_state=True, seed=13)
    cut = 37  # not a multiple of the chunk size
    y_full, s_full = liquid_scan(q, k, v, ld, initial_state=init, chunk_size=16)
    y1, s1 = liquid_scan(q[:, :cut], k[:, :cut], v[:, :cut], ld[:, :cut], initial_state=init, chunk_size=16)
    y2, s2 = liquid_scan(q[:, cut:], k[:, cut:], v[:, cut:], ld[:, cut:], initial_state=s1, chunk_size=16)
    assert_close(torch.cat([y1, y2], dim=1), y_full)
    assert_close(s2, s_full)
    # Without the carried state the second half differs.
    y2_cold, _ = liquid_scan(q[:, cut:], k[:, cut:], v[:, cut:], ld[:, cut:], chunk_size=16)
    assert not torch.allclose(y2_cold, y_full[:, cut:], atol=1e-3)


def test_result_does_not_depend_on_chunk_size():
    torch.manual_seed(0)
    q, k, v, ld, init = make_inputs(2, 50, 2, 4, 4, reset_prob=0.05, with_state=True, seed=17)
    y_ref, s_ref = liquid_scan_reference(q, k, v, ld, initial_state=init)
    for chunk in (1, 3, 8, 50, 64, 128):
        y, s = liquid_scan(q, k, v, ld, initial_state=init, chunk_size=chunk)
        assert_close(y, y_ref)
        assert_close(s, s_ref)


def test_empty_sequence_reference():
    q, k, v, ld, init = make_inputs(2, 0, 2, 4, 3, with_state=True)
    y, s = liquid_scan_reference(q, k, v, ld, initial_state=init)
    assert y.shape == (2, 0, 2, 3)
    torch.testing.assert_close(s, init)


def test_empty_sequence_chunked():
    q, k, v, ld, init = make_inputs(2, 0, 2, 4, 3, with_state=True)
    y, s = liquid_scan(q, k, v, ld, initial_state=init)
    assert y.shape == (2, 0, 2, 3)
    torch.testing.assert_close(s, init)


def test_bf16_inputs_keep_float32_state():
    torch.manual_seed(0)
    q, k, v, ld, init = make_inputs(2, 40, 2, 4, 4, reset_prob=0.05, seed=19)
    y32, s32 = liquid_scan(q, k, v, ld, chunk_size=16)
    y, s = liquid_scan(q.bfloat16(), k.bfloat16(), v.bfloat16(), ld, chunk_size=16)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    torch.testing.assert_close(y.float(), y32, rtol=5e-2, atol=5e-2 * y32.abs().max().item())


def _prefix_state(q, k, v, ld, end):
    """The chunked scan's state after the first `end` tokens (the state a window starting there enters with)."""
    _, state = liquid_scan(q[:, :end], k[:, :end], v[:, :end], ld[:, :end])
    return state


@pytest.fixture
def one_thread():
    """Thousands of ops on a few numbers each: extra intra-op threads only add hand-offs (on a busy
    2-core machine the 65,536-token scan took 13 s with two threads, 0.3 s with one)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_long_sequence_strong_decay_is_finite_and_exact(one_thread):
    """seq 65536: no overflow/NaN, and windows of the chunked scan's output equal the token-by-token
    reference started from the chunked scan's own state at the window's start.

    Head 0 decays strongly (log_decay ~ -20 per token: the in-chunk cumulative sums reach ~-1300, so any
    exp of an un-differenced sum overflows); head 1 decays mildly (memory of ~100 tokens), so the state
    carried into a window, and across the chunk and group boundaries inside it, shapes its outputs.
    Windows: 1024 tokens from an unaligned start across the group boundary at 32768, and the last 1024
    tokens; each holds a reset away from any boundary."""
    seq, window = 65536, 1024
    g = torch.Generator().manual_seed(23)
    q = torch.randn(1, seq, 2, 2, generator=g)
    k = torch.randn(1, seq, 2, 2, generator=g)
    v = torch.randn(1, seq, 2, 2, generator=g)
    ld = torch.stack([-20.0 + torch.randn(seq, generator=g), -0.02 * torch.rand(seq, generator=g)], dim=-1)[None]
    starts = (seq // 2 - 500, seq - window)  # 32268: not a multiple of the chunk (64) or group (1024) size
    carries = torch.ones(seq, dtype=torch.bool)  # no random reset early in a window: its entering state matters
    for start in starts:
        carries[start:start + 300] = False
    ld = ld.masked_fill((torch.rand(1, seq, 2, generator=g) < 0.001) & carries[None, :, None], NEG_INF)
    ld[:, 0] = NEG_INF
    for start in starts:
        ld[:, start + 300] = NEG_INF
    with torch.no_grad():
        y, s = liquid_scan(q, k, v, ld)
        assert torch.isfinite(y).all() and torch.isfinite(s).all()
        for start in starts:
            end = start + window
            init = _prefix_state(q, k, v, ld, start)
            assert init[:, 1].abs().max() > 0.1  # the mild head carries a state into the window
            y_ref, s_ref = liquid_scan_reference(q[:, start:end], k[:, start:end], v[:, start:end],
                                                 ld[:, start:end], initial_state=init)
            torch.testing.assert_close(y[:, start:end], y_ref, rtol=1e-5, atol=_atol(y_ref),
                                       msg=lambda m: f"window [{start}, {end}): {m}")
        assert_close(s, s_ref)  # the last window ends the sequence


def test_long_sequence_mild_decay_stays_bounded():
    """Long run with decays near 0 (long memory) and a large initial state: finite, matches the reference."""
    g = torch.Generator().manual_seed(29)
    seq = 4096
    q = torch.randn(1, seq, 1, 2, generator=g)
    k = torch.randn(1, seq, 1, 2, generator=g) * 0.1
    v = torch.randn(1, seq, 1, 2, generator=g)
    ld = -0.01 * torch.rand(1, seq, 1, generator=g)
    init = torch.full((1, 1, 2, 2), 1e3)
    with torch.no_grad():
        y, s = liquid_scan(q, k, v, ld, initial_state=init)
        y_ref, s_ref = liquid_scan_reference(q, k, v, ld, initial_state=init)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    # Cumulative log decays reach ~-0.3 inside a chunk; float32 differences keep ~1e-5 relative accuracy.
    assert_close(y, y_ref)
    assert_close(s, s_ref)


@pytest.mark.parametrize("fn", [liquid_scan, liquid_scan_reference], ids=["chunked", "reference"])
def test_shape_errors_name_the_argument(fn):
    q, k, v, ld, init = make_inputs(2, 10, 2, 4, 3, with_state=True)
    with pytest.raises(ValueError, match=r"\bk\b"):
        fn(q, k[..., :3], v, ld)
    with pytest.raises(ValueError, match=r"\bq\b"):
        fn(q[0], k[0], v, ld)
    with pytest.raises(ValueError, match=r"^v must"):
        fn(q, k, v[:, :9], ld)
    with pytest.raises(ValueError, match=r"^v must"):
        fn(q, k, v[..., 0], ld)
    with pytest.raises(ValueError, match=r"^log_decay must"):
        fn(q, k, v, ld[..., :1])
    with pytest.raises(ValueError, match=r"^log_decay must"):
        fn(q, k, v, ld[..., None])
    with pytest.raises(ValueError, match=r"^initial_state must"):
        fn(q, k, v, ld, initial_state=init[..., :2])
    with pytest.raises(ValueError, match=r"^initial_state must"):
        fn(q, k, v, ld, initial_state=init[0])


def test_bad_chunk_size():
    q, k, v, ld, _ = make_inputs(1, 4, 1, 2, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        liquid_scan(q, k, v, ld, chunk_size=0)


def test_recompute_matches_plain_chunked_scan_outputs_and_grads():
    """recompute=True (groups recomputed in backward) gives the same values and gradients."""
    import pretrain.model.scan as scan_mod

    torch.manual_seed(3)
    old = scan_mod.GROUP_TOKENS
    scan_mod.GROUP_TOKENS = 32  # several groups at a small size
    try:
        results = []
        for recompute in (False, True):
            torch.manual_seed(3)
            q, k, v, ld, init = make_inputs(2, 150, 2, 4, 5, reset_prob=0.05, with_state=True, seed=7)
            leaves = [t.requires_grad_() for t in (q, k, v, ld, init)]
            y, s = liquid_scan(q, k, v, ld, initial_state=init, chunk_size=16, recompute=recompute)
            grads = torch.autograd.grad((y * y).sum() + s.sum(), leaves)
            results.append((y, s, *grads))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    finally:
        scan_mod.GROUP_TOKENS = old


def _kernel_only(form):
    if form != "cpu_kernel":
        pytest.skip("a property of the CPU kernel")


def test_cpu_kernel_is_independent_of_the_thread_count_and_equals_the_pytorch_form(form, monkeypatch):
    """The kernel splits (batch, head) pairs over torch's threads, each pair's chunks in order in one thread
    (heads in groups of scan_cpu's HEAD_GROUP): the same bits at 1 and 3 threads, and the PyTorch form's
    values and gradients to fp32 rounding. 2 x 11 heads: a group of 8 and one of 3 at one thread, uneven
    ranges across a batch boundary at three; 93 tokens: a short last chunk; resets and an initial state."""
    _kernel_only(form)
    inputs = make_inputs(2, 93, 11, 6, 5, reset_prob=0.03, with_state=True, resets=(0, 40))
    one, three = results_at_thread_counts(inputs, 16, (1, 3))
    assert all(torch.equal(a, b) for a, b in zip(one, three))
    monkeypatch.setattr(scan_module, "_cpu_kernel", lambda chunked=False: None)
    y, s, grads = run_with_grads(liquid_scan, *inputs, 16)
    for a, b in zip(one, [y, s, *grads]):
        assert_close(a, b)


def _cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


@pytest.mark.parametrize("chunk,seq", [(64, 149), (48, 159), (32, 99)])
def test_cpu_kernel_register_tiles_match_the_reference(form, chunk, seq):
    """Key and value widths that are multiples of 16 (as the presets' 64 and 128) take the kernel's own AVX-512
    register tiles for every product of a full chunk (32- and 16-column panels, 8-row tiles); the short last
    chunk (21, 15 or 3 tokens) leaves 5, 7 or 3 rows after the 8-row tiles, and its q k^T (n = 21, 15, 3) takes
    torch's sgemm. Values, final state and gradients against the token-by-token reference, with resets and an
    initial state; the same bits at 1 and 3 threads. On an AVX-512 machine the tiles must be built."""
    _kernel_only(form)
    if _cpu_has_avx512():
        assert scan_cpu.register_tiles()
    inputs = make_inputs(2, seq, 3, 16, 48, reset_prob=0.03, resets=(0, chunk - 1, chunk), with_state=True,
                         seed=chunk)
    check_against_reference(*inputs, chunk_size=chunk)
    one, three = results_at_thread_counts(inputs, chunk, (1, 3))
    assert all(torch.equal(a, b) for a, b in zip(one, three))


def test_cpu_kernel_reads_views_of_a_projection_in_place(form):
    """q, k, v and log_decay as strided views of one projection's output (as a mixer slices them) give the
    same bits as contiguous copies, and their gradients reach the projection."""
    _kernel_only(form)
    g = torch.Generator().manual_seed(5)
    batch, seq, heads, n, p = 2, 70, 3, 4, 6
    proj = torch.randn(batch, seq, heads, 2 * n + p + 2, generator=g).requires_grad_()
    q, k, v = proj[..., :n], proj[..., n:2 * n], proj[..., 2 * n:2 * n + p]
    ld = (-torch.nn.functional.softplus(proj[..., -2:]))[..., 0]  # a decay gate of stride 2
    assert not q.is_contiguous() and not ld.is_contiguous()
    y, s = liquid_scan(q, k, v, ld, chunk_size=16)
    (y.square().sum() + s.sum()).backward()
    copies = [t.detach().contiguous().requires_grad_() for t in (q, k, v, ld)]
    y2, s2 = liquid_scan(*copies, chunk_size=16)
    (y2.square().sum() + s2.sum()).backward()
    assert torch.equal(y, y2) and torch.equal(s, s2)
    assert torch.equal(proj.grad[..., :n], copies[0].grad) and torch.equal(proj.grad[..., n:2 * n], copies[1].grad)
    assert torch.equal(proj.grad[..., 2 * n:2 * n + p], copies[2].grad)


def test_without_torch_sgemm_the_pytorch_form_runs_with_one_warning(form, monkeypatch):
    """Where torch exports no usable sgemm (another BLAS, another platform) the chunked kernel is not used:
    one warning says why and liquid_scan takes the PyTorch form, still equal to the reference."""
    _kernel_only(form)
    monkeypatch.setattr(scan_cpu, "_sgemm", lambda: (None, "torch's CPU library exports no sgemm_ (test)"))
    monkeypatch.setattr(scan_module, "_CPU_KERNELS", {})  # decided again, in this test only
    with pytest.warns(RuntimeWarning, match="exports no sgemm_"):
        assert scan_module._cpu_kernel(chunked=True) is None
    check_against_reference(*make_inputs(1, 40, 2, 3, 4, reset_prob=0.05, with_state=True), 16)


def test_cpu_kernel_ops_pass_opcheck(form):
    """The kernel's custom ops (liquid::chunked_scan and its backward): schema, shape functions under fake
    tensors, autograd registration (torch.library.opcheck), with and without an initial state."""
    _kernel_only(form)
    for with_state in (False, True):
        q, k, v, ld, init = make_inputs(1, 37, 2, 3, 4, reset_prob=0.05, with_state=with_state)
        leaves = [t.requires_grad_() for t in (q, k, v, ld)]
        torch.library.opcheck(scan_cpu.chunked_scan, (*leaves, init, 16))
        with torch.no_grad():
            y, final, states = scan_cpu.chunked_scan(q, k, v, ld, init, 16)
        # (no double backward: the backward op's own inputs do not require gradients)
        torch.library.opcheck(scan_cpu.chunked_scan_backward,
                              (*(t.detach() for t in leaves), states, torch.randn_like(y), torch.randn_like(final),
                               with_state, 16))


def test_cpu_kernel_compiles_in_one_graph_like_eager(form):
    """torch.compile traces liquid_scan with the kernel as one op (no graph break) and gives eager's values
    and gradients to fp32 rounding."""
    _kernel_only(form)

    def loss(q, k, v, ld):
        y, s = liquid_scan(q * 2, k, v, ld, chunk_size=16)
        return (y * 3).sum() + s.sum()

    q, k, v, ld, _ = make_inputs(1, 50, 2, 4, 8, reset_prob=0.05)
    q.requires_grad_()
    eager = loss(q, k, v, ld)
    (g_eager,) = torch.autograd.grad(eager, q)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss)(q, k, v, ld)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(loss)(q, k, v, ld)
    (g_compiled,) = torch.autograd.grad(compiled, q)
    # (inductor sums the loss in another order: equal to fp32 rounding)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=0)
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-6, atol=1e-6)
