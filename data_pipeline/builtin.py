"""The embedded default dataset: the interpreter's standard library, tokenized once into MDS shards and cached.

`liquid pretrain` with no data path trains from these shards, made by the same pipeline as any other
corpus: corpus -> jsonl -> tokenizer (trained here unless one is given) -> `prepare` -> shards.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from data_pipeline.corpus import iter_stdlib_documents, stdlib_root
from data_pipeline.format import BLOCK_TOKENS, META_FILE


def cache_root() -> Path:
    return Path(os.environ.get("LIQUID_CACHE", Path.home() / ".cache" / "liquid-pretrain"))


def _key(data_cfg) -> str:
    parts = [sys.version, str(stdlib_root()), data_cfg.corpus_max_mb, data_cfg.tokenizer_vocab_size,
             data_cfg.tokenizer or "", BLOCK_TOKENS, 1] + ([data_cfg.eos_token] if data_cfg.eos_token else [])
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def _write_corpus(path: Path, max_bytes: int) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for name, data in iter_stdlib_documents(max_bytes):
            text = data.decode("utf-8", errors="replace")  # a few stdlib files are Latin-1
            fh.write(json.dumps({"text": text, "source": name}) + "\n")
    tmp.replace(path)


def builtin_dataset(data_cfg, *, log=print) -> tuple[str, str]:
    """Return (shard directory, tokenizer path) of the embedded corpus, preparing them on first use."""
    from data_pipeline.prepare import prepare
    from data_pipeline.tokenizer import train_tokenizer

    root = cache_root() / f"builtin-{_key(data_cfg)}"
    shards = root / "shards"
    tokenizer = Path(data_cfg.tokenizer) if data_cfg.tokenizer else root / "tokenizer" / "tokenizer.json"
    if (shards / META_FILE).exists() and tokenizer.exists():
        return str(shards), str(tokenizer)
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.jsonl"
    if not corpus.exists():
        log(f"data: reading the embedded corpus ({data_cfg.corpus_max_mb:g} MB of {stdlib_root()})")
        _write_corpus(corpus, int(data_cfg.corpus_max_mb * 2**20))
    if not tokenizer.exists():
        log(f"data: training a byte-level BPE tokenizer (vocabulary {data_cfg.tokenizer_vocab_size})")
        texts = (json.loads(line)["text"] for line in corpus.open(encoding="utf-8"))
        train_tokenizer(texts, vocab_size=data_cfg.tokenizer_vocab_size, out_dir=tokenizer.parent)
    log(f"data: tokenizing into MDS shards under {shards} (cached for later runs)")
    staging = root / "shards.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    prepare([str(corpus)], str(staging), str(tokenizer), use_ray=False, progress=True, eos_token=data_cfg.eos_token)
    shutil.rmtree(shards, ignore_errors=True)
    staging.replace(shards)  # complete or absent: an interrupted run prepares again
    return str(shards), str(tokenizer)


HELDOUT_MB = 0.5  # standard-library text after the training corpus, kept for validation


def builtin_heldout(data_cfg, *, log=print) -> str:
    """The shard directory of the embedded corpus's held-out part: the standard-library documents that come
    after the training corpus's (never trained on; the one the training corpus cuts short is left out too),
    HELDOUT_MB of them, tokenized with the training corpus's tokenizer. Prepared once, cached."""
    from data_pipeline.corpus import iter_stdlib_documents
    from data_pipeline.prepare import prepare

    _, tokenizer = builtin_dataset(data_cfg, log=log)
    root = cache_root() / f"builtin-{_key(data_cfg)}"
    shards = root / "heldout"
    if (shards / META_FILE).exists():
        return str(shards)
    train_bytes, held_bytes = int(data_cfg.corpus_max_mb * 2**20), int(HELDOUT_MB * 2**20)
    corpus = root / "heldout.jsonl"
    if not corpus.exists():
        log(f"data: holding out {HELDOUT_MB:g} MB of the embedded corpus for validation")
        tmp = corpus.with_suffix(".tmp")
        seen, kept = 0, 0
        with tmp.open("w", encoding="utf-8") as fh:
            for name, data in iter_stdlib_documents(train_bytes + held_bytes + 2**30):
                seen += len(data)
                if seen <= train_bytes or seen - len(data) < train_bytes:  # trained on, or cut short there
                    continue
                fh.write(json.dumps({"text": data.decode("utf-8", errors="replace"), "source": name}) + "\n")
                kept += len(data)
                if kept >= held_bytes:
                    break
        if kept == 0:
            tmp.unlink()
            raise ValueError(f"the standard library has no text after the first {data_cfg.corpus_max_mb:g} MB "
                             "to hold out; lower data.corpus_max_mb or name eval.streams")
        tmp.replace(corpus)
    staging = root / "heldout.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    prepare([str(corpus)], str(staging), tokenizer, use_ray=False, progress=False, eos_token=data_cfg.eos_token)
    shutil.rmtree(shards, ignore_errors=True)
    staging.replace(shards)
    return str(shards)
