"""Run configuration: OmegaConf YAML presets plus dot-list overrides, merged into frozen dataclasses.

OmegaConf lives at this boundary only; every component receives its own frozen slice (ModelConfig, ...).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

PRESET_DIR = Path(__file__).parent / "configs"
# Environment variables that change what the training code computes (the scan and attention kernels, the
# data cache, DeepSpeed's accelerator). They are part of a run's configuration in effect: the driver
# forwards them to every Ray worker (cluster/launch.py) and each rank records what it saw (workers/rank{R}.json).
ENV_SWITCHES = ("LIQUID_SCAN_TRITON", "LIQUID_SCAN_CPU_KERNEL", "LIQUID_LOSS_CPU_KERNEL", "LIQUID_ATTENTION", "LIQUID_CACHE", "DS_ACCELERATOR")
DEFAULT_PRESET = "tiny"


@dataclass(frozen=True)
class LiquidConfig:
    heads: int = 4
    key_dim: int = 32  # N: rows of the per-head state
    value_dim: int = 32  # P: columns of the per-head state
    chunk_size: int = 64
    conv_kernel: int = 3  # short causal conv on the value path; 0 disables it
    recompute: bool = False  # recompute the scan's chunk matrices in backward (less activation memory)
    tau_min: float = 1.0  # time constants 1/exp(l_h) are spread log-uniformly over [tau_min, tau_max]
    tau_max: float = 256.0


@dataclass(frozen=True)
class AttentionConfig:
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    rope_theta: float = 1_000_000.0


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    expert_dim: int = 128
    routed_scaling: float = 1.0
    bias_update_rate: float = 1e-3  # aux-loss-free balancing step; 0 disables it
    aux_loss_coeff: float = 0.0
    z_loss_coeff: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 2048
    d_model: int = 128
    num_layers: int = 4
    mixer: str = "liquid"  # kind of every layer not listed below: liquid | conv | attention
    attention_layers: list[int] = field(default_factory=lambda: [2])
    conv_layers: list[int] = field(default_factory=list)
    conv_kernel: int = 3  # the `conv` mixer's kernel (LFM2 uses 3)
    dense_layers: int = 1  # the first layers use a dense SwiGLU FFN, the rest MoE
    dense_dim: int = 384
    liquid: LiquidConfig = field(default_factory=LiquidConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3
    # Tokens per slice of the head's cross-entropy (pretrain/model/loss.py): the [tokens, vocab] logits are never
    # held whole in training; 0 = off (the plain head: all logits, then F.cross_entropy).
    loss_chunk_tokens: int = 4096
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def layer_types(self) -> list[str]:
        types = [self.mixer] * self.num_layers
        for i in self.conv_layers:
            types[i] = "conv"
        for i in self.attention_layers:
            types[i] = "attention"
        return types

    def ffn_types(self) -> list[str]:
        return ["dense" if i < self.dense_layers else "moe" for i in range(self.num_layers)]


@dataclass(frozen=True)
class StreamConfig:
    path: str = ""  # prepared shards: a local directory or a URL (s3://bucket/prefix)
    proportion: Optional[float] = None  # share of rows drawn from this stream; all set or none


@dataclass(frozen=True)
class PhaseConfig:
    """One data-mixture phase (data.phases): from its start on, rows are drawn by these proportions."""
    name: str = ""  # shown in the metrics and in `liquid plan`; default phase<i>
    start_step: Optional[int] = None  # the first global step of the phase (1-based) ...
    start_tokens: Optional[int] = None  # ... or the tokens trained before it (rounded up to a whole step)
    proportions: list[float] = field(default_factory=list)  # one per data.streams entry, in their order


@dataclass(frozen=True)
class DataConfig:
    path: Optional[str] = None  # prepared shards (directory or URL); None = the embedded corpus
    streams: list[StreamConfig] = field(default_factory=list)  # several datasets mixed by proportion
    cache_dir: str = "~/.cache/liquid-pretrain/streaming"  # local copies of remote shards
    cache_limit_gb: Optional[float] = None  # most GiB of shards kept there (None: 80% of the free disk)
    shuffle: bool = True
    shuffle_buffer_blocks: int = 8  # rows of this many blocks are shuffled together
    lanes: Optional[int] = None  # runs of each step's rows read from their own shards (None: up to 64, dividing the global batch)
    validate_hash: bool = True
    record_rows: bool = False  # each reading rank appends the rows of every micro-batch to RUN_DIR/rows/rankR.jsonl
    # The embedded corpus (used when neither path nor streams is set):
    corpus_max_mb: float = 8.0
    tokenizer: Optional[str] = None  # an existing tokenizer.json; None = train one on the corpus
    eos_token: Optional[str] = None  # its end-of-document token when not a usual name (data_pipeline/tokenizer.py)
    tokenizer_vocab_size: int = 2048
    # Data-mixture phases (data_pipeline/order.py PhasedOrder): the first starts at step 1; each later one
    # at its start_step or start_tokens. Empty: the streams' own proportions for the whole run.
    phases: list[PhaseConfig] = field(default_factory=list)


@dataclass(frozen=True)
class ParallelConfig:
    dp: int = 1
    ep: int = 1
    cp: int = 1
    zero_stage: int = 1


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | constant | wsd (warmup-stable-decay)
    # wsd: the decay runs from decay_start_step (default: the last decay_fraction of train.max_steps) to
    # train.max_steps, shaped linear | cosine | 1-sqrt, down to min_lr_ratio. A decay_start_step at or past
    # max_steps keeps the run stable to its end (extend it on resume; start the decay from any checkpoint).
    decay_fraction: float = 0.2
    decay_start_step: Optional[int] = None
    decay_shape: str = "1-sqrt"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 300
    max_tokens: Optional[int] = None  # stops at whichever of max_steps / max_tokens comes first
    seq_len: int = 256
    global_batch_size: int = 16
    micro_batch_size: int = 8
    seed: int = 0
    log_interval: int = 10
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default
    # none | selective (recompute each mixer in backward) | full (recompute each block): pretrain/model/model.py Block
    activation_checkpointing: str = "none"
    # torch.compile each model block (pretrain/model/model.py LiquidLM.compile_blocks); the first steps compile
    compile: bool = False
    # On the CPU, keep freed host memory for the next step instead of giving it back to the kernel and
    # faulting it in again (pretrain/train/host_memory.py): glibc's malloc, set when the rank starts
    keep_host_memory: bool = True


@dataclass(frozen=True)
class CheckpointConfig:
    interval: int = 0  # steps between saves; 0 = only the final one (save_final)
    keep_last: int = 2  # keep the newest N checkpoints (0 = keep all) ...
    keep_every: int = 0  # ... plus every M-th step (0 = none)
    resume: str = "none"  # none | auto (newest good checkpoint, or a fresh start) | a checkpoint directory
    async_save: bool = True  # copy to host memory, write in the background; one save in flight
    save_final: bool = True  # also save after the last step
    finalize_timeout_s: float = 600.0  # rank 0 waits this long for the other ranks' files
    export: bool = True  # write Hugging Face weights to RUN_DIR/export at the end of the run
    export_dtype: str = "bf16"  # bf16 | fp32


@dataclass(frozen=True)
class ClusterConfig:
    num_workers: int = 1
    address: Optional[str] = None  # a Ray cluster to join; None starts a local one when Ray is used
    launcher: str = "auto"  # auto (Ray when num_workers > 1 or an address is set) | ray | local
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 3  # Ray restarts the worker group this often, resuming from the newest checkpoint
    collective_timeout_s: float = 600.0  # a collective that waits longer fails the worker (a hung peer)
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD (Ray placement group)
    # Elastic training (cluster/launch.py; Ray only). None: the job always runs num_workers workers. Else it
    # runs at the largest allowed size the cluster holds, from min_workers up to num_workers (the full size):
    # a lost node shrinks it (resuming from the newest checkpoint), returning capacity grows it back.
    min_workers: Optional[int] = None
    resize_check_s: float = 30.0  # how often a job below its full size checks whether more workers fit
    capacity_timeout_s: float = 600.0  # how long to wait for min_workers to fit before the job fails


@dataclass(frozen=True)
class EvalStreamConfig:
    name: str = ""  # logged as val/<name>/loss and val/<name>/perplexity
    path: str = ""  # prepared shards (`liquid data prepare`): a local directory or a URL


@dataclass(frozen=True)
class EvalConfig:
    """Validation during training (pretrain/train/validate.py): every `interval` steps and after the last,
    all ranks score the first `tokens` tokens of each held-out stream (the same rows every time)."""
    interval: int = 0  # steps between validations; 0 = no validation
    # Held-out prepared datasets. Empty: the embedded corpus's held-out part ("heldout") when training on
    # the embedded corpus; with other data and none named, no validation (the run says so at its start).
    streams: list[EvalStreamConfig] = field(default_factory=list)
    tokens: int = 65536  # tokens scored per stream (whole rows of train.seq_len; fewer if the stream is smaller)
    micro_batch_size: Optional[int] = None  # rows per forward; None: train.micro_batch_size


@dataclass(frozen=True)
class WandbConfig:
    enabled: bool = False
    project: str = "liquid-pretrain"
    entity: Optional[str] = None
    name: Optional[str] = None  # the run's name; None: run.name
    tags: list[str] = field(default_factory=list)
    mode: str = "offline"  # offline (no network; `wandb sync` uploads later) | online
    dir: Optional[str] = None  # where wandb keeps its files; None: RUN_DIR/tracking


@dataclass(frozen=True)
class MlflowConfig:
    enabled: bool = False
    tracking_uri: Optional[str] = None  # a server URL or file:/path; None: RUN_DIR/tracking/mlruns
    experiment: str = "liquid-pretrain"
    run_name: Optional[str] = None  # None: run.name
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking (pretrain/train/tracking.py): rank 0 logs every metrics record and the resolved
    config; a resumed run continues the same tracked run (its ids are kept in RUN_DIR/tracking.json)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass(frozen=True)
class RunSection:
    dir: str = "runs/${run.name}"
    name: str = "tiny"


@dataclass(frozen=True)
class Config:
    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def _all_keys(cls, prefix="") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            keys.extend(_all_keys(f.default_factory, f"{prefix}{f.name}."))
    return keys


ALL_KEYS = _all_keys(Config)


def _friendly(err: OmegaConfBaseException, source: str, user_key: str = "") -> ValueError:
    key = getattr(err, "full_key", None) or ""
    if user_key.startswith(key):  # OmegaConf names the first unknown component; the user typed more
        key = user_key
    msg = str(err).splitlines()[0]
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)) and user_key and not key.startswith(user_key):
        # A key inside a list item (data.streams=[{...}]): OmegaConf knows the item's fields.
        inner = re.search(r"Did you mean: '([^']+)'", str(err))
        hint = f"; did you mean '{inner.group(1)}'?" if inner else ""
        return ValueError(f"unknown config key '{key}' inside '{user_key}' (from {source}){hint}")
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        close = difflib.get_close_matches(key, ALL_KEYS, n=1, cutoff=0.5)
        if not close:  # match on the last component, e.g. `train.max_step` -> `train.max_steps`
            leaf = key.rsplit(".", 1)[-1]
            close = [k for k in ALL_KEYS if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]], cutoff=0.7)]
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return ValueError(f"unknown config key '{key}' (from {source}){hint}")
    return ValueError(f"bad value for config key '{key}' (from {source}): {msg}")


def resolve_preset(name_or_path: str | None) -> Path:
    if name_or_path is None:
        name_or_path = DEFAULT_PRESET
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise ValueError(f"config '{name_or_path}' is neither a YAML file nor a preset; presets: {', '.join(names)}")


def _int_typed(t) -> bool:
    return t is int or (typing.get_origin(t) is typing.Union and int in typing.get_args(t)
                        and float not in typing.get_args(t))


def _coerce_integral(node, cls) -> None:
    """In place: a float with an integral value at an int-typed key of dataclass `cls` becomes an int.
    Token counts are written `38e12`, which YAML reads as a float; OmegaConf would refuse it for an int key."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not isinstance(node, dict) or f.name not in node:
            continue
        t, value = hints[f.name], node[f.name]
        if _int_typed(t) and isinstance(value, float) and value.is_integer():
            node[f.name] = int(value)
        elif dataclasses.is_dataclass(t):
            _coerce_integral(value, t)
        elif typing.get_origin(t) is list and isinstance(value, list):
            (item,) = typing.get_args(t)
            if dataclasses.is_dataclass(item):
                for v in value:
                    _coerce_integral(v, item)


def _coerced(loaded):
    """A loaded YAML or dot-list with integral floats at int keys made ints (see _coerce_integral)."""
    container = OmegaConf.to_container(loaded, resolve=False)
    _coerce_integral(container, Config)
    return OmegaConf.create(container)


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Preset name or YAML path, plus `key=value` overrides -> a validated, frozen Config."""
    path = resolve_preset(name_or_path)
    schema = OmegaConf.structured(Config)
    try:
        cfg = OmegaConf.merge(schema, _coerced(OmegaConf.load(path)))
    except OmegaConfBaseException as err:
        raise _friendly(err, str(path)) from None
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}' must look like key=value (for example train.max_steps=100)")
        try:
            cfg = OmegaConf.merge(cfg, _coerced(OmegaConf.from_dotlist([item])))
        except OmegaConfBaseException as err:
            raise _friendly(err, f"override '{item}'", item.split("=", 1)[0].strip()) from None
    try:
        config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise _friendly(err, str(path)) from None
    validate(config)
    return config


def _require(ok: bool, key: str, why: str):
    if not ok:
        raise ValueError(f"config key '{key}': {why}")


def validate(cfg: Config) -> None:
    m, t, p = cfg.model, cfg.train, cfg.parallel
    _require(m.mixer in ("liquid", "conv", "attention"), "model.mixer", f"must be liquid, conv or attention, got '{m.mixer}'")
    for key, idxs in (("model.attention_layers", m.attention_layers), ("model.conv_layers", m.conv_layers)):
        bad = [i for i in idxs if not 0 <= i < m.num_layers]
        _require(not bad, key, f"layer indices {bad} are outside 0..{m.num_layers - 1}")
    _require(0 <= m.dense_layers <= m.num_layers, "model.dense_layers", f"must be in 0..{m.num_layers}")
    _require(1 <= m.moe.top_k <= m.moe.num_experts, "model.moe.top_k",
             f"must be in 1..model.moe.num_experts ({m.moe.num_experts}), got {m.moe.top_k}")
    a = m.attention
    _require(a.heads % a.kv_heads == 0, "model.attention.kv_heads", f"must divide model.attention.heads ({a.heads})")
    _require(a.head_dim % 2 == 0, "model.attention.head_dim", "must be even for RoPE")
    _require(m.vocab_size > 0 and m.d_model > 0 and m.num_layers > 0, "model", "vocab_size, d_model and num_layers must be > 0")
    _require(m.mtp_depth >= 0, "model.mtp_depth", "must be >= 0")
    _require(m.loss_chunk_tokens >= 0, "model.loss_chunk_tokens",
             f"must be >= 0 (0: the plain head), got {m.loss_chunk_tokens}")
    _require(t.seq_len > 0, "train.seq_len", "must be > 0")
    _require(t.micro_batch_size > 0, "train.micro_batch_size", "must be > 0")
    per_step = t.micro_batch_size * p.dp
    _require(t.global_batch_size % per_step == 0, "train.global_batch_size",
             f"{t.global_batch_size} is not a multiple of train.micro_batch_size x parallel.dp = {per_step}")
    _require(t.log_interval > 0, "train.log_interval", "must be > 0")
    _require(t.device in ("auto", "cpu", "cuda"), "train.device", f"must be auto, cpu or cuda, got '{t.device}'")
    _require(t.dtype in ("auto", "fp32", "bf16"), "train.dtype", f"must be auto, fp32 or bf16, got '{t.dtype}'")
    _require(t.activation_checkpointing in ("none", "selective", "full"), "train.activation_checkpointing",
             f"must be none, selective or full, got '{t.activation_checkpointing}'")
    _require(isinstance(t.compile, bool), "train.compile", f"must be true or false, got {t.compile!r}")
    _require(isinstance(t.keep_host_memory, bool), "train.keep_host_memory",
             f"must be true or false, got {t.keep_host_memory!r}")
    o = cfg.optim
    _require(o.schedule in ("cosine", "constant", "wsd"), "optim.schedule", f"must be cosine, constant or wsd, got '{o.schedule}'")
    _require(0.0 <= o.decay_fraction <= 1.0, "optim.decay_fraction", f"must be in [0, 1], got {o.decay_fraction}")
    _require(o.decay_start_step is None or o.decay_start_step >= 0, "optim.decay_start_step",
             f"must be >= 0 or null, got {o.decay_start_step}")
    _require(o.decay_shape in ("linear", "cosine", "1-sqrt"), "optim.decay_shape",
             f"must be linear, cosine or 1-sqrt, got '{o.decay_shape}'")
    for key, val in (("parallel.dp", p.dp), ("parallel.ep", p.ep), ("parallel.cp", p.cp)):
        _require(val >= 1, key, f"must be >= 1, got {val}")
    _require(m.moe.num_experts % p.ep == 0, "parallel.ep",
             f"model.moe.num_experts ({m.moe.num_experts}) is not divisible by parallel.ep ({p.ep})")
    _require(t.seq_len % p.cp == 0, "parallel.cp", f"train.seq_len ({t.seq_len}) is not divisible by parallel.cp ({p.cp})")
    # ZeRO-3 gathers a parameter only around its own module's forward; the model also reads weights
    # elsewhere (tied embeddings in the head, conv taps in the mixers), and DeepSpeed has no ZeRO-3 path
    # for expert parameters outside its own MoE layers (parallel/engine.py).
    _require(p.zero_stage in (0, 1, 2), "parallel.zero_stage",
             f"must be 0 (one rank only), 1 or 2, got {p.zero_stage}: ZeRO-3 is not supported (the model reads "
             "some weights outside their own modules, and DeepSpeed's ZeRO-3 has no path for our experts)")
    world = p.dp * p.cp  # expert parallelism is carved out of dp x cp (megatron-core's layout)
    _require(world % p.ep == 0, "parallel.ep", f"must divide parallel.dp x parallel.cp = {world}, got {p.ep}")
    _require(cfg.cluster.num_workers == world, "cluster.num_workers",
             f"must equal parallel.dp x parallel.cp = {world} (one worker per rank), got {cfg.cluster.num_workers}")
    _require(cfg.checkpoint.resume in ("none", "auto") or "/" in cfg.checkpoint.resume
             or cfg.checkpoint.resume.startswith("step_"), "checkpoint.resume",
             "must be none, auto or a checkpoint directory")
    _require(cfg.checkpoint.interval >= 0, "checkpoint.interval", "must be >= 0")
    _require(cfg.checkpoint.keep_last >= 0, "checkpoint.keep_last", "must be >= 0 (0 keeps all)")
    _require(cfg.checkpoint.keep_every >= 0, "checkpoint.keep_every", "must be >= 0")
    _require(cfg.checkpoint.export_dtype in ("bf16", "fp32"), "checkpoint.export_dtype", "must be bf16 or fp32")
    _require(cfg.cluster.collective_timeout_s > 0, "cluster.collective_timeout_s", "must be > 0")
    _require(cfg.cluster.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
             "cluster.placement_strategy", "must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")
    _require(cfg.cluster.launcher in ("auto", "ray", "local"), "cluster.launcher", "must be auto, ray or local")
    _require(cfg.cluster.launcher != "local" or world == 1, "cluster.launcher",
             f"local runs one process; {world} ranks need cluster.launcher=ray (or auto)")
    _validate_elastic(cfg)
    d = cfg.data
    _require(not (d.path and d.streams), "data.streams", "set data.path or data.streams, not both")
    for i, s in enumerate(d.streams):
        _require(bool(s.path), f"data.streams[{i}].path", "must name a directory or URL of prepared shards")
        _require(s.proportion is None or s.proportion > 0, f"data.streams[{i}].proportion", "must be > 0")
    _require(len({s.proportion is None for s in d.streams}) <= 1, "data.streams",
             "give every stream a proportion, or none")
    _require(d.shuffle_buffer_blocks >= 1, "data.shuffle_buffer_blocks", "must be >= 1")
    _require(d.cache_limit_gb is None or d.cache_limit_gb > 0, "data.cache_limit_gb", "must be > 0")
    _require(d.lanes is None or (d.lanes >= 1 and t.global_batch_size % d.lanes == 0), "data.lanes",
             f"must be >= 1 and divide train.global_batch_size ({t.global_batch_size}), got {d.lanes}")
    _validate_phases(cfg)
    _validate_eval(cfg)
    _validate_tracking(cfg)


def phase_start_steps(phases: list[PhaseConfig], tokens_per_step: int) -> list[int]:
    """The first global step (1-based) of each of data.phases: the first phase starts at step 1; a phase
    given by start_tokens starts at the first step after that many tokens (train.global_batch_size x
    train.seq_len tokens a step)."""
    starts = []
    for i, ph in enumerate(phases):
        if i == 0:
            starts.append(1)
        elif ph.start_step is not None:
            starts.append(int(ph.start_step))
        else:
            starts.append(-(-int(ph.start_tokens) // tokens_per_step) + 1)
    return starts


def phase_names(phases: list[PhaseConfig]) -> list[str]:
    return [ph.name or f"phase{i}" for i, ph in enumerate(phases)]


def _validate_phases(cfg: Config) -> None:
    d = cfg.data
    if not d.phases:
        return
    _require(len(d.streams) >= 1, "data.phases",
             "phases mix data.streams by proportion; name the streams in data.streams (data.path is one stream)")
    for i, ph in enumerate(d.phases):
        key = f"data.phases[{i}]"
        _require(len(ph.proportions) == len(d.streams), f"{key}.proportions",
                 f"needs one proportion per data.streams entry ({len(d.streams)}), got {len(ph.proportions)}")
        _require(all(x >= 0 for x in ph.proportions) and sum(ph.proportions) > 0, f"{key}.proportions",
                 f"must be >= 0 with a positive sum, got {list(ph.proportions)}")
        _require(ph.start_step is None or ph.start_tokens is None, key, "set start_step or start_tokens, not both")
        if i == 0:
            _require(ph.start_step in (None, 1) and not ph.start_tokens, f"{key}.start_step",
                     "the first phase starts at step 1 (leave start_step and start_tokens unset)")
        else:
            _require(ph.start_step is not None or ph.start_tokens is not None, key,
                     "a later phase needs start_step or start_tokens")
            _require(ph.start_step is None or ph.start_step >= 2, f"{key}.start_step", f"must be >= 2, got {ph.start_step}")
            _require(ph.start_tokens is None or ph.start_tokens > 0, f"{key}.start_tokens", "must be > 0")
    starts = phase_start_steps(d.phases, cfg.train.global_batch_size * cfg.train.seq_len)
    _require(all(a < b for a, b in zip(starts, starts[1:])), "data.phases",
             f"phases must start at increasing steps, got steps {starts}")
    names = phase_names(d.phases)
    _require(len(set(names)) == len(names), "data.phases", f"phase names must differ, got {names}")


def _validate_eval(cfg: Config) -> None:
    e = cfg.eval
    _require(e.interval >= 0, "eval.interval", f"must be >= 0 (0: no validation), got {e.interval}")
    _require(e.tokens >= 1, "eval.tokens", f"must be >= 1, got {e.tokens}")
    _require(e.micro_batch_size is None or e.micro_batch_size >= 1, "eval.micro_batch_size", "must be >= 1")
    for i, s in enumerate(e.streams):
        _require(bool(s.name) and re.fullmatch(r"[A-Za-z0-9_.-]+", s.name) is not None, f"eval.streams[{i}].name",
                 f"must be a non-empty name of letters, digits, '_', '.' or '-', got '{s.name}'")
        _require(bool(s.path), f"eval.streams[{i}].path", "must name a directory or URL of prepared shards")
    names = [s.name for s in e.streams]
    _require(len(set(names)) == len(names), "eval.streams", f"names must differ, got {names}")


def _validate_tracking(cfg: Config) -> None:
    w = cfg.tracking.wandb
    _require(w.mode in ("offline", "online"), "tracking.wandb.mode", f"must be offline or online, got '{w.mode}'")
    _require(bool(w.project), "tracking.wandb.project", "must not be empty")
    _require(bool(cfg.tracking.mlflow.experiment), "tracking.mlflow.experiment", "must not be empty")


def elastic_unit(parallel: ParallelConfig) -> int:
    """Worker counts of an elastic job are multiples of this: lcm(parallel.ep, parallel.cp), so that every
    size holds whole context-parallel groups (dp = workers / cp) and whole expert-parallel groups (ep must
    divide dp x cp, the rule `validate` applies to any layout)."""
    return math.lcm(parallel.ep, parallel.cp)


def keeps_global_batch(cfg: Config, workers: int) -> bool:
    """Whether `workers` workers (dp = workers / parallel.cp) keep train.global_batch_size with whole micro-batches
    (gradient accumulation = global_batch_size / (micro_batch_size x dp))."""
    dp = workers // cfg.parallel.cp
    return workers % cfg.parallel.cp == 0 and cfg.train.global_batch_size % (cfg.train.micro_batch_size * dp) == 0


def elastic_sizes(cfg: Config) -> list[int]:
    """The worker counts an elastic job may run at, ascending: multiples of `elastic_unit` from
    cluster.min_workers to cluster.num_workers that keep the global batch (others in between are skipped).
    [num_workers] when the job is not elastic."""
    c = cfg.cluster
    if c.min_workers is None:
        return [c.num_workers]
    unit = elastic_unit(cfg.parallel)
    return [n for n in range(c.min_workers, c.num_workers + 1) if n % unit == 0 and keeps_global_batch(cfg, n)]


def _validate_elastic(cfg: Config) -> None:
    c, p, t = cfg.cluster, cfg.parallel, cfg.train
    _require(c.resize_check_s > 0, "cluster.resize_check_s", f"must be > 0, got {c.resize_check_s}")
    _require(c.capacity_timeout_s > 0, "cluster.capacity_timeout_s", f"must be > 0, got {c.capacity_timeout_s}")
    if c.min_workers is None:
        return
    m = c.min_workers
    _require(m >= 1, "cluster.min_workers", f"must be >= 1 (or null: not elastic), got {m}")
    _require(m <= c.num_workers, "cluster.min_workers",
             f"cluster.min_workers={m} is more than cluster.num_workers={c.num_workers} (the full size)")
    _require(c.launcher != "local", "cluster.min_workers",
             "elastic training resizes a Ray worker group; it needs cluster.launcher=ray (or auto)")
    unit = elastic_unit(p)
    _require(m % unit == 0, "cluster.min_workers",
             f"cluster.min_workers={m} cannot hold whole expert-parallel and context-parallel groups: it must be "
             f"a multiple of parallel.ep={p.ep} and parallel.cp={p.cp}, i.e. of {unit}")
    if not keeps_global_batch(cfg, m):
        good = elastic_sizes(dataclasses.replace(cfg, cluster=dataclasses.replace(c, min_workers=unit)))
        dp = m // p.cp
        _require(False, "cluster.min_workers",
                 f"at cluster.min_workers={m} workers (dp = {m} / parallel.cp = {dp}) train.global_batch_size="
                 f"{t.global_batch_size} is not a multiple of train.micro_batch_size x dp = "
                 f"{t.micro_batch_size} x {dp} = {t.micro_batch_size * dp}, so the global batch cannot be kept; "
                 f"sizes up to cluster.num_workers={c.num_workers} that keep it: {', '.join(map(str, good))} "
                 "(raise cluster.min_workers, or change train.global_batch_size or train.micro_batch_size)")


def config_from_yaml(text: str) -> Config:
    """The inverse of `to_yaml`: how the driver hands the resolved config to every worker."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text)))
    except OmegaConfBaseException as err:
        raise _friendly(err, "resolved config") from None


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_hash(cfg: Config) -> str:
    blob = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
