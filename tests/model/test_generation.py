"""The hybrid LiquidLM: step-by-step generation vs the parallel forward, MTP loss, tied head, packed documents."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import AttentionConfig, LiquidConfig, ModelConfig, MoEConfig
from pretrain.model.ffn import MoE
from pretrain.model.model import IGNORE_INDEX, build_model

VOCAB = 50

CFG = ModelConfig(
    vocab_size=VOCAB,
    d_model=32,
    num_layers=4,
    mixer="liquid",
    attention_layers=[2],
    conv_layers=[3],
    conv_kernel=3,
    dense_layers=1,
    dense_dim=48,
    liquid=LiquidConfig(heads=2, key_dim=8, value_dim=8, chunk_size=8, conv_kernel=3, tau_min=1.0, tau_max=64.0),
    attention=AttentionConfig(heads=4, kv_heads=2, head_dim=8),
    moe=MoEConfig(num_experts=4, top_k=2, expert_dim=24),
    mtp_depth=0,
    init_std=0.1,  # larger than the default so that every layer visibly moves the logits
)


def make_model(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.eval()
    return model


def assert_close(actual, expected, rtol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-5 * max(1.0, expected.abs().max().item()))


def generate_logits(model, ids, dt=None):
    batch, seq = ids.shape
    state = model.init_state(batch)
    out = []
    for t in range(seq):
        logits, state = model.step(ids[:, t], state, dt=None if dt is None else dt[:, t])
        out.append(logits)
    return torch.stack(out, dim=1)


def test_layer_layout():
    model = make_model()
    assert [b.mixer_kind for b in model.layers] == ["liquid", "liquid", "attention", "conv"]
    assert [b.ffn_kind for b in model.layers] == ["dense", "moe", "moe", "moe"]
    assert len(model.moe_layers()) == 3
    # reset_parameters initialises the experts (they are allocated with torch.empty).
    for moe in model.moe_layers():
        for p in (moe.experts.w1, moe.experts.w3, moe.experts.w2):
            assert torch.isfinite(p).all() and 0 < p.std() < 1


@pytest.mark.parametrize("use_dt", [False, True], ids=["no_dt", "per_token_dt"])
def test_step_matches_parallel_forward(use_dt):
    model = make_model()
    torch.manual_seed(1)
    batch, seq = 2, 37
    ids = torch.randint(0, VOCAB, (batch, seq))
    dt = torch.rand(batch, seq) * 2 + 0.2 if use_dt else None
    with torch.no_grad():
        parallel = model(ids, dt=dt).logits
        stepped = generate_logits(model, ids, dt)
    assert parallel.shape == (batch, seq, VOCAB)
    assert torch.isfinite(parallel).all()
    assert_close(stepped, parallel)
    if use_dt:  # dt actually changes the result
        with torch.no_grad():
            assert (model(ids).logits - parallel).abs().max() > 1e-4


def test_step_does_not_count_expert_load_in_eval():
    model = make_model()
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        generate_logits(model, ids)
        model(ids)
    for moe in model.moe_layers():
        assert (moe.tokens_per_expert == 0).all()


def test_mtp_loss_present_and_added():
    cfg = dataclasses.replace(CFG, mtp_depth=2, mtp_loss_weight=0.3, moe=dataclasses.replace(CFG.moe, aux_loss_coeff=0.01))
    model = make_model(cfg)
    model.train()
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 24))
    labels = torch.randint(0, VOCAB, (2, 24))
    labels[:, -3:] = IGNORE_INDEX
    out = model(ids, labels=labels)
    assert out.mtp_loss is not None and out.mtp_loss.dim() == 0 and torch.isfinite(out.mtp_loss)
    assert out.mtp_loss.item() > 0
    assert out.aux_loss.item() > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss + 0.3 * out.mtp_loss)
    assert out.logits is None  # labels given, logits not asked for
    # The MTP modules receive gradients from the loss.
    out.loss.backward()
    assert len(model.mtp) == 2
    for module in model.mtp:
        assert module.proj.weight.grad is not None and module.proj.weight.grad.abs().max() > 0


def test_mtp_loss_value_for_depth_one():
    """Depth 1 predicts labels[t+1] from position t, feeding the embedding of labels[t]."""
    cfg = dataclasses.replace(CFG, mtp_depth=1)
    model = make_model(cfg)
    torch.manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 16))
    labels = torch.cat([ids[:, 1:], torch.randint(0, VOCAB, (2, 1))], dim=1)
    with torch.no_grad():
        out = model(ids, labels=labels)
        h = model.embed(ids)
        for layer in model.layers:
            h, _ = layer(h)
        h = model.mtp[0](h, model.embed(labels))
        target = torch.cat([labels[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
        expected = F.cross_entropy(model.head(h).flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.mtp_loss, expected)


def test_no_mtp_loss_without_mtp():
    model = make_model()
    torch.manual_seed(4)
    ids = torch.randint(0, VOCAB, (2, 12))
    labels = torch.randint(0, VOCAB, (2, 12))
    out = model(ids, labels=labels, return_logits=True)
    assert out.mtp_loss is None
    assert len(model.mtp) == 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    expected = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(out.lm_loss, expected)


def test_tied_embeddings():
    model = make_model()
    shapes = {n: p.shape for n, p in model.named_parameters()}
    assert "embed.weight" in shapes
    vocab_shaped = [n for n, s in shapes.items() if VOCAB in s]
    assert vocab_shaped == ["embed.weight"], f"unexpected vocab-sized parameters: {vocab_shaped}"
    torch.manual_seed(5)
    ids = torch.randint(0, VOCAB // 2, (2, 10))  # the upper half of the vocabulary is never an input
    h = torch.randn(2, 10, 32)
    torch.testing.assert_close(model.head(h), F.linear(model.norm(h), model.embed.weight))
    # The head's gradient lands on embedding rows that never appear as inputs.
    model.train()
    labels = torch.randint(0, VOCAB, (2, 10))
    model(ids, labels=labels).loss.backward()
    grad = model.embed.weight.grad
    assert grad[VOCAB // 2:].abs().sum(-1).gt(0).all()
    # Changing the embedding matrix changes the logits of an unseen token.
    model.eval()
    with torch.no_grad():
        before = model(ids).logits[..., -1].clone()
        model.embed.weight[-1] += 1.0
        after = model(ids).logits[..., -1]
    assert (after - before).abs().min() > 1e-4


def _packed_case(seed=6):
    torch.manual_seed(seed)
    lengths = (5, 13, 1, 18)  # 37 tokens; liquid chunk 8, so starts fall inside chunks
    ids = torch.randint(0, VOCAB, (1, sum(lengths)))
    doc_start = torch.zeros(1, sum(lengths), dtype=torch.bool)
    offsets = [0]
    for n in lengths[:-1]:
        offsets.append(offsets[-1] + n)
    doc_start[0, offsets] = True
    return lengths, offsets, ids, doc_start


def test_packed_documents_equal_separate_flagged_documents():
    """Packed forward with doc_start == each document alone with its first token marked as a start."""
    model = make_model()
    lengths, offsets, ids, doc_start = _packed_case()
    dt = torch.rand(1, ids.shape[1]) + 0.5
    with torch.no_grad():
        for d in (None, dt):
            packed = model(ids, doc_start=doc_start, dt=d).logits
            for off, n in zip(offsets, lengths):
                ds = torch.zeros(1, n, dtype=torch.bool)
                ds[0, 0] = True
                alone = model(ids[:, off:off + n], doc_start=ds, dt=None if d is None else d[:, off:off + n]).logits
                assert_close(packed[:, off:off + n], alone)


def test_packed_documents_equal_separate_documents():
    """Packed forward with doc_start == each document run alone (plain forward, as generation sees it)."""
    model = make_model()
    lengths, offsets, ids, doc_start = _packed_case()
    with torch.no_grad():
        packed = model(ids, doc_start=doc_start).logits
        for off, n in zip(offsets, lengths):
            alone = model(ids[:, off:off + n]).logits
            assert_close(packed[:, off:off + n], alone)


def test_generation_matches_training_forward_of_a_flagged_document():
    model = make_model()
    torch.manual_seed(7)
    ids = torch.randint(0, VOCAB, (2, 20))
    doc_start = torch.zeros(2, 20, dtype=torch.bool)
    doc_start[:, 0] = True
    with torch.no_grad():
        train_logits = model(ids, doc_start=doc_start).logits
        gen_logits = generate_logits(model, ids)
    assert_close(gen_logits, train_logits)


def test_doc_start_isolates_documents_in_the_model():
    """Changing the first document leaves the logits of later documents unchanged."""
    model = make_model()
    lengths, offsets, ids, doc_start = _packed_case()
    ids2 = ids.clone()
    ids2[:, :offsets[2]] = torch.randint(0, VOCAB, (1, offsets[2]))
    with torch.no_grad():
        a = model(ids, doc_start=doc_start).logits
        b = model(ids2, doc_start=doc_start).logits
    torch.testing.assert_close(a[:, offsets[2]:], b[:, offsets[2]:], rtol=0, atol=1e-5)
    assert (a[:, :offsets[2]] - b[:, :offsets[2]]).abs().max() > 1e-3


def test_update_expert_bias_on_model():
    model = make_model()
    model.train()
    torch.manual_seed(8)
    ids = torch.randint(0, VOCAB, (2, 16))
    model(ids, labels=ids)
    counts = [m.tokens_per_expert.clone() for m in model.moe_layers()]
    assert all(c.sum().item() == 2 * 16 * CFG.moe.top_k for c in counts)
    model.update_expert_bias()
    for moe, c in zip(model.moe_layers(), counts):
        assert isinstance(moe, MoE)
        expected = CFG.moe.bias_update_rate * torch.sign(c.mean() - c)
        torch.testing.assert_close(moe.router.expert_bias, expected)
        assert (moe.tokens_per_expert == 0).all()
