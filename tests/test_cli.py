import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LIQUID = [sys.executable, "-m", "pretrain.cli"]
SINGLE = ("parallel.dp=1", "parallel.ep=1", "cluster.num_workers=1")  # one process, no Ray


def run_cli(*args, cwd=None, env=None):
    return subprocess.run([*LIQUID, *args], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, **(env or {})})


def test_pretrain_smoke_through_the_real_entry_point(tmp_path):
    """No data path: the embedded corpus goes through tokenizer training, prepare and the streaming loader."""
    run_dir = tmp_path / "run"
    args = ("pretrain", "tiny", f"run.dir={run_dir}", "train.max_steps=6", "train.log_interval=2",
            "train.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=2",
            "data.corpus_max_mb=0.5", "data.tokenizer_vocab_size=512", "model.vocab_size=512", *SINGLE)
    proc = run_cli(*args, env={"LIQUID_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert "training a byte-level BPE tokenizer" in proc.stdout
    assert list((tmp_path / "cache").glob("builtin-*/shards/index.json"))
    assert "step      6/6" in proc.stdout and "tok/s" in proc.stdout and "eta" in proc.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        assert {"step", "loss", "tokens", "tokens_per_s"} <= set(r)
        assert len(r["expert_load_per_layer"]) == 3  # the tiny preset's MoE layers
        assert r["expert_load_max_over_mean"] == max(r["expert_load_per_layer"])
    assert records[-1]["tokens"] == 6 * 4 * 64
    assert (run_dir / "config.yaml").exists() and "max_steps: 6" in (run_dir / "config.yaml").read_text()
    # The second run finds the prepared shards in the cache.
    again = run_cli(*args, f"run.dir={tmp_path / 'run2'}",
                    env={"LIQUID_CACHE": str(tmp_path / "cache")})
    assert again.returncode == 0, again.stderr
    assert "training a byte-level BPE tokenizer" not in again.stdout
    # Same seed, same shards: the same losses.
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert losses == [r["loss"] for r in records]


def test_vocab_too_small_for_the_tokenizer_is_a_clear_error(tmp_path):
    proc = run_cli("pretrain", "tiny", *SINGLE, f"run.dir={tmp_path / 'run'}", "train.max_steps=1", "data.corpus_max_mb=0.5",
                   "data.tokenizer_vocab_size=512", "model.vocab_size=256",
                   env={"LIQUID_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2
    assert "set model.vocab_size=512" in proc.stderr


def test_cli_errors_are_clear_and_exit_2():
    proc = run_cli("pretrain", "train.max_step=5")
    assert proc.returncode == 2
    assert "did you mean 'train.max_steps'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plan_json():
    proc = run_cli("plan", "liquid-8b-a1b", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert 8.2e9 < plan["params_total"] < 8.45e9 and 1.45e9 < plan["params_active"] < 1.6e9
    text = run_cli("plan", "liquid-8b-a1b").stdout
    assert "active" in text and "days" in text


def test_data_commands_tokenizer_train_and_prepare(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    docs = [f"document {i}: " + "the liquid layer keeps a state of fixed size. " * (i + 3) for i in range(40)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = run_cli("data", "tokenizer", "train", "--input", str(corpus), "--vocab-size", "300",
                  "--out", str(tmp_path / "tok"))
    assert tok.returncode == 0, tok.stderr
    assert "model.vocab_size=384" in tok.stdout and (tmp_path / "tok" / "tokenizer.json").exists()
    out = tmp_path / "shards"
    prep = run_cli("data", "prepare", "--input", str(corpus), "--output", str(out), "--tokenizer",
                   str(tmp_path / "tok"), "--no-ray", "--block-tokens", "257")
    assert prep.returncode == 0, prep.stderr
    summary = json.loads((out / "prepare_summary.json").read_text())
    assert summary["documents"] == 40 and (out / "index.json").exists()
    again = run_cli("data", "prepare", "--input", str(corpus), "--output", str(out), "--tokenizer",
                    str(tmp_path / "tok"), "--no-ray")
    assert again.returncode == 2 and "--overwrite" in again.stderr
