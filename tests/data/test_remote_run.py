"""Training from object storage as a user would: `liquid data prepare --output s3://...`, then `liquid
pretrain ... data.path=s3://...` without data.tokenizer, then `liquid export` (at the end of the run) and
`liquid eval`, against the real S3-compatible server on 127.0.0.1. The tokenizer prepare stored beside the
remote shards reaches the run directory."""
from __future__ import annotations

from data_pipeline.prepare import prepare
from data_pipeline.tokenizer import train_tokenizer
from tests.data.test_prepare import make_docs, write_inputs
from tests.test_cli import SINGLE, run_cli


def test_pretrain_export_and_eval_from_a_remote_dataset(tmp_path, s3_bucket):
    texts = [d for seed in range(1, 6) for d in make_docs(30, seed)]
    tokenizer = train_tokenizer(texts, vocab_size=400, out_dir=tmp_path / "tok")
    write_inputs(tmp_path / "in")
    url = f"s3://{s3_bucket}/ds"
    prepare([str(tmp_path / "in")], url, str(tokenizer), block_tokens=257, use_ray=False, progress=False)

    run_dir = tmp_path / "run"
    proc = run_cli("pretrain", "tiny", *SINGLE, f"run.dir={run_dir}", f"data.path={url}",
                   f"data.cache_dir={tmp_path / 'cache'}", "model.vocab_size=512", "train.max_steps=2",
                   "train.seq_len=64", "train.global_batch_size=2", "train.micro_batch_size=2",
                   "train.log_interval=1", "checkpoint.interval=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "tokenizer" / "tokenizer.json").read_bytes() == tokenizer.read_bytes()
    assert "export: FAILED" not in proc.stdout
    assert (run_dir / "export" / "config.json").exists() and (run_dir / "export" / "tokenizer.json").exists()

    held_out = tmp_path / "held_out.txt"
    held_out.write_text(" ".join(texts[:20]))
    evaluated = run_cli("eval", str(run_dir / "export"), "--input", str(held_out), "--seq-len", "64")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "loss" in evaluated.stdout
