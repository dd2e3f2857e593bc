"""The chunked head cross-entropy (pretrain/model/loss.py) against the plain head: the loss and the gradients
(of the head's input, the tied weight, and every parameter of a tiny model with multi-token prediction) equal
to 1e-6 relative in fp32, ignored labels included; bf16 autocast; no-grad; no label at all; less memory."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import load_config
from pretrain.model import loss_cpu
from pretrain.model.loss import linear_cross_entropy_sum
from pretrain.model.model import IGNORE_INDEX, build_model
from tests.model.test_generation import CFG

RTOL = 1e-6


@pytest.fixture(autouse=True, params=["cpu_kernel", "torch_ops"])
def form(request):
    """The form of the per-chunk softmax cross-entropy in this test: the CPU kernel (pretrain/model/loss_cpu.py)
    or torch's ops."""
    if request.param == "cpu_kernel":
        if not loss_cpu.available():
            pytest.skip("the CPU cross-entropy kernel is not available here (see the warning)")
        yield request.param
    else:
        with loss_cpu.torch_ops():
            yield request.param


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _plain(x, w, labels):
    return F.cross_entropy(F.linear(x, w).float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def _inputs(n=37, d=16, vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).requires_grad_()
    w = (0.3 * torch.randn(vocab, d, generator=g)).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::5] = IGNORE_INDEX
    return x, w, labels


@pytest.mark.parametrize("chunk", [1, 6, 37, 4096])
def test_loss_and_gradients_equal_the_plain_head(chunk):
    x, w, labels = _inputs()
    scale = 0.37  # backward scales the forward's gradients by the incoming one
    want = _plain(x, w, labels)
    want_gx, want_gw = torch.autograd.grad(want * scale, (x, w))
    got = linear_cross_entropy_sum(x, w, labels, chunk_tokens=chunk)
    gx, gw = torch.autograd.grad(got * scale, (x, w))
    assert got.dtype == torch.float32 and got.shape == ()
    assert abs(got.item() - want.item()) <= RTOL * abs(want.item())
    assert _rel(gx, want_gx) <= RTOL and _rel(gw, want_gw) <= RTOL
    assert gx.dtype == x.dtype and gw.dtype == w.dtype


def test_batched_input_and_one_side_needing_grad():
    x, w, labels = _inputs(n=24)
    x3, labels3 = x.detach().reshape(2, 12, -1), labels.reshape(2, 12)
    want = _plain(x3, w, labels3)
    got = linear_cross_entropy_sum(x3, w, labels3, chunk_tokens=5)  # only the weight needs a gradient
    assert abs(got.item() - want.item()) <= RTOL * abs(want.item())
    assert _rel(torch.autograd.grad(got, w)[0], torch.autograd.grad(want, w)[0]) <= RTOL


def test_no_label_sums_to_zero_with_zero_gradients():
    x, w, labels = _inputs()
    got = linear_cross_entropy_sum(x, w, torch.full_like(labels, IGNORE_INDEX), chunk_tokens=8)
    assert got.item() == 0.0
    gx, gw = torch.autograd.grad(got, (x, w))
    assert not gx.any() and not gw.any()


def test_no_grad_and_inputs_without_grad():
    x, w, labels = _inputs()
    want = _plain(x, w, labels).item()
    with torch.no_grad():
        got = linear_cross_entropy_sum(x, w, labels, chunk_tokens=8)
    assert got.grad_fn is None and abs(got.item() - want) <= RTOL * abs(want)
    got = linear_cross_entropy_sum(x.detach(), w.detach(), labels, chunk_tokens=8)
    assert got.grad_fn is None and abs(got.item() - want) <= RTOL * abs(want)


def test_bf16_autocast_runs_the_matmuls_as_the_plain_head(form):
    x, w, labels = _inputs(n=64, d=32, vocab=257)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _plain(x, w, labels)
        got_one = linear_cross_entropy_sum(x, w, labels, chunk_tokens=64)
        got = linear_cross_entropy_sum(x, w, labels, chunk_tokens=16)
    if form == "torch_ops":  # one chunk: the plain head's kernels on the same bf16 logits
        assert got_one.item() == want.item()
    assert abs(got_one.item() - want.item()) <= RTOL * abs(want.item())
    assert abs(got.item() - want.item()) <= RTOL * abs(want.item())  # (fp32 sums of the chunks)
    want_gx, want_gw = torch.autograd.grad(want, (x, w))
    gx, gw = torch.autograd.grad(got, (x, w))
    assert gx.dtype == torch.float32 and gw.dtype == torch.float32
    # The plain head's gradients are bf16 matmul outputs; here too (the weight's summed over chunks in fp32).
    assert _rel(gx, want_gx) <= 1e-2 and _rel(gw, want_gw) <= 1e-2


def test_a_label_out_of_range_is_an_index_error():
    x, w, labels = _inputs()
    labels[3] = w.shape[0]
    with pytest.raises(IndexError, match="out of bounds"):
        linear_cross_entropy_sum(x, w, labels, chunk_tokens=8)


def test_the_kernel_runs_and_its_bits_do_not_depend_on_the_thread_count(form):
    if form != "cpu_kernel":
        pytest.skip("a property of the CPU kernel")
    g = torch.Generator().manual_seed(1)
    logits, labels = 4 * torch.randn(13, 1000, generator=g), torch.randint(0, 1000, (13,), generator=g)
    labels[2] = IGNORE_INDEX
    assert loss_cpu.applies(logits, labels)
    threads = torch.get_num_threads()
    got = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            grad = logits.clone()
            got.append((loss_cpu.cross_entropy_rows_(grad, labels, IGNORE_INDEX, grad=True), grad))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
    want = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(got[0][0], want, rtol=1e-6, atol=1e-6)
    assert not got[0][1][2].any() and got[0][0][2] == 0  # the ignored row
    soft = torch.softmax(logits, -1)
    soft[torch.arange(13), labels.clamp_min(0)] -= 1
    soft[2] = 0
    torch.testing.assert_close(got[0][1], soft, rtol=1e-5, atol=1e-6)


def test_peak_memory_is_below_the_plain_heads():
    from pretrain.train.dryrun import allocator_peak

    n, d, vocab = 1024, 32, 4096  # plain: 16 MiB of fp32 logits, their log-softmax and its gradient
    x, w, labels = _inputs(n=n, d=d, vocab=vocab)

    def step(fn):
        loss = fn()
        loss.backward()
        x.grad = w.grad = None

    _, plain = allocator_peak(lambda: step(lambda: _plain(x, w, labels)))
    _, chunked = allocator_peak(lambda: step(lambda: linear_cross_entropy_sum(x, w, labels, chunk_tokens=128)))
    assert chunked < plain / 4, (chunked, plain)


# ---- in the model ---------------------------------------------------------------------------------------------

MTP_CFG = dataclasses.replace(CFG, mtp_depth=2, loss_chunk_tokens=7)


def _model_run(cfg, batch, **kwargs):
    torch.manual_seed(0)
    model = build_model(cfg, seed=0)
    out = model(batch["input_ids"], labels=batch["labels"], doc_start=batch["doc_start"], **kwargs)
    (out.lm_loss_sum * 0.01 + out.mtp_loss_sums.sum() * 0.02 + out.aux_loss).backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _batch(rows=3, seq=20, vocab=CFG.vocab_size):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (rows, seq + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[1, 11:] = IGNORE_INDEX
    labels[2, [0, 4, 5]] = IGNORE_INDEX
    doc_start = torch.zeros(rows, seq, dtype=torch.bool)
    doc_start[:, 0] = True
    doc_start[0, 9] = True
    return {"input_ids": ids[:, :-1], "labels": labels, "doc_start": doc_start}


def test_model_losses_and_all_gradients_equal_the_plain_path():
    batch = _batch()
    plain, plain_grads = _model_run(dataclasses.replace(MTP_CFG, loss_chunk_tokens=0), batch)
    chunked, grads = _model_run(MTP_CFG, batch)
    assert plain.logits is None and chunked.logits is None
    for name in ("loss", "lm_loss", "lm_loss_sum", "mtp_loss", "mtp_loss_sums"):
        assert _rel(getattr(chunked, name).detach(), getattr(plain, name).detach()) <= RTOL, name
    assert grads.keys() == plain_grads.keys() and "embed.weight" in grads
    flat = torch.cat([g.flatten() for g in grads.values()])
    assert _rel(flat, torch.cat([plain_grads[n].flatten() for n in grads])) <= RTOL  # all parameters together
    assert _rel(grads["embed.weight"], plain_grads["embed.weight"]) <= RTOL
    # Each parameter on its own: the head's gradients differ from the plain path's in the last bits (exp
    # kernels; the upstream scale applied after the matmuls), and a few small gradients that are sums with
    # cancellation over every token (the liquid mixers' rate biases) carry that as ~1e-6 relative.
    for name, g in grads.items():
        assert _rel(g, plain_grads[name]) <= 10 * RTOL, name


def test_model_with_logits_asked_for_takes_the_plain_head():
    batch = _batch()
    out, _ = _model_run(MTP_CFG, batch, return_logits=True)
    plain, _ = _model_run(dataclasses.replace(MTP_CFG, loss_chunk_tokens=0), batch, return_logits=True)
    assert out.logits.shape == (3, 20, CFG.vocab_size)
    torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=0)
    assert out.lm_loss_sum.item() == plain.lm_loss_sum.item()
    assert torch.equal(out.mtp_loss_sums, plain.mtp_loss_sums)


def test_config_key():
    assert load_config("tiny").model.loss_chunk_tokens == 4096
    assert load_config("tiny", ["model.loss_chunk_tokens=0"]).model.loss_chunk_tokens == 0
    with pytest.raises(ValueError, match="model.loss_chunk_tokens"):
        load_config("tiny", ["model.loss_chunk_tokens=-1"])


def test_bench_loss_prints_one_json_line(monkeypatch, capsys):
    """`liquid bench loss` at tiny sizes, its children run in this process (a child interpreter costs seconds)."""
    import json

    import pretrain.bench.loss as bench
    from pretrain.cli import main as cli_main

    monkeypatch.setattr(bench, "_run_child", lambda spec, timeout: bench._child(spec))
    cli_main(["bench", "loss", "--vocab", "512", "--d-model", "16", "--tokens", "256", "--chunk", "64",
              "--device", "cpu", "--repeats", "1", "--no-allocator"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["bench"] == "loss" and out["vocab"] == 512 and out["chunk_tokens"] == 64
    assert out["plain"]["variant"] == "plain" and out["chunked"]["variant"] == "chunked"
    assert out["loss_rel_diff"] <= RTOL and out["time_ratio"] > 0
    assert {"memory_saved_bytes", "allocator_saved_bytes", "peak_ratio", "time_plain_s", "time_chunked_s"} <= set(out)


def test_without_a_compiler_torch_ops_compute_it_with_one_warning(tmp_path):
    """A fresh process (the build is decided once per process) whose compiler does not exist."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    probe = """
import warnings, torch, torch.nn.functional as F
from pretrain.model import loss_cpu
from pretrain.model.loss import linear_cross_entropy_sum
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    x, w, y = torch.randn(9, 4), torch.randn(30, 4), torch.randint(0, 30, (9,))
    got = linear_cross_entropy_sum(x, w, y, chunk_tokens=4)
want = F.cross_entropy(x @ w.t(), y, reduction="sum")
print("available", loss_cpu.available(), "close", abs(got.item() - want.item()) <= 1e-6 * want.item())
print("warnings", [str(c.message) for c in caught])
"""
    env = {**os.environ, "LIQUID_CACHE": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler")}
    out = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[2], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "available False close True" in out
    assert out.count("the head's cross-entropy takes torch's ops on the CPU: could not build the CPU loss kernel") == 1
