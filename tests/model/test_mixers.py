"""Sequence mixers: document isolation in packed rows, causality, per-token dt and step/forward agreement."""
from __future__ import annotations

import pytest
import torch

from pretrain.config import AttentionConfig, LiquidConfig, ModelConfig
from pretrain.model.mixers import MIXERS, build_mixer

D_MODEL = 16
DOC_LENGTHS = (5, 13, 1, 20)  # 39 tokens; with chunk_size 8 the boundaries fall inside chunks

CFG = ModelConfig(
    d_model=D_MODEL,
    conv_kernel=3,
    liquid=LiquidConfig(heads=2, key_dim=4, value_dim=4, chunk_size=8, conv_kernel=3, tau_min=1.0, tau_max=64.0),
    attention=AttentionConfig(heads=4, kv_heads=2, head_dim=4),
)


def make_mixer(kind, cfg=CFG, seed=0):
    torch.manual_seed(seed)
    mixer = build_mixer(kind, D_MODEL, cfg)
    mixer.eval()
    return mixer


def assert_close(actual, expected, rtol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-5 * max(1.0, expected.abs().max().item()))


def doc_start_for(lengths, first_is_start=True):
    ds = torch.zeros(sum(lengths), dtype=torch.bool)
    offset = 0
    for i, n in enumerate(lengths):
        if i > 0 or first_is_start:
            ds[offset] = True
        offset += n
    return ds


def run_separately(mixer, x_row, lengths, *, flag_start):
    """x_row [1, seq, d] -> each document run on its own, concatenated; flag_start marks its first token."""
    outs, offset = [], 0
    for n in lengths:
        piece = x_row[:, offset:offset + n]
        ds = None
        if flag_start:
            ds = torch.zeros(1, n, dtype=torch.bool)
            ds[0, 0] = True
        outs.append(mixer(piece, doc_start=ds))
        offset += n
    return torch.cat(outs, dim=1)


def test_build_mixer_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown mixer kind"):
        build_mixer("lstm", D_MODEL, CFG)


@pytest.mark.parametrize("kind", MIXERS)
def test_packed_documents_equal_separate_runs_flagged(kind):
    """Packed row with doc_start == each document run alone with its first token flagged as a start."""
    mixer = make_mixer(kind)
    torch.manual_seed(1)
    seq = sum(DOC_LENGTHS)
    x = torch.randn(2, seq, D_MODEL)
    # Row 0 starts with a document; row 1 starts mid-document (first token not a start) with other lengths.
    lengths_1 = (7, 2, 9, 21)
    ds = torch.stack([doc_start_for(DOC_LENGTHS), doc_start_for(lengths_1, first_is_start=False)])
    with torch.no_grad():
        packed = mixer(x, doc_start=ds)
        sep0 = run_separately(mixer, x[:1], DOC_LENGTHS, flag_start=True)
        # Row 1: the first piece is a continuation, so run it without a flag; the rest are flagged.
        first = mixer(x[1:, :lengths_1[0]])
        rest = run_separately(mixer, x[1:, lengths_1[0]:], lengths_1[1:], flag_start=True)
    assert_close(packed[:1], sep0)
    assert_close(packed[1:], torch.cat([first, rest], dim=1))


@pytest.mark.parametrize("kind", MIXERS)
def test_packed_documents_equal_separate_runs(kind):
    """Packed row with doc_start == each document run alone with no doc_start, concatenated."""
    mixer = make_mixer(kind)
    torch.manual_seed(1)
    seq = sum(DOC_LENGTHS)
    x = torch.randn(2, seq, D_MODEL)
    ds = doc_start_for(DOC_LENGTHS).expand(2, seq)
    with torch.no_grad():
        packed = mixer(x, doc_start=ds)
        separate = torch.cat([run_separately(mixer, x[b:b + 1], DOC_LENGTHS, flag_start=False) for b in range(2)])
    assert_close(packed, separate)


@pytest.mark.parametrize("kind", MIXERS)
def test_no_information_crosses_a_document_start(kind):
    """Changing an earlier document leaves every later document's output untouched."""
    mixer = make_mixer(kind)
    torch.manual_seed(2)
    seq = sum(DOC_LENGTHS)
    x = torch.randn(1, seq, D_MODEL)
    ds = doc_start_for(DOC_LENGTHS)[None]
    boundary = DOC_LENGTHS[0] + DOC_LENGTHS[1]  # start of the third document
    x2 = x.clone()
    x2[:, :boundary] = torch.randn(1, boundary, D_MODEL) * 3
    with torch.no_grad():
        y1, y2 = mixer(x, doc_start=ds), mixer(x2, doc_start=ds)
    torch.testing.assert_close(y1[:, boundary:], y2[:, boundary:], rtol=0, atol=1e-6)
    assert (y1[:, :boundary] - y2[:, :boundary]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", MIXERS)
@pytest.mark.parametrize("with_docs", [False, True], ids=["one_doc", "packed"])
def test_causality(kind, with_docs):
    mixer = make_mixer(kind)
    torch.manual_seed(3)
    seq = sum(DOC_LENGTHS)
    x = torch.randn(2, seq, D_MODEL)
    ds = doc_start_for(DOC_LENGTHS).expand(2, seq) if with_docs else None
    with torch.no_grad():
        y = mixer(x, doc_start=ds)
        for t in (0, 4, 9, 17, 23, seq - 1):
            x2 = x.clone()
            x2[:, t] += torch.randn(2, D_MODEL) * 2
            y2 = mixer(x2, doc_start=ds)
            torch.testing.assert_close(y2[:, :t], y[:, :t], rtol=0, atol=1e-6)
            assert (y2[:, t] - y[:, t]).abs().max() > 1e-4, f"token {t} does not affect its own output"


@pytest.mark.parametrize("kind", MIXERS)
def test_step_matches_forward(kind):
    mixer = make_mixer(kind)
    torch.manual_seed(4)
    batch, seq = 2, 21
    x = torch.randn(batch, seq, D_MODEL)
    dt = torch.rand(batch, seq) * 2 + 0.25
    with torch.no_grad():
        full = mixer(x, dt=dt)
        state = mixer.init_state(batch, x.device, x.dtype)
        steps = []
        for t in range(seq):
            y, state = mixer.step(x[:, t:t + 1], state, dt=dt[:, t:t + 1])
            steps.append(y)
    assert_close(torch.cat(steps, dim=1), full)


def test_liquid_dt_one_equals_none():
    mixer = make_mixer("liquid")
    torch.manual_seed(5)
    seq = sum(DOC_LENGTHS)
    x = torch.randn(2, seq, D_MODEL)
    ds = doc_start_for(DOC_LENGTHS).expand(2, seq)
    with torch.no_grad():
        for doc_start in (None, ds):
            y_none = mixer(x, doc_start=doc_start)
            y_one = mixer(x, doc_start=doc_start, dt=torch.ones(2, seq))
            assert_close(y_one, y_none)
            y_other = mixer(x, doc_start=doc_start, dt=torch.full((2, seq), 3.0))
            assert (y_other - y_none).abs().max() > 1e-3  # dt is actually used


def _first_token_influence(mixer, x, dt, t_end):
    """|dy_end / dx_0|: how much the output at t_end still depends on the first token."""
    x = x.clone().requires_grad_(True)
    y = mixer(x, dt=dt)
    (grad,) = torch.autograd.grad(y[:, t_end].pow(2).sum(), x)
    return grad[:, 0].norm().item()


def test_liquid_larger_dt_forgets_faster():
    cfg = ModelConfig(
        d_model=D_MODEL,
        liquid=LiquidConfig(heads=2, key_dim=4, value_dim=4, chunk_size=8, conv_kernel=3, tau_min=8.0, tau_max=64.0),
    )
    mixer = make_mixer("liquid", cfg)
    torch.manual_seed(6)
    seq = 40
    x = torch.randn(1, seq, D_MODEL)
    influence = {s: _first_token_influence(mixer, x, torch.full((1, seq), s), seq - 1) for s in (0.5, 1.0, 4.0, 16.0)}
    assert influence[0.5] > influence[1.0] > influence[4.0] > influence[16.0]
    assert influence[16.0] < 1e-3 * influence[1.0]
    # Same picture via a perturbation of the first token.
    with torch.no_grad():
        x2 = x.clone()
        x2[:, 0] += 3.0
        diffs = {}
        for s in (1.0, 16.0):
            dt = torch.full((1, seq), s)
            diffs[s] = (mixer(x2, dt=dt)[:, -1] - mixer(x, dt=dt)[:, -1]).abs().max().item()
    assert diffs[1.0] > 1e-4
    assert diffs[16.0] < 1e-2 * diffs[1.0]


def test_liquid_per_token_dt_is_local():
    """A large dt at one token only (e.g. a time gap) wipes the memory before it, not other tokens' dt."""
    mixer = make_mixer("liquid")
    torch.manual_seed(7)
    seq = 30
    x = torch.randn(1, seq, D_MODEL)
    dt = torch.ones(1, seq)
    dt[:, 15] = 1e4  # a ~ exp(-1e4 * rate) = 0: the state before token 15 is forgotten
    x2 = x.clone()
    x2[:, :13] += torch.randn(1, 13, D_MODEL)  # outside the conv's reach of token 15
    with torch.no_grad():
        y1, y2 = mixer(x, dt=dt), mixer(x2, dt=dt)
        y1_plain, y2_plain = mixer(x), mixer(x2)
    torch.testing.assert_close(y1[:, 15:], y2[:, 15:], rtol=0, atol=1e-5)
    assert (y1_plain[:, 15:] - y2_plain[:, 15:]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", MIXERS)
def test_doc_start_shape_is_checked(kind):
    mixer = make_mixer(kind)
    x = torch.randn(2, 10, D_MODEL)
    # The attention mixer computes positions before doc_ids validates, so it fails with a broadcast error.
    expected = (ValueError, RuntimeError) if kind == "attention" else ValueError
    with pytest.raises(expected):
        mixer(x, doc_start=torch.zeros(2, 9, dtype=torch.bool))
    if kind != "attention":
        with pytest.raises(ValueError, match="doc_start"):
            mixer(x, doc_start=torch.zeros(2, 9, dtype=torch.bool))


@pytest.mark.parametrize("q_offset", [0, 37])
@pytest.mark.parametrize("block", [7, 16, 1000])
def test_document_mask_blocks_equal_the_dense_mask(q_offset, block, monkeypatch):
    """Attention over a DocumentMask's blocks (only the keys each block can see, never a [s, s] mask) equals
    one SDPA call with the dense causal same-document mask: outputs and gradients, for a row of its own
    (q_offset 0) and for a context-parallel slice (queries at 37.., keys from 0), rows with different
    documents, documents longer and shorter than a block, GQA."""
    import torch.nn.functional as F

    from pretrain.model import mixers

    g = torch.Generator().manual_seed(4)
    b, heads, kv, hd, s_q = 2, 4, 2, 8, 90
    total = q_offset + s_q
    doc_start = torch.rand(b, total, generator=g) < 0.06
    doc_start[1, 10:60] = False  # one document across several blocks
    doc_start[:, 0] = True
    docs = doc_start.long().cumsum(-1)
    mask = mixers.DocumentMask(docs, q_offset, s_q)
    q = torch.randn(b, heads, s_q, hd, generator=g, requires_grad=True)
    k = torch.randn(b, kv, total, hd, generator=g, requires_grad=True)
    v = torch.randn(b, kv, total, hd, generator=g, requires_grad=True)
    dout = torch.randn(b, heads, s_q, hd, generator=g)

    def grads(out):
        return [out.detach()] + list(torch.autograd.grad(out, (q, k, v), dout))

    ref = grads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(), enable_gqa=True))
    pieces = list(mask.blocks(block))
    assert [p[:2] for p in pieces] == [(a, min(a + block, s_q)) for a in range(0, s_q, block)]
    assert all(hi == q_offset + bb and mk.shape[-2:] == (bb - a, hi - lo) for a, bb, lo, hi, mk in pieces)
    for a, _, lo, _, _ in pieces:  # a block's keys start where its first query's document starts (earliest row)
        assert lo == min(int((docs[r] == docs[r, q_offset + a]).nonzero()[0]) for r in range(b))
    assert block > s_q or any(lo > 0 for _, _, lo, _, _ in pieces)  # keys before a document are skipped
    out = torch.cat([F.scaled_dot_product_attention(q[:, :, a:bb], k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=mk,
                                                    enable_gqa=True) for a, bb, lo, hi, mk in pieces], dim=2)
    for got, want in zip(grads(out), ref):
        assert_close(got, want)

    # The mixer itself: small blocks give the same output as one block covering the row.
    x = torch.randn(b, total, D_MODEL, generator=g)
    mixer = make_mixer("attention")
    monkeypatch.setattr(mixers, "ATTENTION_BLOCK", 10_000)
    whole = mixer(x, doc_start=doc_start)
    monkeypatch.setattr(mixers, "ATTENTION_BLOCK", block)
    assert_close(mixer(x, doc_start=doc_start), whole)
