"""The per-rank entry point: one line per stage of the data flow.

topology -> data -> model -> parallelize -> engine -> restore -> loop. The same function runs in a local
process (world of one) and on every Ray Train worker (the process group is already initialised there).
"""
from __future__ import annotations

import os
import socket
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist

from checkpoints.manager import CheckpointManager
from data_pipeline.dataset import build_dataset, stream_specs
from data_pipeline.tokenizer import configured_eos
from parallel.collectives import barrier
from parallel.engine import build_engine
from parallel.parallelize import parallelize
from parallel.topology import build_topology, expert_groups_across_nodes, single_process_topology
from pretrain.config import ENV_SWITCHES, config_hash, to_yaml
from pretrain.model.model import build_model, materialize
from pretrain.run_dir import RunDir
from pretrain.train.flops import flops_per_token, peak_flops
from pretrain.train.host_memory import keep_freed_host_memory
from pretrain.train.loop import LoopResult, Position, last_step, train_loop
from pretrain.train.metrics import MetricsLogger, ProgressPrinter, val_losses
from pretrain.train.step import Placement
from pretrain.train.tracking import open_tracker
from pretrain.train.validate import open_validator


def train_main(cfg, *, progress: bool = True, launch_id: str | None = None, node: dict | None = None,
               record_cfg=None) -> dict:
    """Train on this rank. `launch_id` names one `liquid pretrain` launch: when Ray restarts the worker
    group after a failure, the restarted workers resume from that launch's newest checkpoint. `node`: the
    Ray node's `node_id` and `node_ip` (the launcher looks them up; None outside Ray). `record_cfg`: the
    config the run directory keeps when it is not `cfg` (an elastic attempt's layout is not the job's)."""
    topology = build_topology_for(cfg)
    status = WorkerStatus(open_run_dir(record_cfg or cfg, topology), topology, launch_id=launch_id, node=node)
    status("starting")
    try:
        summary = _train(cfg, topology, status, progress=progress)
    except BaseException as err:
        status("failed", error=f"{type(err).__name__}: {err}")
        raise
    status("finished", step=summary["steps"])
    return summary


def _train(cfg, topology, status: "WorkerStatus", *, progress: bool) -> dict:
    run, launch_id = status.run, status.launch_id
    place = placement(cfg.train, topology)
    data = open_data(cfg, run, topology)
    model = parallelize(build_model(cfg.model, device="meta"), topology)  # nothing allocated yet
    model = materialize(model, place.device, seed=cfg.train.seed)  # only what this rank keeps
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)  # what backward recomputes
    if cfg.train.compile:
        compile_blocks(model)  # the blocks, not the engine: DeepSpeed wraps the (compiled-block) model
    engine = engine_for(cfg, model, topology, place)
    checkpoints, start, resumed_from = restore(cfg, run, topology, engine, data, launch_id=launch_id)
    status.running(start.step)
    with ExitStack() as cleanup:
        for closable in (data, checkpoints):
            cleanup.callback(closable.close)
        validator = open_validator(cfg, topology, place)
        if validator is not None:
            cleanup.callback(validator.close)
        logger = cleanup.enter_context(metrics_logger(cfg, run, topology, place, start, progress=progress))
        result = train_loop(engine, data, place, train_cfg=cfg.train, logger=logger, start=start,
                            checkpoint=checkpoints, should_stop=stop_hook(run, topology), validator=validator)
    return finish(cfg, run, topology, result, checkpoints=checkpoints, start=start, resumed_from=resumed_from)


# ---- the stages -------------------------------------------------------------------------------------------


def compile_blocks(model):
    """train.compile: torch.compile each block of the model (LiquidLM.compile_blocks), after activation
    checkpointing is set (the compiled code follows the block's checkpointing mode)."""
    return model.compile_blocks()


def build_topology_for(cfg):
    if not dist.is_initialized():
        return single_process_topology()
    return build_topology(cfg.parallel, seq_len=cfg.train.seq_len, num_experts=cfg.model.moe.num_experts)


def open_run_dir(cfg, topology) -> RunDir:
    """The run directory; rank 0 writes the resolved config (every start, so it shows the latest overrides)."""
    run = RunDir(cfg.run.dir)
    run.path.mkdir(parents=True, exist_ok=True)
    if topology.rank == 0:
        run.write_config(to_yaml(cfg))
    return run


def resolve_device(train_cfg) -> tuple[torch.device, torch.dtype | None]:
    want = train_cfg.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    device = torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")
    use_bf16 = train_cfg.dtype == "bf16" or (train_cfg.dtype == "auto" and device.type == "cuda")
    return device, torch.bfloat16 if use_bf16 else None


def placement(train_cfg, topology) -> Placement:
    """Device, autocast dtype and CPU threads of this rank (torch's generator seeded: the same on every rank); on
    the CPU, freed host memory kept for reuse (train.keep_host_memory)."""
    torch.manual_seed(train_cfg.seed)
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    device, dtype = resolve_device(train_cfg)
    if device.type == "cpu" and train_cfg.keep_host_memory:
        keep_freed_host_memory()
    return Placement(topology, device, dtype)


def open_data(cfg, run: RunDir, topology):
    """This data-parallel rank's rows, after one process per node prepared (or found) the cached shards;
    rank 0 copies the run's tokenizer into the run directory (export and eval read it there)."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        specs, tokenizer = stream_specs(cfg.data)
        tokenizer = tokenizer or cfg.data.tokenizer or _dataset_tokenizer(specs, os.path.expanduser(cfg.data.cache_dir))
        if topology.rank == 0 and tokenizer:
            run.copy_tokenizer(tokenizer, cfg.data.eos_token or configured_eos(Path(tokenizer).parent))
    barrier()
    t = cfg.train
    record = None
    if cfg.data.record_rows and topology.cp_rank == 0:  # the CP ranks of a data-parallel rank read the same rows
        (run.path / "rows").mkdir(exist_ok=True)
        record = str(run.path / "rows" / f"rank{topology.rank}.jsonl")
    return build_dataset(cfg.data, seq_len=t.seq_len, vocab_size=cfg.model.vocab_size, seed=t.seed,
                         rank=topology.dp_rank, world=topology.dp, global_batch=t.global_batch_size, record=record)


def engine_for(cfg, model, topology, place: Placement):
    """The engine in the run's precision: train.dtype=bf16 is DeepSpeed's bf16 mode on many ranks and the
    same master-weight mode on one. The LR schedule decays to the run's real end (max_tokens may come
    before max_steps)."""
    t = cfg.train
    return build_engine(model, cfg.optim, cfg.parallel, topology, max_steps=last_step(t),
                        grad_accum=t.global_batch_size // (t.micro_batch_size * topology.dp),
                        micro_batch_size=t.micro_batch_size, dtype=place.autocast_dtype)


def restore(cfg, run: RunDir, topology, engine, data, *, launch_id: str | None):
    """The checkpoint manager and where training starts: a fresh run, or the newest good checkpoint (the
    ranks verify it together, each hashing a share) loaded on every rank. Returns (manager, Position, name
    of the checkpoint or None)."""
    checkpoints = CheckpointManager(run.path, cfg.checkpoint, topology=topology, cfg=cfg, launch_id=launch_id)
    target = checkpoints.resume_target(cfg.checkpoint.resume)  # collective
    start, resumed_from = Position(), None
    if target is not None:
        start = Position(*checkpoints.load(target, engine, data))
        resumed_from = target.name
    if topology.rank == 0:
        run.clear_stop()  # a request left by an earlier, finished stop
    barrier()
    return checkpoints, start, resumed_from


def metrics_logger(cfg, run: RunDir, topology, place: Placement, start: Position, *, progress: bool):
    """Rank 0's metrics (metrics.jsonl, TensorBoard, the progress line), with MFU against the device's peak."""
    t = cfg.train
    printer = ProgressPrinter(max_steps=t.max_steps, max_tokens=t.max_tokens) if progress else None
    device_name = torch.cuda.get_device_name(place.device) if place.device.type == "cuda" else "cpu"
    tracker = open_tracker(cfg, run.path, start_step=start.step) if topology.rank == 0 else None
    try:
        return MetricsLogger(run.path, max_steps=t.max_steps, max_tokens=t.max_tokens, printer=printer,
                             enabled=topology.rank == 0, start_step=start.step, devices=topology.world,
                             flops_per_token=flops_per_token(cfg.model, t.seq_len),
                             peak_flops=peak_flops(device_name), tracker=tracker)
    except BaseException:
        if tracker is not None:
            tracker.close()
        raise


def stop_hook(run: RunDir, topology):
    """Rank 0 reads stop requests (`liquid stop`, the driver's SIGTERM); the step tells every rank."""
    return run.stop_requested if topology.rank == 0 else None


def finish(cfg, run: RunDir, topology, result: LoopResult, *, checkpoints, start: Position,
           resumed_from: str | None) -> dict:
    """After the loop: say how to continue a stopped run, export a finished one (rank 0), write the summary."""
    export = None
    if result.stopped and topology.rank == 0 and run.stop_reason().startswith("elastic:"):
        run.clear_stop()  # the elastic driver's: it restarts the job at another size itself
        print(f"stopped at step {result.steps} for an elastic resize (checkpoint saved)", flush=True)
    elif result.stopped and topology.rank == 0:
        run.clear_stop()
        print(f"stopped on request at step {result.steps} (checkpoint saved); continue with "
              f"`liquid resume {run.path}`", flush=True)
    if topology.rank == 0 and cfg.checkpoint.export and checkpoints.saved and not result.stopped:
        export = _export(run, cfg)
    summary = {"run_dir": str(run.path), "config_hash": config_hash(cfg), "steps": result.steps,
               "tokens": result.tokens, "world": topology.world,
               "first_loss": result.first_record["loss"] if result.first_record else None,
               "last_loss": result.last_record["loss"] if result.last_record else None,
               "start_step": start.step, "resumed_from": resumed_from,
               "val_loss": val_losses(result.last_record or {}) or None,
               "checkpoints": [f"step_{s:08d}" for s in checkpoints.saved],
               "checkpoint_failures": checkpoints.failures, "export": export, "stopped": result.stopped}
    if topology.rank == 0:
        run.write_summary(summary)
    return summary


# ---- hooks ------------------------------------------------------------------------------------------------


class WorkerStatus:
    """workers/rank{R}.json through a run: starting, running, finished or failed, with where the rank runs."""

    def __init__(self, run: RunDir, topology, *, launch_id: str | None, node: dict | None):
        self.run, self.topology, self.launch_id, self.node = run, topology, launch_id, node or {}

    def __call__(self, status: str, **extra) -> None:
        switches = {k: os.environ[k] for k in ENV_SWITCHES if k in os.environ}  # what this rank computes with
        self.run.write_worker_status(self.topology.rank, self.topology.world, status, node=self.node,
                                     launch_id=self.launch_id, switches=switches, **extra)

    def running(self, start_step: int) -> None:
        node_ip = self.node.get("node_ip")
        self("running", start_step=start_step, node_ip=node_ip)
        _warn_if_expert_groups_span_nodes(self.topology, node_ip)


def _warn_if_expert_groups_span_nodes(topology, node_ip: str | None) -> None:
    """Expert-parallel all_to_alls belong inside a node: say so when the placement put a group across nodes."""
    if topology.ep <= 1 or not dist.is_initialized():
        return
    nodes = [None] * topology.world
    dist.all_gather_object(nodes, node_ip or socket.gethostname())
    split = expert_groups_across_nodes(nodes, topology.ep)
    if split and topology.rank == 0:
        print(f"warning: expert-parallel groups span nodes (ranks {split}); their all_to_all crosses the "
              f"network. Give each node a multiple of parallel.ep={topology.ep} workers "
              "(cluster.placement_strategy=PACK packs them)", flush=True)


def _dataset_tokenizer(specs, cache_dir) -> str | None:
    """The tokenizer `liquid data prepare` stored beside the shards, local or remote."""
    from data_pipeline.loader import dataset_tokenizer

    return dataset_tokenizer(specs, cache_dir)


def _export(run: RunDir, cfg) -> str | None:
    """The final checkpoint as Hugging Face weights in RUN_DIR/export (a failure is reported, not fatal:
    the checkpoint is safe and `liquid export` can be run again)."""
    from checkpoints.export import export_run, summary_line

    try:
        summary = export_run(run.path, run.export_dir, dtype=cfg.checkpoint.export_dtype, overwrite=True)
    except Exception as err:  # noqa: BLE001 - the run itself succeeded; say what went wrong
        print(f"export: FAILED ({type(err).__name__}: {err}); run `liquid export {run.path} --out DIR` after "
              "fixing it", flush=True)
        return None
    print(summary_line(summary), flush=True)
    return str(run.export_dir)
