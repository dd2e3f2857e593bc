"""The DeepSpeed engine equals the single-process run: same seed, same global batch -> same loss,
gradients, gradient norm, weights, learning rate and expert-bias updates (fp32 on CPU, ~1e-5 relative).

All distributed cases run inside one spawn of two ranks (the DeepSpeed and megatron imports are slow).
"""
import copy

import pytest
import torch
import torch.distributed as dist

from parallel.engine import LocalEngine, build_engine
from parallel.topology import Topology
from pretrain.config import AttentionConfig, LiquidConfig, ModelConfig, MoEConfig, OptimConfig, ParallelConfig
from pretrain.model.model import build_model
from tests.distributed.harness import run_distributed

MODEL = ModelConfig(vocab_size=64, d_model=32, num_layers=3, mixer="liquid", attention_layers=[1], dense_layers=1,
                    dense_dim=64, liquid=LiquidConfig(heads=2, key_dim=8, value_dim=8, chunk_size=8),
                    attention=AttentionConfig(heads=2, kv_heads=1, head_dim=16),
                    moe=MoEConfig(num_experts=4, top_k=2, expert_dim=32, bias_update_rate=1e-2))
# grad_clip 1.0: both steps clip (norms ~1.06 and ~1.21). Adam's eps is 1e-3: its update g / (|g| + eps)
# turns float noise in gradients near zero into weight noise of up to lr * noise / eps, which a tiny eps
# makes 1e-5-sized after one step; at 1e-3 the update is near-linear in g and the comparison well posed.
OPTIM = OptimConfig(lr=1e-2, warmup_steps=1, eps=1e-3)
ROWS, SEQ, STEPS, MAX_STEPS = 4, 16, 2, 10
RTOL = 1e-5


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


HAS_EP, HAS_CP = _importable("parallel.expert_parallel"), _importable("parallel.context_parallel")
# (dp, cp, ep, zero_stage, grad_accum) on two ranks; "resume" reloads the state after step 1 into a new engine.
CASES = [(2, 1, 1, 1, 1), (2, 1, 1, 2, 1), (2, 1, 1, 2, 2), (2, 1, 1, 1, 2)]
CASES += [(2, 1, 2, 1, 1), (2, 1, 2, 2, 2)] if HAS_EP else []
CASES += [(1, 2, 1, 2, 1), (1, 2, 2, 1, 2)] if HAS_CP and HAS_EP else []
RESUME = (2, 1, 1, 2, 1)
IDS = [f"dp{d}-cp{c}-ep{e}-zero{s}-accum{a}" for d, c, e, s, a in CASES]


def _batches(steps: int = STEPS, seed: int = 1234):
    """`steps` global batches of ROWS x SEQ tokens, with document boundaries inside some rows."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, MODEL.vocab_size, (ROWS, SEQ + 1), generator=g)
        doc_start = torch.zeros(ROWS, SEQ, dtype=torch.bool)
        doc_start[:, 0] = True
        doc_start[1, 11] = doc_start[2, 5] = True
        out.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:], "doc_start": doc_start})
    return out


def _plain(obj):
    """Tensors as numpy arrays: a spawned process's tensors cannot outlive it in the result queue."""
    if torch.is_tensor(obj):
        return obj.detach().cpu().float().numpy() if obj.dtype == torch.bfloat16 else obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _counts(model):
    return [m.tokens_per_expert.clone() for m in model.moe_layers()]


def _train_step(engine, model, micro_batches, *, loss_of, after_backward) -> dict:
    """The training loop's order: forward/backward per micro-batch, expert-load reduction, step, bias update."""
    loss = 0.0
    for mb in micro_batches:
        out = model(mb["input_ids"], labels=mb["labels"], doc_start=mb["doc_start"])
        lossy = loss_of(out, mb)
        engine.backward(lossy)
        loss += float(lossy.detach()) / len(micro_batches)
    grads = engine.full_gradients()
    counts = after_backward(model)
    norm = engine.step()
    model.update_expert_bias()
    return _plain({"loss": loss, "grads": grads, "norm": norm, "lr": engine.lr, "counts": counts,
                   "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
                   "biases": [m.router.expert_bias.clone() for m in model.moe_layers()],
                   "dtypes": {str(p.dtype) for p in model.parameters()},
                   "router_buffer_dtypes": {str(m.router.expert_bias.dtype) for m in model.moe_layers()}
                   | {str(m.tokens_per_expert.dtype) for m in model.moe_layers()}})


def _reference():
    torch.manual_seed(0)
    model = build_model(MODEL)
    engine = build_engine(model, OPTIM, ParallelConfig(), max_steps=MAX_STEPS, grad_accum=1)
    return [_train_step(engine, model, [b], loss_of=lambda out, mb: out.loss, after_backward=_counts)
            for b in _batches()]


def _device():
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _run_case(case, topology, *, resume_after=None, dtype=None):
    """One case on this rank: data-parallel rank d takes rows [d * ROWS / dp, ...), split into grad_accum
    micro-batches; CP rank c takes slice c of their sequence."""
    from parallel.engine import reduce_expert_load

    dp, cp, ep, stage, grad_accum = case
    device = _device()

    def build(seed):
        torch.manual_seed(seed)
        model = build_model(MODEL).to(device)  # built on the CPU: the same numbers as the reference
        if ep > 1:
            from parallel.expert_parallel import apply_expert_parallel
            apply_expert_parallel(model, topology)
        if cp > 1:
            from parallel.context_parallel import apply_context_parallel
            apply_context_parallel(model, topology.cp_group)
        engine = build_engine(model, OPTIM, ParallelConfig(dp=dp, cp=cp, ep=ep, zero_stage=stage), topology,
                              max_steps=MAX_STEPS, grad_accum=grad_accum, micro_batch_size=ROWS // dp // grad_accum,
                              dtype=dtype)
        return model, engine

    def micro_batches(batch):
        size = ROWS // dp // grad_accum
        lo = topology.dp_rank * (ROWS // dp)
        out = [{k: v[lo + i * size:lo + (i + 1) * size].to(device) for k, v in batch.items()}
               for i in range(grad_accum)]
        if cp > 1:
            from parallel.context_parallel import split_for_context_parallel
            out = [split_for_context_parallel(mb, topology.cp_rank, cp) for mb in out]
        return out

    def forward_loss(out, mb):
        if cp == 1:
            return out.loss
        from parallel.context_parallel import context_parallel_loss
        return context_parallel_loss(out, mb["labels"], topology.cp_group)

    def after_backward(m):
        reduce_expert_load(m, topology)
        return _counts(m)

    model, engine = build(0)
    record = []
    for step, batch in enumerate(_batches()):
        if step == resume_after:  # a fresh engine, differently initialised, takes over from the saved state
            state = copy.deepcopy(engine.state_dict())
            model, engine = build(1)
            engine.load_state_dict(state)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):  # as the training loop does
            record.append(_train_step(engine, model, micro_batches(batch), loss_of=forward_loss,
                                      after_backward=after_backward))
    return record


def _distributed_cases(rank, world, cases, resume_case):
    from parallel.topology import build_topology, destroy_topology

    results = {}
    for layout in sorted({c[:3] for c in cases}):
        dp, cp, ep = layout
        topology = build_topology(ParallelConfig(dp=dp, cp=cp, ep=ep), seq_len=SEQ, num_experts=MODEL.moe.num_experts)
        for case in [c for c in cases if c[:3] == layout]:
            results[case] = _run_case(case, topology)
            if case == resume_case:
                results["resume"] = _run_case(case, topology, resume_after=1)
                results["bf16"] = _run_case(case, topology, dtype=torch.bfloat16)
        destroy_topology()
    return results


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(_distributed_cases, 2, CASES, RESUME)


def _close(a, b, what, rtol=RTOL, floor=1e-12):
    """Relative error of a whole tensor, ||a - b|| / max(||b||, floor) (elementwise, entries near zero are
    all noise; a tensor much smaller than its peers, e.g. a gradient made of cancelling terms, too)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    err = float((a - b).norm()) / max(float(b.norm()), floor)
    assert err <= rtol, f"{what}: relative error {err:.3g}"


def _expected(ref: dict, name: str, *, ep_rank: int, ep: int):
    """The single-process value a rank should hold: its slice of the experts under expert parallelism."""
    full_name = name.replace(".experts.experts.", ".experts.")  # ExpertParallelExperts nests the plain one
    value = ref[full_name]
    if ep > 1 and ".experts." in full_name and full_name.rsplit(".", 1)[-1] in ("w1", "w2", "w3"):
        local = value.shape[0] // ep
        value = value[ep_rank * local:(ep_rank + 1) * local]
    return value


def _check_equal(ranks_by_step, reference, *, dp, ep):
    for step, ref in enumerate(reference):
        ranks = [r[step] for r in ranks_by_step]
        # DP ranks hold means over their rows; CP ranks hold shares that add up to their DP rank's loss.
        _close(sum(r["loss"] for r in ranks) / dp, ref["loss"], f"step {step} loss")
        for rank, r in enumerate(ranks):
            _close(r["norm"], ref["norm"], f"step {step} grad norm")
            _close(r["lr"], ref["lr"], f"step {step} lr")
            assert len(r["grads"]) == len(ref["grads"]) and len(r["weights"]) == len(ref["weights"])
            for name, g in r["grads"].items():  # relative to 1e-3 of the whole gradient at least
                _close(g, _expected(ref["grads"], name, ep_rank=rank % ep, ep=ep), f"step {step} grad {name}",
                       floor=1e-3 * ref["norm"])
            for name, w in r["weights"].items():
                _close(w, _expected(ref["weights"], name, ep_rank=rank % ep, ep=ep), f"step {step} weight {name}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_two_ranks_equal_single_process(reference, two_ranks, case):
    _check_equal([r[case] for r in two_ranks], reference, dp=case[0], ep=case[2])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_expert_load_is_summed_over_ranks(reference, two_ranks, case):
    for step, ref in enumerate(reference):
        for r in two_ranks:
            got = r[case][step]
            for c, c_ref in zip(got["counts"], ref["counts"], strict=True):
                assert (c == c_ref).all(), (step, c, c_ref)
            for b, b_ref in zip(got["biases"], ref["biases"], strict=True):
                assert (b == b_ref).all(), (step, b, b_ref)


def test_state_dict_resumes_exactly(reference, two_ranks):
    dp, _, ep, _, _ = RESUME
    _check_equal([r["resume"] for r in two_ranks], reference, dp=dp, ep=ep)


def test_bf16_runs_close_to_fp32(reference, two_ranks):
    """DeepSpeed's bf16 mode (bf16 weights, fp32 master copies in the optimizer) under bf16 autocast."""
    for step, ref in enumerate(reference):
        ranks = [r["bf16"][step] for r in two_ranks]
        assert abs(sum(r["loss"] for r in ranks) / 2 - ref["loss"]) < 2e-2 * ref["loss"]
        for r in ranks:
            assert abs(r["norm"] - ref["norm"]) < 2e-2 * ref["norm"]
            assert r["dtypes"] == {"torch.bfloat16"}
            # The balancing state stays fp32: bf16 would drop bias steps of 1e-3 and round token counts.
            assert r["router_buffer_dtypes"] == {"torch.float32"}


def test_one_rank_keeps_the_local_engine():
    model = build_model(MODEL)
    engine = build_engine(model, OPTIM, ParallelConfig(zero_stage=2), Topology.single(), max_steps=3,
                          grad_accum=2, micro_batch_size=1)
    assert isinstance(engine, LocalEngine) and engine.grad_accum == 2


@pytest.mark.parametrize("stage, match", [(0, "one rank only"), (3, "not supported")])
def test_refused_zero_stages(stage, match):
    fake = Topology(world=2, rank=0, dp=2, ep=1, cp=1, dp_rank=0, cp_rank=0, ep_rank=0, expert_dp_rank=0)
    with pytest.raises(ValueError, match=f"'parallel.zero_stage'.*{match}"):
        build_engine(build_model(MODEL), OPTIM, ParallelConfig(dp=2, zero_stage=stage), fake, max_steps=3,
                     grad_accum=1)


def test_topology_must_match_the_config():
    with pytest.raises(ValueError, match="topology has 1 ranks"):
        build_engine(build_model(MODEL), OPTIM, ParallelConfig(dp=2), Topology.single(), max_steps=3, grad_accum=1)


# DP=2 x EP=2 on 4 ranks (megatron layout: dense data parallel over all 4, experts in 2 EP groups of 2
# with 2 expert-data-parallel replicas each).
FOUR_RANK_CASES = [(4, 1, 2, 1, 1)] if HAS_EP else []


@pytest.mark.skipif(not HAS_EP, reason="parallel.expert_parallel is missing")
def test_four_ranks_dp_with_ep2_equal_single_process(reference):
    ranks = run_distributed(_distributed_cases, 4, FOUR_RANK_CASES, None)
    _check_equal([r[FOUR_RANK_CASES[0]] for r in ranks], reference, dp=4, ep=2)
    for step, ref in enumerate(reference):
        for r in ranks:
            for c, c_ref in zip(r[FOUR_RANK_CASES[0]][step]["counts"], ref["counts"], strict=True):
                assert (c == c_ref).all(), (step, c, c_ref)
