"""train.compile: torch.compile of each block gives the eager losses (a few training steps, the smallest model)."""
import shutil
from pathlib import Path

import pytest
import torch

from parallel.engine import build_engine
from parallel.topology import single_process_topology
from pretrain.config import load_config
from pretrain.model import model as model_module
from pretrain.model.model import Block, build_model, compile_cache_tag
from pretrain.train.step import Placement, train_step
from pretrain.train.worker import compile_blocks

# The smallest model of the LFM2 kinds of layer: a conv mixer with a dense FFN, an attention mixer with an MoE
# (two blocks: the compile is most of the test's time).
OVERRIDES = ["model.vocab_size=64", "model.d_model=32", "model.num_layers=2", "model.mixer=conv",
             "model.attention_layers=[1]", "model.dense_layers=1", "model.dense_dim=32", "model.moe.expert_dim=16",
             "model.attention.heads=2", "model.attention.kv_heads=2", "model.attention.head_dim=16",
             "train.seq_len=16", "train.global_batch_size=2", "train.micro_batch_size=2", "train.device=cpu",
             "train.dtype=fp32", "parallel.dp=1", "parallel.ep=1", "cluster.num_workers=1"]
STEPS = 2


def _losses(cfg, compiled: bool) -> list[float]:
    topology = single_process_topology()
    model = build_model(cfg.model, device="cpu", seed=0)
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    if compiled:
        compile_blocks(model)
        assert all(b._compiled is not None for b in model.modules() if isinstance(b, Block))
    engine = build_engine(model, cfg.optim, cfg.parallel, topology, max_steps=10, grad_accum=1)
    place = Placement(topology, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(STEPS):
        tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.train.seq_len + 1), generator=g)
        losses.append(train_step(engine, [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}], place).loss)
    return losses


def test_compile_config_key():
    assert load_config("tiny").train.compile is False
    assert load_config("tiny", ["train.compile=true"]).train.compile is True
    with pytest.raises(Exception):
        load_config("tiny", ["train.compile=sometimes"])


def test_compiled_blocks_train_like_eager():
    cfg = load_config("tiny", OVERRIDES)
    torch._dynamo.reset()
    eager, compiled = _losses(cfg, False), _losses(cfg, True)
    assert compiled == pytest.approx(eager, abs=1e-5, rel=0)


def test_compiled_blocks_tag_torch_s_compile_caches_with_the_model_source(tmp_path):
    """compile_blocks adds a digest of pretrain/model's source to torch's compile-cache key tag (once), so a
    graph compiled by an earlier version of the model's custom ops is not loaded; the digest changes with
    any byte of any file of the package."""
    tag = compile_cache_tag()
    with torch.compiler.config.patch(cache_key_tag="user-tag"):
        compile_blocks(build_model(load_config("tiny", OVERRIDES).model, device="cpu", seed=0))
        compile_blocks(build_model(load_config("tiny", OVERRIDES).model, device="cpu", seed=0))
        assert torch.compiler.config.cache_key_tag == "user-tag" + tag
    package = Path(model_module.__file__).parent
    copy = tmp_path / "model"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert compile_cache_tag(copy) == tag
    (copy / "scan_cpu.py").write_text((copy / "scan_cpu.py").read_text() + "\n")
    assert compile_cache_tag(copy) != tag


@pytest.mark.parametrize("with_tail", [False, True])
def test_compiled_conv_takes_the_shifted_sums_and_equals_eager(with_tail):
    """Eager, a row without document starts takes conv1d; compiled, the shifted sums (which inductor fuses):
    the same outputs and gradients (of the input, the weight and the tail)."""
    from pretrain.model.layers import causal_depthwise_conv

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 11, 6, generator=g), torch.randn(6, 1, 3, generator=g)
    tail = torch.randn(2, 2, 6, generator=g) if with_tail else None
    gy = torch.randn(2, 11, 6, generator=g)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, w) + ((tail,) if with_tail else ())]
        y = fn(leaves[0], leaves[1], None, *leaves[2:])
        y.backward(gy)
        return [y.detach()] + [t.grad for t in leaves]

    torch._dynamo.reset()
    eager = run(causal_depthwise_conv)
    compiled = run(torch.compile(causal_depthwise_conv, backend="inductor", fullgraph=True))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_compiled_rope_tables_are_one_op_and_equal_eager():
    """Compiled on the CPU, cos/sin come from one opaque op (liquid::rope_table), materialised once, not
    re-evaluated inside every kernel that applies them; the values are the eager formula's."""
    from pretrain.model.layers import rope_cos_sin

    positions = torch.arange(40).reshape(2, 20) % 13
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    got = torch.compile(lambda p: rope_cos_sin(p, 16, 10000.0), backend=backend, fullgraph=True)(positions)
    want = rope_cos_sin(positions, 16, 10000.0)
    assert [n.target for n in graphs[0].graph.nodes if n.op == "call_function"][:1] == [torch.ops.liquid.rope_table.default]
    for a, b in zip(got, want):
        assert a.shape == (2, 20, 8) and torch.equal(a, b)


def test_the_model_s_small_ops_pass_opcheck():
    """liquid::conv_taps (with its backward) and liquid::rope_table: shape functions, schemas, autograd."""
    from pretrain.model.layers import conv_taps, rope_table

    w = torch.randn(6, 1, 3, requires_grad=True)
    torch.library.opcheck(conv_taps, (w,))
    assert torch.equal(conv_taps(w), w[:, 0, :].t())
    torch.library.opcheck(rope_table, (torch.arange(10).reshape(2, 5), 8, 10000.0))
