"""The per-rank entry point: one line per stage of the data flow.

topology -> data -> model -> parallelize -> engine -> loop. The same function runs in a local process
(world of one) and on every Ray Train worker (the process group is already initialised there).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.dataset import build_dataset, stream_specs
from parallel.collectives import barrier
from parallel.engine import build_engine
from parallel.parallelize import parallelize
from parallel.topology import build_topology, single_process_topology
from pretrain.config import config_hash, to_yaml
from pretrain.model.model import build_model
from pretrain.train.flops import flops_per_token, peak_flops
from pretrain.train.loop import train_loop
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


def prepare_data_once(data_cfg) -> None:
    """One process per node prepares (or finds) the cached shards before every rank opens them."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        stream_specs(data_cfg)
    barrier()


def train_main(cfg, *, progress: bool = True) -> dict:
    t = cfg.train
    topology = build_topology_for(cfg)
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    if t.threads:
        torch.set_num_threads(t.threads)
    device, autocast_dtype = resolve_device(t)
    run_dir = prepare_run_dir(cfg, topology.rank)
    grad_accum = t.global_batch_size // (t.micro_batch_size * topology.dp)
    prepare_data_once(cfg.data)
    data = build_dataset(cfg.data, seq_len=t.seq_len, vocab_size=cfg.model.vocab_size, seed=t.seed,
                         rank=topology.dp_rank, world=topology.dp)
    model = parallelize(build_model(cfg.model, device=device), topology)
    engine = build_engine(model, cfg.optim, cfg.parallel, topology, max_steps=t.max_steps, grad_accum=grad_accum,
                          micro_batch_size=t.micro_batch_size)
    printer = ProgressPrinter(max_steps=t.max_steps) if progress else None
    logger = MetricsLogger(run_dir, max_steps=t.max_steps, printer=printer, enabled=topology.rank == 0)
    peak = peak_flops(torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    try:
        result = train_loop(model=model, engine=engine, data=data, train_cfg=t, logger=logger, device=device,
                            topology=topology, autocast_dtype=autocast_dtype,
                            flops_per_token=flops_per_token(cfg.model, t.seq_len), peak_flops=peak)
    finally:
        logger.close()
        data.close()
    return _write_summary(cfg, run_dir, result, topology)


def _write_summary(cfg, run_dir: Path, result: dict, topology) -> dict:
    history = result["history"]
    summary = {"run_dir": str(run_dir), "config_hash": config_hash(cfg), "steps": result["steps"],
               "tokens": result["tokens"], "world": topology.world,
               "first_loss": history[0]["loss"] if history else None,
               "last_loss": history[-1]["loss"] if history else None}
    if topology.rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
