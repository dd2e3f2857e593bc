"""Import layers: a module imports project modules of its own layer or below only, DeepSpeed, Megatron and Ray
stay in the modules that own them, and the model is plain single-device PyTorch.

Every import counts, including those inside functions (they run too, only later). Each test first runs its
rule on a planted violation, so it is known to fail when the tree breaks the rule.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pretrain", "parallel", "data_pipeline", "checkpoints", "cluster")
# Shipped beside exported weights and loaded by transformers: imports only its siblings and transformers.
SKIPPED = ("checkpoints/hf_modeling/",)

# (module or package, layer); the first match wins, so the longer names come first.
LAYERS = (
    ("pretrain.config", 0), ("pretrain.run_dir", 0), ("pretrain.optim", 0), ("pretrain.model", 0),
    ("parallel", 1), ("data_pipeline", 1),
    ("checkpoints", 2),
    ("pretrain.train", 3),
    ("cluster", 4), ("pretrain.bench", 4),
    ("pretrain.cli", 5), ("pretrain.__main__", 5),
)
LAYER_NAMES = {0: "pretrain.config, pretrain.run_dir, pretrain.optim, pretrain.model.*",
               1: "parallel.*, data_pipeline.*", 2: "checkpoints.*", 3: "pretrain.train.*",
               4: "cluster.*, pretrain.bench*", 5: "pretrain.cli, pretrain.__main__"}
# Third-party frameworks and the only modules that may import them (a name ending in "." is a package).
OWNERS = {"deepspeed": ("parallel.engine",), "megatron": ("parallel.topology",),
          "ray": ("cluster.", "data_pipeline.prepare")}
MODEL_FORBIDDEN = ("torch.distributed", "deepspeed", "megatron", "ray", "parallel", "cluster", "checkpoints",
                   "data_pipeline")


# ------------------------------------------------------------------------------------------------- the checker


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the five packages (a package is named by its __init__.py)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(SKIPPED):
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = project_modules()


def _is_project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def imports_of(module: str, source: str, *, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, dotted name) of everything `source` imports, wherever the statement is.

    `from a.b import c` names a.b.c when that is a project module, else a.b (c is an attribute); for other
    libraries it names a.b.c, so `from torch import distributed` is seen as torch.distributed."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node, is_package)
            for alias in node.names:
                full = f"{base}.{alias.name}" if alias.name != "*" else base
                keep_full = full in MODULES if _is_project(base) else alias.name != "*"
                found.append((node.lineno, full if keep_full else base))
    return found


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[:len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def layer_of(name: str) -> int | None:
    if name == "pretrain":  # the package's __init__: a docstring
        return 0
    for prefix, layer in LAYERS:
        # pretrain.bench, pretrain.bench_step (today) or pretrain.bench.step (the package being made)
        if name == prefix or name.startswith(prefix + ".") or (prefix == "pretrain.bench" and
                                                              name.startswith("pretrain.bench_")):
            return layer
    return None


def layer_rule(module: str, name: str) -> str | None:
    """Why `module` may not import project module `name`, or None."""
    mine, theirs = layer_of(module), layer_of(name)
    if mine is None or theirs is None:
        unplaced = module if mine is None else name
        return f"{unplaced} is in no layer: add it to LAYERS in tests/test_layering.py (and the README's layout)"
    if theirs > mine:
        return (f"layer {mine} ({LAYER_NAMES[mine]}) may import only layers 0-{mine}; "
                f"{name} is layer {theirs} ({LAYER_NAMES[theirs]})")
    if mine == theirs == 1 and module.split(".")[0] != name.split(".")[0]:
        return "parallel and data_pipeline (layer 1) do not import each other"
    return None


def third_party_rule(module: str, name: str) -> str | None:
    top = name.split(".")[0]
    owners = OWNERS.get(top)
    if owners is None or any(module == o or (o.endswith(".") and module.startswith(o)) for o in owners):
        return None
    return f"{top} may be imported only by {', '.join(o + '*' if o.endswith('.') else o for o in owners)}"


def model_rule(module: str, name: str) -> str | None:
    if not (module == "pretrain.model" or module.startswith("pretrain.model.")):
        return None
    for banned in MODEL_FORBIDDEN:
        if name == banned or name.startswith(banned + "."):
            return (f"pretrain/model/ is plain single-device PyTorch: no torch.distributed, DeepSpeed, Megatron, "
                    f"Ray or the parallel, cluster, checkpoints and data_pipeline packages ({banned})")
    return None


def check(rule, module: str, source: str, *, is_package: bool = False) -> list[str]:
    """One message per import of `source` (as module `module`) that breaks `rule`."""
    problems = []
    for line, name in imports_of(module, source, is_package=is_package):
        if rule is layer_rule and not _is_project(name):
            continue
        why = rule(module, name)
        if why:
            problems.append(f"{module} (line {line}) imports {name}: {why}")
    return problems


def check_tree(rule) -> list[str]:
    assert {"pretrain.run_dir", "checkpoints.manager", "cluster.launch", "pretrain.model.model"} <= set(MODULES)
    problems = []
    for module, path in MODULES.items():
        problems += check(rule, module, path.read_text(), is_package=path.name == "__init__.py")
    return problems


# ----------------------------------------------------------------------------------------------------- the rules


def test_each_module_imports_its_own_layer_or_below():
    planted = {
        ("data_pipeline.prepare", "def f():\n    from cluster.safety import ray_init_kwargs\n"): "layer 1",
        ("checkpoints.manager", "import pretrain.train.worker\n"): "layer 2",
        ("pretrain.run_dir", "from checkpoints import manifest\n"): "layer 0",
        ("parallel.state", "from data_pipeline.loader import merge_rank_states\n"): "do not import each other",
        ("data_pipeline.loader", "from parallel import collectives\n"): "do not import each other",
        ("pretrain.train.worker", "from pretrain.bench_step import x\n"): "layer 3",
        ("cluster.monitor", "from pretrain.cli import main\n"): "layer 4",
        ("pretrain.newthing", "import os\nfrom pretrain import config\n"): "is in no layer",
        ("pretrain.train.metrics", "from ..cli import main\n"): "layer 3",
    }
    for (module, source), expected in planted.items():
        problems = check(layer_rule, module, source)
        assert len(problems) == 1 and expected in problems[0] and module in problems[0], (module, problems)
    assert check(layer_rule, "pretrain.train.loop", "from parallel.collectives import barrier\n"
                 "from pretrain.optim import x\nfrom pretrain.run_dir import RunDir\n") == []
    assert check(layer_rule, "pretrain.bench.step", "from pretrain.train.worker import train_main\n") == []

    problems = check_tree(layer_rule)
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


def test_frameworks_are_imported_only_where_they_belong():
    planted = {("checkpoints.manager", "def status():\n    import ray\n"): "ray",
               ("parallel.state", "from deepspeed.utils import groups\n"): "deepspeed",
               ("parallel.engine", "import megatron.core.parallel_state as ps\n"): "megatron",
               ("pretrain.train.worker", "from ray import train\n"): "ray"}
    for (module, source), expected in planted.items():
        problems = check(third_party_rule, module, source)
        assert len(problems) == 1 and problems[0].startswith(f"{module} (line") and expected in problems[0], problems
    assert check(third_party_rule, "cluster.torch_backend", "import ray.train\n") == []
    assert check(third_party_rule, "data_pipeline.prepare", "def f():\n    import ray\n") == []
    assert check(third_party_rule, "parallel.engine", "import deepspeed\n") == []

    problems = check_tree(third_party_rule)
    assert not problems, "framework imports outside their owners:\n" + "\n".join(problems)


def test_model_is_plain_single_device_pytorch():
    for source in ("import torch.distributed as dist\n", "from torch import distributed\n",
                   "from torch.distributed import all_reduce\n", "def f():\n    import deepspeed\n",
                   "from parallel.collectives import barrier\n", "from data_pipeline import format\n",
                   "import checkpoints.manifest\n", "from cluster.safety import is_loopback\n"):
        problems = check(model_rule, "pretrain.model.moe", source)
        assert len(problems) == 1 and "pretrain.model.moe" in problems[0], (source, problems)
    assert check(model_rule, "pretrain.model.mixers", "import torch\nimport torch.nn.functional as F\n"
                 "from .scan import liquid_scan\n") == []
    assert check(model_rule, "parallel.engine", "import torch.distributed as dist\n") == []

    problems = check_tree(model_rule)
    assert not problems, "pretrain/model/ imports distributed code:\n" + "\n".join(problems)
