"""The per-rank entry point: one line per stage of the data flow.

topology -> data -> model -> parallelize -> engine -> loop. The same function runs in a local process
(world of one) and on every Ray Train worker (the process group is already initialised there).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from checkpoints.manager import (CheckpointManager, clear_stop_request, resume_target, stop_requested,
                                 write_worker_status)
from data_pipeline.dataset import build_dataset, stream_specs
from parallel.collectives import barrier
from parallel.engine import build_engine
from parallel.parallelize import parallelize
from parallel.topology import build_topology, expert_groups_across_nodes, single_process_topology
from pretrain.config import config_hash, to_yaml
from pretrain.model.model import build_model
from pretrain.train.flops import flops_per_token, peak_flops
from pretrain.train.loop import last_step, train_loop
from pretrain.train.metrics import MetricsLogger, ProgressPrinter


def resolve_device(train_cfg) -> tuple[torch.device, torch.dtype | None]:
    want = train_cfg.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    device = torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")
    use_bf16 = train_cfg.dtype == "bf16" or (train_cfg.dtype == "auto" and device.type == "cuda")
    return device, torch.bfloat16 if use_bf16 else None


def prepare_run_dir(cfg, rank: int) -> Path:
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir


def build_topology_for(cfg):
    if not dist.is_initialized():
        return single_process_topology()
    return build_topology(cfg.parallel, seq_len=cfg.train.seq_len, num_experts=cfg.model.moe.num_experts)


def prepare_data_once(data_cfg, run_dir: Path, rank: int) -> None:
    """One process per node prepares (or finds) the cached shards before every rank opens them; rank 0
    copies the run's tokenizer into the run directory (export and eval read it there)."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        specs, tokenizer = stream_specs(data_cfg)
        tokenizer = tokenizer or data_cfg.tokenizer or _dataset_tokenizer(specs)
        if rank == 0 and tokenizer:
            (run_dir / "tokenizer").mkdir(exist_ok=True)
            shutil.copyfile(tokenizer, run_dir / "tokenizer" / "tokenizer.json")
    barrier()


def _node_ip() -> str | None:
    try:
        import ray

        return ray.util.get_node_ip_address() if ray.is_initialized() else None
    except Exception:  # not on Ray
        return None


def _warn_if_expert_groups_span_nodes(topology) -> None:
    """Expert-parallel all_to_alls belong inside a node: say so when the placement put a group across nodes."""
    if topology.ep <= 1 or not dist.is_initialized():
        return
    import socket

    nodes = [None] * topology.world
    dist.all_gather_object(nodes, _node_ip() or socket.gethostname())
    split = expert_groups_across_nodes(nodes, topology.ep)
    if split and topology.rank == 0:
        print(f"warning: expert-parallel groups span nodes (ranks {split}); their all_to_all crosses the "
              f"network. Give each node a multiple of parallel.ep={topology.ep} workers "
              "(cluster.placement_strategy=PACK packs them)", flush=True)


def _dataset_tokenizer(specs) -> str | None:
    """The tokenizer `liquid data prepare` stored beside local shards (remote datasets: set data.tokenizer)."""
    from data_pipeline.format import TOKENIZER_FILE

    for spec in specs:
        path = Path(spec.path) / TOKENIZER_FILE
        if not spec.is_remote and path.exists():
            return str(path)
    return None


def _resume_point(cfg, run_dir: Path, topology, launch_id: str | None):
    """Rank 0 picks the checkpoint to start from (verifying checksums) and tells every rank."""
    choice = [None]
    if topology.rank == 0:
        target = resume_target(run_dir, cfg.checkpoint.resume, launch_id=launch_id)
        choice = [str(target) if target else None]
    if dist.is_initialized() and topology.world > 1:
        dist.broadcast_object_list(choice, src=0)
    return Path(choice[0]) if choice[0] else None


def train_main(cfg, *, progress: bool = True, launch_id: str | None = None) -> dict:
    """Train on this rank. `launch_id` names one `liquid pretrain` launch: when Ray restarts the worker
    group after a failure, the restarted workers resume from that launch's newest checkpoint."""
    t = cfg.train
    topology = build_topology_for(cfg)
    run_dir = prepare_run_dir(cfg, topology.rank)
    write_worker_status(run_dir, topology, "starting", launch_id=launch_id)
    try:
        summary = _train(cfg, topology, run_dir, progress=progress, launch_id=launch_id)
    except BaseException as err:
        write_worker_status(run_dir, topology, "failed", launch_id=launch_id, error=f"{type(err).__name__}: {err}")
        raise
    write_worker_status(run_dir, topology, "finished", launch_id=launch_id, step=summary["steps"])
    return summary


def _train(cfg, topology, run_dir: Path, *, progress: bool, launch_id: str | None) -> dict:
    t = cfg.train
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    if t.threads:
        torch.set_num_threads(t.threads)
    device, autocast_dtype = resolve_device(t)
    grad_accum = t.global_batch_size // (t.micro_batch_size * topology.dp)
    prepare_data_once(cfg.data, run_dir, topology.rank)
    data = build_dataset(cfg.data, seq_len=t.seq_len, vocab_size=cfg.model.vocab_size, seed=t.seed,
                         rank=topology.dp_rank, world=topology.dp)
    model = parallelize(build_model(cfg.model, device=device), topology)
    # The LR schedule decays to the run's real end (max_tokens may come before max_steps).
    engine = build_engine(model, cfg.optim, cfg.parallel, topology, max_steps=last_step(t), grad_accum=grad_accum,
                          micro_batch_size=t.micro_batch_size)
    checkpoints = CheckpointManager(run_dir, cfg.checkpoint, topology=topology, cfg=cfg, launch_id=launch_id)
    start_step, tokens, resumed_from = 0, 0, None
    target = _resume_point(cfg, run_dir, topology, launch_id)
    if target is not None:
        start_step, tokens = checkpoints.load(target, engine, data)
        resumed_from = target.name
    if topology.rank == 0:
        clear_stop_request(run_dir)  # a request left by an earlier, finished stop
    barrier()
    write_worker_status(run_dir, topology, "running", launch_id=launch_id, start_step=start_step,
                        node_ip=_node_ip())
    _warn_if_expert_groups_span_nodes(topology)
    printer = ProgressPrinter(max_steps=t.max_steps, max_tokens=t.max_tokens) if progress else None
    logger = MetricsLogger(run_dir, max_steps=t.max_steps, max_tokens=t.max_tokens, printer=printer,
                           enabled=topology.rank == 0, start_step=start_step)
    peak = peak_flops(torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    try:
        result = train_loop(model=model, engine=engine, data=data, train_cfg=t, logger=logger, device=device,
                            topology=topology, autocast_dtype=autocast_dtype,
                            flops_per_token=flops_per_token(cfg.model, t.seq_len), peak_flops=peak,
                            start_step=start_step, tokens_seen=tokens, checkpoint=checkpoints,
                            stop=(lambda: stop_requested(run_dir)) if topology.rank == 0 else None)
    finally:
        checkpoints.close()
        logger.close()
        data.close()
    result.update(resumed_from=resumed_from, start_step=start_step, checkpoints=checkpoints.saved,
                  checkpoint_failures=checkpoints.failures, export=None)
    if result["stopped"] and topology.rank == 0:
        clear_stop_request(run_dir)
        print(f"stopped on request at step {result['steps']} (checkpoint saved); continue with "
              f"`liquid resume {run_dir}`", flush=True)
    if topology.rank == 0 and cfg.checkpoint.export and checkpoints.saved and not result["stopped"]:
        result["export"] = _export(run_dir, cfg)
    return _write_summary(cfg, run_dir, result, topology)


def _export(run_dir: Path, cfg) -> str | None:
    """The final checkpoint as Hugging Face weights in RUN_DIR/export (a failure is reported, not fatal:
    the checkpoint is safe and `liquid export` can be run again)."""
    from checkpoints.export import export_run, summary_line

    try:
        summary = export_run(run_dir, run_dir / "export", dtype=cfg.checkpoint.export_dtype, overwrite=True)
    except Exception as err:  # noqa: BLE001 - the run itself succeeded; say what went wrong
        print(f"export: FAILED ({type(err).__name__}: {err}); run `liquid export {run_dir} --out DIR` after "
              "fixing it", flush=True)
        return None
    print(summary_line(summary), flush=True)
    return str(run_dir / "export")


def _write_summary(cfg, run_dir: Path, result: dict, topology) -> dict:
    history = result["history"]
    summary = {"run_dir": str(run_dir), "config_hash": config_hash(cfg), "steps": result["steps"],
               "tokens": result["tokens"], "world": topology.world,
               "first_loss": history[0]["loss"] if history else None,
               "last_loss": history[-1]["loss"] if history else None,
               "start_step": result["start_step"], "resumed_from": result["resumed_from"],
               "checkpoints": [f"step_{s:08d}" for s in result["checkpoints"]],
               "checkpoint_failures": result["checkpoint_failures"], "export": result["export"],
               "stopped": result["stopped"]}
    if topology.rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
