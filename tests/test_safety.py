"""Safety: a local Ray cluster listens on loopback only; object-store secrets never reach the run directory
or the output.

(a) A real local Ray cluster started with `cluster.safety.local_ray_init_kwargs()` (in a subprocess, since the
    options change process-wide Ray state): every listening socket of every Ray process is on loopback.
(b) A real training run reading its shards from a real S3-compatible server (moto on 127.0.0.1) with planted
    credentials in the environment: neither value appears in any file the run writes nor in its output.
"""
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cluster.safety import LOCAL_RAY_ENV, exposed_sockets, is_loopback, listening_sockets, ray_init_kwargs

REPO = Path(__file__).resolve().parents[1]


# --- the helpers ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.1.1", True), ("::1", True), ("::ffff:127.0.0.1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.0.2.2", False), ("::ffff:192.0.2.2", False), ("fd00::2", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_listening_sockets_sees_this_process():
    """The listing is not vacuous: a socket on all interfaces is reported as exposed, a loopback one is not."""
    with socket.socket() as everywhere, socket.socket() as local:
        everywhere.bind(("0.0.0.0", 0))
        everywhere.listen()
        local.bind(("127.0.0.1", 0))
        local.listen()
        ports = {s["port"] for s in listening_sockets()}
        exposed = {s["port"] for s in exposed_sockets()}
        assert {everywhere.getsockname()[1], local.getsockname()[1]} <= ports
        assert everywhere.getsockname()[1] in exposed and local.getsockname()[1] not in exposed


def test_ray_init_kwargs_joins_what_it_is_told(monkeypatch):
    for key in LOCAL_RAY_ENV:  # restored afterwards: local_ray_init_kwargs() sets them
        monkeypatch.setenv(key, "placeholder")
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        monkeypatch.setattr(constants, "ENABLE_RAY_CLUSTER", constants.ENABLE_RAY_CLUSTER)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_init_kwargs("ray://head:10001") == {"address": "ray://head:10001"}
    assert ray_init_kwargs(None) == {"address": None}  # a Ray job's entrypoint: Ray reads RAY_ADDRESS
    monkeypatch.delenv("RAY_ADDRESS")
    local = ray_init_kwargs(None)
    assert local["address"] == "local"  # never the cluster of the last `ray start` on this machine
    assert local["dashboard_host"] == "127.0.0.1" and local["_node_ip_address"] == "127.0.0.1"
    assert all(os.environ[k] == v for k, v in LOCAL_RAY_ENV.items())


# --- (a) a real local Ray cluster -----------------------------------------------------------------------------

_LOCAL_RAY = r"""
import json, time
import ray  # imported before the options are applied, as in a process that imported Ray earlier
from cluster.safety import listening_sockets, local_ray_init_kwargs

ctx = ray.init(**local_ray_init_kwargs(), log_to_driver=True, runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}})

@ray.remote
def task():
    return 1

@ray.remote
class Actor:
    def ping(self):
        return 1

actor = Actor.remote()
assert ray.get([task.remote(), actor.ping.remote()]) == [1, 1]
seen = {}
for _ in range(12):  # agents and metrics servers may come up after ray.init returns
    for s in listening_sockets():
        seen[(s["proto"], s["ip"], s["port"], s["pid"])] = s
    time.sleep(0.5)
print("RESULT " + json.dumps({"dashboard_url": ctx.dashboard_url, "node_ip": ray.util.get_node_ip_address(),
                              "sockets": list(seen.values())}))
ray.shutdown()
"""


def test_local_ray_listens_on_loopback_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _LOCAL_RAY], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    sockets = result["sockets"]
    exposed = [s for s in sockets if not is_loopback(s["ip"])]
    assert not exposed, "listening beyond loopback:\n" + "\n".join(
        f"{s['proto']} {s['ip']}:{s['port']} pid {s['pid']} {s['name']}" for s in exposed)
    assert result["node_ip"] == "127.0.0.1"
    assert result["dashboard_url"].startswith("127.0.0.1:"), result["dashboard_url"]
    # Every Ray component was seen listening, so the check covered them all. (Not required: the metrics
    # servers of the autoscaler monitor and the dashboard, on the fixed ports 44217 and 44227, which a
    # concurrent local cluster may hold; they bind like the rest.)
    names = " | ".join(s["name"] for s in sockets)
    for component in ("gcs_server", "raylet", "dashboard/dashboard.py", "DashboardAgent", "RuntimeEnvAgent"):
        assert component in names, f"{component} not seen listening: {names}"
    assert any(s["port"] == int(result["dashboard_url"].rsplit(":", 1)[1]) for s in sockets)
    print(f"local Ray: {len(sockets)} listening sockets, all on loopback ({time.monotonic() - start:.1f} s)")


# --- (b) planted object-store secrets -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 (as in tests/data/conftest.py)."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


WORDS = "the quick brown fox jumps over a lazy dog while liquid models route tokens to experts".split()


def _files_containing(root: Path, needles: list[bytes]) -> list[str]:
    """Every regular file under root (recursively, binary) that holds one of the needles."""
    hits = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += [f"{path} holds {needle[:8].decode()}..." for needle in needles if needle in data]
    return hits


def test_planted_secret_reaches_neither_run_dir_nor_output(tmp_path, s3_endpoint, monkeypatch):
    import boto3
    import numpy as np

    from data_pipeline.prepare import prepare
    from data_pipeline.tokenizer import train_tokenizer

    key_id = "AKIA" + uuid.uuid4().hex[:16].upper()
    secret = "plantedSecret" + uuid.uuid4().hex + uuid.uuid4().hex[:8]
    creds = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
             "S3_ENDPOINT_URL": s3_endpoint}
    for key, value in creds.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)

    # Shards on the S3 server, uploaded with the planted credentials.
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 80)))) for _ in range(300)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tokenizer = train_tokenizer(docs, vocab_size=400, out_dir=tmp_path / "tok")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="safety")
    url = "s3://safety/shards"
    prepare([str(tmp_path / "in")], url, str(tokenizer), block_tokens=513, use_ray=False, progress=False)

    # A real run in a fresh process; every place it writes to is under tmp_path.
    run_dir, cache, scratch = tmp_path / "run", tmp_path / "cache", tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, **creds, "LIQUID_CACHE": str(cache / "liquid"), "TMPDIR": str(scratch)}
    args = [sys.executable, "-m", "pretrain.cli", "pretrain", "tiny", f"data.path={url}",
            f"data.tokenizer={tokenizer}", f"data.cache_dir={cache / 'streaming'}", "parallel.dp=1",
            "parallel.ep=1", "cluster.num_workers=1", "train.max_steps=3", "train.seq_len=64",
            "train.global_batch_size=4", "train.micro_batch_size=2", "train.log_interval=1", "model.vocab_size=512",
            f"run.dir={run_dir}", "checkpoint.export=false"]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output.decode(errors="replace")[-5000:]

    # The run really read the remote shards with those credentials and wrote what a run writes.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["checkpoints"] == ["step_00000003"]
    assert any(p.name.startswith("shard.") for p in (cache / "streaming").rglob("*"))
    assert (run_dir / "config.yaml").exists() and (run_dir / "metrics.jsonl").exists()
    assert url in (run_dir / "config.yaml").read_text()

    needles = [secret.encode(), key_id.encode()]
    assert not [n for n in needles if n in output], "a planted credential is in the output"
    assert not _files_containing(run_dir, needles)
    assert not _files_containing(cache, needles)  # the shard cache and LIQUID_CACHE
    assert not _files_containing(scratch, needles)  # temporary files
