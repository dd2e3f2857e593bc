"""The deployment templates in cluster/templates: valid YAML of the right shape, `liquid` command lines that
the real parser and config accept (preset and every override), cluster sizes that match the run's layout,
the dashboard kept off public addresses, and no inlined secrets."""
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pretrain.cli import _split_config, build_parser
from pretrain.config import load_config

TEMPLATES = Path(__file__).resolve().parents[1] / "cluster" / "templates"
RAYJOB = TEMPLATES / "kuberay-rayjob.yaml"
LAUNCHER = TEMPLATES / "ray-cluster-gpu.yaml"
JOB_COMMANDS = {"submit", "status", "logs", "stop", "jobs"}  # cluster/jobs.py, when present
SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY)", re.I)
SECRET_VALUE = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # an AWS access key id
    # A credential variable given a literal value (a reference to the environment, "$NAME", is fine).
    re.compile(r"(AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|AWS_SESSION_TOKEN|RAY_AUTH_TOKEN)[ \t]*[=:][ \t]*"
               r"(?![\"']?\$)[\"']?[^\s\"'$]", re.I),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def liquid_commands(text: str) -> list[list[str]]:
    """Every `liquid ...` command in a file, as argv without the program name: whole YAML string values that
    are one (a RayJob's entrypoint), and command lines in comments, with `\\` continuations joined."""
    commands = [v for doc in yaml.safe_load_all(text) for v in strings_in(doc) if re.match(r"\s*liquid [a-z]", v)]
    pending = None
    for raw in text.splitlines():
        if not raw.lstrip().startswith("#"):
            pending = None
            continue
        line = re.sub(r"^\s*#+\s*", "", raw).rstrip()
        if pending is not None:
            pending += " " + line.rstrip("\\").strip()
            if not line.endswith("\\"):
                commands.append(pending)
                pending = None
        elif re.match(r"liquid [a-z]", line):
            if line.endswith("\\"):
                pending = line.rstrip("\\").strip()
            else:
                commands.append(line)
    return [shlex.split(c, comments=True)[1:] for c in commands]


def config_of(argv: list[str]):
    """Parse argv with the project's own parser; returns (subcommand, config or None)."""
    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    if argv[0] not in choices:
        # Only the cluster job commands may be missing (cluster/jobs.py not installed): check the config part.
        assert argv[0] in JOB_COMMANDS, f"`liquid {argv[0]}` is not a command of pretrain.cli"
        positional, rest = [], iter(argv[1:])
        for a in rest:
            if a in ("--address", "--token-path", "--stop-grace-s", "--python", "--env"):
                next(rest)  # its value
            elif not a.startswith("--"):
                positional.append(a)
        return argv[0], (load_config(*_split_config(positional)) if argv[0] == "submit" else None)
    args = parser.parse_args(argv)
    if not hasattr(args, "args"):
        return argv[0], None
    config, overrides = _split_config(args.args)
    assert config is not None, f"`liquid {' '.join(argv)}` names no preset"
    return argv[0], load_config(config, overrides)  # validates every key and the cross-key rules


def strings_in(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings_in(value)
    elif node is not None:
        yield str(node)


def assert_no_inlined_secrets(text: str, docs) -> None:
    for pattern in SECRET_VALUE:
        for s in [text, *strings_in(docs)]:
            assert not pattern.search(s), f"looks like an inlined secret: {pattern.search(s).group(0)!r}"


def quantity(value) -> float:
    text = str(value)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3}
    for unit, scale in units.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


# --- both files ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [RAYJOB, LAUNCHER], ids=lambda p: p.name)
def test_valid_yaml_and_valid_liquid_commands(path):
    text = path.read_text()
    docs = list(yaml.safe_load_all(text))
    assert docs and all(isinstance(d, dict) for d in docs)
    commands = liquid_commands(text)
    runs = [config_of(argv) for argv in commands]
    assert any(cfg is not None and cfg.cluster.use_gpu for _, cfg in runs), commands
    assert_no_inlined_secrets(text, docs)


# --- KubeRay RayJob -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rayjob():
    docs = list(yaml.safe_load_all(RAYJOB.read_text()))
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1
    return jobs[0], docs


def containers(pod_template):
    return pod_template["spec"]["containers"]


def test_rayjob_structure(rayjob):
    job, docs = rayjob
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    assert spec["rayClusterSpec"]["rayVersion"] == "2.60.0"
    assert spec["rayClusterSpec"].get("authOptions", {}).get("mode") == "token"
    head = spec["rayClusterSpec"]["headGroupSpec"]
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert containers(head["template"]) and workers
    # The run directory: one ReadWriteMany claim, mounted on every pod.
    claims = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    for template in [head["template"]] + [w["template"] for w in workers]:
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        shm = [v for v in volumes.values() if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert shm, "no shared-memory volume"
        mounts = {m["mountPath"]: m["name"] for c in containers(template) for m in c.get("volumeMounts", [])}
        assert volumes[mounts["/dev/shm"]] in shm
        pvc = [v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v]
        assert len(pvc) == 1 and pvc[0] in claims and "ReadWriteMany" in claims[pvc[0]]["spec"]["accessModes"]


def test_rayjob_entrypoint_matches_the_cluster(rayjob):
    job, _ = rayjob
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["liquid", "pretrain", "liquid-8b-a1b"]
    command, cfg = config_of(argv[1:])
    # One rank per GPU: worker replicas x GPUs per pod = cluster.num_workers = dp x cp.
    gpus = 0
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]  # fixed size
        for c in containers(group["template"]):
            limits, requests = c["resources"]["limits"], c["resources"]["requests"]
            assert quantity(limits["nvidia.com/gpu"]) == quantity(requests["nvidia.com/gpu"])
            per_pod = int(quantity(limits["nvidia.com/gpu"]))
            gpus += group["replicas"] * per_pod
            assert per_pod % cfg.parallel.ep == 0  # expert-parallel groups stay inside a node
            assert per_pod * cfg.cluster.cpus_per_worker <= quantity(requests["cpu"])
    assert cfg.cluster.use_gpu and gpus == cfg.cluster.num_workers == cfg.parallel.dp * cfg.parallel.cp
    # The run directory is on the shared claim of every pod; a retried attempt resumes.
    mounts = {m["mountPath"] for c in containers(spec["rayClusterSpec"]["headGroupSpec"]["template"])
              for m in c["volumeMounts"]}
    assert any(cfg.run.dir.startswith(p.rstrip("/") + "/") for p in mounts if p != "/dev/shm")
    assert cfg.checkpoint.resume == "auto"
    assert cfg.data.path.startswith("s3://") and cfg.cluster.address is None  # Ray's RAY_ADDRESS joins


def test_rayjob_dashboard_not_public(rayjob):
    job, _ = rayjob
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    for template in [head["template"]] + [w["template"] for w in cluster["workerGroupSpecs"]]:
        for c in containers(template):
            assert all("hostPort" not in p for p in c.get("ports", []))
        assert not template["spec"].get("hostNetwork", False)


def test_rayjob_secrets_only_by_reference(rayjob):
    job, _ = rayjob
    cluster = job["spec"]["rayClusterSpec"]
    envs = [e for t in [cluster["headGroupSpec"]["template"]] + [w["template"] for w in cluster["workerGroupSpecs"]]
            for c in containers(t) for e in c.get("env", [])]
    secret_envs = [e for e in envs if SECRET_NAME.search(e["name"])]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= {e["name"] for e in secret_envs}
    for e in secret_envs:
        assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), e
    assert "runtimeEnvYAML" not in job["spec"] or not SECRET_NAME.search(job["spec"]["runtimeEnvYAML"])


# --- Ray cluster launcher ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def launcher():
    return yaml.safe_load(LAUNCHER.read_text())


def test_launcher_schema_and_structure(launcher):
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(launcher)))  # Ray's own schema, with its AWS defaults
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands", "file_mounts"):
        assert launcher.get(key), key
    assert launcher["head_node_type"] in launcher["available_node_types"]
    # The project is synced and installed on every node.
    assert "." in launcher["file_mounts"].values()
    project = next(remote for remote, local in launcher["file_mounts"].items() if local == ".")
    assert any(re.search(rf"pip install .*-e {re.escape(project)}\b", c) for c in launcher["setup_commands"])
    assert ".venv" in launcher["rsync_exclude"] and "runs" in launcher["rsync_exclude"]


def test_launcher_dashboard_on_loopback(launcher):
    head = " ".join(launcher["head_start_ray_commands"])
    assert "ray start --head" in head and "--dashboard-host=127.0.0.1" in head
    everything = head + " ".join(launcher["worker_start_ray_commands"])
    assert "0.0.0.0" not in everything and "::" not in everything.replace("--", "")
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in " ".join(launcher["worker_start_ray_commands"])
    # The submit command goes through the SSH tunnel to the head's loopback dashboard.
    submits = [argv for argv in liquid_commands(LAUNCHER.read_text()) if argv[0] == "submit"]
    assert submits and all("--address" in a and a[a.index("--address") + 1] == "http://127.0.0.1:8265"
                           for a in submits)
    assert "ray dashboard" in LAUNCHER.read_text()


def test_launcher_sizes_match_the_run(launcher):
    gpu_types = {name: t for name, t in launcher["available_node_types"].items() if t.get("resources", {}).get("GPU")}
    assert len(gpu_types) == 1
    (node_type,) = gpu_types.values()
    assert node_type["min_workers"] == node_type["max_workers"] <= launcher["max_workers"]
    gpus = node_type["min_workers"] * node_type["resources"]["GPU"]
    submits = [argv for argv in liquid_commands(LAUNCHER.read_text()) if argv[0] == "submit"]
    for argv in submits:
        _, cfg = config_of(argv)
        assert cfg.cluster.use_gpu and cfg.cluster.num_workers == gpus == cfg.parallel.dp * cfg.parallel.cp
        assert node_type["resources"]["GPU"] % cfg.parallel.ep == 0
        assert node_type["resources"]["GPU"] * cfg.cluster.cpus_per_worker <= node_type["resources"]["CPU"]
        assert cfg.run.dir.startswith("/fsx/") and cfg.checkpoint.resume == "auto"
    plans = [argv for argv in liquid_commands(LAUNCHER.read_text()) if argv[0] == "plan"]
    assert plans and all(int(a[a.index("--gpus") + 1]) == gpus for a in plans)
    # No static credentials: the nodes read the bucket through an instance profile.
    for t in launcher["available_node_types"].values():
        assert "IamInstanceProfile" in t["node_config"]
