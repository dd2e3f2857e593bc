"""The worker's stages at two ranks: train.dtype=bf16 means DeepSpeed's bf16 mode (bf16 weights and
gradients, fp32 master weights and Adam state), and one process gets the same mode from LocalEngine."""
import torch

from pretrain.config import load_config

OVERRIDES = ["train.dtype=bf16", "train.device=cpu", "train.seq_len=32", "train.global_batch_size=4",
             "train.micro_batch_size=2", "model.vocab_size=256"]


def _bf16_engine(rank, world):
    from parallel.engine import ZeroEngine
    from parallel.parallelize import parallelize
    from pretrain.model.model import build_model, materialize
    from pretrain.train.step import train_step
    from pretrain.train.worker import build_topology_for, engine_for, placement

    cfg = load_config("tiny", OVERRIDES + ["parallel.dp=2", "parallel.ep=2", "cluster.num_workers=2"])
    topology = build_topology_for(cfg)
    place = placement(cfg.train, topology)
    model = materialize(parallelize(build_model(cfg.model, device="meta"), topology), place.device, seed=0)
    engine = engine_for(cfg, model, topology, place)
    g = torch.Generator().manual_seed(rank)
    rows = [{"input_ids": torch.randint(0, 256, (2, 32), generator=g),
             "labels": torch.randint(0, 256, (2, 32), generator=g), "doc_start": None}]
    grads = {}
    train_step(engine, rows, place, before_update=lambda: grads.update(
        {n: str(p.grad.dtype) for n, p in model.named_parameters() if p.grad is not None}))
    master = engine.ds.optimizer.single_partition_of_fp32_groups
    return {"zero": isinstance(engine, ZeroEngine), "bf16": engine.ds.bfloat16_enabled(),
            "weights": {str(p.dtype) for p in model.parameters()}, "grads": set(grads.values()),
            "masters": {str(t.dtype) for t in master}, "autocast": str(place.autocast_dtype)}


def test_bf16_means_deepspeeds_bf16_mode_on_many_ranks():
    from tests.distributed.harness import run_distributed

    for r in run_distributed(_bf16_engine, 2):
        assert r["zero"] and r["bf16"] and r["autocast"] == "torch.bfloat16"
        assert r["weights"] == {"torch.bfloat16"} and r["grads"] <= {"torch.bfloat16"}
        assert r["masters"] == {"torch.float32"}


def test_bf16_on_one_process_keeps_fp32_masters():
    from parallel.engine import LocalEngine
    from parallel.topology import Topology
    from pretrain.model.model import build_model
    from pretrain.train.worker import engine_for, placement

    cfg = load_config("tiny", OVERRIDES + ["parallel.dp=1", "parallel.ep=1", "cluster.num_workers=1"])
    place = placement(cfg.train, Topology.single())
    engine = engine_for(cfg, build_model(cfg.model, seed=0), Topology.single(), place)
    assert isinstance(engine, LocalEngine) and place.autocast_dtype == torch.bfloat16
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    assert {engine.full_state_tensor(p, "model").dtype for p in engine.model.parameters()} == {torch.float32}
