"""Checkpoints of real training runs (single process here; two ranks in tests/distributed/test_reshard.py):
the run directory, the manifest, exact resume, retention, torn / corrupt / failed / killed saves."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from checkpoints.manager import find_checkpoint, list_checkpoints, read_model_state, resume_target
from checkpoints.manifest import CorruptCheckpoint, sha256_file, verify

SMALL = ["parallel.dp=1", "parallel.ep=1", "cluster.num_workers=1", "train.log_interval=1", "train.seq_len=64",
         "train.global_batch_size=4", "train.micro_batch_size=2", "data.corpus_max_mb=0.5",
         "data.tokenizer_vocab_size=512", "model.vocab_size=512", "checkpoint.export=false"]


@pytest.fixture(scope="module", autouse=True)
def corpus_cache(tmp_path_factory):
    """One prepared copy of the embedded corpus for the module (and for its subprocesses)."""
    old = os.environ.get("LIQUID_CACHE")
    os.environ["LIQUID_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("LIQUID_CACHE")
    else:
        os.environ["LIQUID_CACHE"] = old


def train(run_dir: Path, *overrides: str) -> dict:
    from pretrain.config import load_config
    from pretrain.train.worker import train_main

    return train_main(load_config("tiny", [*SMALL, f"run.dir={run_dir}", *overrides]), progress=False)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def run6(tmp_path_factory) -> Path:
    """6 uninterrupted steps, a checkpoint every 3."""
    run_dir = tmp_path_factory.mktemp("run6")
    train(run_dir, "train.max_steps=6", "checkpoint.interval=3")
    return run_dir


def test_run_directory_manifest_and_latest(run6):
    ckpts = run6 / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000003", "step_00000006"]
    assert (ckpts / "latest").read_text().strip() == "step_00000006"
    for step in (3, 6):
        d = ckpts / f"step_{step:08d}"
        manifest = verify(d)
        assert manifest["step"] == step and manifest["tokens"] == step * 4 * 64
        assert manifest["topology"] == {"world": 1, "dp": 1, "ep": 1, "cp": 1, "zero_stage": 0}
        assert manifest["versions"]["torch"] and manifest["config_hash"]
        # Every file but the manifest is listed with its checksum; nothing that needs unpickling is stored.
        assert set(manifest["files"]) == {p.name for p in d.iterdir()} - {"manifest.json"}
        assert all(sha256_file(d / name) == info["sha256"] for name, info in manifest["files"].items())
        assert {p.suffix for p in d.iterdir()} == {".json", ".safetensors"}
    worker = json.loads((run6 / "workers" / "rank0.json").read_text())
    assert worker["status"] == "finished" and worker["pid"] > 0 and worker["host"]
    summary = json.loads((run6 / "summary.json").read_text())
    assert summary["checkpoints"] == ["step_00000003", "step_00000006"] and summary["checkpoint_failures"] == []


def test_model_state_of_a_checkpoint_is_the_single_process_state_dict(run6):
    from pretrain.config import load_config
    from pretrain.model.model import build_model

    state = read_model_state(run6 / "checkpoints" / "step_00000006")
    expected = build_model(load_config("tiny", SMALL).model).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in expected.items()}


def test_resume_is_bitwise_identical_to_the_uninterrupted_run(run6, tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, "train.max_steps=3", "checkpoint.interval=3")
    summary = train(run_dir, "train.max_steps=6", "checkpoint.interval=3", "checkpoint.resume=auto")
    assert summary["resumed_from"] == "step_00000003" and summary["start_step"] == 3
    assert losses(run_dir) == losses(run6)  # steps 1-3 kept from the first attempt, 4-6 trained after resume
    # The final weights too.
    a, b = (read_model_state(d / "checkpoints" / "step_00000006") for d in (run_dir, run6))
    assert all((a[k] == b[k]).all() for k in a)


def test_bf16_autocast_run_trains_and_resumes_bitwise(tmp_path):
    """train.dtype=bf16 in one process: fp32 weights under bf16 autocast (the single-GPU path, here on the
    CPU). It trains, and a resume reproduces the uninterrupted run's losses bit for bit."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(whole, "train.max_steps=4", "checkpoint.interval=2", "train.dtype=bf16")
    train(split, "train.max_steps=2", "checkpoint.interval=2", "train.dtype=bf16")
    train(split, "train.max_steps=4", "checkpoint.interval=2", "train.dtype=bf16", "checkpoint.resume=auto")
    reference = losses(whole)
    assert sorted(reference) == [1, 2, 3, 4] and all(math.isfinite(v) for v in reference.values())
    assert losses(split) == reference


def test_a_fresh_run_refuses_a_directory_with_checkpoints(run6):
    with pytest.raises(ValueError, match="already has checkpoints.*checkpoint.resume=auto"):
        resume_target(run6, "none")


def test_retention_keeps_the_last_n_and_every_mth(tmp_path):
    train(tmp_path, "train.max_steps=9", "checkpoint.interval=1", "checkpoint.keep_last=2",
          "checkpoint.keep_every=4", "checkpoint.async_save=false")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [9, 8, 4]


def flip_a_byte(path) -> None:
    """Corrupt a file the way a bad disk would: same size, one byte changed."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_and_torn_checkpoints_are_reported_and_skipped(run6, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run6, run_dir)
    flip_a_byte(run_dir / "checkpoints" / "step_00000006" / "rank00000.safetensors")
    messages = []
    assert find_checkpoint(run_dir, log=messages.append).name == "step_00000003"
    assert messages == ["checkpoint: skipping step_00000006/rank00000.safetensors: sha256 does not match the manifest"]
    # A torn one (the manifest never written) is skipped too; with nothing left, the error names both.
    (run_dir / "checkpoints" / "step_00000003" / "manifest.json").unlink()
    with pytest.raises(ValueError, match="no complete checkpoint.*step_00000006/rank00000.safetensors: sha256.*"
                                         "step_00000003: no manifest.json"):
        find_checkpoint(run_dir, log=lambda _: None)
    with pytest.raises(CorruptCheckpoint):
        verify(run_dir / "checkpoints" / "step_00000003")


def test_the_drivers_fail_fast_check_reads_the_structure_and_leaves_hashing_to_the_ranks(run6, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run6, run_dir)
    shard = run_dir / "checkpoints" / "step_00000006" / "rank00000.safetensors"
    flip_a_byte(shard)
    data = shard.read_bytes()
    assert resume_target(run_dir, "auto", checksums=False).name == "step_00000006"  # no byte hashed
    assert resume_target(run_dir, "auto", log=lambda _: None).name == "step_00000003"
    shard.write_bytes(bytes(data[:-1]))  # torn: a file shorter than the manifest says
    messages = []
    assert resume_target(run_dir, "auto", checksums=False, log=messages.append).name == "step_00000003"
    assert messages == [f"checkpoint: skipping step_00000006/rank00000.safetensors: {len(data) - 1} bytes, "
                        f"the manifest says {len(data)}"]


def test_export_hashes_a_checkpoint_only_if_this_process_has_not(run6, tmp_path, monkeypatch):
    """Right after training, rank 0 exports the checkpoint it has just written: no second pass over it.
    `liquid export` alone (a fresh process: nothing recorded) verifies every file."""
    from checkpoints import manifest
    from checkpoints.export import export_run

    hashed = []
    real = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    export_run(run6, tmp_path / "a", dtype="fp32")
    assert hashed == []
    monkeypatch.setattr(manifest, "_VERIFIED", set())
    export_run(run6, tmp_path / "b", dtype="fp32")
    assert sorted(hashed) == sorted(verify(run6 / "checkpoints" / "step_00000006", checksums=False)["files"])


def test_each_file_is_hashed_by_one_rank_its_own_where_it_exists():
    from checkpoints.manifest import hash_share

    sizes = {0: 50, 1: 40, 2: 30, 3: 20, 4: 10}  # saved by five ranks, verified by three
    manifest = {"files": {}, "ranks": []}
    for r, size in sizes.items():
        manifest["files"] |= {f"rank{r}.safetensors": {"bytes": size}, f"rank{r}.json": {"bytes": 1}}
        manifest["ranks"].append({"rank": r, "file": f"rank{r}.safetensors", "state": f"rank{r}.json"})
    shares = [hash_share(manifest, r, 3) for r in range(3)]
    assert sorted(f for share in shares for f in share) == sorted(manifest["files"])
    for r in range(3):
        assert {f"rank{r}.safetensors", f"rank{r}.json"} <= set(shares[r])
    # The rest go largest first to the least loaded: rank3's shard to rank 2, rank4's to rank 1, and so on.
    assert [sum(manifest["files"][f]["bytes"] for f in share) for share in shares] == [52, 52, 51]


def test_resume_skips_a_corrupt_newest_checkpoint(run6, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run6, run_dir)
    (run_dir / "checkpoints" / "step_00000006" / "rank00000.json").write_text("{}")
    summary = train(run_dir, "train.max_steps=6", "checkpoint.interval=3", "checkpoint.resume=auto")
    assert summary["resumed_from"] == "step_00000003"
    assert losses(run_dir) == losses(run6)


def test_a_changed_model_is_refused_with_the_tensors_that_differ(run6, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run6, run_dir)
    with pytest.raises(ValueError, match=r"cannot load step_00000006 into this model \(model settings changed: "
                                         r"d_model\).*embed.weight has shape \[512, 128\], the model needs \[512, 96\]"):
        train(run_dir, "train.max_steps=8", "checkpoint.resume=auto", "model.d_model=96")


SAVE_UNDER_A_FILE_SIZE_LIMIT = textwrap.dedent("""
    import json, resource, signal, sys
    from pretrain.config import load_config
    from pretrain.train.worker import train_main
    import checkpoints.manager as manager

    # After the first save, files may not grow past 1 MiB: the next save fails with EFBIG, as on a full disk.
    original = manager.CheckpointManager._finalize
    def finalize_then_limit(self, *args):
        out = original(self, *args)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return out
    manager.CheckpointManager._finalize = finalize_then_limit
    summary = train_main(load_config("tiny", sys.argv[1:]), progress=False)
    print(json.dumps(summary))
""")


def test_a_failed_save_leaves_the_earlier_checkpoint_usable_and_says_so(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", SAVE_UNDER_A_FILE_SIZE_LIMIT, *SMALL, f"run.dir={run_dir}",
                           "train.max_steps=4", "checkpoint.interval=2", "checkpoint.async_save=false"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["checkpoints"] == ["step_00000002"] and len(summary["checkpoint_failures"]) == 1
    failure = summary["checkpoint_failures"][0]
    assert "saving step_00000004 FAILED" in failure and "File too large" in failure
    assert "the newest usable checkpoint is step_00000002" in failure and failure in proc.stderr
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()] == ["step_00000002"]
    assert find_checkpoint(run_dir).name == "step_00000002"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def test_a_process_killed_mid_save_leaves_earlier_checkpoints_and_resumes(run6, tmp_path):
    """SIGKILL the training process while a checkpoint is being written; the next run cleans the torn
    directory up, resumes from the newest complete checkpoint and trains the same losses."""
    run_dir = tmp_path / "run"
    args = [sys.executable, "-c", "from pretrain.cli import main; main()", "pretrain", "tiny", *SMALL,
            f"run.dir={run_dir}", "train.max_steps=200", "checkpoint.interval=1", "checkpoint.keep_last=0"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = run_dir / "checkpoints"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            torn = [p for p in ckpts.glob("step_*.tmp") if int(p.name[5:13]) >= 3] if ckpts.exists() else []
            if torn and list(torn[0].glob("*.safetensors*")):
                os.kill(proc.pid, signal.SIGKILL)
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.002)
    finally:
        proc.kill()
        proc.wait()
    assert list(ckpts.glob("step_*.tmp")), "killed after the save had finished"
    newest = find_checkpoint(run_dir)
    step = int(newest.name[5:])
    assert step >= 2
    messages = []
    from checkpoints.manager import CheckpointManager
    from parallel.topology import Topology
    from pretrain.config import load_config

    CheckpointManager(run_dir, load_config("tiny", SMALL).checkpoint, topology=Topology.single(),
                      cfg=load_config("tiny", SMALL), log=messages.append)
    assert any("removing step_" in m and ".tmp" in m for m in messages) and not list(ckpts.glob("step_*.tmp"))
    summary = train(run_dir, "train.max_steps=6", "checkpoint.interval=3", "checkpoint.resume=auto")
    assert summary["resumed_from"] == newest.name


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.cli", *args], capture_output=True, text=True, timeout=300)


def test_liquid_resume_continues_a_run_and_exports(run6, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run6, run_dir)
    proc = _cli("resume", str(run_dir), "train.max_steps=8", "checkpoint.export=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step_00000006" in proc.stdout and "last checkpoint step_00000008" in proc.stdout
    assert sorted(losses(run_dir)) == list(range(1, 9))
    # The end of the run exported the final checkpoint as a Hugging Face directory.
    config = json.loads((run_dir / "export" / "config.json").read_text())
    assert config["model_type"] == "liquid_moe" and (run_dir / "export" / "tokenizer.json").exists()
    assert json.loads((run_dir / "summary.json").read_text())["export"] == str(run_dir / "export")


def test_liquid_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "config.yaml").write_text("run: {name: x}\n")
    proc = _cli("resume", str(tmp_path))
    assert proc.returncode == 2 and "no complete checkpoint in" in proc.stderr
    proc = _cli("resume", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "is not a run directory (no config.yaml)" in proc.stderr


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_stops(tmp_path):
    """What `ray job stop` or a scheduler's preemption does to the driver: the run checkpoints and exits 0."""
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "pretrain.cli", "pretrain", "tiny", *SMALL, f"run.dir={run_dir}",
            "train.max_steps=100000", "checkpoint.export=true"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    step = summary["steps"]
    assert summary["stopped"] is True and 3 <= step < 100000 and summary["export"] is None
    assert summary["checkpoints"][-1] == f"step_{step:08d}" and find_checkpoint(run_dir).name == f"step_{step:08d}"
    assert max(losses(run_dir)) == step and "stopped: step" in out and "SIGTERM: stopping" in err
    assert not (run_dir / "STOP").exists()  # a later resume must not stop at once
