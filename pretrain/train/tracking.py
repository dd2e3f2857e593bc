"""Experiment tracking (tracking.wandb, tracking.mlflow): rank 0 sends every metrics record and the resolved
config to Weights & Biases and/or MLflow. `open_tracker` is the only entry point; wandb and mlflow are
imported there, only when enabled, so a run without tracking never loads them.

What is logged, per record of metrics.jsonl (the same records, as MetricsLogger writes them):
  - numeric values under their own key (loss, lr, grad_norm, tokens, tokens_per_s, mfu, elapsed_s, eta_s,
    val/<name>/loss, ...); None is skipped (mfu on CPU, no checkpoint in the window);
  - lists of numbers expanded into indexed scalars: `expert_load_per_layer` -> expert_load/layer0, layer1, ...;
    any other list `k` -> k/0, k/1, ...;
  - `step` is the x-axis: wandb logs it as a metric and every other metric uses it as its step metric
    (define_metric), so wandb's own `_step` counter never has to match it; MLflow gets it as the metric step;
  - `time` is the record's wall time: MLflow's timestamp (wandb stamps rows itself);
  - strings (e.g. `phase`): kept in the wandb row, and an MLflow tag of that name whenever the value changes.
The resolved config (flattened: `model.d_model`, `data.streams.0.path`, lists of scalars as JSON) is the wandb
run's config and the MLflow run's params. MLflow params cannot change: on resume, keys new to the run are
added and changed values are set as tags `config.<key>` (the newest value); wandb takes the new values.

Resume: RUN_DIR/tracking.json keeps, per tracker, the tracked run's ids (wandb run_id; mlflow run_id and
experiment_id) and `last_step`, the last step it was sent. A resumed start (start_step > 0) reopens the same
tracked runs (wandb.init(id=..., resume="allow"); MLflow's run by id); a fresh start (start_step 0, when
metrics.jsonl is emptied too) opens new ones. Steps a tracked run already holds are not sent again: after a
crash the steps between the checkpoint and the crash are trained again (same data and seed, so the same
losses; throughput differs) and their records skip the trackers that have them, which keeps one value per
step and a step that only grows. What a run holds: MLflow, tracking.json's last_step (log_batch returns once
the store has the metrics); wandb, the last step in the transaction logs of the earlier attempts (wandb-core
buffers its log and a crash loses the buffer, so tracking.json may be ahead), or online the run's summary on
the server. A tracker behind the checkpoint (tracking turned on when resuming, or rows lost in a crash) is
first caught up from metrics.jsonl's records up to start_step, then gets the steps trained again.

Files: wandb's under tracking.wandb.dir (default RUN_DIR/tracking; its offline runs are
RUN_DIR/tracking/wandb/offline-run-*, uploaded later by `wandb sync`); MLflow's file store at
RUN_DIR/tracking/mlruns unless tracking.mlflow.tracking_uri names another. MLflow 3 keeps its file store in
maintenance mode and refuses it unless MLFLOW_ALLOW_FILE_STORE=true, which is set here for file stores only.

Privacy: nothing from the environment is logged. wandb runs with its metadata, git, code, requirements,
console and system-metrics capture off (no command line, no environment, no git remote URL, no probing of
cloud metadata endpoints), silent, without error reporting, WANDB_MODE set to tracking.wandb.mode. MLflow's
telemetry is off (MLFLOW_DISABLE_TELEMETRY); its runs are made through MlflowClient, which adds no source,
user or git tags. A user:password in a URL of the config is masked before it is logged.

A tracker that fails while training (a server that went away) prints a warning and the run goes on; one that
cannot start (package missing, bad URI) stops the run with an error naming the config key.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

STATE_FILE = "tracking.json"  # RUN_DIR/tracking.json
TRACKING_DIR = "tracking"  # RUN_DIR/tracking: wandb's dir and the MLflow file store by default
MLRUNS = "mlruns"

# The versions pyproject.toml pins (named in the error when a package is missing).
PACKAGES = {"wandb": "wandb==0.31.0", "mlflow": "mlflow-skinny==3.18.0"}

_MAX_WARNINGS = 5
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_MLFLOW_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")
_MLFLOW_PARAM_MAX = 6000


class TrackingUnavailable(ValueError):
    """A tracker is enabled but its package is missing (a ValueError: the CLI prints it and exits 2)."""


# ---- helpers (no wandb/mlflow needed) ---------------------------------------------------------------------

def mask_url(text: str) -> str:
    """`scheme://user:password@host/...` -> `scheme://***@host/...` (any userinfo in a URL)."""
    return _URL_USERINFO.sub(r"\g<scheme>***@", text)


def flatten_config(cfg) -> dict[str, object]:
    """The resolved config as one level of dotted keys; lists of scalars as JSON text, lists of dicts by index;
    strings with a user:password URL masked."""
    import dataclasses

    tree = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    flat: dict[str, object] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            if not value:
                flat[prefix] = "{}"
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in value):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        elif isinstance(value, (list, tuple)):
            flat[prefix] = mask_url(json.dumps(list(value)))
        elif isinstance(value, str):
            flat[prefix] = mask_url(value)
        else:
            flat[prefix] = value
    walk("", tree)
    return flat


def _number(value) -> float | int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    return None


def record_scalars(record: dict) -> dict[str, float | int]:
    """Metric name -> number of one metrics record (see the module docstring); step and time left out."""
    out: dict[str, float | int] = {}
    for key, value in record.items():
        if key in ("step", "time") or value is None:
            continue
        if isinstance(value, (list, tuple)):
            base = key[: -len("_per_layer")] + "/layer" if key.endswith("_per_layer") else f"{key}/"
            for i, item in enumerate(value):
                n = _number(item)
                if n is not None:
                    out[f"{base}{i}"] = n
            continue
        n = _number(value)
        if n is not None:
            out[key] = n
    return out


def record_strings(record: dict) -> dict[str, str]:
    return {k: v for k, v in record.items() if isinstance(v, str)}


def read_state(run_dir) -> dict:
    try:
        state = json.loads((Path(run_dir) / STATE_FILE).read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_state(run_dir: Path, state: dict) -> None:
    path = run_dir / STATE_FILE
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _metrics_records(run_dir: Path, after: int, through: int) -> list[dict]:
    """metrics.jsonl's records with after < step <= through (lines cut by a crash skipped)."""
    from pretrain.run_dir import RunDir

    path, records = RunDir(run_dir).metrics_file, []
    if through <= after or not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            if after < int(record["step"]) <= through:
                records.append(record)
        except (ValueError, KeyError, TypeError):
            continue
    return records


_WANDB_BLOCK = 32768  # wandb's transaction log: LevelDB's log format (32 KiB blocks of chunks)


def _wandb_chunks(data: bytes, pos: int):
    """(type, payload) of the chunks from a block boundary `pos` on; stops at a chunk cut short."""
    while pos + 7 <= len(data):
        left = _WANDB_BLOCK - pos % _WANDB_BLOCK
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0 and length == 0:  # zero padding (a preallocated or block-padded tail)
            pos += left
            continue
        if pos + 7 + length > len(data):
            return
        yield kind, data[pos + 7:pos + 7 + length]
        pos += 7 + length


def wandb_last_step(path) -> int | None:
    """The largest `step` of the history rows in a .wandb transaction log (None: no row), reading from the end:
    every block starts at a chunk boundary, so the scan starts a few blocks back and goes further back only
    while it finds no row."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb transaction log")
    blocks = max(1, -(-len(data) // _WANDB_BLOCK))
    back = 2
    while True:
        first = max(0, blocks - back)
        best, pending = None, None
        for kind, payload in _wandb_chunks(data, 7 if first == 0 else first * _WANDB_BLOCK):
            if kind in (1, 2):  # full, first
                pending = payload
            elif pending is not None:  # middle, last (skipped until a record's start is seen)
                pending += payload
            if kind in (1, 4) and pending is not None:
                record = pb.Record()
                record.ParseFromString(pending)
                pending = None
                if record.WhichOneof("record_type") == "history":
                    for item in record.history.item:
                        if (item.key or "/".join(item.nested_key)) == "step":
                            step = json.loads(item.value_json)
                            best = step if best is None else max(best, step)
        if best is not None or first == 0:
            return None if best is None else int(best)
        back *= 2


def check_available(cfg) -> None:
    """Raise TrackingUnavailable when an enabled tracker's package is not installed (nothing imported)."""
    import importlib.util

    for name in ("wandb", "mlflow"):
        if getattr(cfg.tracking, name).enabled and importlib.util.find_spec(name) is None:
            raise TrackingUnavailable(_missing(name, f"No module named '{name}'"))


def _missing(name: str, why) -> str:
    return (f"config key tracking.{name}.enabled=true needs the '{name}' package ({why}); install it with "
            f"`pip install '{PACKAGES[name]}'` or set tracking.{name}.enabled=false")


def _import(name: str):
    try:
        if name == "wandb":
            import wandb
            return wandb
        import mlflow
        return mlflow
    except ImportError as err:
        raise TrackingUnavailable(_missing(name, err)) from None


def _say(msg: str) -> None:
    print(f"tracking: {msg}", flush=True)


# ---- the backends -----------------------------------------------------------------------------------------

class _WandbBackend:
    name = "wandb"

    def __init__(self, cfg, run_dir: Path, state: dict | None, *, resume: bool):
        w = cfg.tracking.wandb
        # Before the import: what wandb reads from the environment at import and init.
        os.environ["WANDB_MODE"] = w.mode
        os.environ["WANDB_SILENT"] = "true"
        os.environ["WANDB_ERROR_REPORTING"] = "false"  # no crash reports to Sentry
        os.environ["WANDB_DISABLE_CODE"] = "true"
        os.environ["WANDB_DISABLE_GIT"] = "true"
        wandb = _import("wandb")
        self.dir, self.mode = (Path(w.dir) if w.dir else run_dir / TRACKING_DIR), w.mode
        self.dir.mkdir(parents=True, exist_ok=True)
        run_id = state.get("run_id") if (resume and state) else None
        settings = wandb.Settings(
            mode=w.mode, silent=True, quiet=True, console="off", save_code=False, disable_code=True,
            disable_git=True, disable_job_creation=True, x_disable_meta=True, x_disable_stats=True,
            x_disable_machine_info=True, x_save_requirements=False, label_disable=True)
        try:
            self.run = wandb.init(project=w.project, entity=w.entity, name=w.name or cfg.run.name,
                                  tags=list(w.tags) or None, dir=str(self.dir), id=run_id,
                                  resume="allow" if run_id else None, settings=settings)
        except Exception as err:
            raise RuntimeError(f"tracking.wandb: wandb.init failed ({w.mode}): {err}") from err
        self.run.config.update(flatten_config(cfg), allow_val_change=True)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.sent_through = self._sent_through(run_id, state or {}) if run_id else 0
        self.state = {"run_id": self.run.id, "project": w.project, "entity": w.entity, "mode": w.mode,
                      "dir": str(self.dir), "last_step": self.sent_through}
        where = (f"offline under {self.dir / 'wandb'} (upload: wandb sync {self.dir / 'wandb'}/offline-run-*-"
                 f"{self.run.id})" if w.mode == "offline" else "online")
        _say(f"wandb run {self.run.id} ({'resumed' if run_id else 'new'}), {where}")

    def _sent_through(self, run_id: str, state: dict) -> int:
        """The last step this wandb run holds from earlier attempts. wandb-core buffers its transaction log and
        a crash loses the buffer, so tracking.json's last_step may be ahead of it. Online: the run's summary on
        the server; offline: what the earlier attempts' transaction logs in the wandb dir hold (every attempt,
        offline or online, leaves one: wandb/*run-<time>-<id>/run-<id>.wandb); tracking.json's last_step when
        neither can tell."""
        fallback = int(state.get("last_step", 0))
        try:
            if self.mode == "online":
                step = self.run.summary.get("step")
                if isinstance(step, (int, float)) and not isinstance(step, bool):
                    return int(step)
            current = Path(self.run.dir).parent  # this attempt's folder
            logs = [p for p in (self.dir / "wandb").glob(f"*-{run_id}/run-{run_id}.wandb") if p.parent != current]
            if not logs:
                return fallback
            steps = [s for s in map(wandb_last_step, logs) if s is not None]
            return max(steps) if steps else 0
        except Exception as err:  # an unreadable log: trust tracking.json
            _say(f"warning: could not read what wandb run {run_id} holds ({type(err).__name__}: {err}); "
                 f"taking step {fallback} from {STATE_FILE}")
            return fallback

    def log(self, record: dict) -> None:
        row = {**record_scalars(record), **record_strings(record), "step": int(record["step"])}
        self.run.log(row)

    def close(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)


class _MlflowBackend:
    name = "mlflow"

    def __init__(self, cfg, run_dir: Path, state: dict | None, *, resume: bool):
        m = cfg.tracking.mlflow
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # before the import: mlflow starts its client there
        uri = m.tracking_uri or (run_dir / TRACKING_DIR / MLRUNS).resolve().as_uri()
        if _is_file_store(uri):
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3: the file store is in maintenance mode
        mlflow = _import("mlflow")
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        self.Metric, self.Param, self.RunTag = Metric, Param, RunTag
        try:
            self.client = client = MlflowClient(tracking_uri=uri)
            run = None
            if resume and state and state.get("run_id"):
                try:
                    run = client.get_run(state["run_id"])
                except mlflow.exceptions.MlflowException as err:
                    _say(f"warning: mlflow run {state['run_id']} not found at {mask_url(uri)} ({err}); "
                         "starting a new run")
            resumed = run is not None
            if run is None:
                exp = client.get_experiment_by_name(m.experiment)
                experiment_id = exp.experiment_id if exp is not None else client.create_experiment(m.experiment)
                tags = {str(k): str(v) for k, v in m.tags.items()}
                run = client.create_run(experiment_id, run_name=m.run_name or cfg.run.name, tags=tags)
                last_step = 0
            else:
                client.update_run(run.info.run_id, status="RUNNING")
                for k, v in m.tags.items():
                    client.set_tag(run.info.run_id, str(k), str(v))
                last_step = int(state.get("last_step", 0))  # log_batch returns once the store has it
            self.run_id = run.info.run_id
            self._log_params(cfg, run)
        except TrackingUnavailable:
            raise
        except Exception as err:
            raise RuntimeError(f"tracking.mlflow: could not open a run at {mask_url(uri)}: {err}") from err
        self.sent_through = last_step
        self.state = {"run_id": self.run_id, "experiment_id": run.info.experiment_id, "experiment": m.experiment,
                      "tracking_uri": mask_url(uri), "last_step": last_step}
        self._strings: dict[str, str] = {}
        _say(f"mlflow run {self.run_id} ({'resumed' if resumed else 'new'}) in experiment '{m.experiment}' "
             f"({run.info.experiment_id}) at {mask_url(uri)}")

    def _log_params(self, cfg, run) -> None:
        have = dict(run.data.params)
        params, changed = [], []
        for key, value in flatten_config(cfg).items():
            text = value if isinstance(value, str) else json.dumps(value)
            text = text[:_MLFLOW_PARAM_MAX]
            key = _mlflow_key(key)
            if key not in have:
                params.append(self.Param(key, text))
            elif have[key] != text:
                changed.append(self.RunTag(f"config.{key}", text))
        self.client.log_batch(self.run_id, params=params, tags=changed)

    def log(self, record: dict) -> None:
        step = int(record["step"])
        stamp = int(float(record.get("time") or time.time()) * 1000)
        metrics = [self.Metric(_mlflow_key(k), float(v), stamp, step) for k, v in record_scalars(record).items()]
        tags = [self.RunTag(_mlflow_key(k), v[:8000]) for k, v in record_strings(record).items()
                if self._strings.get(k) != v]
        self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
        self._strings.update(record_strings(record))

    def close(self, exit_code: int) -> None:
        status = "FINISHED" if exit_code == 0 else ("KILLED" if exit_code == 130 else "FAILED")
        self.client.set_terminated(self.run_id, status=status)


def _mlflow_key(key: str) -> str:
    key = _MLFLOW_KEY_BAD.sub("_", key).lstrip("/")
    while ".." in key:
        key = key.replace("..", "._")
    return key[:250]


def _is_file_store(uri: str) -> bool:
    """A `file:` URI or a plain path (MLflow's file store), not a server, database or Databricks URI."""
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme
    return scheme in ("", "file") or len(scheme) == 1  # a Windows drive letter


# ---- the tracker MetricsLogger holds ----------------------------------------------------------------------

class Tracker:
    """Sends records to the enabled backends and keeps RUN_DIR/tracking.json (ids, last step sent)."""

    def __init__(self, run_dir: Path, backends: list, state: dict, *, start_step: int):
        self.run_dir, self.backends, self.state = run_dir, backends, state
        self.warnings = 0
        for backend in backends:
            state[backend.name] = backend.state  # the same dict: log() updates last_step in it
        _write_state(run_dir, state)
        # Catch up: the records a tracker has not had, up to the step this attempt starts after.
        behind = min(b.sent_through for b in backends) if backends else start_step
        for record in _metrics_records(run_dir, behind, start_step):
            self.log(record)

    def log(self, record: dict) -> None:
        step, sent = int(record["step"]), False
        for backend in self.backends:
            if step <= backend.sent_through:
                continue  # sent by an earlier attempt (a step trained again after a crash)
            try:
                backend.log(record)
            except Exception as err:  # the run goes on without this record in this tracker
                self._warn(f"{backend.name} could not log step {step}: {type(err).__name__}: {err}")
                continue
            backend.state["last_step"], sent = max(step, backend.state["last_step"]), True
        if sent:
            self._save()

    def _save(self) -> None:
        try:
            _write_state(self.run_dir, self.state)
        except OSError as err:
            self._warn(f"could not write {STATE_FILE}: {err}")

    def _warn(self, msg: str) -> None:
        self.warnings += 1
        if self.warnings <= _MAX_WARNINGS:
            print(f"tracking: warning: {msg}", file=sys.stderr, flush=True)

    def close(self, exit_code: int | None = None) -> None:
        """Finish the tracked runs; `exit_code` None: 0, or 1 / 130 when called while an exception unwinds."""
        if exit_code is None:
            exc = sys.exc_info()[0]
            exit_code = 0 if exc is None else (130 if issubclass(exc, KeyboardInterrupt) else 1)
        for backend in self.backends:
            try:
                backend.close(exit_code)
            except Exception as err:
                self._warn(f"{backend.name} could not close: {type(err).__name__}: {err}")
        self._save()
        self.backends = []


def open_tracker(cfg, run_dir, *, start_step: int = 0):
    """The run's tracker (an object with log(record) and close()), or None when tracking is off.
    start_step > 0: a resumed run; the tracked runs named in RUN_DIR/tracking.json are continued."""
    t = cfg.tracking
    if not (t.wandb.enabled or t.mlflow.enabled):
        return None
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_available(cfg)
    resume = start_step > 0
    state = read_state(run_dir) if resume else {}
    backends = []
    try:
        if t.wandb.enabled:
            backends.append(_WandbBackend(cfg, run_dir, state.get("wandb"), resume=resume))
        if t.mlflow.enabled:
            backends.append(_MlflowBackend(cfg, run_dir, state.get("mlflow"), resume=resume))
    except BaseException:
        for backend in backends:
            try:
                backend.close(1)
            except Exception:
                pass
        raise
    # On resume a disabled tracker's ids stay in the file (for a later resume with it on again).
    return Tracker(run_dir, backends, state, start_step=start_step)
