"""`liquid pretrain` on a Ray Train worker group: 2 CPU workers, DP=2 with EP=2, the embedded corpus."""
import json
import os
import subprocess
import sys


def test_two_workers_on_ray_with_expert_parallelism(tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "pretrain.cli", "pretrain", "tiny", f"run.dir={run_dir}",
            "parallel.dp=2", "parallel.ep=2", "cluster.num_workers=2", "cluster.launcher=ray",
            "train.max_steps=4", "train.log_interval=2", "train.seq_len=64", "train.global_batch_size=4",
            "train.micro_batch_size=2", "data.corpus_max_mb=0.5", "data.tokenizer_vocab_size=512",
            "model.vocab_size=512"]
    env = {**os.environ, "LIQUID_CACHE": str(tmp_path / "cache"), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
           "LIQUID_ATTENTION": "blocks"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # The driver prints one progress line per logged step, with throughput per device.
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and "tok/s/device" in lines[-1], proc.stdout[-3000:]
    # A worker's message reaches the driver once (Ray Train's print patch would also log it a second time).
    output = proc.stdout + proc.stderr
    assert output.count("checkpoint: saved step_00000004") == 1, output[-3000:]
    assert output.count("exported liquid_moe") == 1, output[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]  # written once, by rank 0
    assert all(r["devices"] == 2 for r in records)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world"] == 2 and summary["tokens"] == 4 * 4 * 64
    # Both ranks wrote their share of the final checkpoint; rank 0 exported it.
    assert summary["checkpoints"] == ["step_00000004"], summary
    assert summary["export"] == str(run_dir.resolve() / "export"), (summary, proc.stdout[-2000:])
    files = sorted(p.name for p in (run_dir / "checkpoints" / "step_00000004").iterdir())
    assert files == ["manifest.json", "rank00000.json", "rank00000.safetensors", "rank00001.json",
                     "rank00001.safetensors"]
    workers = [json.loads((run_dir / "workers" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [w["status"] for w in workers] == ["finished", "finished"] and workers[0]["pid"] != workers[1]["pid"]
    # Each rank records the switches it computed with (the driver forwards them to every worker).
    assert all(w["switches"]["LIQUID_ATTENTION"] == "blocks" for w in workers), workers


def test_the_driver_forwards_the_switches_a_job_does_not_set():
    from cluster.launch import forwarded_switches

    environ = {"LIQUID_SCAN_TRITON": "1", "LIQUID_CACHE": "/data/cache", "HOME": "/root"}
    assert forwarded_switches(environ) == {"LIQUID_SCAN_TRITON": "1", "LIQUID_CACHE": "/data/cache"}
    # Inside a Ray job the job's runtime env already gives its env_vars to every worker (and Ray refuses a
    # key set twice), so only the others are forwarded.
    job = {"runtime_env": {"env_vars": {"LIQUID_SCAN_TRITON": "1"}}}
    environ["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps(job)
    assert forwarded_switches(environ) == {"LIQUID_CACHE": "/data/cache"}
