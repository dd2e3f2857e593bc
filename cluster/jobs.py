"""Cluster job commands: `liquid submit`, `status`, `logs`, `stop` and `jobs`, through the Ray Jobs API.

`liquid submit CONFIG [key=value ...] --address http://HEAD:8265` resolves the config here (the same errors
as `liquid pretrain`), copies the project (without virtual environments, runs, .git, caches and
bench-results) into a staging directory with the resolved config in `.liquid-job/config.yaml`, and submits
`python -m pretrain.cli pretrain .liquid-job/config.yaml` with that directory as the job's working_dir. On
the cluster the driver is an ordinary `liquid pretrain`: Ray sets RAY_ADDRESS for it, so its `ray.init()`
joins the cluster.

The run directory: the config's `run.dir`, made absolute here (a relative one against this directory), is
the run directory on the cluster, so a job that runs on this machine (or on a filesystem shared with it)
writes where `liquid pretrain` would. It is stored in the job's metadata; `liquid status` reads
RUN_DIR/metrics.jsonl when it is reachable from here, else the newest progress line of the job's logs.

Authentication: Ray 2.60 clusters require a token on the dashboard and the job API. It is looked up as Ray
does (RAY_AUTH_TOKEN, then the file named by RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token), after
`--token-path`, and sent as `Authorization: Bearer ...`. It is never written to the job's metadata, its
runtime environment, the run directory or the logs: the driver on the cluster authenticates with the
cluster's own token.

Stopping: `liquid stop JOB` asks Ray to stop the job; Ray's job supervisor sends SIGTERM to the entrypoint
(and every process under it), then SIGKILLs whatever is left after RAY_JOB_STOP_WAIT_TIME_S seconds (3 by
default). The supervisor reads that variable from its own environment, which includes the job's
runtime_env env_vars, so `submit` sets it per job (`--stop-grace-s`, default 300) to give the driver time to
have the workers save a checkpoint and exit.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from pretrain.run_dir import RunDir

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pretrain", "parallel", "data_pipeline", "checkpoints", "cluster")
JOB_DIR = ".liquid-job"  # inside the uploaded working_dir: the resolved config
META_MARK = "liquid_job"  # metadata key that marks jobs submitted by `liquid submit`
STOP_WAIT_ENV = "RAY_JOB_STOP_WAIT_TIME_S"  # read by Ray's JobSupervisor (ray/dashboard/modules/job/job_supervisor.py)
DEFAULT_STOP_GRACE_S = 300
CONNECT_TIMEOUT_S = 5.0
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

# Never uploaded: environments, outputs, VCS data, caches.
EXCLUDED_TOP = {".venv", ".venv-hf5", ".venv-hf5.tmp", "venv", "runs", ".git", "bench-results", "gpu-results",
                "build", "dist", JOB_DIR}
EXCLUDED_ANYWHERE = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".cache", ".ipynb_checkpoints",
                     ".DS_Store"}
# Set by launch.py's own ray.init(runtime_env=...): the same key in the job's env_vars makes Ray refuse to merge
# the two runtime environments ("Failed to merge the Job's runtime env ...").
# (cluster/launch.py's WORKER_ENV and HEALTH_CHECK_ENV, not imported: it would import torch into every job command.)
DRIVER_ENV_KEYS = {"PYTHONUNBUFFERED", "RAY_TRAIN_ENABLE_PRINT_PATCH", "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S"}

SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|API_?KEY", re.I)
TOKEN_HELP = ("Copy the cluster's token (on the head node: the file ~/.ray/auth_token, or the output of "
              "`ray get-auth-token`) to ~/.ray/auth_token on this machine, or pass --token-path FILE, "
              "or set RAY_AUTH_TOKEN_PATH=FILE (or RAY_AUTH_TOKEN)")


# ------------------------------------------------------------------------------------------ connection


@dataclasses.dataclass
class Token:
    value: str | None
    source: str  # where it came from (never the value), or where it was looked for


def find_token(token_path: str | None = None, environ=None) -> Token:
    """The client's token: --token-path, else Ray's own order (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token). A file that is named but missing or empty is an error."""
    env = os.environ if environ is None else environ

    def read(path: str, what: str) -> Token:
        p = Path(path).expanduser()
        try:
            value = p.read_text().strip()
        except OSError as err:
            raise ValueError(f"cannot read the authentication token file {p} ({what}): {err.strerror}") from None
        if not value:
            raise ValueError(f"the authentication token file {p} ({what}) is empty")
        return Token(value, f"{p} ({what})")

    if token_path:
        return read(token_path, "--token-path")
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return Token(env["RAY_AUTH_TOKEN"].strip(), "the RAY_AUTH_TOKEN environment variable")
    if env.get("RAY_AUTH_TOKEN_PATH"):
        return read(env["RAY_AUTH_TOKEN_PATH"], "RAY_AUTH_TOKEN_PATH")
    default = Path(env.get("HOME") or Path.home()) / ".ray" / "auth_token"
    if default.is_file():
        return read(str(default), "the default token file")
    return Token(None, f"--token-path, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH and {default}")


def resolve_address(address: str | None, environ=None) -> tuple[str, str]:
    """(dashboard URL, where it came from): --address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS."""
    env = os.environ if environ is None else environ
    source = "--address"
    if not address:
        for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            if env.get(var):
                address, source = env[var], var
                break
    if not address:
        raise ValueError("no cluster address: pass --address http://HEAD:8265 (the head node's dashboard, which "
                         "serves the job API) or set RAY_ADDRESS")
    address = address.strip().rstrip("/")
    if address == "auto" or address.startswith("ray://"):
        raise ValueError(f"{source}={address} does not name the job API: use the head's dashboard URL, "
                         "e.g. http://HEAD:8265")
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise ValueError(f"{source}={address}: the job API address must be http://HOST:PORT or https://HOST:PORT")
    return address, source


@contextlib.contextmanager
def _without_address_env():
    """JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override its address argument; the
    address chosen here (--address first) must win."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _no_cluster(address: str, source: str, why: str) -> ValueError:
    return ValueError(f"no Ray cluster answers at {address} (from {source}): {why}. Is the head running "
                      "(`ray start --head`), and is its dashboard reachable from here? (`ray start --head "
                      "--dashboard-host=0.0.0.0` listens beyond localhost; the address is the dashboard's, "
                      "port 8265 by default, not the GCS port)")


def _get(address: str, source: str, path: str, headers=None):
    import requests

    try:
        return requests.get(address + path, headers=headers or {}, timeout=(CONNECT_TIMEOUT_S, 2 * CONNECT_TIMEOUT_S))
    except requests.exceptions.Timeout:
        raise _no_cluster(address, source, f"no answer within {CONNECT_TIMEOUT_S:.0f} s") from None
    except requests.exceptions.RequestException as err:
        errno = re.findall(r"\[Errno -?\d+\] ([^'\")\]]+)", str(err))  # the innermost reason
        reason = errno[-1].strip().lower() if errno else (re.sub(r"\s+", " ", str(err))[:160] or type(err).__name__)
        raise _no_cluster(address, source, f"cannot connect ({reason})") from None


def check_cluster(address: str, source: str, token: Token) -> dict:
    """Short-timeout checks before any Ray client call: a dashboard answers, and it accepts our token.
    Returns the headers to send."""
    r = _get(address, source, "/api/authentication_mode")
    mode = None
    if r.status_code == 200:
        try:
            mode = r.json().get("authentication_mode")
        except ValueError:
            raise _no_cluster(address, source, "what answers is not a Ray dashboard") from None
    elif r.status_code != 404:  # 404: a Ray older than token authentication, or not a dashboard at all
        raise _no_cluster(address, source, f"HTTP {r.status_code} from /api/authentication_mode")
    headers = {}
    if token.value is not None and mode != "disabled":
        headers = {"Authorization": f"Bearer {token.value}"}
    if mode == "disabled":
        print(f"warning: the Ray cluster at {address} does not require an authentication token "
              "(RAY_AUTH_MODE=disabled on the head): anyone who can reach it can run code on it", file=sys.stderr)
    if mode == "token" and token.value is None:
        raise ValueError(f"the Ray cluster at {address} requires an authentication token and none was found "
                         f"(looked at {token.source}). {TOKEN_HELP}.")
    r = _get(address, source, "/api/version", headers)
    if r.status_code == 401:
        raise ValueError(f"the Ray cluster at {address} requires an authentication token and none was sent "
                         f"(looked at {token.source}). {TOKEN_HELP}.")
    if r.status_code == 403:
        raise ValueError(f"the Ray cluster at {address} rejected the authentication token from {token.source} "
                         f"(403 Forbidden: it is not this cluster's token). {TOKEN_HELP}.")
    if r.status_code != 200:
        raise _no_cluster(address, source, f"what answers is not a Ray dashboard (HTTP {r.status_code} from "
                                           "/api/version)")
    return headers


class Jobs:
    """A JobSubmissionClient for one cluster, with the errors turned into clear ValueErrors."""

    def __init__(self, address: str | None = None, token_path: str | None = None):
        self.address, source = resolve_address(address)
        token = find_token(token_path)
        headers = check_cluster(self.address, source, token)
        import logging

        from ray.job_submission import JobSubmissionClient

        for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                     "ray._private.runtime_env.packaging"):  # per-request INFO lines
            logging.getLogger(name).setLevel(logging.WARNING)
        with _without_address_env():
            self.client = self._call(JobSubmissionClient, self.address, headers=headers)

    def _call(self, fn, *args, job: str | None = None, **kwargs):
        import requests
        from ray.exceptions import AuthenticationError

        try:
            return fn(*args, **kwargs)
        except AuthenticationError as err:
            raise ValueError(f"the Ray cluster at {self.address} refused the request: "
                             f"{str(err).splitlines()[0]}. {TOKEN_HELP}.") from None
        except (requests.exceptions.RequestException, ConnectionError) as err:
            raise ValueError(f"lost the Ray cluster at {self.address}: {err}") from None
        except RuntimeError as err:
            if job is not None and "404" in str(err):
                raise ValueError(f"no job {job} on the Ray cluster at {self.address} "
                                 "(`liquid jobs` lists them)") from None
            raise

    def info(self, job: str):
        return self._call(self.client.get_job_info, job, job=job)

    def list(self) -> list:
        return sorted(self._call(self.client.list_jobs), key=lambda j: j.start_time or 0)

    def logs(self, job: str) -> str:
        return self._call(self.client.get_job_logs, job, job=job)

    def stop(self, job: str) -> bool:
        return self._call(self.client.stop_job, job, job=job)

    def submit(self, **kwargs) -> str:
        return self._call(self.client.submit_job, **kwargs)

    def tail(self, job: str, out=None) -> None:
        import asyncio

        out = out or sys.stdout

        async def follow():
            async for chunk in self.client.tail_job_logs(job):
                out.write(chunk)
                out.flush()

        self.info(job)  # a clear error for an unknown job
        self._call(asyncio.run, follow(), job=job)

    def latest_liquid_job(self):
        ours = [j for j in self.list() if (j.metadata or {}).get(META_MARK)]
        if not ours:
            raise ValueError(f"no job submitted by `liquid submit` on the Ray cluster at {self.address} "
                             "(`liquid jobs --all` lists every job)")
        return ours[-1]


def _status(info) -> str:
    return str(getattr(info.status, "value", info.status))


# ------------------------------------------------------------------------------------------- submit


def project_files(root: Path = PROJECT_ROOT):
    """The ignore function for copying the project: no environments, runs, VCS data, caches or outputs."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        top = Path(directory).resolve() == root
        skipped = set()
        for name in names:
            path = Path(directory) / name
            if name in EXCLUDED_ANYWHERE or name.endswith((".egg-info", ".pyc")) or (top and name in EXCLUDED_TOP):
                skipped.add(name)
            elif path.is_dir() and (path / "pyvenv.cfg").exists():  # any other virtual environment
                skipped.add(name)
        return skipped

    return ignore


def stage_working_dir(config_yaml: str, dest: Path, root: Path = PROJECT_ROOT) -> Path:
    """dest/project: the project (or, for an installed package, its packages) plus JOB_DIR/config.yaml."""
    stage = dest / "project"
    if (root / "pyproject.toml").exists() and (root / "pretrain").is_dir():
        shutil.copytree(root, stage, ignore=project_files(root), symlinks=True)
    else:  # installed into site-packages: upload the packages themselves
        stage.mkdir(parents=True)
        for pkg in PACKAGES:
            shutil.copytree(root / pkg, stage / pkg, ignore=project_files(root))
    (stage / JOB_DIR).mkdir()
    (stage / JOB_DIR / "config.yaml").write_text(config_yaml)
    return stage


def _parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"--env {item!r} must look like NAME=VALUE")
        if key.startswith("RAY_AUTH") or SECRET_NAME.search(key):
            raise ValueError(f"--env {key}: secrets are not passed to jobs (a job's runtime environment is stored "
                             "in the cluster's job table and shown by the dashboard); provide them on the cluster "
                             "(the environment `ray start` runs in, or a credentials file there). The driver "
                             "authenticates with the cluster's own Ray token")
        if key in DRIVER_ENV_KEYS or key == STOP_WAIT_ENV:
            raise ValueError(f"--env {key}: set by liquid itself" +
                             (" (use --stop-grace-s)" if key == STOP_WAIT_ENV else ""))
        env[key] = value
    return env


def _submission_id(run_name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", run_name.lower()).strip("-")[:40] or "run"
    return f"liquid-{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _driver_trains_itself(cfg) -> bool:
    """Not cluster.launch.use_ray(cfg) (kept in step with it; importing launch costs seconds of torch import)."""
    c = cfg.cluster
    return not (c.launcher == "ray" or (c.launcher == "auto" and (c.num_workers > 1 or c.address is not None)))


def _cmd_submit(args) -> int:
    from pretrain.config import load_config, to_yaml

    if args.stop_grace_s < 1:
        raise ValueError("--stop-grace-s must be at least 1")
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.run.dir)
    if not run_dir.is_absolute():
        run_dir = Path.cwd() / run_dir
    run_dir = Path(os.path.normpath(run_dir))
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(run_dir)))
    env = _parse_env(args.env)
    jobs = Jobs(args.address, args.token_path)
    job_id = _submission_id(cfg.run.name)
    metadata = {META_MARK: "1", "job_name": f"liquid {cfg.run.name}", "run_dir": str(run_dir),
                "run_name": cfg.run.name, "config": args.config or "tiny", "max_steps": str(cfg.train.max_steps),
                "submitted_from": socket.gethostname()}
    runtime_env = {"env_vars": {STOP_WAIT_ENV: str(int(args.stop_grace_s)), **env}}
    resources = {}
    if _driver_trains_itself(cfg):  # the driver trains in its own process: reserve what one worker would get
        resources["entrypoint_num_cpus"] = cfg.cluster.cpus_per_worker
        if cfg.cluster.use_gpu:
            resources["entrypoint_num_gpus"] = 1
    entrypoint = f"exec {shlex.quote(args.python)} -m pretrain.cli pretrain {JOB_DIR}/config.yaml"
    with tempfile.TemporaryDirectory(prefix="liquid-submit-") as tmp:
        stage = stage_working_dir(to_yaml(cfg), Path(tmp))
        files = [f for f in stage.rglob("*") if f.is_file()]
        print(f"uploading {stage.name}: {len(files)} files, {sum(f.stat().st_size for f in files) / 2**20:.1f} MiB "
              f"from {PROJECT_ROOT}", flush=True)
        runtime_env["working_dir"] = str(stage)
        jobs.submit(entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env, metadata=metadata,
                    **resources)
    print(f"submitted job {job_id} to {jobs.address}")
    print(f"run directory on the cluster: {run_dir} (the config's run.dir made absolute on this machine; "
          "the same path when the job runs here or on a shared filesystem)")
    print(f"stop grace period: {int(args.stop_grace_s)} s ({STOP_WAIT_ENV}); follow with `liquid status {job_id}` "
          f"or `liquid logs {job_id} --follow`; stop with `liquid stop {job_id}`", flush=True)
    if args.follow:
        jobs.tail(job_id)
        info = jobs.info(job_id)
        print(status_report(jobs, info), file=sys.stderr)
        return 0 if _status(info) == "SUCCEEDED" else 1
    return 0


# ---------------------------------------------------------------------------------------------- status

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STEP = re.compile(r"^step\s+(\d+)/(\d+)\b")
_LOSS = re.compile(r"\|\s*loss\s+([-+.\w]+)")
_TOK_S = re.compile(r"\|\s*([\d,.]+)\s+tok/s(?!/)")
_TOKENS = re.compile(r"\|\s*tokens\s+([\d,]+)|\s([\d.]+[kMBT]?)/[\d.]+[kMBT]?\s+tok\b")
_SCALE = {"": 1, "k": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


def _count(text: str) -> int:
    """'1,024' -> 1024; '1.02k' -> 1020 (the progress bar's three significant digits)."""
    text = text.replace(",", "")
    unit = text[-1] if text[-1] in _SCALE else ""
    return int(round(float(text[: len(text) - len(unit)]) * _SCALE[unit]))


def progress_from_logs(logs: str) -> dict | None:
    """The newest progress line `liquid pretrain` printed ("step     40/100 ... | loss 5.1234 | lr ... |
    8,123 tok/s | ..."): step, max_steps, loss, tokens_per_s and, when the line shows it, tokens."""
    for line in reversed(logs.splitlines()):
        line = _ANSI.sub("", line).strip()
        step, loss, tps = _STEP.match(line), _LOSS.search(line), _TOK_S.search(line)
        if not (step and loss and tps):
            continue
        try:
            record = {"step": int(step.group(1)), "max_steps": int(step.group(2)), "loss": float(loss.group(1)),
                      "tokens_per_s": float(tps.group(1).replace(",", ""))}
        except ValueError:
            continue
        tokens = _TOKENS.search(line)
        if tokens and tokens.group(1):
            record["tokens"] = _count(tokens.group(1))
        elif tokens:  # the progress bar's rounded count
            record["tokens"], record["tokens_text"] = _count(tokens.group(2)), tokens.group(2)
        return record
    return None


def progress_from_run_dir(run_dir: Path, since: float | None = None) -> dict | None:
    """The newest record of RUN_DIR/metrics.jsonl, if the file is here and was written since `since`
    (the job's submission time: an older file at the same path is another run's)."""
    path = RunDir(run_dir).metrics_file
    try:
        if since is not None and path.stat().st_mtime < since - 2:
            return None
        lines = path.read_bytes().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:  # a line being written
            continue
    return None


def _read_summary(run_dir: Path, since: float | None) -> dict | None:
    path = RunDir(run_dir).summary_file
    try:
        if since is not None and path.stat().st_mtime < since - 2:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _progress(jobs: Jobs, info, from_logs: bool = False) -> tuple[dict | None, str | None]:
    meta = info.metadata or {}
    since = info.start_time / 1000 if info.start_time else None
    if meta.get("run_dir") and not from_logs:
        record = progress_from_run_dir(Path(meta["run_dir"]), since)
        if record is not None:
            record.setdefault("max_steps", int(meta["max_steps"]) if meta.get("max_steps") else None)
            return record, str(RunDir(meta["run_dir"]).metrics_file)
    if _status(info) == "PENDING":
        return None, None
    record = progress_from_logs(jobs.logs(info.submission_id))
    return record, ("the job's logs" if record else None)


def format_progress(r: dict) -> str:
    steps = f"{r['step']}/{r['max_steps']}" if r.get("max_steps") else str(r["step"])
    parts = [f"step {steps}", f"loss {r['loss']:.4f}", f"{r['tokens_per_s']:,.0f} tok/s"]
    if r.get("tokens_text"):
        parts.append(f"tokens {r['tokens_text']}")
    elif r.get("tokens") is not None:
        parts.append(f"tokens {r['tokens']:,}")
    return " | ".join(parts)


def _when(ms) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def status_report(jobs: Jobs, info, from_logs: bool = False) -> str:
    status, meta = _status(info), info.metadata or {}
    lines = [f"job {info.submission_id}: {status}"]
    if meta.get("run_dir"):
        lines.append(f"run directory on the cluster: {meta['run_dir']}")
    lines.append(f"submitted {_when(info.start_time)}" + (f", ended {_when(info.end_time)}" if info.end_time else ""))
    record, source = _progress(jobs, info, from_logs)
    if record is not None:
        lines.append(f"{format_progress(record)} (from {source})")
    elif status != "PENDING":
        lines.append("no training step logged yet")
    if status in TERMINAL and meta.get("run_dir"):
        summary = _read_summary(Path(meta["run_dir"]), info.start_time / 1000 if info.start_time else None)
        if summary is not None:
            what = "stopped" if summary.get("stopped") else "finished"
            ckpt = summary["checkpoints"][-1] if summary.get("checkpoints") else "none"
            lines.append(f"{what} at step {summary.get('steps')}; last checkpoint {ckpt}")
    if status == "FAILED" and info.message:
        tail = info.message.strip().splitlines()[-15:]
        lines.append("ray: " + "\n  ".join(tail))
        if "ModuleNotFoundError" in info.message:
            lines.append("hint: the `python` on the cluster lacks the project's dependencies: start Ray from the "
                         "project's environment (activate it before `ray start`) or pass --python to submit")
    return "\n".join(lines)


def _cmd_status(args) -> int:
    jobs = Jobs(args.address, args.token_path)
    info = jobs.info(args.job) if args.job else jobs.latest_liquid_job()
    print(status_report(jobs, info, from_logs=args.from_logs))
    return 0


def _cmd_logs(args) -> int:
    jobs = Jobs(args.address, args.token_path)
    if args.follow:
        jobs.tail(args.job)
        print(f"job {args.job}: {_status(jobs.info(args.job))}", file=sys.stderr)
    else:
        sys.stdout.write(jobs.logs(args.job))
    return 0


def _cmd_stop(args) -> int:
    jobs = Jobs(args.address, args.token_path)
    info = jobs.info(args.job)
    if _status(info) in TERMINAL:
        print(f"job {args.job} is not running: {_status(info)}")
        return 0
    grace = int(((info.runtime_env or {}).get("env_vars") or {}).get(STOP_WAIT_ENV, 3))
    jobs.stop(args.job)
    print(f"stop requested for job {args.job}: Ray sends its driver SIGTERM, which has the run save a checkpoint "
          f"and exit; Ray kills what is left after {grace} s", flush=True)
    if args.no_wait:
        return 0
    timeout = args.timeout if args.timeout is not None else grace + 60
    deadline = time.monotonic() + timeout
    while _status(info) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1.0)
        info = jobs.info(args.job)
    if _status(info) not in TERMINAL:
        print(f"job {args.job} is still {_status(info)} after {timeout:.0f} s", file=sys.stderr)
        return 1
    print(status_report(jobs, info))
    return 0


def _cmd_jobs(args) -> int:
    jobs = Jobs(args.address, args.token_path)
    listed = [j for j in jobs.list() if args.all or (j.metadata or {}).get(META_MARK)]
    if not listed:
        print(f"no jobs on the Ray cluster at {jobs.address}" + ("" if args.all else " submitted by liquid "
                                                                  "(--all lists every job)"))
        return 0
    width = max(len(j.submission_id or j.job_id or "-") for j in listed)
    print(f"{'JOB':<{width}}  {'STATUS':<9}  {'SUBMITTED':<19}  RUN DIRECTORY")
    for j in listed:
        print(f"{j.submission_id or j.job_id or '-':<{width}}  {_status(j):<9}  {_when(j.start_time):<19}  "
              f"{(j.metadata or {}).get('run_dir', '-')}")
    return 0


# ---------------------------------------------------------------------------------------------- parsers


def add_job_parsers(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default=None,
                        help="the head's dashboard URL, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")
    common.add_argument("--token-path", default=None,
                        help="file holding the cluster's authentication token (default: $RAY_AUTH_TOKEN, "
                             "$RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token)")

    p = sub.add_parser("submit", parents=[common], help="run `liquid pretrain` on a Ray cluster as a Ray Job")
    p.add_argument("args", nargs="*", metavar="[CONFIG] key=value", help="preset name or YAML, then overrides")
    p.add_argument("--stop-grace-s", type=int, default=DEFAULT_STOP_GRACE_S,
                   help=f"seconds `liquid stop` leaves the run to save a checkpoint before Ray kills it "
                        f"(sets {STOP_WAIT_ENV} for the job; default {DEFAULT_STOP_GRACE_S})")
    p.add_argument("--python", default="python",
                   help="the interpreter on the cluster (default: `python` on the head's PATH)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for the job (repeatable), e.g. LIQUID_CACHE=/data/cache")
    p.add_argument("--follow", action="store_true", help="then print the job's logs until it ends")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("status", parents=[common], help="a job's state and its latest step, loss and tokens/s")
    p.add_argument("job", nargs="?", default=None, metavar="JOB", help="default: the newest `liquid submit` job")
    p.add_argument("--from-logs", action="store_true",
                   help="read the progress from the job's logs even when the run directory is reachable here")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("logs", parents=[common], help="a job's output (driver and workers)")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p.set_defaults(func=_cmd_logs)

    p = sub.add_parser("stop", parents=[common],
                       help="stop a job: the run saves a checkpoint and exits; waits for the job to end")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for the job to end (default: its stop grace period + 60)")
    p.add_argument("--no-wait", action="store_true", help="return once the stop is requested")
    p.set_defaults(func=_cmd_stop)

    p = sub.add_parser("jobs", parents=[common], help="list the jobs submitted by liquid on a cluster")
    p.add_argument("--all", action="store_true", help="every job on the cluster, not only liquid's")
    p.set_defaults(func=_cmd_jobs)
