"""`liquid export`: Hugging Face directories that transformers loads and that compute what the project's model
computes (liquid_moe with its own code on transformers 4.57 here; lfm2_moe on transformers 5 in .venv-hf5),
sharding, dtypes and errors. transformers always runs in a subprocess (checkpoints/hf_check.py) with its
module cache in the test's tmp directory and the project's packages blocked."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from checkpoints.export import (INDEX_FILE, check_state_dict, choose_format, export_model, export_run,
                                lfm2_moe_plan, model_config_from_lfm2_moe, model_sources, parse_size, read_export,
                                render_model_source, shard_plan)
from data_pipeline.tokenizer import TextTokenizer, train_tokenizer
from pretrain.cli import main
from pretrain.config import load_config
from pretrain.model.model import build_model

REPO = Path(__file__).resolve().parents[2]
HF_CHECK = REPO / "checkpoints" / "hf_check.py"
HF5_DIR = REPO / ".venv-hf5"
HF5_VERSION = "5.23.0"
SINGLE = ["parallel.dp=1", "parallel.ep=1", "cluster.num_workers=1"]
# The tiny preset (liquid, liquid, attention, liquid; dense then MoE), narrower.
LIQUID = ("tiny", [*SINGLE, "model.vocab_size=384", "model.d_model=64", "train.seq_len=32"])
# lfm2-8b-a1b's layout (conv + attention, 2 dense layers then MoE) with tiny widths; head_dim != d/heads
# and routed_scaling != 1 so that those mappings are exercised.
LFM2 = ("lfm2-8b-a1b", [*SINGLE, "model.vocab_size=384", "model.d_model=64", "model.num_layers=6",
                        "model.attention_layers=[2,4]", "model.dense_dim=96", "model.attention.heads=4",
                        "model.attention.kv_heads=2", "model.attention.head_dim=32", "model.moe.num_experts=8",
                        "model.moe.top_k=3", "model.moe.expert_dim=32", "model.moe.routed_scaling=1.7",
                        "train.seq_len=32", "train.global_batch_size=8"])
TEXTS = ["The liquid layer keeps a state whose time constant depends on the input. " * 3,
         "Short convolutions and a few attention layers; experts are chosen per token by a sigmoid router.",
         "hello world, hello experts " * 5]
# A bf16 export vs the fp32 model it came from (logits here are at most ~2): weights keep 8 mantissa bits,
# and a rounding can flip a near-tie in a router's top-k for a token, so the largest difference is a few
# percent while the typical one stays at the bf16 rounding level.
BF16_MAX_ATOL, BF16_MEAN_ATOL = 5e-2, 5e-3


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    return train_tokenizer(TEXTS * 4, vocab_size=300, out_dir=tmp_path_factory.mktemp("tok"))


def config(preset):
    name, overrides = preset
    return load_config(name, overrides)


def random_model(model_cfg, seed=0):
    """A model whose every mapping matters: norms away from 1, non-zero router biases."""
    torch.manual_seed(seed)
    model = build_model(model_cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
        for moe in model.moe_layers():
            moe.router.expert_bias.normal_(0.0, 0.05)
    return model.eval()


def bf16_rounded(model):
    """The model an export in bf16 holds: every weight rounded to bf16 except the routers' expert_bias."""
    rounded = build_model(model.cfg).eval()
    rounded.load_state_dict({k: v if k.endswith("expert_bias") else v.bfloat16().float()
                             for k, v in model.state_dict().items()})
    return rounded


@torch.no_grad()
def greedy(model, prompt, steps, eos):
    ids = prompt
    for _ in range(steps):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        if nxt.item() == eos:
            break
    return ids


@torch.no_grad()
def write_reference(model, path, tokenizer, *, seed=0, labels=None, input_ids=None):
    """What the project's model computes, for hf_check.py to compare with."""
    tok = TextTokenizer(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    if input_ids is None:
        input_ids = torch.randint(0, tok.vocab_size, (2, 24), generator=gen)
    ref = {"input_ids": input_ids, "logits": model(input_ids).logits.contiguous(),
           "greedy": greedy(model, input_ids[:1, :6], 6, tok.eos_id), "prompt_len": torch.tensor(6),
           "text_ids": torch.tensor(tok.encode_batch([TEXTS[1]])[0])}
    if labels is not None:
        ref["labels"] = labels
    save_file(ref, str(path), metadata={"text": TEXTS[1]})
    return ref


def hf_env(tmp_path, hf5=False) -> dict:
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_MODULES_CACHE": str(tmp_path / "hf-modules"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("PYTHONPATH", None)
    if hf5:
        env["PYTHONPATH"] = str(HF5_DIR)  # transformers 5 shadows the venv's 4.57; torch stays the venv's
    return env


def run_hf_check(cases, tmp_path, *, hf5=False, atol=1e-5) -> list[dict]:
    args = [sys.executable, str(HF_CHECK), "--atol", str(atol)]
    for case in cases:
        args += ["--case", *map(str, case)]
    proc = subprocess.run(args, capture_output=True, text=True, env=hf_env(tmp_path, hf5), cwd=tmp_path,
                          timeout=600)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(cases), f"hf_check failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return lines


def tensors_of(out: Path) -> dict:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


# ---- liquid_moe on the main venv's transformers (4.57) --------------------------------------------

def test_liquid_export_loads_with_transformers_and_computes_the_same_logits(tmp_path, tokenizer):
    cfg = config(LIQUID)
    model = random_model(cfg.model)
    state = model.state_dict()
    cases = []
    for dtype, reference_model in (("fp32", model), ("bf16", bf16_rounded(model))):
        out = tmp_path / f"liquid-{dtype}"
        summary = export_model(cfg.model, state, out, tokenizer=tokenizer, seq_len=cfg.train.seq_len, dtype=dtype)
        assert summary["format"] == "liquid_moe" and "liquid mixer layers [0, 1, 3]" in summary["format_reason"]
        write_reference(reference_model, tmp_path / f"ref-{dtype}.safetensors", tokenizer)
        cases.append((out, tmp_path / f"ref-{dtype}.safetensors", "LiquidMoeForCausalLM"))
    out = cases[0][0]
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["model_type"] == "liquid_moe" and config_json["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_liquid_moe.LiquidMoeForCausalLM"
    assert config_json["liquid_pretrain"]["seq_len"] == 32 and config_json["dtype"] == "float32"
    # The shipped code is the project's own model code with relative imports: nothing imports the project.
    for file in out.glob("*.py"):
        text = file.read_text()
        assert not re.search(r"^\s*(from|import)\s+(pretrain|parallel|data_pipeline|checkpoints|cluster)\b", text,
                             flags=re.MULTILINE), file.name
    assert "class LiquidMixer" in (out / "liquid_mixers.py").read_text()
    assert "from .liquid_layers import" in (out / "liquid_mixers.py").read_text()

    results = run_hf_check(cases, tmp_path)
    for res in results:
        assert res["ok"], res
        assert res["transformers"].startswith("4.") and res["class"] == "LiquidMoeForCausalLM"
        assert res["max_abs_diff"] <= 1e-5 and res["generate_match"] and res["tokenizer_match"]
    # bf16: transformers computes exactly the bf16-rounded model (above); that one is within BF16_ATOL of fp32.
    ids = load_file(str(tmp_path / "ref-fp32.safetensors"))["input_ids"]
    with torch.no_grad():
        drift = (bf16_rounded(model)(ids).logits - model(ids).logits).abs()
    assert 0 < drift.max().item() <= BF16_MAX_ATOL and drift.mean().item() <= BF16_MEAN_ATOL


# ---- lfm2_moe on transformers 5 ---------------------------------------------------------------------

NETWORK_ERRORS = ("No matching distribution", "Could not find a version", "NewConnectionError",
                  "Temporary failure in name resolution", "Failed to establish a new connection",
                  "Network is unreachable", "ConnectTimeout", "ReadTimeout", "ProxyError", "SSLError",
                  "Max retries exceeded")


def ensure_hf5() -> None:
    """transformers 5 in .venv-hf5 (what `make venv-hf5` does), installed once; skip only without a registry."""
    stamp = HF5_DIR / f".installed-{HF5_VERSION}"
    if stamp.exists():
        return
    tmp = HF5_DIR.with_name(HF5_DIR.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           "--target", str(tmp), f"transformers=={HF5_VERSION}"],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        output = proc.stdout + proc.stderr
        if any(err in output for err in NETWORK_ERRORS):
            pytest.skip(f"pip cannot reach the package registry to install transformers=={HF5_VERSION}: "
                        f"{output.strip().splitlines()[-1]}")
        raise AssertionError(f"pip install --target {tmp} transformers=={HF5_VERSION} failed:\n{output[-4000:]}")
    shutil.rmtree(HF5_DIR, ignore_errors=True)
    tmp.rename(HF5_DIR)
    stamp.touch()


@pytest.mark.slow
def test_hf5_lfm2_moe_export_is_transformers_lfm2_moe(tmp_path, tokenizer):
    ensure_hf5()
    cases = []
    cfg = config(LFM2)
    model = random_model(cfg.model, seed=1)
    for dtype, reference_model in (("fp32", model), ("bf16", bf16_rounded(model))):
        out = tmp_path / f"lfm2-{dtype}"
        summary = export_model(cfg.model, model.state_dict(), out, tokenizer=tokenizer, seq_len=32, dtype=dtype)
        assert summary["format"] == "lfm2_moe"
        write_reference(reference_model, tmp_path / f"lfm2-{dtype}.safetensors", tokenizer, seed=2)
        cases.append((out, tmp_path / f"lfm2-{dtype}.safetensors", "Lfm2MoeForCausalLM"))
    # The liquid_moe remote code works on transformers 5 too.
    liquid_cfg = config(LIQUID)
    liquid = random_model(liquid_cfg.model, seed=3)
    export_model(liquid_cfg.model, liquid.state_dict(), tmp_path / "liquid", tokenizer=tokenizer, seq_len=32,
                 dtype="fp32")
    write_reference(liquid, tmp_path / "liquid.safetensors", tokenizer, seed=4)
    cases.append((tmp_path / "liquid", tmp_path / "liquid.safetensors", "LiquidMoeForCausalLM"))

    results = run_hf_check(cases, tmp_path, hf5=True)
    for res in results:
        assert res["transformers"] == HF5_VERSION, res
        assert res["ok"], res
        assert res["max_abs_diff"] <= 1e-5 and res["generate_match"] and res["tokenizer_match"], res
    assert [r["class"] for r in results] == ["Lfm2MoeForCausalLM", "Lfm2MoeForCausalLM", "LiquidMoeForCausalLM"]


def test_lfm2_moe_names_config_and_round_trip(tmp_path, tokenizer):
    cfg = config(LFM2)
    model = random_model(cfg.model)
    state = model.state_dict()
    out = tmp_path / "lfm2"
    export_model(cfg.model, state, out, tokenizer=tokenizer, seq_len=32, dtype="fp32")
    tensors = tensors_of(out)
    # The published LFM2-8B-A1B names (per-expert w1/w3/w2; transformers 5 merges them on load).
    for name in ("model.embed_tokens.weight", "model.embedding_norm.weight", "model.layers.0.conv.in_proj.weight",
                 "model.layers.0.conv.conv.weight", "model.layers.0.conv.out_proj.weight",
                 "model.layers.0.feed_forward.w1.weight", "model.layers.0.operator_norm.weight",
                 "model.layers.0.ffn_norm.weight", "model.layers.2.self_attn.q_layernorm.weight",
                 "model.layers.2.self_attn.k_layernorm.weight", "model.layers.2.self_attn.out_proj.weight",
                 "model.layers.2.feed_forward.gate.weight", "model.layers.2.feed_forward.expert_bias",
                 "model.layers.5.feed_forward.experts.7.w2.weight"):
        assert name in tensors, name
    assert "lm_head.weight" not in tensors  # tied
    assert not [k for k in tensors if "liquid" in k or "mtp" in k]
    assert tensors["model.layers.0.conv.conv.weight"].shape == (64, 1, 3)  # nn.Conv1d's layout
    torch.testing.assert_close(tensors["model.layers.3.feed_forward.experts.5.w3.weight"],
                               state["layers.3.ffn.experts.w3"][5], rtol=0, atol=0)
    assert len(tensors) == len(lfm2_moe_plan(cfg.model))
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["layer_types"] == ["conv", "conv", "full_attention", "conv", "full_attention", "conv"]
    assert (config_json["num_dense_layers"], config_json["num_experts_per_tok"], config_json["head_dim"],
            config_json["routed_scaling_factor"], config_json["conv_L_cache"]) == (2, 3, 32, 1.7, 3)
    # Read back: the same model config and bit-identical weights.
    back_cfg, back_state, _ = read_export(out)
    assert back_cfg.layer_types() == cfg.model.layer_types() and back_cfg.ffn_types() == cfg.model.ffn_types()
    for field in ("vocab_size", "d_model", "num_layers", "conv_kernel", "dense_layers", "dense_dim", "norm_eps",
                  "attention"):
        assert getattr(back_cfg, field) == getattr(cfg.model, field), field
    for field in ("num_experts", "top_k", "expert_dim", "routed_scaling"):
        assert getattr(back_cfg.moe, field) == getattr(cfg.model.moe, field), field
    assert back_state.keys() == state.keys()
    for k in state:
        assert torch.equal(back_state[k], state[k]), k
    # transformers 5 saves experts merged (gate_up_proj, down_proj): read back the same.
    merged = dict(tensors)
    for i in range(2, 6):
        p = f"model.layers.{i}.feed_forward.experts."
        merged[p + "gate_up_proj"] = torch.stack([torch.cat([merged.pop(f"{p}{e}.w1.weight"),
                                                             merged.pop(f"{p}{e}.w3.weight")]) for e in range(8)])
        merged[p + "down_proj"] = torch.stack([merged.pop(f"{p}{e}.w2.weight") for e in range(8)])
    for f in out.glob("*.safetensors"):
        f.unlink()
    save_file(merged, str(out / "model.safetensors"))
    _, again, _ = read_export(out)
    for k in state:
        assert torch.equal(again[k], state[k]), k


def test_liquid_export_round_trip_is_bit_identical(tmp_path, tokenizer):
    cfg = config(LIQUID)
    state = random_model(cfg.model).state_dict()
    export_model(cfg.model, state, tmp_path / "out", tokenizer=tokenizer, seq_len=32, dtype="fp32")
    back_cfg, back_state, _ = read_export(tmp_path / "out")
    assert back_cfg == cfg.model
    assert all(torch.equal(back_state[k], state[k]) for k in state) and back_state.keys() == state.keys()


def test_shipped_model_code_is_the_project_source_with_relative_imports():
    assert sorted(model_sources()) == ["ffn", "layers", "loss", "mixers", "model", "scan"]
    text = "from pretrain.model.layers import (RMSNorm,\n    doc_ids)\nimport torch\n"
    assert "from .liquid_layers import (RMSNorm,\n    doc_ids)\nimport torch\n" in render_model_source(text, "x")
    for bad in ("from pretrain.config import ModelConfig\n", "    import parallel.engine\n"):
        with pytest.raises(RuntimeError, match="must be self-contained"):
            render_model_source(bad, "x")


# ---- sharding, dtypes, tokenizer files ----------------------------------------------------------------

def test_sharding_index_lists_every_tensor_once_and_shards_stay_under_the_limit(tmp_path, tokenizer):
    cfg = config(LIQUID)
    state = random_model(cfg.model).state_dict()
    limit = 300_000  # bytes; the largest tensor (experts.w1 of a layer, fp32) is 262,144
    summary = export_model(cfg.model, state, tmp_path / "sharded", tokenizer=tokenizer, seq_len=32, dtype="fp32",
                           max_shard_size="300KB")
    out = tmp_path / "sharded"
    files = sorted(out.glob("*.safetensors"))
    assert summary["shards"] == len(files) > 5
    n = len(files)
    assert [f.name for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / INDEX_FILE).read_text())
    seen = []
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            names = list(handle.keys())
            assert handle.metadata() == {"format": "pt"}
            data_bytes = sum(handle.get_tensor(n).numel() * 4 for n in names)
        assert data_bytes <= limit, f.name
        assert all(index["weight_map"][n] == f.name for n in names)
        seen += names
    assert sorted(seen) == sorted(index["weight_map"]) == sorted(f"model.{k}" for k in state)
    assert len(seen) == len(set(seen))
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in state.values()) == summary["bytes"]
    # The same weights as one file.
    export_model(cfg.model, state, tmp_path / "single", tokenizer=tokenizer, seq_len=32, dtype="fp32")
    assert [f.name for f in (tmp_path / "single").glob("*.safetensors")] == ["model.safetensors"]
    assert not (tmp_path / "single" / INDEX_FILE).exists()
    single = tensors_of(tmp_path / "single")
    sharded = tensors_of(out)
    assert single.keys() == sharded.keys() and all(torch.equal(single[k], sharded[k]) for k in single)
    _, back, _ = read_export(out)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_shard_plan_and_sizes():
    assert shard_plan([("a", 4), ("b", 4), ("c", 4)], 8) == [["a", "b"], ["c"]]
    assert shard_plan([("a", 3), ("big", 20), ("c", 3)], 8) == [["a"], ["big"], ["c"]]  # too big: alone
    assert parse_size("5GB") == 5 * 10**9 and parse_size("64MiB") == 64 * 2**20 and parse_size(1000) == 1000
    assert parse_size("1.5KB") == 1500
    for bad in ("five", "5XB", "0", "-1GB", ""):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


def test_dtypes_and_tokenizer_files(tmp_path, tokenizer):
    cfg = config(LFM2)
    state = random_model(cfg.model).state_dict()
    export_model(cfg.model, state, tmp_path / "bf16", tokenizer=tokenizer, seq_len=32)  # bf16 is the default
    bf16 = tensors_of(tmp_path / "bf16")
    for name, t in bf16.items():
        assert t.dtype == (torch.float32 if name.endswith("expert_bias") else torch.bfloat16), name
    torch.testing.assert_close(bf16["model.embed_tokens.weight"], state["embed.weight"].bfloat16(), rtol=0, atol=0)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    export_model(cfg.model, state, tmp_path / "fp32", tokenizer=tokenizer, seq_len=32, dtype="fp32")
    assert {t.dtype for t in tensors_of(tmp_path / "fp32").values()} == {torch.float32}
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("bf16", "fp32")}
    assert size["bf16"] < 0.6 * size["fp32"]

    tok = TextTokenizer(tokenizer)
    out = tmp_path / "fp32"
    assert (out / "tokenizer.json").read_bytes() == Path(tokenizer).read_bytes()
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    special = json.loads((out / "special_tokens_map.json").read_text())
    assert special == {"eos_token": "<|eos|>", "bos_token": "<|bos|>", "pad_token": "<|pad|>"}
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tok_cfg["eos_token"] == "<|eos|>"
    config_json = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    for d in (config_json, generation):
        assert (d["eos_token_id"], d["bos_token_id"], d["pad_token_id"]) == (tok.eos_id, tok.bos_id, tok.pad_id)


# ---- formats and errors --------------------------------------------------------------------------------

def test_format_choice():
    lfm2 = config(LFM2).model
    assert choose_format(lfm2)[0] == "lfm2_moe"
    assert choose_format(lfm2, "liquid_moe")[0] == "liquid_moe"
    liquid = config(LIQUID).model
    assert choose_format(liquid)[0] == "liquid_moe"
    with pytest.raises(ValueError, match=r"cannot be exported as lfm2_moe.*liquid mixer layers \[0, 1, 3\]"):
        choose_format(liquid, "lfm2_moe")
    # A conv preset with features lfm2_moe lacks falls back to liquid_moe under auto, and says why.
    with_mtp = load_config(LFM2[0], LFM2[1] + ["model.mtp_depth=1"]).model
    fmt, reason = choose_format(with_mtp)
    assert fmt == "liquid_moe" and "multi-token prediction (model.mtp_depth=1)" in reason
    hybrid = load_config(LFM2[0], LFM2[1] + ["model.mixer=liquid", "model.conv_layers=[0,1]"]).model
    with pytest.raises(ValueError, match=r"liquid mixer layers \[3, 5\]"):
        choose_format(hybrid, "lfm2_moe")
    with pytest.raises(ValueError, match="unknown export format 'hf'"):
        choose_format(lfm2, "hf")


def test_conv_preset_with_mtp_exports_as_liquid_moe_with_every_weight(tmp_path, tokenizer):
    cfg = load_config(LFM2[0], LFM2[1] + ["model.mtp_depth=1"])
    state = random_model(cfg.model).state_dict()
    summary = export_model(cfg.model, state, tmp_path / "out", tokenizer=tokenizer, seq_len=32, dtype="fp32")
    assert summary["format"] == "liquid_moe" and "multi-token prediction" in summary["format_reason"]
    assert any(k.startswith("model.mtp.") for k in tensors_of(tmp_path / "out"))
    back_cfg, back, _ = read_export(tmp_path / "out")
    assert back_cfg == cfg.model and all(torch.equal(back[k], state[k]) for k in state)


def test_bad_input_is_refused_before_anything_is_written(tmp_path, tokenizer):
    cfg = config(LIQUID)
    state = random_model(cfg.model).state_dict()
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="unknown dtype 'fp16'; choose one of bf16, fp32"):
        export_model(cfg.model, state, out, tokenizer=tokenizer, seq_len=32, dtype="fp16")
    with pytest.raises(ValueError, match="max shard size 'lots'"):
        export_model(cfg.model, state, out, tokenizer=tokenizer, seq_len=32, max_shard_size="lots")
    broken = dict(state)
    broken.pop("norm.weight")
    broken["layers.0.mixer.in_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"do not match the run's model config: missing \['norm.weight'\].*shapes"):
        export_model(cfg.model, broken, out, tokenizer=tokenizer, seq_len=32)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))

    # A non-empty output directory: refused, then replaced with --overwrite only if it is an earlier export.
    export_model(cfg.model, state, out, tokenizer=tokenizer, seq_len=32, dtype="fp32")
    with pytest.raises(ValueError, match="is not empty; pass --overwrite"):
        export_model(cfg.model, state, out, tokenizer=tokenizer, seq_len=32)
    (out / "stale.safetensors").write_text("x")
    export_model(cfg.model, state, out, tokenizer=tokenizer, seq_len=32, overwrite=True)
    assert not (out / "stale.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an earlier export"):
        export_model(cfg.model, state, other, tokenizer=tokenizer, seq_len=32, overwrite=True)
    assert (other / "todo.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    export_model(cfg.model, state, empty, tokenizer=tokenizer, seq_len=32)  # an empty directory is fine
    assert (empty / "config.json").exists()
    assert not list(tmp_path.glob(".*.tmp-*")) and not list(tmp_path.glob(".*.old-*"))


def write_run_dir(run_dir: Path, tokenizer: Path, preset=LIQUID):
    from pretrain.config import to_yaml

    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(config(preset)))
    (run_dir / "tokenizer").mkdir()
    (run_dir / "tokenizer" / "tokenizer.json").write_bytes(Path(tokenizer).read_bytes())


def test_run_dir_errors_through_the_cli(tmp_path, tokenizer, capsys):
    def export(*args):
        code = main(["export", *map(str, args)])
        return code, capsys.readouterr().err

    code, err = export(tmp_path / "missing", "--out", tmp_path / "o")
    assert code == 2 and "run directory" in err and "does not exist" in err and "Traceback" not in err
    (tmp_path / "plain").mkdir()
    code, err = export(tmp_path / "plain", "--out", tmp_path / "o")
    assert code == 2 and "has no config.yaml: not a run directory" in err
    run = tmp_path / "run"
    write_run_dir(run, tokenizer)
    code, err = export(run, "--out", tmp_path / "o")
    assert code == 2 and "no complete checkpoint" in err
    code, err = export(run, "--out", tmp_path / "o", "--dtype", "fp16")
    assert code == 2 and "unknown dtype 'fp16'" in err
    code, err = export(run, "--out", tmp_path / "o", "--format", "lfm2_moe")
    assert code == 2 and "cannot be exported as lfm2_moe" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    code, err = export(run, "--out", tmp_path / "full")
    assert code == 2 and "is not empty; pass --overwrite" in err
    (run / "tokenizer" / "tokenizer.json").unlink()
    code, err = export(run, "--out", tmp_path / "o")
    assert code == 2 and "has no tokenizer" in err
    assert not (tmp_path / "o").exists()


# ---- end to end: a real (short) training run ------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """4 steps of the tiny preset on the embedded corpus, one process: a run directory with a checkpoint."""
    tmp = tmp_path_factory.mktemp("run")
    run_dir = tmp / "run"
    args = [sys.executable, "-m", "pretrain.cli", "pretrain", "tiny", f"run.dir={run_dir}", *SINGLE,
            "train.max_steps=4", "train.log_interval=2", "train.seq_len=32", "train.global_batch_size=4",
            "train.micro_batch_size=2", "data.corpus_max_mb=0.5", "data.tokenizer_vocab_size=512",
            "model.vocab_size=512", "checkpoint.export=false"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "LIQUID_CACHE": str(tmp / "cache")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def test_export_of_a_real_run_holds_the_checkpoint_weights(trained_run, tmp_path, capsys):
    from checkpoints.manager import find_checkpoint, read_model_state

    out = tmp_path / "export"
    assert main(["export", str(trained_run), "--out", str(out), "--dtype", "fp32"]) == 0
    line = capsys.readouterr().out
    assert "exported liquid_moe" in line and "step_00000004" in line
    ckpt = find_checkpoint(trained_run)
    state = read_model_state(ckpt)
    back_cfg, back, config_json = read_export(out)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k].float()) for k in state)
    assert config_json["liquid_pretrain"]["step"] == 4 and config_json["liquid_pretrain"]["run_name"] == "tiny"
    assert config_json["liquid_pretrain"]["seq_len"] == 32
    assert (out / "tokenizer.json").read_bytes() == (trained_run / "tokenizer" / "tokenizer.json").read_bytes()
    check_state_dict(back_cfg, state)
    # --step picks a checkpoint; a step that was not saved is a clear error.
    summary = export_run(trained_run, tmp_path / "step4", step=4)
    assert summary["step"] == 4 and summary["dtype"] == "bf16"
    assert main(["export", str(trained_run), "--out", str(tmp_path / "x"), "--step", "3"]) == 2
    assert "no checkpoint at step 3" in capsys.readouterr().err


def test_model_config_from_a_published_lfm2_moe_config():
    """The LiquidAI/LFM2-8B-A1B config.json keys (pre-5.x style, rope_theta at the top) read as the preset."""
    published = {"architectures": ["Lfm2MoeForCausalLM"], "model_type": "lfm2_moe", "vocab_size": 65536,
                 "hidden_size": 2048, "intermediate_size": 7168, "moe_intermediate_size": 1792,
                 "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "max_position_embeddings": 128000, "norm_eps": 1e-5, "conv_bias": False, "conv_L_cache": 3,
                 "num_dense_layers": 2, "num_experts": 32, "num_experts_per_tok": 4, "use_expert_bias": True,
                 "routed_scaling_factor": 1.0, "norm_topk_prob": True, "rope_theta": 1000000.0,
                 "tie_embedding": True,
                 "layer_types": ["full_attention" if i in (2, 6, 10, 14, 18, 21) else "conv" for i in range(24)]}
    cfg = model_config_from_lfm2_moe(published)
    preset = load_config("lfm2-8b-a1b").model
    assert cfg.layer_types() == preset.layer_types() and cfg.ffn_types() == preset.ffn_types()
    assert cfg.attention == preset.attention and cfg.moe.expert_dim == preset.moe.expert_dim
    with pytest.raises(ValueError, match="conv_bias=true"):
        model_config_from_lfm2_moe({**published, "conv_bias": True})
