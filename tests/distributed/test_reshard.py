"""Resharding: a checkpoint saved under one layout loads under another and training goes on as in the
single-process reference (fp32 on CPU, the equivalence tests' 1e-5 relative tolerance).

Saved at DP=2 x EP=2 (ZeRO-1, two ranks) after step 2; loaded into freshly (differently) initialised
engines at DP=1 (one process, EP=1), DP=2 (ZeRO-2, EP=1), DP=4 x EP=2 (ZeRO-2) and DP=4 x EP=4 (ZeRO-1),
which train steps 3-4. A checkpoint saved by one process loads at DP=2 x EP=2 as well.
"""
import dataclasses

import pytest
import torch

from checkpoints.manager import CheckpointManager, find_checkpoint
from parallel.engine import build_engine
from parallel.parallelize import parallelize
from parallel.topology import Topology
from pretrain.config import CheckpointConfig, ParallelConfig, load_config
from pretrain.model.model import build_model
from pretrain.train.step import Placement, train_step
from tests.distributed.harness import run_distributed
from tests.distributed.test_engine import MAX_STEPS, MODEL, OPTIM, ROWS, SEQ, _close
from tests.distributed.test_engine import _batches as _engine_batches

SAVE_AT, STEPS = 2, 4


def _batches():
    return _engine_batches(STEPS, seed=4321)


def _config(dp: int, ep: int, zero: int):
    cfg = load_config("tiny", [f"parallel.dp={dp}", f"parallel.ep={ep}", f"cluster.num_workers={dp}",
                              f"train.global_batch_size={ROWS}", "train.micro_batch_size=1"])
    return dataclasses.replace(cfg, model=MODEL, optim=OPTIM, parallel=ParallelConfig(dp=dp, ep=ep, zero_stage=zero),
                               checkpoint=CheckpointConfig(async_save=False))


def _build(topology, dp, ep, zero, seed):
    torch.manual_seed(seed)
    model = parallelize(build_model(MODEL), topology)
    engine = build_engine(model, OPTIM, ParallelConfig(dp=dp, ep=ep, zero_stage=zero), topology,
                          max_steps=MAX_STEPS, grad_accum=1, micro_batch_size=ROWS // dp)
    return model, engine


def _train(model, engine, topology, dp, steps) -> list[float]:
    """Steps `steps` (1-based) of the global batches through the training step; each DP rank takes its
    rows. Returns the global losses."""
    place = Placement(topology, torch.device("cpu"))
    losses = []
    for step in steps:
        batch = _batches()[step - 1]
        lo = topology.dp_rank * (ROWS // dp)
        losses.append(train_step(engine, [{k: v[lo:lo + ROWS // dp] for k, v in batch.items()}], place).loss)
    return losses


def _weights(model) -> dict:
    from parallel.state import canonical_name

    return {canonical_name(n): p.detach().clone().numpy() for n, p in model.named_parameters()}


def _manager(path, topology, dp, ep, zero):
    return CheckpointManager(path, CheckpointConfig(async_save=False), topology=topology,
                             cfg=_config(dp, ep, zero), log=lambda _: None)


def _continue(topology, layout, ckpt_dir):
    """Load the checkpoint into a differently initialised engine of this layout; train steps 3-4."""
    dp, ep, zero = layout
    model, engine = _build(topology, dp, ep, zero, seed=1)
    step, _ = _manager(ckpt_dir.parent.parent, topology, dp, ep, zero).load(ckpt_dir, engine, None)
    assert step == SAVE_AT
    return {"losses": _train(model, engine, topology, dp, range(SAVE_AT + 1, STEPS + 1)), "weights": _weights(model),
            "ep_rank": topology.ep_rank}


def _two_ranks(rank, world, saved_dir, single_ckpt):
    from parallel.topology import build_topology, destroy_topology

    results = {}
    topology = build_topology(ParallelConfig(dp=2, ep=2), seq_len=SEQ, num_experts=MODEL.moe.num_experts)
    model, engine = _build(topology, 2, 2, 1, seed=0)
    results["saved"] = _train(model, engine, topology, 2, range(1, SAVE_AT + 1))
    _manager(saved_dir, topology, 2, 2, 1).save(SAVE_AT, SAVE_AT * ROWS * SEQ, engine, None)
    results["dp1_to_dp2_ep2"] = _continue(topology, (2, 2, 1), single_ckpt)
    destroy_topology()
    topology = build_topology(ParallelConfig(dp=2, ep=1), seq_len=SEQ, num_experts=MODEL.moe.num_experts)
    results["dp2_ep1_zero2"] = _continue(topology, (2, 1, 2), find_checkpoint(saved_dir))
    destroy_topology()
    return results


def _four_ranks(rank, world, ckpt_dir):
    from parallel.topology import build_topology, destroy_topology

    results = {}
    for dp, ep, zero in [(4, 2, 2), (4, 4, 1)]:
        topology = build_topology(ParallelConfig(dp=dp, ep=ep), seq_len=SEQ, num_experts=MODEL.moe.num_experts)
        results[f"dp{dp}_ep{ep}_zero{zero}"] = _continue(topology, (dp, ep, zero), ckpt_dir)
        destroy_topology()
    return results


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, steps 1-4; its state after step 2 is saved too (for DP=1 -> DP=2 x EP=2)."""
    run = tmp_path_factory.mktemp("single")
    topology = Topology.single()
    model, engine = _build(topology, 1, 1, 0, seed=0)
    losses = _train(model, engine, topology, 1, range(1, SAVE_AT + 1))
    _manager(run, topology, 1, 1, 0).save(SAVE_AT, SAVE_AT * ROWS * SEQ, engine, None)
    losses += _train(model, engine, topology, 1, range(SAVE_AT + 1, STEPS + 1))
    return {"losses": losses, "weights": _weights(model), "checkpoint": find_checkpoint(run)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, reference):
    run = tmp_path_factory.mktemp("dp2_ep2")
    ranks = run_distributed(_two_ranks, 2, run, reference["checkpoint"])
    return {"ranks": ranks, "checkpoint": find_checkpoint(run)}


def _check(results: list[dict], reference: dict, ep: int):
    for r in results:
        for i, (got, want) in enumerate(zip(r["losses"], reference["losses"][SAVE_AT:], strict=True)):
            _close(got, want, f"loss of step {SAVE_AT + 1 + i}")
        for name, w in r["weights"].items():
            want = reference["weights"][name]
            if ep > 1 and name.rsplit(".", 1)[-1] in ("w1", "w2", "w3") and ".experts." in name:
                rows = want.shape[0] // ep
                want = want[r["ep_rank"] * rows:(r["ep_rank"] + 1) * rows]
            _close(w, want, f"weight {name} after step {STEPS}")


def test_the_distributed_run_matches_the_reference_before_saving(saved, reference):
    for r in saved["ranks"]:
        for got, want in zip(r["saved"], reference["losses"][:SAVE_AT], strict=True):
            _close(got, want, "loss before the save")
    assert saved["checkpoint"].name == "step_00000002"


def test_dp2_ep2_checkpoint_loads_in_one_process(saved, reference):
    from checkpoints.manifest import read_manifest

    assert read_manifest(saved["checkpoint"])["topology"] == {"world": 2, "dp": 2, "ep": 2, "cp": 1, "zero_stage": 1}
    _check([_continue(Topology.single(), (1, 1, 0), saved["checkpoint"])], reference, ep=1)


def test_dp2_ep2_checkpoint_loads_at_dp2_ep1_zero2(saved, reference):
    _check([r["dp2_ep1_zero2"] for r in saved["ranks"]], reference, ep=1)


def test_single_process_checkpoint_loads_at_dp2_ep2(saved, reference):
    _check([r["dp1_to_dp2_ep2"] for r in saved["ranks"]], reference, ep=2)


def test_dp2_ep2_checkpoint_loads_at_dp4_with_ep2_and_ep4(saved, reference):
    ranks = run_distributed(_four_ranks, 4, saved["checkpoint"])
    _check([r["dp4_ep2_zero2"] for r in ranks], reference, ep=2)
    _check([r["dp4_ep4_zero1"] for r in ranks], reference, ep=4)


def test_a_different_expert_count_is_refused_not_resharded(saved):
    """Experts move between ranks on resume; their number is part of the model and cannot change."""
    model_cfg = dataclasses.replace(MODEL, moe=dataclasses.replace(MODEL.moe, num_experts=8))
    torch.manual_seed(0)
    model = build_model(model_cfg)
    engine = build_engine(model, OPTIM, ParallelConfig(), max_steps=MAX_STEPS, grad_accum=1)
    cfg = dataclasses.replace(_config(1, 1, 0), model=model_cfg)
    manager = CheckpointManager(saved["checkpoint"].parent.parent, cfg.checkpoint, topology=Topology.single(), cfg=cfg,
                                log=lambda _: None)
    with pytest.raises(ValueError, match=r"model settings changed: moe\).*experts.w1 has shape \[4, 32, 32\], "
                                         r"the model needs \[8, 32, 32\].*Only the parallel layout"):
        manager.load(saved["checkpoint"], engine, None)


# ---- whole runs (train_main: real data loaders, DeepSpeed, checkpoints every 3 steps) -----------------

RUN = ["parallel.dp=2", "parallel.ep=2", "cluster.num_workers=2", "train.log_interval=1", "train.seq_len=64",
       "train.global_batch_size=8", "train.micro_batch_size=2", "train.threads=1", "data.corpus_max_mb=0.5",
       "data.tokenizer_vocab_size=512", "model.vocab_size=512", "checkpoint.interval=3", "checkpoint.export=false"]


def _run(rank, world, overrides, cache):
    import os

    os.environ["LIQUID_CACHE"] = cache
    from pretrain.train.worker import train_main

    return train_main(load_config("tiny", overrides), progress=False)


def _runs(rank, world, steps, cache):
    """Several whole runs one after the other on the same spawned ranks (one spawn instead of one per run):
    each step is a list of overrides (train_main, then its megatron groups torn down, the torch world kept) or
    ("copy", source, [destinations]) (rank 0 copies a run directory). A barrier ends each step. Returns the
    summaries of the runs."""
    import os
    import shutil

    import torch.distributed as dist

    from parallel.topology import destroy_topology

    summaries = []
    for step in steps:
        if step[0] == "copy":
            if rank == 0:
                for destination in step[2]:
                    shutil.copytree(step[1], destination)
        else:
            summaries.append(_run(rank, world, step, cache))
            destroy_topology()
        dist.barrier()
    return summaries


def _losses(run_dir) -> dict:
    import json

    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _rows(run_dir) -> dict:
    """{step: sorted (epoch, block, row) the ranks trained}, from the loaders' row records (data.record_rows)."""
    import json

    by_step: dict = {}
    for path in sorted((run_dir / "rows").glob("rank*.jsonl")):
        for r in map(json.loads, path.read_text().splitlines()):
            by_step.setdefault(r["step"], []).extend(zip(r["epoch"], r["block"], r["row"]))
    return {step: sorted(rows) for step, rows in by_step.items()}


LAYOUTS = {"dp1": (1, ["parallel.dp=1", "parallel.ep=1", "cluster.num_workers=1"]),
           "dp4_ep2": (4, ["parallel.dp=4", "parallel.ep=2", "cluster.num_workers=4"]),
           "dp2_cp2": (4, ["parallel.dp=2", "parallel.cp=2", "parallel.ep=2", "cluster.num_workers=4"])}


def test_a_checkpoint_resumes_exactly_at_any_layout(tmp_path):
    """Saved at step 3 by dp=2 x ep=2; resumed at the same layout (bitwise), at dp=1 (one process), at
    dp=4 x ep=2 and at dp=2 x cp=2 x ep=2: every later loss within 1e-5 of the uninterrupted dp=2 run,
    and every step trains the same rows (recorded by the loader): none skipped, none twice."""

    cache = str(tmp_path / "cache")
    full, part = tmp_path / "full", tmp_path / "part"
    run = RUN + ["data.record_rows=true"]
    # The three dp=2 x ep=2 runs (the uninterrupted one, the one that stops at step 3, its resume) on one
    # spawn of two ranks; the stopped run is copied for the other layouts before it resumes.
    ranks = run_distributed(_runs, 2, [run + [f"run.dir={full}", "train.max_steps=6"],
                                       run + [f"run.dir={part}", "train.max_steps=3"],
                                       ("copy", part, [tmp_path / name for name in LAYOUTS]),
                                       run + [f"run.dir={part}", "train.max_steps=6", "checkpoint.resume=auto"]],
                            cache)
    summaries = [r[2] for r in ranks]
    assert all(s["resumed_from"] == "step_00000003" for s in summaries)
    assert _losses(part) == _losses(full)  # bitwise: same layout, same data, same state
    want, rows = _losses(full), _rows(full)
    assert sorted(rows) == [1, 2, 3, 4, 5, 6] and all(len(r) == 8 for r in rows.values())
    assert len({t for r in rows.values() for t in r}) == 48  # 6 steps x 8 rows, all different
    assert _rows(part) == rows
    resumes = {name: run + layout + [f"run.dir={tmp_path / name}", "train.max_steps=6", "checkpoint.resume=auto"]
               for name, (_, layout) in LAYOUTS.items()}
    # The resumes at four ranks (dp=4 x ep=2, dp=2 x cp=2 x ep=2) on one spawn, one after the other.
    four = [name for name, (world, _) in LAYOUTS.items() if world == 4]
    by_rank = run_distributed(_runs, 4, [resumes[name] for name in four], cache)
    resumed = {name: [r[i] for r in by_rank] for i, name in enumerate(four)}
    for name, (world, layout) in LAYOUTS.items():
        summaries = resumed[name] if world == 4 else [_run(0, 1, resumes[name], cache)]
        assert {(s["resumed_from"], s["world"]) for s in summaries} == {("step_00000003", world)}, name
        got = _losses(tmp_path / name)
        assert sorted(got) == [1, 2, 3, 4, 5, 6], name
        for step in (4, 5, 6):
            _close(got[step], want[step], f"{name}: loss of step {step}")
        assert _rows(tmp_path / name) == rows, name
