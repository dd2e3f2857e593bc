"""`liquid eval SOURCE --input FILE...`: mean per-token loss and perplexity on held-out text.

SOURCE is a run directory (it has config.yaml: the newest complete checkpoint, or `--step`, read through
checkpoints.manager; the run's tokenizer/tokenizer.json; windows of train.seq_len) or an export directory
(it has config.json, either layout of checkpoints/export.py: read back into the project's own model, so no
transformers is needed; its tokenizer.json; windows of `liquid_pretrain.seq_len`). `--seq-len` overrides.

Text is read as `liquid data prepare` reads it (.txt is one document; .jsonl[.gz|.zst] and .parquet hold one
per record, `--text-field`), tokenized with the source's tokenizer, and every document is followed by EOS,
as in training.

Windows: each document is scored on its own, in windows of seq_len + 1 tokens overlapping by one (seq_len
inputs and their seq_len next tokens, like training rows), each starting from an empty context. No window
crosses a document boundary, so no document masking is needed and any causal LM (transformers included)
computes the same numbers; the first token of a document is never a target. Windows are batched with right
padding whose targets are ignored (every layer is causal and the MoE dropless, so padding cannot change the
real positions).

The result is one JSON line: {"loss": sum of natural-log cross entropy / tokens, "perplexity": exp(loss),
"tokens": number of targets, "source": the checkpoint or export directory, ...}. The model runs in float32
(bf16 weights are upcast); sums are accumulated in float64.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.run_dir import RunDir

IGNORE_INDEX = -100
LOGITS_BUDGET = 2**27  # float32 logits per batch (512 MiB) when the batch size is automatic


@dataclass
class EvalSource:
    model_cfg: object
    state_dict: dict
    tokenizer: Path
    seq_len: int
    info: dict  # source, step, format: reported with the result


def read_documents(inputs: list[str], text_field: str = "text") -> list[str]:
    from data_pipeline.sources import SourceStats, expand_inputs, iter_texts

    if not inputs:
        raise ValueError("no --input given: name the held-out text files")
    stats = SourceStats()
    docs = [t for f in expand_inputs(list(inputs)) for t in iter_texts(f, text_field=text_field, stats=stats)]
    if not docs:
        raise ValueError(f"no documents in {list(inputs)} (skipped: {stats.skipped_where[:3]})")
    return docs


def tokenize_documents(docs: list[str], tokenizer: str | Path, eos_token: str | None = None) -> list[list[int]]:
    """Each document's ids followed by EOS, as the data pipeline packs them."""
    from data_pipeline.tokenizer import TextTokenizer

    tok = TextTokenizer(tokenizer, eos_token=eos_token)
    return [ids + [tok.eos_id] for ids in tok.encode_batch(docs)]


def document_windows(token_docs: list[list[int]], seq_len: int) -> list[list[int]]:
    """Windows of at most seq_len + 1 tokens, overlapping by one, never crossing a document."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    windows = []
    for ids in token_docs:
        for start in range(0, max(len(ids) - 1, 0), seq_len):
            windows.append(ids[start:start + seq_len + 1])
    return windows


def batches(windows: list[list[int]], batch_size: int, pad_id: int = 0):
    """(input_ids [b, s], labels [b, s]) with labels = next tokens, IGNORE_INDEX at right padding."""
    for i in range(0, len(windows), batch_size):
        part = windows[i:i + batch_size]
        width = max(len(w) for w in part) - 1
        ids = torch.full((len(part), width), pad_id, dtype=torch.long)
        labels = torch.full((len(part), width), IGNORE_INDEX, dtype=torch.long)
        for row, w in enumerate(part):
            ids[row, :len(w) - 1] = torch.tensor(w[:-1])
            labels[row, :len(w) - 1] = torch.tensor(w[1:])
        yield ids, labels


def auto_batch_size(seq_len: int, vocab_size: int) -> int:
    return max(1, min(64, LOGITS_BUDGET // max(1, seq_len * vocab_size)))


@torch.no_grad()
def score_windows(logits_fn, windows: list[list[int]], *, batch_size: int, device="cpu") -> tuple[float, int]:
    """(sum of natural-log cross entropy, number of targets); logits_fn(input_ids) -> [b, s, vocab]."""
    total, count = 0.0, 0
    for ids, labels in batches(windows, batch_size):
        logits = logits_fn(ids.to(device)).float()
        labels = labels.to(device)
        total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="sum").double().item()
        count += int((labels != IGNORE_INDEX).sum())
    return total, count


def result(total: float, count: int, info: dict) -> dict:
    if count == 0:
        raise ValueError("the inputs give no tokens to score (every document is empty)")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"), "tokens": count, **info}


def evaluate_model(model, token_docs: list[list[int]], seq_len: int, *, batch_size: int | None = None,
                   device="cpu", info: dict | None = None) -> dict:
    """A LiquidLM (in memory) on tokenized documents -> the result dict."""
    windows = document_windows(token_docs, seq_len)
    batch_size = batch_size or auto_batch_size(seq_len, model.cfg.vocab_size)
    was_training = model.training
    model.eval()
    try:
        total, count = score_windows(lambda ids: model(ids).logits, windows, batch_size=batch_size, device=device)
    finally:
        model.train(was_training)
    return result(total, count, {**(info or {}), "documents": len(token_docs), "windows": len(windows),
                                 "seq_len": seq_len})


def load_source(path: str | Path, step: int | None = None) -> EvalSource:
    """A run directory or an export directory -> weights, tokenizer and window length."""
    from checkpoints.export import load_run_config, read_export, run_tokenizer

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} does not exist (expected a run directory or an export directory)")
    if (path / "config.json").is_file():
        if step is not None:
            raise ValueError(f"--step applies to run directories; {path} is an export")
        model_cfg, state, config = read_export(path)
        meta = config.get("liquid_pretrain") or {}
        seq_len = meta.get("seq_len") or min(int(config.get("max_position_embeddings", 4096)), 4096)
        tokenizer = path / "tokenizer.json"
        if not tokenizer.is_file():
            raise ValueError(f"{path} has no tokenizer.json")
        info = {"source": str(path), "format": config.get("model_type"), "step": meta.get("step")}
        return EvalSource(model_cfg, state, tokenizer, int(seq_len), info)
    if RunDir(path).has_config():
        cfg = load_run_config(path)
        tokenizer = run_tokenizer(path)
        from checkpoints.export import _step_of
        from checkpoints.manager import find_checkpoint, read_model_state

        ckpt = Path(find_checkpoint(path, step))
        info = {"source": str(ckpt), "format": "checkpoint", "step": _step_of(ckpt)}
        return EvalSource(cfg.model, read_model_state(ckpt), tokenizer, cfg.train.seq_len, info)
    raise ValueError(f"{path} is neither a run directory ({RunDir(path).config_file.name}) nor an export "
                     "directory (config.json)")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device '{device}'; choose auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but CUDA is not available")
    return device


def evaluate(path: str | Path, inputs: list[str], *, step: int | None = None, seq_len: int | None = None,
             batch_size: int | None = None, device: str = "auto", text_field: str = "text",
             eos_token: str | None = None) -> dict:
    """`liquid eval`: the result dict for a run's checkpoint or an export on the inputs."""
    from pretrain.model.model import build_model

    device = resolve_device(device)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    docs = read_documents(inputs, text_field)  # before loading the weights: a bad path fails fast
    source = load_source(path, step)
    token_docs = tokenize_documents(docs, source.tokenizer, eos_token)
    model = build_model(source.model_cfg, device)
    model.load_state_dict({k: v.float() for k, v in source.state_dict.items()})
    return evaluate_model(model, token_docs, seq_len or source.seq_len, batch_size=batch_size, device=device,
                          info=source.info)


def result_line(res: dict) -> str:
    return json.dumps(res)
