"""Export of final weights to Hugging Face format: `liquid export RUN_DIR [--step N] --out DIR`.

The export directory holds safetensors weights (one `model.safetensors`, or `model-0000i-of-0000n.safetensors`
shards plus `model.safetensors.index.json` when the tensors exceed `--max-shard-size`, default 5GB, decimal
as in transformers), `config.json`, `generation_config.json` and the run's tokenizer (`tokenizer.json`,
`tokenizer_config.json`, `special_tokens_map.json`; EOS/BOS/PAD as data_pipeline/tokenizer.py finds them).

Two layouts (`fmt`, `--format`):

- `lfm2_moe`: transformers' own LFM2-MoE (`Lfm2MoeForCausalLM`, transformers >= 5). Tensor names and
  config keys are those of the published LiquidAI/LFM2-8B-A1B checkpoint: per-expert
  `feed_forward.experts.{e}.w1/w2/w3.weight` (transformers 5 merges them into `gate_up_proj`/`down_proj`
  when it loads), `conv.in_proj/conv/out_proj`, `self_attn.q_layernorm/k_layernorm`, `operator_norm`,
  `ffn_norm`, `embedding_norm` (the final norm) and a tied `embed_tokens`. The model computes exactly the
  same function: in_proj -> B, C, x; out_proj(C * conv(B * x)); q/k RMSNorm before rotate-half RoPE; sigmoid
  router, top-k of score + expert_bias, chosen scores / (sum + 1e-6) x routed_scaling_factor.
- `liquid_moe`: any model of this project (liquid layers, MTP, ...). The modeling code is written beside the
  weights (`configuration_liquid_moe.py`, `modeling_liquid_moe.py`, and the project's pretrain/model/model.py
  with every pretrain/model module it imports, copied as `liquid_*.py` with their imports made relative) and `config.json` has an `auto_map`, so
  `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` runs the training code itself
  (transformers 4.57 and 5.x). Nothing in the directory imports this project.

`auto` (the default) picks `lfm2_moe` when the model is representable there (only conv and attention
mixers, no multi-token prediction) and `liquid_moe` otherwise. Decision for a conv preset lfm2_moe cannot
represent (it also has liquid layers, or MTP): with `auto` it falls back to `liquid_moe` and the summary's
`format_reason` names the features; with `--format lfm2_moe` it is refused with a ValueError naming them.
(MTP weights could be dropped without changing the logits, but an export keeps every trained weight.)

Dtypes: `bf16` (default) stores every tensor in bfloat16 except the routers' `expert_bias`, kept in float32
(it decides the top-k choice; its balancing steps are 1e-3..1e-2 and bf16 would round them); `fp32` stores
float32, bit-identical to the checkpoint.

Refused with a ValueError before anything is written: a missing run directory or config.yaml, no checkpoint,
no tokenizer, an unknown dtype or format, a bad shard size, and a non-empty output directory without
`overwrite` (with `overwrite`, only an earlier export, a directory with a config.json, is replaced). The
export is written to a temporary sibling directory and renamed into place when complete.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from pretrain.run_dir import RunDir

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
HF_DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}
FORMATS = ("auto", "lfm2_moe", "liquid_moe")
DEFAULT_MAX_SHARD_SIZE = "5GB"
EXPORT_VERSION = 1
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The project's model code shipped beside liquid_moe exports (as liquid_<name>.py): pretrain/model/model.py
# and every pretrain/model module it imports, directly or not.
MODEL_ROOT = "model"
HF_TEMPLATES = ("configuration_liquid_moe.py", "modeling_liquid_moe.py")
PROJECT_PACKAGES = ("pretrain", "parallel", "data_pipeline", "checkpoints", "cluster")
KEEP_FP32_SUFFIXES = ("expert_bias",)
LFM2_LAYER_TYPES = {"conv": "conv", "attention": "full_attention"}

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


# ---- small checks ------------------------------------------------------------------------------

def parse_size(size: int | str) -> int:
    """'5GB' (decimal, as transformers), '500MiB', '20KB' or a number of bytes -> bytes (> 0)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        unit = match.group(2).upper() if match else None
        if not match or unit not in _SIZE_UNITS:
            raise ValueError(f"max shard size '{size}' is not a size like 5GB, 500MB, 64MiB or a number of bytes")
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"max shard size must be > 0 bytes, got {size}")
    return value


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    return fmt


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"output directory {out} is not empty; pass --overwrite to replace an earlier export")
        if not (out / "config.json").is_file():
            raise ValueError(f"refusing to replace {out}: it is not empty and not an earlier export "
                             "(no config.json); remove it yourself or choose another --out")
    return out


# ---- which layout ------------------------------------------------------------------------------

def lfm2_moe_blockers(model_cfg) -> list[str]:
    """Features of the model that transformers' lfm2_moe cannot represent (empty: it can)."""
    blockers = []
    liquid = [i for i, kind in enumerate(model_cfg.layer_types()) if kind not in LFM2_LAYER_TYPES]
    if liquid:
        blockers.append(f"liquid mixer layers {liquid}")
    if model_cfg.mtp_depth:
        blockers.append(f"multi-token prediction (model.mtp_depth={model_cfg.mtp_depth})")
    return blockers


def choose_format(model_cfg, fmt: str = "auto") -> tuple[str, str]:
    """(format, reason) for this model; raises for an explicit lfm2_moe the model cannot be."""
    check_format(fmt)
    blockers = lfm2_moe_blockers(model_cfg)
    if fmt == "lfm2_moe" and blockers:
        raise ValueError("this model cannot be exported as lfm2_moe (transformers' LFM2-MoE has only conv and "
                         f"attention layers and no multi-token prediction): it has {' and '.join(blockers)}; "
                         "use --format liquid_moe (or auto)")
    if fmt == "auto":
        fmt = "liquid_moe" if blockers else "lfm2_moe"
    if fmt == "lfm2_moe":
        return fmt, "conv and attention layers only: loads as transformers' Lfm2MoeForCausalLM"
    why = f"lfm2_moe cannot represent its {' and '.join(blockers)}" if blockers else "as requested"
    return fmt, f"custom code, trust_remote_code=True; {why}"


# ---- tensor names ------------------------------------------------------------------------------
# A plan is a list of (exported name, source key, expert index or None), in the order they are written.

def lfm2_moe_plan(model_cfg) -> list[tuple[str, str, int | None]]:
    plan = [("model.embed_tokens.weight", "embed.weight", None)]
    for i, (mixer, ffn) in enumerate(zip(model_cfg.layer_types(), model_cfg.ffn_types())):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        if mixer == "conv":
            plan += [(f"{dst}conv.{n}.weight", f"{src}mixer.{n}.weight", None) for n in ("in_proj", "conv", "out_proj")]
        elif mixer == "attention":
            plan += [(f"{dst}self_attn.{n}.weight", f"{src}mixer.{n}.weight", None)
                     for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
            plan += [(f"{dst}self_attn.{hf}.weight", f"{src}mixer.{ours}.weight", None)
                     for hf, ours in (("q_layernorm", "q_norm"), ("k_layernorm", "k_norm"))]
        else:
            raise ValueError(f"layer {i} is a '{mixer}' mixer, which lfm2_moe does not have")
        if ffn == "dense":
            plan += [(f"{dst}feed_forward.{w}.weight", f"{src}ffn.{w}.weight", None) for w in ("w1", "w3", "w2")]
        else:
            plan += [(f"{dst}feed_forward.gate.weight", f"{src}ffn.router.gate.weight", None),
                     (f"{dst}feed_forward.expert_bias", f"{src}ffn.router.expert_bias", None)]
            plan += [(f"{dst}feed_forward.experts.{e}.{w}.weight", f"{src}ffn.experts.{w}", e)
                     for e in range(model_cfg.moe.num_experts) for w in ("w1", "w3", "w2")]
        plan += [(f"{dst}operator_norm.weight", f"{src}mixer_norm.weight", None),
                 (f"{dst}ffn_norm.weight", f"{src}ffn_norm.weight", None)]
    plan.append(("model.embedding_norm.weight", "norm.weight", None))
    return plan


def liquid_moe_plan(state_dict: dict) -> list[tuple[str, str, int | None]]:
    return [(f"model.{key}", key, None) for key in state_dict]


def check_state_dict(model_cfg, state_dict: dict) -> None:
    """The state dict must be exactly LiquidLM(model_cfg)'s: same keys, same shapes."""
    from pretrain.model.model import LiquidLM

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LiquidLM(model_cfg).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    shapes = [f"{k}: {got[k]} != {expected[k]}" for k in expected.keys() & got.keys() if got[k] != expected[k]]
    if missing or unexpected or shapes:
        raise ValueError("the weights do not match the run's model config: "
                         + "; ".join(part for part in (
                             missing and f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}",
                             unexpected and f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}",
                             shapes and f"shapes {shapes[:5]}") if part))


# ---- writing -----------------------------------------------------------------------------------

def _target_dtype(name: str, source: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    if not source.is_floating_point():
        return source.dtype
    return torch.float32 if name.endswith(KEEP_FP32_SUFFIXES) else dtype


def _materialize(state_dict, name, key, index, dtype) -> torch.Tensor:
    tensor = state_dict[key]
    if index is not None:
        tensor = tensor[index]
    return tensor.detach().to(device="cpu", dtype=_target_dtype(name, tensor, dtype)).contiguous().clone()


def shard_plan(sizes: list[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Greedy, in order: a shard closes before the tensor that would take it past the limit. A single
    tensor above the limit gets a shard of its own (as transformers does)."""
    shards, current, used = [], [], 0
    for name, nbytes in sizes:
        if current and used + nbytes > max_shard_size:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current:
        shards.append(current)
    return shards


def write_safetensors(state_dict: dict, plan, out: Path, *, dtype: torch.dtype, max_shard_size: int) -> dict:
    """Writes the planned tensors shard by shard (only one shard's copies in memory at a time)."""
    from safetensors.torch import save_file

    entries = {name: (key, index) for name, key, index in plan}
    if len(entries) != len(plan):
        raise RuntimeError("export plan names a tensor twice")
    sizes = []
    for name, key, index in plan:
        src = state_dict[key]
        numel = src[index].numel() if index is not None else src.numel()
        sizes.append((name, numel * torch.empty((), dtype=_target_dtype(name, src, dtype)).element_size()))
    size_of = dict(sizes)
    shards = shard_plan(sizes, max_shard_size)
    files = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total_params = {}, 0
    for file, names in zip(files, shards):
        tensors = {n: _materialize(state_dict, n, *entries[n], dtype) for n in names}
        total_params += sum(t.numel() for t in tensors.values())
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
        del tensors
    total_size = sum(size_of.values())
    if len(files) > 1:
        index = {"metadata": {"total_size": total_size, "total_parameters": total_params}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return {"files": files, "tensors": len(plan), "bytes": total_size, "parameters": total_params,
            "shard_bytes": [sum(size_of[n] for n in names) for names in shards]}


def _tokenizer_info(tokenizer_path: Path) -> dict:
    from data_pipeline.tokenizer import TextTokenizer

    tok = TextTokenizer(tokenizer_path)
    names = {"eos": tok.tok.id_to_token(tok.eos_id),
             "bos": tok.tok.id_to_token(tok.bos_id) if tok.bos_id is not None else None,
             "pad": tok.tok.id_to_token(tok.pad_id) if tok.pad_id is not None else None}
    ids = {"eos": tok.eos_id, "bos": tok.bos_id, "pad": tok.pad_id if tok.pad_id is not None else tok.eos_id}
    return {"path": tok.path, "names": names, "ids": ids, "vocab_size": tok.vocab_size}


def write_tokenizer(tok: dict, out: Path, *, model_max_length: int) -> list[str]:
    shutil.copyfile(tok["path"], out / "tokenizer.json")
    special = {f"{kind}_token": name for kind, name in tok["names"].items() if name is not None}
    if "pad_token" not in special:
        special["pad_token"] = special["eos_token"]  # what the data pipeline pads blocks with
    config = {**special, "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def model_config_dict(model_cfg) -> dict:
    """The project's model config as plain JSON, plus the resolved per-layer kinds."""
    values = dataclasses.asdict(model_cfg)
    values["layer_kinds"] = model_cfg.layer_types()
    values["ffn_kinds"] = model_cfg.ffn_types()
    return values


def lfm2_moe_config(model_cfg, *, seq_len: int) -> dict:
    a, m = model_cfg.attention, model_cfg.moe
    return {
        "architectures": ["Lfm2MoeForCausalLM"],
        "model_type": "lfm2_moe",
        "vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.d_model,
        "intermediate_size": model_cfg.dense_dim,
        "moe_intermediate_size": m.expert_dim,
        "num_hidden_layers": model_cfg.num_layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": a.head_dim,
        "max_position_embeddings": seq_len,
        "norm_eps": model_cfg.norm_eps,
        "conv_bias": False,
        "conv_L_cache": model_cfg.conv_kernel,
        "num_dense_layers": model_cfg.dense_layers,
        "num_experts": m.num_experts,
        "num_experts_per_tok": m.top_k,
        "use_expert_bias": True,
        "norm_topk_prob": True,
        "routed_scaling_factor": m.routed_scaling,
        "layer_types": [LFM2_LAYER_TYPES[kind] for kind in model_cfg.layer_types()],
        "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta},
        "rope_theta": a.rope_theta,  # the pre-5.x key, still read by other tools
        "tie_word_embeddings": True,
        "initializer_range": model_cfg.init_std,
        "use_cache": True,
    }


def liquid_moe_config(model_cfg) -> dict:
    return {
        "architectures": ["LiquidMoeForCausalLM"],
        "model_type": "liquid_moe",
        "auto_map": {"AutoConfig": "configuration_liquid_moe.LiquidMoeConfig",
                     "AutoModelForCausalLM": "modeling_liquid_moe.LiquidMoeForCausalLM"},
        "liquid_model": model_config_dict(model_cfg),
        "tie_word_embeddings": False,
        "use_cache": False,
    }


def render_model_source(text: str, name: str) -> str:
    """One pretrain/model file with `from pretrain.model.x import` made `from .liquid_x import`."""
    rendered = re.sub(r"^(\s*)from\s+pretrain\.model\.(\w+)\s+import", r"\1from .liquid_\2 import", text,
                      flags=re.MULTILINE)
    leftover = re.findall(rf"^\s*(?:from|import)\s+((?:{'|'.join(PROJECT_PACKAGES)})\b[\w.]*)", rendered,
                          flags=re.MULTILINE)
    if leftover:
        raise RuntimeError(f"pretrain/model/{name}.py imports {leftover}: the exported modeling code must be "
                           "self-contained (only pretrain.model modules can be shipped)")
    return (f"# Generated by `liquid export` from the liquid-pretrain source pretrain/model/{name}.py;\n"
            f"# imports made relative so this directory is self-contained. Do not edit.\n" + rendered)


def model_sources() -> dict[str, str]:
    """{name: source} of pretrain/model/model.py and the pretrain.model modules it needs, transitively."""
    import pretrain.model

    src_dir = Path(pretrain.model.__file__).parent
    sources, todo = {}, [MODEL_ROOT]
    while todo:
        name = todo.pop()
        if name not in sources:
            sources[name] = (src_dir / f"{name}.py").read_text()
            todo += re.findall(r"^\s*from\s+pretrain\.model\.(\w+)\s+import", sources[name], flags=re.MULTILINE)
    return sources


def write_modeling_code(out: Path) -> list[str]:
    templates = Path(__file__).parent / "hf_modeling"
    modeling = (templates / "modeling_liquid_moe.py").read_text()
    imported = set(re.findall(r"^\s*from\s+\.(\w+)\s+import", modeling, flags=re.MULTILINE))
    written = []
    for name, text in sorted(model_sources().items()):
        if f"liquid_{name}" not in imported:  # a programming error, caught by the export tests
            raise RuntimeError(f"checkpoints/hf_modeling/modeling_liquid_moe.py must import .liquid_{name} itself: "
                               "transformers copies only the files a local model's modeling file imports")
        (out / f"liquid_{name}.py").write_text(render_model_source(text, name))
        written.append(f"liquid_{name}.py")
    for file in HF_TEMPLATES:
        shutil.copyfile(templates / file, out / file)
        written.append(file)
    return written


# ---- entry points ------------------------------------------------------------------------------

def export_model(model_cfg, state_dict: dict, out: str | Path, *, tokenizer: str | Path, seq_len: int,
                 dtype: str = "bf16", fmt: str = "auto", max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                 overwrite: bool = False, source: dict | None = None) -> dict:
    """Writes the Hugging Face directory for these weights (LiquidLM(model_cfg).state_dict() keys)."""
    torch_dtype = check_dtype(dtype)
    fmt, reason = choose_format(model_cfg, fmt)
    shard_bytes = parse_size(max_shard_size)
    out = check_output_dir(out, overwrite)
    tok = _tokenizer_info(Path(tokenizer))
    if tok["vocab_size"] > model_cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok['vocab_size']} tokens, more than model.vocab_size="
                         f"{model_cfg.vocab_size}")
    check_state_dict(model_cfg, state_dict)
    plan = lfm2_moe_plan(model_cfg) if fmt == "lfm2_moe" else liquid_moe_plan(state_dict)
    used = {key for _, key, _ in plan}
    if used != set(state_dict):  # every trained weight is exported, none twice-mapped from nowhere
        raise RuntimeError(f"export plan covers {sorted(used ^ set(state_dict))[:5]} wrongly")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        weights = write_safetensors(state_dict, plan, tmp, dtype=torch_dtype, max_shard_size=shard_bytes)
        config = lfm2_moe_config(model_cfg, seq_len=seq_len) if fmt == "lfm2_moe" else liquid_moe_config(model_cfg)
        config.update({"bos_token_id": tok["ids"]["bos"], "eos_token_id": tok["ids"]["eos"],
                       "pad_token_id": tok["ids"]["pad"], "dtype": HF_DTYPE_NAMES[dtype]})
        config["liquid_pretrain"] = {"export_version": EXPORT_VERSION, "format": fmt, "seq_len": seq_len,
                                     "dtype": dtype, **(source or {})}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {"bos_token_id": tok["ids"]["bos"], "eos_token_id": tok["ids"]["eos"],
                      "pad_token_id": tok["ids"]["pad"], "use_cache": fmt == "lfm2_moe"}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        files = weights["files"] + ([INDEX_FILE] if len(weights["files"]) > 1 else [])
        files += ["config.json", "generation_config.json"]
        files += write_tokenizer(tok, tmp, model_max_length=seq_len)
        if fmt == "liquid_moe":
            files += write_modeling_code(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "format": fmt, "format_reason": reason, "dtype": dtype, "files": files,
            "tensors": weights["tensors"], "parameters": weights["parameters"], "bytes": weights["bytes"],
            "shards": len(weights["files"]), "shard_bytes": weights["shard_bytes"], **(source or {})}


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.is_dir() and any(out.iterdir()):  # an earlier export, checked by check_output_dir
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out.is_dir():
            out.rmdir()
        os.replace(tmp, out)
    os.chmod(out, 0o755 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _step_of(checkpoint: Path) -> int | None:
    match = re.search(r"(\d+)$", checkpoint.name)
    return int(match.group(1)) if match else None


def load_run_config(run_dir: str | Path):
    """The run's resolved config (run_dir/config.yaml), with clear errors for a path that is not a run."""
    from pretrain.config import config_from_yaml

    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise ValueError(f"run directory {run.path} does not exist")
    if not run.has_config():
        raise ValueError(f"{run.path} has no {run.config_file.name}: not a run directory")
    return config_from_yaml(run.config_file.read_text())


def run_tokenizer(run_dir: str | Path) -> Path:
    path = RunDir(run_dir).tokenizer_file
    if not path.is_file():
        raise ValueError(f"{path} does not exist: the run directory has no tokenizer (the training worker "
                         "copies the run's tokenizer there)")
    return path


def export_run(run_dir: str | Path, out: str | Path, step: int | None = None, dtype: str = "bf16", *,
               fmt: str = "auto", max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
               overwrite: bool = False) -> dict:
    """The newest complete checkpoint of a run (or the one at `step`) -> a Hugging Face directory."""
    cfg = load_run_config(run_dir)
    # Cheap checks first: a typo must not cost reading an 8B checkpoint.
    check_dtype(dtype)
    choose_format(cfg.model, fmt)
    parse_size(max_shard_size)
    check_output_dir(out, overwrite)
    tokenizer = run_tokenizer(run_dir)
    from checkpoints.manager import find_checkpoint, read_model_state

    ckpt = Path(find_checkpoint(run_dir, step, reverify=False))  # not hashed again if this process just wrote it
    state = read_model_state(ckpt)
    source = {"run_name": cfg.run.name, "checkpoint": str(ckpt), "step": _step_of(ckpt)}
    return export_model(cfg.model, state, out, tokenizer=tokenizer, seq_len=cfg.train.seq_len, dtype=dtype,
                        fmt=fmt, max_shard_size=max_shard_size, overwrite=overwrite, source=source)


def summary_line(summary: dict) -> str:
    return (f"exported {summary['format']} ({summary['format_reason']}): {summary['parameters']:,} parameters, "
            f"{summary['tensors']} tensors, {summary['bytes'] / 2**20:.1f} MiB {summary['dtype']} in "
            f"{summary['shards']} file{'s' if summary['shards'] > 1 else ''}"
            + (f" from {summary['checkpoint']}" if summary.get("checkpoint") else "") + f" -> {summary['out']}")


# ---- reading an export back --------------------------------------------------------------------

def model_config_from_dict(values: dict):
    """`liquid_model` of a liquid_moe config.json -> the project's ModelConfig."""
    from pretrain.config import AttentionConfig, LiquidConfig, ModelConfig, MoEConfig

    values = dict(values)
    kinds, ffn_kinds = values.pop("layer_kinds", None), values.pop("ffn_kinds", None)
    try:
        cfg = ModelConfig(**{**values, "liquid": LiquidConfig(**values.get("liquid", {})),
                             "attention": AttentionConfig(**values.get("attention", {})),
                             "moe": MoEConfig(**values.get("moe", {}))})
    except TypeError as err:
        raise ValueError(f"config.json: liquid_model does not fit this version's model config: {err}") from None
    if (kinds is not None and kinds != cfg.layer_types()) or (ffn_kinds is not None and ffn_kinds != cfg.ffn_types()):
        raise ValueError("config.json: liquid_model's layer_kinds/ffn_kinds disagree with its layer settings")
    return cfg


def model_config_from_lfm2_moe(config: dict):
    """An lfm2_moe config.json (ours or the LiquidAI layout) -> the project's ModelConfig."""
    from pretrain.config import AttentionConfig, ModelConfig, MoEConfig

    try:
        types = list(config["layer_types"])
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        rope = config.get("rope_parameters") or {"rope_type": "default",
                                                  "rope_theta": config.get("rope_theta", 1_000_000.0)}
        problems = [what for what, bad in (
            ("conv_bias=true", config.get("conv_bias", False)),
            ("untied lm_head (tie_word_embeddings=false)",
             not config.get("tie_word_embeddings", config.get("tie_embedding", True))),
            ("norm_topk_prob=false", not config.get("norm_topk_prob", True)),
            (f"rope_type '{rope.get('rope_type')}'", rope.get("rope_type", "default") != "default"),
            ("rope_scaling", config.get("rope_scaling")),
            (f"layer types {sorted(set(types) - set(LFM2_LAYER_TYPES.values()))}",
             set(types) - set(LFM2_LAYER_TYPES.values())),
        ) if bad]
        if problems:
            raise ValueError(f"config.json: this lfm2_moe model has {', '.join(problems)}, "
                             "which the liquid model lacks")
        return ModelConfig(
            vocab_size=config["vocab_size"], d_model=hidden, num_layers=config["num_hidden_layers"], mixer="conv",
            attention_layers=[i for i, t in enumerate(types) if t == "full_attention"], conv_layers=[],
            conv_kernel=config.get("conv_L_cache", 3), dense_layers=config.get("num_dense_layers", 2),
            dense_dim=config["intermediate_size"],
            attention=AttentionConfig(heads=heads, kv_heads=config["num_key_value_heads"],
                                      head_dim=config.get("head_dim") or hidden // heads,
                                      rope_theta=float(rope["rope_theta"])),
            moe=MoEConfig(num_experts=config["num_experts"], top_k=config["num_experts_per_tok"],
                          expert_dim=config["moe_intermediate_size"],
                          routed_scaling=float(config.get("routed_scaling_factor", 1.0))),
            norm_eps=config.get("norm_eps", 1e-5), init_std=config.get("initializer_range", 0.02))
    except KeyError as err:
        raise ValueError(f"config.json of an lfm2_moe export lacks {err}") from None


def read_safetensors(export_dir: Path) -> dict:
    from safetensors.torch import load_file

    index = export_dir / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (export_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise ValueError(f"{export_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    tensors = {}
    for file in files:
        tensors.update(load_file(str(export_dir / file)))
    return tensors


def read_export(export_dir: str | Path) -> tuple[object, dict, dict]:
    """An export directory -> (the project's ModelConfig, float32 state dict of LiquidLM, config.json)."""
    export_dir = Path(export_dir)
    path = export_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{export_dir} has no config.json: not a Hugging Face export")
    config = json.loads(path.read_text())
    tensors = {k: v.float() for k, v in read_safetensors(export_dir).items()}
    kind = config.get("model_type")
    if kind == "liquid_moe":
        model_cfg = model_config_from_dict(config["liquid_model"])
        unexpected = [k for k in tensors if not k.startswith("model.")]
        if unexpected:
            raise ValueError(f"{export_dir}: unexpected tensors {unexpected[:5]}")
        state = {k[len("model."):]: v for k, v in tensors.items()}
    elif kind == "lfm2_moe":
        model_cfg = model_config_from_lfm2_moe(config)
        state = _state_from_lfm2_moe(model_cfg, tensors, export_dir)
    else:
        raise ValueError(f"{export_dir}: model_type '{kind}' is neither liquid_moe nor lfm2_moe")
    check_state_dict(model_cfg, state)
    return model_cfg, state, config


def _state_from_lfm2_moe(model_cfg, tensors: dict, export_dir: Path) -> dict:
    tensors = dict(tensors)
    if "lm_head.weight" in tensors:  # saved untied by some tools; must equal the embedding
        head = tensors.pop("lm_head.weight")
        if not torch.equal(head, tensors.get("model.embed_tokens.weight", head)):
            raise ValueError(f"{export_dir}: lm_head.weight differs from the embedding (untied head)")
    for i, ffn in enumerate(model_cfg.ffn_types()):  # transformers 5's merged expert tensors
        dst = f"model.layers.{i}.feed_forward."
        if ffn == "moe" and dst + "experts.gate_up_proj" in tensors:
            w1, w3 = tensors.pop(dst + "experts.gate_up_proj").chunk(2, dim=1)
            w2 = tensors.pop(dst + "experts.down_proj")
            for e in range(model_cfg.moe.num_experts):
                for name, w in (("w1", w1), ("w3", w3), ("w2", w2)):
                    tensors[f"{dst}experts.{e}.{name}.weight"] = w[e]
        if ffn == "moe":  # use_expert_bias=false: selection by the scores alone, i.e. a zero bias
            tensors.setdefault(dst + "expert_bias", torch.zeros(model_cfg.moe.num_experts))
    state, experts = {}, {}
    for name, key, index in lfm2_moe_plan(model_cfg):
        if name not in tensors:
            raise ValueError(f"{export_dir}: tensor {name} is missing")
        if index is None:
            state[key] = tensors.pop(name)
        else:
            experts.setdefault(key, {})[index] = tensors.pop(name)
    for key, parts in experts.items():
        state[key] = torch.stack([parts[e] for e in range(len(parts))])
    if tensors:
        raise ValueError(f"{export_dir}: tensors the model does not have: {sorted(tensors)[:5]}")
    return state
