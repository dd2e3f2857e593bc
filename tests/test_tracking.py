"""Experiment tracking (pretrain/train/tracking.py) with the real packages: wandb in offline mode (its run data
read back from the .wandb transaction log) and MLflow on a local file store (read back through MlflowClient).

(a) `liquid pretrain` with both trackers, then `liquid resume`: each tracker holds metrics.jsonl's values per
    step, the config, and the resumed attempt continues the same tracked runs (ids in RUN_DIR/tracking.json).
(b) A crash after the checkpoint (steps trained again) and tracking turned on at resume (catch-up from
    metrics.jsonl), through open_tracker in a subprocess that also refuses any IP connection.
(c) A missing package: a clear error naming the key and the package, exit 2 from the CLI.
"""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.train.tracking import flatten_config, record_scalars

REPO = Path(__file__).resolve().parents[1]
LIQUID = [sys.executable, "-m", "pretrain.cli"]
SINGLE = ("parallel.dp=1", "parallel.ep=1", "cluster.num_workers=1")
SMALL = ("train.log_interval=1", "train.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=2",
         "data.corpus_max_mb=0.5", "data.tokenizer_vocab_size=512", "model.vocab_size=512",
         "checkpoint.export=false", "eval.interval=2", "eval.tokens=128", *SINGLE)
TRACKING = ("tracking.wandb.enabled=true", "tracking.mlflow.enabled=true", "tracking.wandb.tags=[ci,tiny]",
            "tracking.mlflow.tags={team: pretrain}")
NOT_METRICS = ("step", "time")  # the x-axis, and MLflow's timestamp


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The shards cache shared by this module's runs; wandb's own cache/config dirs in scratch."""
    scratch = tmp_path_factory.mktemp("tracking-env")
    return {"LIQUID_CACHE": str(scratch / "cache"), "WANDB_CACHE_DIR": str(scratch / "wandb-cache"),
            "WANDB_CONFIG_DIR": str(scratch / "wandb-config"), "WANDB_DATA_DIR": str(scratch / "wandb-data"),
            "MLFLOW_DISABLE_TELEMETRY": "true"}


def run_cli(*args, env):
    full = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([*LIQUID, *args], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**full, **env})


# ---- reading back what was tracked ----------------------------------------------------------------------------

def wandb_records(path: Path):
    """The protobuf Records of a .wandb file: wandb's LevelDB-style log (a 7-byte header `:W&B` + magic +
    version, then 32 KiB blocks of chunks: crc32 (4), length (2), type (1: full, 2: first, 3: middle, 4: last))."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def wandb_runs(run_dir: Path) -> list[dict]:
    """Each offline attempt under RUN_DIR/tracking/wandb, oldest first: its run id, config and history rows."""
    runs = []
    for folder in sorted((run_dir / "tracking" / "wandb").glob("offline-run-*")):
        (log,) = folder.glob("run-*.wandb")
        # (a crashed attempt's log may hold no run record: wandb-core buffers it; the folder names the id)
        run = {"folder": folder, "id": folder.name.rsplit("-", 1)[1], "config": {}, "history": [], "name": None,
               "tags": []}
        for record in wandb_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                assert record.run.run_id == run["id"]
                run["name"], run["tags"] = record.run.display_name, list(record.run.tags)
                run["config"].update({u.key: json.loads(u.value_json) for u in record.run.config.update})
            elif kind == "config":
                run["config"].update({u.key: json.loads(u.value_json) for u in record.config.update})
            elif kind == "history":
                run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in record.history.item})
        runs.append(run)
    return runs


@pytest.fixture(autouse=True)
def mlflow_env(monkeypatch):
    """This process reads the stores back: MLflow without telemetry, its file store allowed (MLflow 3)."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def mlflow_client(run_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(run_dir / "tracking" / "mlruns").resolve().as_uri())


def metrics_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def expected_series(records: list[dict]) -> dict[str, dict[int, float]]:
    """metric name -> {step: value}, as the trackers should hold them."""
    series: dict[str, dict[int, float]] = {}
    for r in records:
        for key, value in record_scalars(r).items():
            series.setdefault(key, {})[r["step"]] = value
    return series


def check_mlflow(run_dir: Path, records: list[dict]) -> object:
    state = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    client = mlflow_client(run_dir)
    run = client.get_run(state["run_id"])
    assert run.info.experiment_id == state["experiment_id"]
    want = expected_series(records)
    assert set(run.data.metrics) == set(want), (sorted(run.data.metrics), sorted(want))
    for key, by_step in want.items():
        history = client.get_metric_history(run.info.run_id, key)
        got = [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)]
        assert got == sorted((s, pytest.approx(float(v))) for s, v in by_step.items()), key
    return run


def check_wandb(run_dir: Path, records: list[dict]) -> list[dict]:
    runs = wandb_runs(run_dir)
    state = json.loads((run_dir / "tracking.json").read_text())["wandb"]
    assert runs and {r["id"] for r in runs} == {state["run_id"]}
    rows = [row for r in runs for row in r["history"]]
    assert [row["step"] for row in rows] == [r["step"] for r in records]  # once each, in order
    for row, record in zip(rows, records):
        want = record_scalars(record)
        assert {k: row[k] for k in want} == pytest.approx(want), record["step"]
        assert "time" not in row
    return runs


# ---- (a) liquid pretrain, liquid resume ----------------------------------------------------------------------

def test_pretrain_and_resume_track_the_same_runs(tmp_path, env):
    run_dir = tmp_path / "run"
    proc = run_cli("pretrain", "tiny", *SMALL, *TRACKING, f"run.dir={run_dir}", "train.max_steps=3", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "tracking: wandb run" in proc.stdout and "tracking: mlflow run" in proc.stdout
    records = metrics_records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert "val/heldout/loss" in records[1] and "expert_load_per_layer" in records[0]
    state = json.loads((run_dir / "tracking.json").read_text())
    assert state["wandb"]["last_step"] == state["mlflow"]["last_step"] == 3

    run = check_mlflow(run_dir, records)
    assert {"val/heldout/loss", "expert_load/layer0", "expert_load/layer2", "loss", "lr", "tokens"} <= set(
        run.data.metrics)
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    assert run.data.tags["team"] == "pretrain"
    assert not [k for k in run.data.tags if k.startswith("mlflow.source") or k == "mlflow.user"]
    params = run.data.params
    assert params["train.max_steps"] == "3" and params["model.vocab_size"] == "512"
    assert params["run.dir"] == str(run_dir) and params["tracking.wandb.tags"] == '["ci", "tiny"]'
    assert params["data.tokenizer_vocab_size"] == "512" and params["eval.interval"] == "2"

    (attempt,) = check_wandb(run_dir, records)
    assert attempt["name"] == "tiny" and attempt["tags"] == ["ci", "tiny"]
    assert attempt["config"]["train.max_steps"] == 3 and attempt["config"]["model.vocab_size"] == 512
    # Nothing of the machine or the environment: no metadata, requirements, code, console capture.
    assert not list((attempt["folder"] / "files").iterdir())

    # Resume to step 5: the same tracked runs, their histories continued.
    proc = run_cli("resume", str(run_dir), "train.max_steps=5", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "(resumed)" in proc.stdout
    again = json.loads((run_dir / "tracking.json").read_text())
    for name, ids in (("wandb", ("run_id",)), ("mlflow", ("run_id", "experiment_id"))):
        assert [again[name][k] for k in ids] == [state[name][k] for k in ids]
        assert again[name]["last_step"] == 5
    records = metrics_records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    run = check_mlflow(run_dir, records)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "3"  # MLflow params do not change...
    assert run.data.tags["config.train.max_steps"] == "5"  # ...the new value is a tag
    attempts = check_wandb(run_dir, records)
    assert len(attempts) == 2 and attempts[1]["config"]["train.max_steps"] == 5
    assert [row["step"] for row in attempts[1]["history"]] == [4, 5]


# ---- (b) a crash after the checkpoint; tracking turned on at resume -------------------------------------------

_DIRECT = r"""
import json, os, socket, sys
from pathlib import Path

attempts = []
def refuse(kind):
    def guard(*args, **kwargs):
        attempts.append(kind + " " + repr(args)[:200])
        raise OSError("no network in this test")
    return guard
_connect = socket.socket.connect
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        return refuse("connect")(address)
    return _connect(self, address)
socket.socket.connect = connect
socket.getaddrinfo = refuse("getaddrinfo")

from pretrain.config import load_config
from pretrain.train.tracking import open_tracker

run_dir, start, stop, crash = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
offset = float(sys.argv[5])
cfg = load_config("tiny", [f"run.dir={run_dir}", "tracking.wandb.enabled=true", "tracking.mlflow.enabled=true",
                           "parallel.dp=1", "parallel.ep=1", "cluster.num_workers=1"])
tracker = open_tracker(cfg, run_dir, start_step=start)
with open(run_dir / "metrics.jsonl", "a") as fh:
    for step in range(start + 1, stop + 1):
        record = {"step": step, "loss": 10.0 / step + offset, "lr": 1e-3 * step, "mfu": None, "tokens": 256 * step,
                  "expert_load_per_layer": [1.0 + step / 10, 1.5], "phase": "main", "time": 1.8e9 + step}
        fh.write(json.dumps(record) + "\n")
        tracker.log(record)
print("ATTEMPTS " + json.dumps(attempts), flush=True)
if crash == "crash":
    os._exit(3)  # no close(): the process dies
tracker.close()
"""


def _direct(run_dir, start, stop, *, crash=False, offset=0.0, env):
    full = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", _DIRECT, str(run_dir), str(start), str(stop),
                           "crash" if crash else "close", str(offset)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**full, **env})
    assert proc.returncode == (3 if crash else 0), proc.stdout[-3000:] + proc.stderr[-5000:]
    attempts = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("ATTEMPTS "))[9:])
    assert attempts == [], f"tried the network: {attempts}"
    return proc


def _keep(run_dir, through):
    """What MetricsLogger does on resume: metrics.jsonl keeps the records up to the checkpoint's step."""
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()
                            if json.loads(line)["step"] <= through))


def test_crash_retrain_and_catch_up(tmp_path, env):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # An earlier untracked attempt wrote steps 1..4 (its checkpoint at 4); tracking is on from the resume, which
    # first sends those four, then trains 5..7 and dies (checkpoint still at 4).
    for step in range(1, 5):
        with open(run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, "loss": 10.0 / step, "lr": 1e-3 * step, "tokens": 256 * step,
                                 "expert_load_per_layer": [1.0 + step / 10, 1.5], "time": 1.8e9 + step}) + "\n")
    _direct(run_dir, 4, 7, crash=True, env=env)
    state = json.loads((run_dir / "tracking.json").read_text())
    assert state["wandb"]["last_step"] == state["mlflow"]["last_step"] == 7
    first = metrics_records(run_dir)

    # The next attempt resumes from step 4 again: 5..7 are trained again (their values differ a little here, as
    # throughput would), then 8..9 are new. MLflow had 5..7 (log_batch returns once they are stored): it keeps
    # those first values. wandb-core buffers its log, so the crashed attempt's .wandb file holds only the rows
    # written before the crash (here none: too few to fill a buffer); the new attempt sends what it lacks, the
    # kept records up to 4 from metrics.jsonl and then 5..9 as trained again. One value per step in each.
    (crashed,) = wandb_runs(run_dir)
    held = len(crashed["history"])
    assert [row["step"] for row in crashed["history"]] == list(range(1, held + 1)) and held <= 7
    _keep(run_dir, 4)
    _direct(run_dir, 4, 9, offset=0.001, env=env)
    again = json.loads((run_dir / "tracking.json").read_text())
    assert again["wandb"]["run_id"] == state["wandb"]["run_id"]
    assert [again["mlflow"][k] for k in ("run_id", "experiment_id")] == [state["mlflow"][k] for k in
                                                                          ("run_id", "experiment_id")]
    assert again["wandb"]["last_step"] == again["mlflow"]["last_step"] == 9
    final = metrics_records(run_dir)
    assert [r["step"] for r in final] == list(range(1, 10)) and final[5]["loss"] != first[5]["loss"]
    run = check_mlflow(run_dir, first[:7] + final[7:])
    assert run.info.status == "FINISHED" and run.data.tags["phase"] == "main"
    attempts = check_wandb(run_dir, first[:held] + final[held:])
    assert [len(a["history"]) for a in attempts] == [held, 9 - held]

    # A fresh start (start_step 0) in the same directory: new tracked runs.
    (run_dir / "metrics.jsonl").unlink()
    _direct(run_dir, 0, 2, env=env)
    fresh = json.loads((run_dir / "tracking.json").read_text())
    assert fresh["wandb"]["run_id"] != state["wandb"]["run_id"]
    assert fresh["mlflow"]["run_id"] != state["mlflow"]["run_id"]
    assert fresh["mlflow"]["experiment_id"] == state["mlflow"]["experiment_id"]  # the same experiment


# ---- (c) a missing package ------------------------------------------------------------------------------------

def test_missing_package_is_a_clear_error_naming_key_and_package(tmp_path, monkeypatch):
    from pretrain.config import load_config
    from pretrain.train.tracking import TrackingUnavailable, open_tracker

    cfg = load_config("tiny", [f"run.dir={tmp_path}", "tracking.mlflow.enabled=true", *SINGLE])
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` fails as when it is not installed
    with pytest.raises(TrackingUnavailable, match=r"tracking\.mlflow\.enabled=true needs the 'mlflow' package") as err:
        open_tracker(cfg, tmp_path, start_step=0)
    assert "mlflow-skinny==3.18.0" in str(err.value) and isinstance(err.value, ValueError)
    assert not (tmp_path / "tracking.json").exists()


_WITHOUT_WANDB = "import sys; sys.modules['wandb'] = None\nfrom pretrain.cli import main\nsys.exit(main(sys.argv[1:]))"


def test_missing_package_through_the_cli_exits_2(tmp_path, env):
    full = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = ["pretrain", "tiny", *SMALL, f"run.dir={tmp_path / 'run'}", "train.max_steps=1",
            "tracking.wandb.enabled=true"]
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_WANDB, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**full, **env})
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "tracking.wandb.enabled=true needs the 'wandb' package" in proc.stderr
    assert "wandb==0.31.0" in proc.stderr and "Traceback" not in proc.stderr


# ---- what goes in ---------------------------------------------------------------------------------------------

def test_record_scalars_and_flattened_config():
    record = {"step": 7, "time": 1.8e9, "loss": 2.5, "mfu": None, "devices": 2, "phase": "main",
              "expert_load_per_layer": [1.25, None, 2.0], "other": [3, 4], "val/heldout/loss": 3.0}
    assert record_scalars(record) == {"loss": 2.5, "devices": 2, "expert_load/layer0": 1.25,
                                      "expert_load/layer2": 2.0, "other/0": 3, "other/1": 4,
                                      "val/heldout/loss": 3.0}
    from pretrain.config import load_config

    cfg = load_config("tiny", ["tracking.mlflow.tracking_uri=https://alice:s3cret@mlflow.example/x",
                               "tracking.wandb.tags=[a,b]"])
    flat = flatten_config(cfg)
    assert flat["tracking.mlflow.tracking_uri"] == "https://***@mlflow.example/x"
    assert flat["tracking.wandb.tags"] == '["a", "b"]' and flat["model.moe.top_k"] == 2
    assert flat["run.name"] == "tiny" and not [k for k, v in flat.items() if isinstance(v, (dict, list))]


def test_tracking_off_imports_neither_package():
    code = ("import sys\nfrom pretrain.config import load_config\nfrom pretrain.train.tracking import open_tracker\n"
            "assert open_tracker(load_config('tiny'), '/nonexistent/run', start_step=5) is None\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('wandb', 'mlflow')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
