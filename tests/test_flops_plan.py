import torch

from pretrain.config import load_config
from pretrain.model.ffn import MoE
from pretrain.model.model import LiquidLM, build_model
from pretrain.train.flops import count_params, flops_per_token
from pretrain.train.plan import build_plan


def _active_from_module(model):
    """Count parameters one token uses, reading the built module: experts scaled by top_k / E."""
    total = 0
    for name, p in model.named_parameters():
        total += p.numel()
    for moe in model.modules():
        if isinstance(moe, MoE):
            expert = sum(p.numel() for p in moe.experts.parameters())
            total -= expert - expert * moe.cfg.top_k // moe.cfg.num_experts
    return total


def test_counts_match_a_built_module_for_every_mixer_and_mtp():
    cfg = load_config("tiny", ["model.conv_layers=[1]", "model.mtp_depth=2"]).model
    model = build_model(cfg)
    counts = count_params(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.active == _active_from_module(model)
    assert counts.expert == sum(p.numel() for m in model.moe_layers() for p in m.experts.parameters())


def test_8b_presets_have_the_advertised_size():
    for preset in ("liquid-8b-a1b", "lfm2-8b-a1b"):
        cfg = load_config(preset).model
        with torch.device("meta"):
            built = sum(p.numel() for p in LiquidLM(cfg).parameters())
        counts = count_params(cfg)
        assert counts.total == built
        assert 8.2e9 < counts.total < 8.45e9
        assert 1.45e9 < counts.active < 1.6e9


def test_flops_convention():
    cfg = load_config("lfm2-8b-a1b").model  # no liquid layers: 6 N_matmul + causal attention only
    counts = count_params(cfg)
    expected = 6 * counts.matmul_active + 6 * 6 * 4096 * 32 * 64
    assert flops_per_token(cfg, 4096) == expected
    # Doubling the sequence adds only attention FLOPs.
    assert flops_per_token(cfg, 8192) - flops_per_token(cfg, 4096) == 6 * 6 * 4096 * 32 * 64


def test_plan_numbers():
    plan = build_plan(load_config("liquid-8b-a1b"), mfu=0.4, gpus=64, device="H100", tokens=1e12)
    assert abs(plan["params_total"] / 1e9 - 8.3) < 0.1
    assert abs(plan["params_active"] / 1e9 - 1.5) < 0.1
    tps = 0.4 * 989e12 * 64 / plan["flops_per_token"]
    assert abs(plan["tokens_per_s"] - tps) < 1e-6 * tps
    assert abs(plan["days_to_tokens"] - 1e12 / tps / 86400) < 1e-9
    mem = plan["memory_gib_per_rank"]
    assert mem["total"] > mem["parameters"] > 0
    # ZeRO-1 shards the optimizer state: more data-parallel ranks, less optimizer memory per rank.
    small = build_plan(load_config("liquid-8b-a1b", ["parallel.dp=8", "cluster.num_workers=8"]), gpus=8)
    assert small["memory_gib_per_rank"]["optimizer"] > mem["optimizer"]


def test_plan_data_section_at_38t_tokens():
    from data_pipeline.format import BLOCK_TOKENS
    from pretrain.train.plan import data_plan

    d = data_plan(tokens=38e12, block_tokens=BLOCK_TOKENS, vocab_size=65536)
    assert d["bytes_per_token"] == 2
    assert abs(d["samples_per_epoch"] - 38e12 / BLOCK_TOKENS) < 1
    assert abs(d["shards"] - 38e12 * 2 / 2**26) < 1
    # Blocks of 64K tokens keep the per-node sample index in GiB, where 4096-token samples would need ~69 GiB.
    assert d["loader_mib_per_node"] < 5 * 1024
    assert 65 < d["per_sample_ids_if_rows_were_samples_gib"] < 75
    assert data_plan(tokens=1e9, block_tokens=1025, vocab_size=100_000)["bytes_per_token"] == 4
    plan = build_plan(load_config("liquid-8b-a1b"), tokens=38e12)
    assert plan["data"]["tokens"] == 38e12


def test_activation_checkpointing_shrinks_the_planned_activations():
    """liquid-8b-a1b at its preset layout (micro-batch 4 x 4096): full keeps a block input per layer and
    one block at a time, selective drops the mixers' activations (the scan's chunk matrices, q/k/v)."""
    acts, weights = {}, set()
    for mode in ("none", "selective", "full"):
        plan = build_plan(load_config("liquid-8b-a1b", [f"train.activation_checkpointing={mode}"]))
        assert plan["layout"]["activation_checkpointing"] == mode
        acts[mode] = plan["memory_gib_per_rank"]["activations"]
        weights.add(plan["memory_gib_per_rank"]["parameters"])
    assert len(weights) == 1  # only the activations change
    print("liquid-8b-a1b activations GiB per rank:", acts)
    assert acts["full"] < acts["selective"] < acts["none"]
