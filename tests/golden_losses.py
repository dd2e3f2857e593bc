"""The golden loss curve: the tiny preset's first per-step losses on the CPU, one process, fixed seed.

`golden_losses()` runs it; `python -m tests.golden_losses --write` (make golden-losses) regenerates
tests/assets/losses/tiny_cpu.json, which tests/test_golden_losses.py compares against.

The data is a corpus generated here, not the preset's embedded one: that is the interpreter's standard
library, which differs between Python versions. The generated text goes through the real pipeline
(tokenizer training, `prepare` into MDS shards, data.path), so only its source is fixed.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

GOLDEN_FILE = Path(__file__).resolve().parent / "assets" / "losses" / "tiny_cpu.json"
PRESET = "tiny"
REGENERATE = "make golden-losses"
# One process, no Ray; short sequences (two scan chunks) so the run takes seconds. The model is the preset's
# but for the vocabulary, sized to the corpus's tokenizer. Warmup ends inside the run so both parts of the
# schedule are covered. One thread: the CPU kernels' reduction order (so a loss's last bits) depends on it.
# No router-bias updates: their step is the sign of the load imbalance, which turns a last-bit difference
# between two CPUs' kernels into a different bias and losses ~1e-5 apart within a few steps (seen between
# two machines); the bias update has its own tests (tests/model/test_moe.py).
OVERRIDES = [
    "parallel.dp=1", "parallel.ep=1", "cluster.num_workers=1", "cluster.launcher=local",
    "train.device=cpu", "train.dtype=fp32", "train.threads=1", "train.seed=0",
    "train.max_steps=10", "train.log_interval=1", "train.seq_len=128", "train.global_batch_size=4",
    "train.micro_batch_size=2", "optim.warmup_steps=4", "model.vocab_size=512",
    "checkpoint.interval=0", "checkpoint.save_final=false", "checkpoint.export=false",
    "model.moe.bias_update_rate=0",
]
DATA_OVERRIDE = "data.path=<the corpus of golden_corpus(), prepared into shards>"
TOKENIZER_VOCAB = 512
NUM_DOCUMENTS = 1000
_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "de", "pa", "zu", "ge", "ho", "ji", "be", "fa"]


def _lcg(seed: int):
    """A fixed pseudo-random stream (no dependence on `random`'s algorithms across Python versions)."""
    state = seed
    while True:
        state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
        yield state >> 33  # 31 bits


def golden_corpus(num_documents: int = NUM_DOCUMENTS) -> list[str]:
    """Documents of made-up sentences over a Zipf-like vocabulary: structure a few steps can start to
    learn (frequent words, capitals after full stops, numbers), and document lengths that vary, so packed
    rows hold document boundaries."""
    words = [a + b + c for a in _SYLLABLES for b in _SYLLABLES for c in ("", "n", "s")][:600]
    rng = _lcg(20240601)
    docs = []
    for _ in range(num_documents):
        sentences = []
        for _ in range(1 + next(rng) % 12):
            n = 3 + next(rng) % 10
            # u^3 on [0, 1): small indices far more often than large ones.
            chosen = [words[(next(rng) % 1000) ** 3 * len(words) // 1000**3] for _ in range(n)]
            if next(rng) % 4 == 0:
                chosen.insert(next(rng) % n, str(next(rng) % 1000))
            sentences.append(" ".join(chosen).capitalize() + (".", "?")[next(rng) % 7 // 5])
        docs.append(" ".join(sentences))
    return docs


def prepare_corpus(work_dir: Path) -> Path:
    """The golden corpus as a jsonl file, a tokenizer trained on it and MDS shards (returns their dir)."""
    from data_pipeline.prepare import prepare
    from data_pipeline.tokenizer import train_tokenizer

    docs = golden_corpus()
    corpus = work_dir / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    tokenizer = train_tokenizer(docs, vocab_size=TOKENIZER_VOCAB, out_dir=work_dir / "tokenizer")
    shards = work_dir / "shards"
    prepare([str(corpus)], str(shards), str(tokenizer), use_ray=False, progress=False)
    return shards


def golden_losses(work_dir: str | os.PathLike) -> list[float]:
    """Prepare the corpus and train the golden run in this process under `work_dir`; returns the loss of
    every step, step 1 first."""
    from pretrain.config import load_config
    from pretrain.train.worker import train_main

    work_dir = Path(work_dir)
    shards = prepare_corpus(work_dir)
    run_dir = work_dir / "run"
    train_main(load_config(PRESET, [*OVERRIDES, f"data.path={shards}", f"run.dir={run_dir}"]), progress=False)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == list(range(1, len(steps) + 1)), f"expected one record per step, got steps {steps}"
    return [r["loss"] for r in records]


def write_golden(path: Path = GOLDEN_FILE) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="golden-losses-") as tmp:
        losses = golden_losses(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"preset": PRESET, "overrides": [*OVERRIDES, DATA_OVERRIDE],
              "data": f"tests/golden_losses.py: golden_corpus() ({NUM_DOCUMENTS} documents), a byte-level BPE of "
                      f"{TOKENIZER_VOCAB} tokens trained on it, data_pipeline.prepare",
              "regenerate": REGENERATE, "module": "python -m tests.golden_losses --write", "losses": losses}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true",
                        help="rewrite tests/assets/losses/tiny_cpu.json (without it: print the losses)")
    args = parser.parse_args(argv)
    if args.write:
        losses = write_golden()
        print(f"wrote {len(losses)} losses to {GOLDEN_FILE}")
    else:
        with tempfile.TemporaryDirectory(prefix="golden-losses-") as tmp:
            print(json.dumps(golden_losses(tmp)))


if __name__ == "__main__":
    main()
