"""`liquid submit / status / logs / stop / jobs` against a real Ray head (`ray start --head`) with token
authentication, through the real CLI in subprocesses.

The head runs on 127.0.0.1 with its own temp dir and a token generated here (RAY_AUTH_MODE=token,
RAY_AUTH_TOKEN_PATH), so nothing depends on the developer's ~/.ray. Clients run with HOME pointing at a
directory whose .ray/auth_token holds that token: the default place on the head's machine.

Teardown does not use `ray stop`: it kills every Ray process on the machine (it matches process names, not
a temp dir or a session), which would take down other clusters and concurrent tests. The head is started in
a new session instead, and teardown ends exactly the processes of that session and their descendants.
"""
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

from cluster.jobs import find_token, progress_from_logs, resolve_address, stage_working_dir

REPO = Path(__file__).resolve().parents[1]
SMALL = ["parallel.dp=1", "parallel.ep=1", "cluster.num_workers=1", "cluster.launcher=ray", "train.seq_len=64",
         "train.global_batch_size=4", "train.micro_batch_size=2", "data.corpus_max_mb=0.5",
         "data.tokenizer_vocab_size=512", "model.vocab_size=512"]
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")


# ------------------------------------------------------------------------------------------ no cluster


def test_progress_line_is_read_back_from_the_logs():
    logs = "\n".join([
        "data: tokenizing ...",
        "step      2/4 [##########..........]  50% 512/1.02k tok | loss 6.2370 | lr 4.50e-04 | 1,914 tok/s | "
        "1,914 tok/s/device | MFU n/a | elapsed 0m00s | eta 0m00s",
        "\x1b[36m(RayTrainWorker pid=1)\x1b[0m step 3 checkpoint",
        "step     40/100 | loss 5.1234 | lr 1.00e-03 | 8,123 tok/s | 4,062 tok/s/device | tokens 40,960 | eta 0m01s",
        "done: step 40, ...",
    ])
    assert progress_from_logs(logs) == {"step": 40, "max_steps": 100, "loss": 5.1234, "tokens_per_s": 8123.0,
                                        "tokens": 40960}
    first = progress_from_logs(logs.split("\n\x1b")[0])
    assert first["step"] == 2 and first["loss"] == 6.237 and first["tokens_per_s"] == 1914.0
    assert first["tokens_text"] == "512"
    assert progress_from_logs("no progress here\n") is None


def test_token_and_address_lookup(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("fromhome\n")
    (tmp_path / "t").write_text("frompath")
    assert find_token(environ={"HOME": str(home)}).value == "fromhome"
    assert find_token(environ={"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "t")}).value == "frompath"
    env = {"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "t"), "RAY_AUTH_TOKEN": "fromenv"}
    assert find_token(environ=env).value == "fromenv"
    assert find_token(str(home / ".ray" / "auth_token"), environ=env).value == "fromhome"  # --token-path first
    missing = find_token(environ={"HOME": str(tmp_path)})
    assert missing.value is None and str(tmp_path / ".ray" / "auth_token") in missing.source
    with pytest.raises(ValueError, match="cannot read the authentication token file"):
        find_token(environ={"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "nope")})
    for token in (find_token(environ={"HOME": str(home)}), find_token(environ=env)):
        assert token.value not in token.source  # where, never what

    assert resolve_address("http://h:8265/", environ={"RAY_ADDRESS": "x:1"}) == ("http://h:8265", "--address")
    assert resolve_address(None, environ={"RAY_ADDRESS": "h:8265"}) == ("http://h:8265", "RAY_ADDRESS")
    with pytest.raises(ValueError, match="no cluster address"):
        resolve_address(None, environ={})
    with pytest.raises(ValueError, match="dashboard URL"):
        resolve_address(None, environ={"RAY_ADDRESS": "auto"})


def test_the_job_env_leaves_the_drivers_own_keys_alone():
    """A key the driver's ray.init sets in its runtime env must not also be in the job's (Ray refuses to
    merge the two), so --env refuses exactly those."""
    from cluster.jobs import DRIVER_ENV_KEYS, _parse_env
    from cluster.launch import HEALTH_CHECK_ENV, WORKER_ENV

    assert DRIVER_ENV_KEYS == {*WORKER_ENV, HEALTH_CHECK_ENV}
    for key in DRIVER_ENV_KEYS:
        with pytest.raises(ValueError, match=f"--env {key}: set by liquid itself"):
            _parse_env([f"{key}=1"])


def test_the_upload_holds_the_project_and_the_config_only(tmp_path):
    stage = stage_working_dir("run:\n  name: x\n", tmp_path)
    names = {p.relative_to(stage).as_posix() for p in stage.rglob("*")}
    assert ".liquid-job/config.yaml" in names and "pyproject.toml" in names
    assert {"pretrain/cli.py", "checkpoints/manager.py", "cluster/launch.py", "parallel/__init__.py"} <= names
    top = {n.split("/")[0] for n in names}
    assert not top & {".venv", ".venv-hf5", "runs", ".git", "bench-results"}, top
    assert not [n for n in names if "__pycache__" in n or ".pytest_cache" in n or n.endswith(".egg-info")]


# ---------------------------------------------------------------------------------------- the cluster


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_processes(sid: int) -> list[psutil.Process]:
    """The processes of session `sid` (the head: GCS, raylet, dashboard, agents, workers) and everything
    under them (job drivers run in sessions of their own)."""
    found = {}
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                found[proc.pid] = proc
        except (OSError, psutil.Error):
            continue
    for proc in list(found.values()):
        try:
            found.update((c.pid, c) for c in proc.children(recursive=True))
        except psutil.Error:
            continue
    return list(found.values())


def _end_session(sid: int) -> None:
    procs = _session_processes(sid)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=3)  # the GCS and raylet often outlive SIGTERM: no use waiting
    for proc in alive:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    env.update(extra)
    return env


@dataclass
class Cluster:
    address: str
    token: str
    home: Path  # HOME of the clients: .ray/auth_token holds the token
    base: Path

    def env(self, **extra) -> dict:
        return _clean_env(HOME=str(self.home), **extra)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("jobs")
    temp_dir = tempfile.mkdtemp(prefix="lqj", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    token = secrets.token_hex(32)
    token_file = base / "cluster_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    home = base / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(token)
    gcs, dashboard, client_server, agent = _free_ports(4)
    venv_bin = str(Path(sys.executable).parent)
    env = _clean_env(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file),  # token auth, with this token
        LIQUID_CACHE=str(base / "cache"), RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # a one-node cluster: every Ray server binds to 127.0.0.1
        PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""))  # the head's `python` is the project's
    env.pop("VIRTUAL_ENV", None)
    args = [str(Path(venv_bin) / "ray"), "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats",
            f"--temp-dir={temp_dir}", f"--ray-client-server-port={client_server}",
            f"--dashboard-agent-listen-port={agent}"]
    head = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own session: teardown ends exactly what it started
    try:
        out, _ = head.communicate(timeout=120)
        assert head.returncode == 0, out[-3000:]
        yield Cluster(address=f"http://127.0.0.1:{dashboard}", token=token, home=home, base=base)
    finally:
        if head.poll() is None:
            head.kill()
        _end_session(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def liquid(*args, env, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _job_id(out: str) -> str:
    match = re.search(r"submitted job (\S+) to ", out)
    assert match, out
    return match.group(1)


def _no_secret(cluster: Cluster, job: str, run_dir: Path, *texts: str) -> None:
    """The token is nowhere in the job's record on the cluster, its logs, the run directory or our output."""
    record = requests.get(f"{cluster.address}/api/jobs/{job}", timeout=10,
                          headers={"Authorization": f"Bearer {cluster.token}"})
    assert record.status_code == 200 and job in record.text
    for text in (record.text, *texts):
        assert cluster.token not in text
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert cluster.token.encode() not in path.read_bytes(), path


def test_clear_errors_for_a_missing_or_wrong_token_or_no_cluster(cluster, tmp_path):
    empty_home = tmp_path / "nohome"
    empty_home.mkdir()
    # No token anywhere: the error says where the token goes.
    r = liquid("jobs", "--address", cluster.address, env=_clean_env(HOME=str(empty_home)))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "requires an authentication token" in r.stderr and "~/.ray/auth_token" in r.stderr
    assert "--token-path" in r.stderr and "RAY_AUTH_TOKEN_PATH" in r.stderr
    # A wrong token: rejected, named by where it came from, never printed.
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    r = liquid("status", "--address", cluster.address, env=_clean_env(HOME=str(empty_home),
                                                                       RAY_AUTH_TOKEN_PATH=str(wrong)))
    assert r.returncode == 2 and "rejected the authentication token" in r.stderr and str(wrong) in r.stderr
    assert wrong.read_text() not in r.stderr + r.stdout
    # The right token through --token-path, and through RAY_AUTH_TOKEN (with RAY_ADDRESS for the address).
    token_file = cluster.base / "cluster_token"
    r = liquid("jobs", "--all", "--address", cluster.address, "--token-path", str(token_file),
               env=_clean_env(HOME=str(empty_home)))
    assert r.returncode == 0 and ("no jobs on the Ray cluster" in r.stdout or "STATUS" in r.stdout), r.stderr
    r = liquid("jobs", env=_clean_env(HOME=str(empty_home), RAY_AUTH_TOKEN=cluster.token,
                                      RAY_ADDRESS=cluster.address))
    assert r.returncode == 0, r.stderr
    # No address, nothing listening, an unknown job.
    r = liquid("status", env=cluster.env())
    assert r.returncode == 2 and "no cluster address" in r.stderr and "--address" in r.stderr
    (closed,) = _free_ports(1)
    r = liquid("jobs", "--address", f"http://127.0.0.1:{closed}", env=cluster.env())
    assert r.returncode == 2 and f"no Ray cluster answers at http://127.0.0.1:{closed}" in r.stderr, r.stderr
    r = liquid("logs", "nosuchjob", "--address", cluster.address, env=cluster.env())
    assert r.returncode == 2 and "no job nosuchjob" in r.stderr, r.stderr


@dataclass
class FinishedJob:
    job: str
    run_dir: Path
    submit: subprocess.CompletedProcess  # `liquid submit`
    follow: subprocess.CompletedProcess  # `liquid logs JOB --follow`, returned when the job ended


@pytest.fixture(scope="module")
def finished_job(cluster, tmp_path_factory) -> FinishedJob:
    """A 4-step job submitted and followed to its end, for any test that needs a finished job."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    r = liquid("submit", "tiny", f"run.dir={run_dir}", *SMALL, "train.max_steps=4", "train.log_interval=2",
               "--address", cluster.address, env=cluster.env())
    assert r.returncode == 0, r.stdout + r.stderr
    job = _job_id(r.stdout)
    # Follow the logs to the end (the address from RAY_ADDRESS this time).
    follow = liquid("logs", job, "--follow", env=cluster.env(RAY_ADDRESS=cluster.address))
    return FinishedJob(job=job, run_dir=run_dir, submit=r, follow=follow)


def test_submit_follow_and_status(cluster, finished_job):
    job, run_dir, r, logs = finished_job.job, finished_job.run_dir, finished_job.submit, finished_job.follow
    assert f"run directory on the cluster: {run_dir}" in r.stdout
    assert logs.returncode == 0, logs.stdout + logs.stderr
    assert f"job {job}: SUCCEEDED" in logs.stderr, logs.stdout[-3000:] + logs.stderr
    assert "done: step 4" in logs.stdout and "Connected to Ray cluster" in logs.stdout  # the driver joined it
    assert len([line for line in logs.stdout.splitlines() if line.startswith("step ")]) == 2
    # Status: the state, and the latest step and loss from the run directory (reachable here) ...
    status = liquid("status", job, "--address", cluster.address, env=cluster.env())
    assert status.returncode == 0, status.stderr
    assert f"job {job}: SUCCEEDED" in status.stdout
    assert re.search(r"step 4/4 \| loss \d+\.\d{4} \| [\d,]+ tok/s .*\(from .*metrics\.jsonl\)", status.stdout), \
        status.stdout
    # ... or from the job's logs (`status` without JOB, the newest liquid job, is checked by the stop test:
    # which job is newest here depends on which tests ran before).
    status = liquid("status", job, "--from-logs", "--address", cluster.address, env=cluster.env())
    assert f"job {job}: SUCCEEDED" in status.stdout
    assert re.search(r"step 4/4 \| loss \d+\.\d{4} \| [\d,]+ tok/s .*\(from the job's logs\)", status.stdout), \
        status.stdout
    listing = liquid("jobs", "--address", cluster.address, env=cluster.env())
    assert re.search(rf"^{re.escape(job)}\s+SUCCEEDED\s+.*{re.escape(str(run_dir))}$", listing.stdout, re.M), \
        listing.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["checkpoints"] == ["step_00000004"] and summary["stopped"] is False
    _no_secret(cluster, job, run_dir, r.stdout, r.stderr, logs.stdout, logs.stderr, status.stdout)


def test_stop_ends_the_job_with_a_checkpoint(cluster, tmp_path):
    run_dir = tmp_path / "run"
    r = liquid("submit", "tiny", f"run.dir={run_dir}", *SMALL, "train.max_steps=5000", "train.log_interval=1",
               "checkpoint.export=false", "--stop-grace-s", "120", "--address", cluster.address, env=cluster.env())
    assert r.returncode == 0, r.stdout + r.stderr
    job = _job_id(r.stdout)
    assert "stop grace period: 120 s" in r.stdout
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 150
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline, liquid("logs", job, "--address", cluster.address, env=cluster.env()).stdout
        time.sleep(0.5)
    # Without JOB: the newest liquid job, this one (nothing else is submitted while a test runs).
    status = liquid("status", "--address", cluster.address, env=cluster.env())
    assert f"job {job}: RUNNING" in status.stdout and re.search(r"step \d+/5000 \| loss", status.stdout), status.stdout

    stop = liquid("stop", job, "--address", cluster.address, env=cluster.env())
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert f"job {job}: STOPPED" in stop.stdout, stop.stdout + stop.stderr
    listing = liquid("jobs", "--address", cluster.address, env=cluster.env())
    assert re.search(rf"^{re.escape(job)}\s+STOPPED\s+.*{re.escape(str(run_dir))}$", listing.stdout, re.M), \
        listing.stdout

    # The driver turns SIGTERM into "save a checkpoint and exit" (pretrain/train/worker.py): the stop leaves a
    # checkpoint at the stop step.
    logs = liquid("logs", job, "--address", cluster.address, env=cluster.env()).stdout
    assert (run_dir / "summary.json").exists(), (
        "the job stopped without summary.json, so the run saved no stop checkpoint. If the log shows `*** SIGTERM "
        "received` and no 'stopping at the next step' line, the driver's SIGTERM handler was replaced: ray.init() "
        "installs its own (sys.exit; ray/_private/worker.py) over any handler set before it, so cluster/launch.py "
        "must call ray.init() before installing its handler.\n" + logs[-3000:])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"] is True and 3 <= summary["steps"] < 5000, summary
    last = f"step_{summary['steps']:08d}"
    assert summary["checkpoints"][-1] == last
    assert (run_dir / "checkpoints" / last / "manifest.json").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == last
    assert f"stopped at step {summary['steps']}; last checkpoint {last}" in stop.stdout
