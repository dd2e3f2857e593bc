"""FlexAttention under a DocumentMask: the backend choice, and agreement with the SDPA block path.

The CPU runs FlexAttention forward only (no backward), so here the flex path's forward is compared with one SDPA
call under DocumentMask.dense(); forward, backward and memory on CUDA are checked by the tests that skip here.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import AttentionConfig
from pretrain.model import mixers
from pretrain.model.mixers import DocumentMask, attention_backend

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
no_compile_warning = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def assert_close(actual, expected, tol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(1.0, expected.abs().max().item()))


def packed_docs(q_offset: int, q_len: int, seed: int = 0) -> torch.Tensor:
    """docs [3, q_offset + q_len], a different layout per row: random short documents opening mid-document;
    one long document across several 128-token flex blocks (and across q_offset); documents starting exactly
    on block boundaries, with one-token documents."""
    total = q_offset + q_len
    g = torch.Generator().manual_seed(seed)
    starts = torch.zeros(3, total, dtype=torch.bool)
    starts[0] = torch.rand(total, generator=g) < 0.03
    starts[0, 0] = False
    starts[1, [i for i in (0, 10, total - 5) if 0 <= i < total]] = True
    starts[2, ::128] = True
    starts[2, [i for i in (1, 129, total - 1) if i < total]] = True
    return starts.long().cumsum(-1)


def qkv(batch, heads, kv_heads, q_len, total, head_dim, *, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = ((batch, heads, q_len, head_dim), (batch, kv_heads, total, head_dim), (batch, kv_heads, total, head_dim))
    return [torch.randn(shape, generator=g, device=device, dtype=dtype) for shape in shapes]


# ---- the choice of kernel --------------------------------------------------------------------------------------


def test_attention_backend_is_flex_on_cuda_and_blocks_elsewhere(monkeypatch):
    monkeypatch.delenv(mixers.ATTENTION_ENV, raising=False)
    assert attention_backend(torch.device("cpu")) == "blocks"
    assert attention_backend(torch.device("cuda")) == "flex"
    assert attention_backend(torch.device("cuda", 1), head_dim=64, group=4) == "flex"
    assert attention_backend("cuda:0") == "flex"
    # Triton's flex kernels: head_dim >= 16, and a power-of-2 number of query heads per KV head.
    assert attention_backend(torch.device("cuda"), head_dim=8) == "blocks"
    assert attention_backend(torch.device("cuda"), group=3) == "blocks"
    monkeypatch.setattr(mixers, "_flex_module", lambda: None)  # a torch without FlexAttention
    assert attention_backend(torch.device("cuda")) == "blocks"


def test_attention_backend_env_override(monkeypatch):
    monkeypatch.setenv(mixers.ATTENTION_ENV, "blocks")
    assert attention_backend(torch.device("cuda")) == "blocks"
    monkeypatch.setenv(mixers.ATTENTION_ENV, "flex")
    assert attention_backend(torch.device("cpu")) == "flex"
    monkeypatch.setenv(mixers.ATTENTION_ENV, "math")
    with pytest.raises(ValueError, match=mixers.ATTENTION_ENV):
        attention_backend(torch.device("cpu"))


def test_attend_rejects_an_unknown_backend():
    q, k, v = qkv(1, 2, 2, 4, 4, 8)
    with pytest.raises(ValueError, match="backend"):
        DocumentMask(None, 0, 4, "cpu").attend(q, k, v, backend="math")


# ---- the flex path equals the reference on the CPU (forward) ---------------------------------------------------

CASES = {  # name: (q_offset, q_len, documents or None); 4 query heads over 2 KV heads
    "one_slice": (0, 300, True),
    "cp_slice": (200, 180, True),  # queries at 200..379 over keys 0..379; the offset is not a block multiple
    "cp_slice_one_document": (130, 100, False),
    "one_query": (0, 1, True),
    "odd_length": (0, 63, True),
    "long": (0, 1000, True),
}


@no_compile_warning
@pytest.mark.parametrize("name", list(CASES))
def test_flex_forward_equals_dense_sdpa_on_cpu(name):
    q_offset, q_len, with_docs = CASES[name]
    total = q_offset + q_len
    docs = packed_docs(q_offset, q_len) if with_docs else None
    batch = 3 if with_docs else 2  # one document: the mask broadcasts over the rows
    mask = DocumentMask(docs, q_offset, q_len, device="cpu")
    q, k, v = qkv(batch, 4, 2, q_len, total, 16)
    with torch.no_grad():
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(), enable_gqa=True)
        got = mask.attend(q, k, v, enable_gqa=True, backend="flex")
        blocks = mask.attend(q, k, v, enable_gqa=True, backend="blocks")
    assert got.shape == want.shape == (batch, 4, q_len, 16)
    assert_close(got, want)
    assert_close(blocks, want)


def test_block_mask_keeps_exactly_the_blocks_the_dense_mask_touches():
    """Built once per DocumentMask; a 128 x 128 block is kept iff some query in it sees some key in it, so
    blocks above the diagonal and before a document's start are skipped."""
    q_offset, q_len = 200, 180
    mask = DocumentMask(packed_docs(q_offset, q_len), q_offset, q_len)
    block_mask = mask.block_mask()
    assert mask.block_mask() is block_mask
    assert block_mask.shape == (3, 1, q_len, q_offset + q_len)
    dense = F.pad(mask.dense(), (0, -(q_offset + q_len) % 128, 0, -q_len % 128))  # [3, 1, 256, 384]
    touched = dense.unflatten(-1, (-1, 128)).unflatten(-3, (-1, 128)).any(-1).any(-2)  # [3, 1, 2, 3]
    assert torch.equal(block_mask.to_dense().bool(), touched)
    assert not touched.all()


@pytest.mark.slow
def test_compiled_flex_on_cpu_equals_dense_sdpa():
    """The compiled flex_attention the CUDA path uses traces the mask_mod (captured document ids, a query
    offset); the CPU compiles it with Inductor's C++ template (about half a minute)."""
    q_offset, q_len = 37, 200
    docs = packed_docs(q_offset, q_len, seed=1)
    mask = DocumentMask(docs, q_offset, q_len)
    q, k, v = qkv(3, 4, 2, q_len, q_offset + q_len, 16, seed=1)
    with torch.no_grad():
        got = mixers._compiled_flex_attention()(q, k, v, block_mask=mask.block_mask(), enable_gqa=True)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(), enable_gqa=True)
    assert_close(got, want)


# ---- inside the attention mixer -------------------------------------------------------------------------------

ATTENTION = AttentionConfig(heads=4, kv_heads=2, head_dim=16)


def attention_mixer(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return mixers.AttentionMixer(64, ATTENTION).to(device)


def test_attention_layers_of_one_forward_share_the_document_mask():
    doc_start = packed_docs(0, 50)[:2].diff(dim=-1, prepend=torch.full((2, 1), -1)) > 0
    first = mixers.local_attention_layout(doc_start, 2, 50, "cpu")
    assert mixers.local_attention_layout(doc_start, 2, 50, torch.device("cpu")) is first
    assert mixers.local_attention_layout(doc_start.clone(), 2, 50, "cpu") is not first  # another tensor
    doc_start[0, 7] = ~doc_start[0, 7]  # the same tensor, changed in place
    changed = mixers.local_attention_layout(doc_start, 2, 50, "cpu")
    assert changed is not first
    assert torch.equal(changed[1].docs, doc_start.long().cumsum(-1))
    # The context-parallel layout without documents (a causal mask at an offset) is shared by its key alone.
    def build():
        return DocumentMask(None, 32, 16, "cpu")

    shared = mixers.shared_layout(None, ("cp", 2, 16), build)
    assert mixers.shared_layout(None, ("cp", 2, 16), build) is shared
    assert mixers.shared_layout(None, ("cp", 2, 17), build) is not shared


@no_compile_warning
def test_mixer_with_flex_equals_mixer_with_blocks_on_cpu(monkeypatch):
    """LIQUID_ATTENTION=flex sends the mixer's DocumentMask through flex_attention; calls with the same
    doc_start (the attention layers of one forward) build one block mask."""
    mixer = attention_mixer()
    x = torch.randn(3, 300, 64, generator=torch.Generator().manual_seed(2))
    doc_start = packed_docs(0, 300).diff(dim=-1, prepend=torch.full((3, 1), -1)) > 0
    module = mixers._flex_module()
    built, create = [], module.create_block_mask
    monkeypatch.setattr(module, "create_block_mask", lambda *a, **kw: built.append(a) or create(*a, **kw))
    with torch.no_grad():
        monkeypatch.setenv(mixers.ATTENTION_ENV, "blocks")
        want = mixer(x, doc_start=doc_start)
        monkeypatch.setenv(mixers.ATTENTION_ENV, "flex")
        got, again = mixer(x, doc_start=doc_start), mixer(x, doc_start=doc_start)
    assert_close(got, want)
    assert torch.equal(again, got)
    assert len(built) == 1


# ---- CUDA: forward, backward and memory (skipped without a GPU) -------------------------------------------------


def forward_backward(mask, q, k, v, dout, backend):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = mask.attend(q, k, v, enable_gqa=True, backend=backend)
    out.backward(dout)
    return [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_offset, q_len", [(0, 4096), (2048, 2048), (200, 380)])
def test_flex_forward_backward_equal_blocks_on_cuda(dtype, q_offset, q_len):
    """32 query / 8 KV heads, head_dim 64, as in the 8B presets. fp32: flex equals the block path. bf16:
    flex's error against the fp32 result is about the block path's own bf16 error (a wrong mask errs by
    the whole scale)."""
    device = torch.device("cuda")
    docs = packed_docs(q_offset, q_len).to(device)
    mask = DocumentMask(docs, q_offset, q_len)
    q, k, v = qkv(3, 32, 8, q_len, q_offset + q_len, 64, device=device)
    dout = torch.randn(3, 32, q_len, 64, device=device)
    want = forward_backward(mask, q, k, v, dout, "blocks")  # fp32
    if dtype == torch.float32:
        for got, ref in zip(forward_backward(mask, q, k, v, dout, "flex"), want):
            assert_close(got, ref, tol=2e-4)
        return
    low = [t.to(dtype) for t in (q, k, v, dout)]
    flex, blocks = forward_backward(mask, *low, "flex"), forward_backward(mask, *low, "blocks")
    for got, base, ref in zip(flex, blocks, want):
        scale = ref.abs().max().item()
        assert (got - ref).abs().max().item() <= 2 * (base - ref).abs().max().item() + 1e-2 * scale


@needs_cuda
def test_flex_saves_far_less_than_the_math_backend_on_cuda():
    """One attention layer at 4096 tokens (32 / 8 heads, head_dim 64, bf16): what the forward keeps for
    backward, and the peak over forward and backward, against the block path on SDPA's math backend (where
    a boolean mask with GQA sends it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = torch.device("cuda")
    starts = torch.zeros(1, 4096, dtype=torch.bool)
    starts[0, [0, 1000, 3000]] = True  # the middle document crosses the 2048-query block boundary
    mask = DocumentMask(starts.long().cumsum(-1).to(device), 0, 4096)
    q, k, v = qkv(1, 32, 8, 4096, 4096, 64, device=device, dtype=torch.bfloat16)
    dout = torch.randn(1, 32, 4096, 64, device=device, dtype=torch.bfloat16)
    mask.block_mask()  # built once per forward for every layer, outside this layer's cost
    torch._dynamo.reset()  # earlier tests may have spent the recompile limit (then flex would run uncompiled)
    use = {}
    for backend in ("flex", "blocks", "flex"):  # the first flex run compiles
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with sdpa_kernel(SDPBackend.MATH) if backend == "blocks" else contextlib.nullcontext():
            out = mask.attend(qq, kk, vv, enable_gqa=True, backend=backend)
        saved = torch.cuda.memory_allocated() - base  # the output and what autograd keeps for backward
        out.backward(dout)
        torch.cuda.synchronize()
        use[backend] = (saved, torch.cuda.max_memory_allocated() - base)
        del out, qq, kk, vv
    (flex_saved, flex_peak), (blocks_saved, blocks_peak) = use["flex"], use["blocks"]
    out_bytes = 32 * 4096 * 64 * 2
    assert blocks_saved > 1 << 30, use  # the math backend keeps fp32 probabilities: GiBs
    assert flex_saved < 2 * out_bytes, use  # the output and its log-sum-exp
    assert flex_peak < blocks_peak / 4, use


@needs_cuda
def test_attention_mixer_uses_flex_on_cuda_and_matches_blocks(monkeypatch):
    monkeypatch.delenv(mixers.ATTENTION_ENV, raising=False)
    device = torch.device("cuda")
    assert attention_backend(device, head_dim=ATTENTION.head_dim, group=2) == "flex"
    mixer = attention_mixer(device=device)
    x = torch.randn(3, 300, 64, device=device)
    doc_start = (packed_docs(0, 300).diff(dim=-1, prepend=torch.full((3, 1), -1)) > 0).to(device)

    def run():
        mixer.zero_grad()
        y = mixer(x, doc_start=doc_start)
        y.square().sum().backward()
        return [y.detach()] + [p.grad.clone() for p in mixer.parameters()]

    got = run()
    monkeypatch.setenv(mixers.ATTENTION_ENV, "blocks")
    for a, b in zip(got, run()):
        assert_close(a, b, tol=2e-4)
