"""Safety: a local Ray cluster listens on loopback only; object-store secrets never reach the run directory
or the output.

(a) A real local Ray cluster started with `cluster.safety.local_ray_init_kwargs()` (in a subprocess, since the
    options change process-wide Ray state): every listening socket of every Ray process is on loopback.
(b) A real training run reading its shards from a real S3-compatible server (moto on 127.0.0.1) with planted
    credentials in the environment: neither value appears in any file the run writes nor in its output. With
    experiment tracking on (wandb offline, MLflow's file store under the run directory), planted tracker
    credentials (WANDB_API_KEY, MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN) are not written either.
(c) The torch process group on that local cluster (cluster/torch_backend.py): the rendezvous store and gloo
    listen on loopback, the collective timeout holds, and a real 2-worker training exposes no socket.
"""
import json
import shutil
import os
import socket
import subprocess
import sys
import tempfile
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


def test_process_names_do_not_depend_on_the_checkout_path():
    """The names the component check below looks for survive any depth of checkout (a CI path once cut
    `dashboard.py` off a 100-character command line)."""
    from cluster.safety import _short_command

    deep = "/" + "/".join(["a-long-directory-name"] * 12) + "/.venv"
    site = f"{deep}/lib/python3.11/site-packages"
    dashboard = _short_command([f"{deep}/bin/python", f"{site}/ray/dashboard/dashboard.py", "--host=127.0.0.1"])
    assert dashboard == "python ray/dashboard/dashboard.py --host=127.0.0.1"
    assert _short_command([f"{site}/ray/core/src/ray/gcs/gcs_server", "--log_dir=/tmp/x"]) == (
        "gcs_server --log_dir=/tmp/x")
    assert _short_command([]) == ""


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


@pytest.mark.parametrize("launcher, tracking", [("local", False), ("local", True), ("ray", True)],
                         ids=["local", "local-tracking", "ray-tracking"])
def test_planted_secret_reaches_neither_run_dir_nor_output(tmp_path, s3_endpoint, monkeypatch, launcher, tracking):
    """One process (launcher local), and 2 workers on a local Ray cluster started by the run (its session
    directory, logs included, under a scratch RAY_TMPDIR that is searched too, as is run_dir/ray/). With
    tracking, rank 0 runs wandb (offline) and MLflow (file store in RUN_DIR/tracking) with tracker credentials
    in the environment too; wandb's own cache and config directories are searched as well."""
    import boto3
    import numpy as np

    from data_pipeline.prepare import prepare
    from data_pipeline.tokenizer import train_tokenizer

    key_id = "AKIA" + uuid.uuid4().hex[:16].upper()
    secret = "plantedSecret" + uuid.uuid4().hex + uuid.uuid4().hex[:8]
    creds = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
             "S3_ENDPOINT_URL": s3_endpoint}
    tracker_creds = {"WANDB_API_KEY": uuid.uuid4().hex + "plantedw",  # 40 characters, as wandb's keys
                     "MLFLOW_TRACKING_PASSWORD": "plantedPw" + uuid.uuid4().hex,
                     "MLFLOW_TRACKING_TOKEN": "plantedTok" + uuid.uuid4().hex} if tracking else {}
    creds.update(tracker_creds)
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
    bucket = f"safety-{launcher}-{'tracking' if tracking else 'plain'}"  # each case writes its own dataset
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/shards"
    prepare([str(tmp_path / "in")], url, str(tokenizer), block_tokens=513, use_ray=False, progress=False)

    # A real run in a fresh process; every place it writes to is under tmp_path.
    run_dir, cache, scratch, wandb_home = tmp_path / "run", tmp_path / "cache", tmp_path / "tmp", tmp_path / "wandb"
    scratch.mkdir()
    # Ray's session directory (sockets, logs): a short path, whatever the checkout's (unix sockets' limit).
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    env = {**os.environ, **creds, "LIQUID_CACHE": str(cache / "liquid"), "TMPDIR": str(scratch),
           "RAY_TMPDIR": str(ray_tmp), "WANDB_CACHE_DIR": str(wandb_home / "cache"),
           "WANDB_CONFIG_DIR": str(wandb_home / "config"), "WANDB_DATA_DIR": str(wandb_home / "data")}
    env.pop("RAY_ADDRESS", None)
    workers = 2 if launcher == "ray" else 1
    args = [sys.executable, "-m", "pretrain.cli", "pretrain", "tiny", f"data.path={url}",
            f"data.tokenizer={tokenizer}", f"data.cache_dir={cache / 'streaming'}", f"parallel.dp={workers}",
            "parallel.ep=1", f"cluster.num_workers={workers}", f"cluster.launcher={launcher}", "train.max_steps=3",
            "train.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=2", "train.log_interval=1",
            "model.vocab_size=512", f"run.dir={run_dir}", "checkpoint.export=false"]
    if tracking:
        args += ["tracking.wandb.enabled=true", "tracking.mlflow.enabled=true"]
    needles = [secret.encode(), key_id.encode(), *(v.encode() for v in tracker_creds.values())]
    try:
        proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, timeout=600)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output.decode(errors="replace")[-5000:]
        if launcher == "ray":
            assert list((run_dir / "ray").iterdir()), "Ray Train wrote nothing under run_dir/ray"
            logs = [p for p in ray_tmp.rglob("*") if p.is_file() and "logs" in p.parts]
            assert logs, f"no Ray session logs under {ray_tmp}"
            assert not _files_containing(ray_tmp, needles)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    # The run really read the remote shards with those credentials and wrote what a run writes.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["checkpoints"] == ["step_00000003"] and summary["world"] == workers
    assert any(p.name.startswith("shard.") for p in (cache / "streaming").rglob("*"))
    assert (run_dir / "config.yaml").exists() and (run_dir / "metrics.jsonl").exists()
    assert url in (run_dir / "config.yaml").read_text()
    if tracking:  # the trackers wrote their runs: wandb's offline log and MLflow's store, under RUN_DIR/tracking
        state = json.loads((run_dir / "tracking.json").read_text())
        assert state["wandb"]["last_step"] == state["mlflow"]["last_step"] == 3
        assert list((run_dir / "tracking" / "wandb").glob(f"offline-run-*-{state['wandb']['run_id']}/run-*.wandb"))
        metric = (run_dir / "tracking" / "mlruns" / state["mlflow"]["experiment_id"] / state["mlflow"]["run_id"]
                  / "metrics" / "loss")
        assert len(metric.read_text().splitlines()) == 3

    assert not [n for n in needles if n in output], "a planted credential is in the output"
    assert not _files_containing(run_dir, needles)  # tracking/ and the MLflow store included
    assert not _files_containing(cache, needles)  # the shard cache and LIQUID_CACHE
    assert not _files_containing(scratch, needles)  # temporary files
    assert not _files_containing(wandb_home, needles)  # wandb-core's own logs


# --- (c) the process-group rendezvous store on a local cluster ------------------------------------------------
# cluster/torch_backend.py: LoopbackTorchConfig puts rank 0's TCPStore (which Ray's TorchConfig leaves on `::`)
# on 127.0.0.1 and builds every rank's process group through it.

def _store_rank(rank, port_queue, done, results):
    """One rank of a 2-process group set up as LoopbackTorchConfig's backend does on a Ray worker, with a
    3 s collective timeout; rank 1 then stays out of the collectives until rank 0 is done."""
    import traceback

    os.environ.update(LOCAL_RAY_ENV)  # a fresh process: the node IP Ray reports is 127.0.0.1
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.pop(var, None)
    try:
        import torch
        import torch.distributed as dist

        from cluster import torch_backend

        torch.set_num_threads(1)
        if rank == 0:
            addr, port = torch_backend._bind_store_listener()
            port_queue.put((addr, port))
        else:
            addr, port = port_queue.get(timeout=60)
        torch_backend._setup_loopback_process_group("gloo", rank, 2, addr, port, timeout_s=3)
        result = {"rank": rank, "port": port, "gloo_interface": os.environ.get("GLOO_SOCKET_IFNAME"),
                  "loopback_interface": torch_backend._loopback_interface()}
        if rank == 0:
            result["listening"] = listening_sockets()
            start = time.monotonic()
            try:
                dist.all_reduce(torch.ones(4))  # rank 1 never joins it
                result["collective"] = "returned"
            except Exception as err:
                result["collective"] = f"{type(err).__name__}: {str(err)[:200]}"
            result["waited_s"] = time.monotonic() - start
            dist.destroy_process_group()  # what Ray's on_shutdown does before a restart
            result["listening_after"] = listening_sockets()
            done.set()
        else:
            done.wait(120)
            dist.destroy_process_group()
        results.put(result)
    except BaseException:
        results.put({"rank": rank, "error": traceback.format_exc()})


def test_loopback_store_process_group_timeout_and_shutdown():
    """The rendezvous store listens on 127.0.0.1 only; the collective timeout reaches the process group; destroying
    the group (Ray's on_shutdown) closes the store's socket."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    port_queue, results, done = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_store_rank, args=(rank, port_queue, done, results)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    try:
        got = {r["rank"]: r for r in (results.get(timeout=120) for _ in procs)}
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    assert not [r["error"] for r in got.values() if "error" in r], [r["error"] for r in got.values() if "error" in r]
    rank0 = got[0]
    store = [s for s in rank0["listening"] if s["port"] == rank0["port"] and s["proto"] == "tcp"]
    assert [s["ip"] for s in store] == ["127.0.0.1"], rank0["listening"]
    assert not [s for s in rank0["listening"] if not is_loopback(s["ip"])], rank0["listening"]
    # gloo's listeners too, even where this host's name resolves to a routable address.
    assert rank0["gloo_interface"] == rank0["loopback_interface"] in ("lo", "lo0"), rank0
    # The peer stays away: the collective fails after the configured 3 s, not torch's default 30 min.
    assert rank0["collective"] != "returned" and 2.5 < rank0["waited_s"] < 60, rank0
    assert not [s for s in rank0["listening_after"] if s["port"] == rank0["port"]], rank0["listening_after"]


def test_loopback_torch_config_refuses_a_cluster_beyond_one_loopback_node(monkeypatch):
    import ray.util
    from ray.train.torch import TorchConfig

    from cluster import torch_backend
    from cluster.torch_backend import LoopbackTorchConfig, torch_config

    assert type(torch_config("gloo", 60, loopback=False)) is TorchConfig
    config = torch_config("nccl", 60, loopback=True)
    assert isinstance(config, LoopbackTorchConfig) and (config.backend, config.timeout_s) == ("nccl", 60)
    assert config.train_func_context is TorchConfig().train_func_context  # device setup as Ray's

    class Group:  # a worker group whose workers sit on two nodes
        def execute(self, fn, *args, **kwargs):
            assert fn is torch_backend._worker_node_id, fn
            return ["node-a", "node-b"]

        def execute_single(self, *args, **kwargs):
            raise AssertionError("no store for a group across nodes")

        def get_resources_per_worker(self):
            return {"CPU": 1}

        def __len__(self):
            return 2

    with pytest.raises(RuntimeError, match="one node"):
        config.backend_cls().on_start(Group(), config)
    # A node whose IP is not loopback (a cluster other nodes can join): rank 0 binds nothing.
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "192.0.2.2")
    with pytest.raises(RuntimeError, match="loopback-only"):
        torch_backend._bind_store_listener()
    assert torch_backend._listener is None


# Until cluster/launch.py selects the config itself: the CLI with Ray Train's TorchConfig replaced.
_LOOPBACK_DRIVER = r"""
import sys
import tempfile
import ray.train.torch
from cluster.torch_backend import torch_config

ray.train.torch.TorchConfig = lambda backend, timeout_s: torch_config(backend, timeout_s, loopback=True)
from pretrain.cli import main

sys.exit(main(sys.argv[1:]))
"""


def _launch_wired() -> bool:
    return "torch_config(" in (REPO / "cluster" / "launch.py").read_text()


def _store_ports(rank_pids: list[int]) -> set[int]:
    """Rank 0's TCPStore: a port rank 0 listens on that every rank (rank 0's own client included) is connected
    to. (gloo's pair listeners on rank 0 get connections from the other ranks only.)"""
    import psutil

    conns = [c for c in psutil.net_connections(kind="tcp") if c.pid in rank_pids]
    listening = {c.laddr.port for c in conns if c.pid == rank_pids[0] and c.status == psutil.CONN_LISTEN}
    return {port for port in listening
            if all(any(c.pid == pid and c.raddr and c.raddr.port == port for c in conns) for pid in rank_pids)}


def _train_and_watch(tmp_path, *, wired: bool) -> dict:
    """`liquid pretrain` with 2 Ray workers on the local cluster; while both train, the listening sockets of the
    driver's whole process tree (Ray's processes, the workers) and rank 0's store port."""
    run_dir = tmp_path / "run"
    overrides = ["tiny", "parallel.dp=2", "parallel.ep=2", "cluster.num_workers=2", "cluster.launcher=ray",
                 "train.max_steps=12", "train.log_interval=4", "train.seq_len=64", "train.global_batch_size=4",
                 "train.micro_batch_size=2", "train.threads=1", "data.corpus_max_mb=0.5",
                 "data.tokenizer_vocab_size=512", "model.vocab_size=512", "checkpoint.export=false",
                 "checkpoint.interval=1000", f"run.dir={run_dir}"]
    args = ["-m", "pretrain.cli", "pretrain", *overrides] if wired else ["-c", _LOOPBACK_DRIVER, "pretrain", *overrides]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"LIQUID_CACHE": str(tmp_path / "cache"), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"})
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen, stores, polls = {}, set(), 0
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            workers = [_worker_status(run_dir, rank) for rank in (0, 1)]
            if all(w and w["status"] == "running" for w in workers):  # both in the training loop
                for s in listening_sockets(proc.pid):
                    seen[(s["proto"], s["ip"], s["port"], s["pid"])] = s
                stores |= _store_ports([workers[0]["pid"], workers[1]["pid"]])
                polls += 1
            time.sleep(0.2)
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return {"returncode": proc.returncode, "output": out, "sockets": list(seen.values()), "stores": stores,
            "polls": polls, "summary": json.loads((run_dir / "summary.json").read_text())
            if (run_dir / "summary.json").exists() else None}


def _worker_status(run_dir: Path, rank: int) -> dict | None:
    try:
        return json.loads((run_dir / "workers" / f"rank{rank}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_training_on_local_ray_listens_on_loopback_only(tmp_path):
    """A real 2-worker training on the loopback-only local cluster: while the workers train, nothing in the
    whole process tree (Ray, the workers' gRPC servers, gloo, the TCPStore rendezvous) listens beyond loopback."""
    start = time.monotonic()
    result = _train_and_watch(tmp_path, wired=_launch_wired())
    assert result["returncode"] == 0, result["output"][-5000:]
    assert result["summary"]["steps"] == 12 and result["summary"]["world"] == 2
    sockets = result["sockets"]
    assert result["polls"] >= 1 and sockets, "the workers were never seen training"
    exposed = [s for s in sockets if not is_loopback(s["ip"])]
    assert not exposed, "listening beyond loopback:\n" + "\n".join(
        f"{s['proto']} {s['ip']}:{s['port']} pid {s['pid']} {s['name']}" for s in exposed)
    # The store was found, on rank 0, and on 127.0.0.1 (Ray's TorchConfig puts it on `::`).
    assert len(result["stores"]) == 1, result["stores"]
    store = [s for s in sockets if s["port"] in result["stores"] and s["proto"] == "tcp"]
    assert store and all(s["ip"] == "127.0.0.1" for s in store), store
    print(f"training on local Ray: {len(sockets)} listening sockets, all on loopback; store "
          f"{store[0]['ip']}:{store[0]['port']} ({time.monotonic() - start:.1f} s)")
