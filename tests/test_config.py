import dataclasses

import pytest

from pretrain.config import Config, load_config, resolve_preset, to_yaml

OPERATOR_KEYS = ["run.dir", "train.max_steps", "train.seq_len", "train.global_batch_size", "train.micro_batch_size",
                 "train.seed", "train.log_interval", "checkpoint.interval", "parallel.dp", "parallel.ep",
                 "parallel.cp", "cluster.num_workers", "cluster.address", "data.path"]


@pytest.mark.parametrize("preset", ["tiny", "liquid-8b-a1b", "lfm2-8b-a1b", "liquid-8b-a1b-128k"])
def test_presets_load_into_frozen_dataclasses(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.max_steps = 3


def test_operator_keys_exist_and_override():
    values = {"run.dir": "/tmp/x", "train.max_steps": "7", "train.seq_len": "128", "train.global_batch_size": "8",
              "train.micro_batch_size": "4", "train.seed": "3", "train.log_interval": "2",
              "checkpoint.interval": "5", "parallel.dp": "1", "parallel.ep": "1", "parallel.cp": "1",
              "cluster.num_workers": "1", "cluster.address": "ray://head:10001", "data.path": "s3://bucket/shards"}
    assert set(values) == set(OPERATOR_KEYS)
    cfg = load_config("tiny", [f"{k}={v}" for k, v in values.items()])
    for key, value in values.items():
        section, name = key.split(".")
        assert str(getattr(getattr(cfg, section), name)) == value


def test_nested_override_and_yaml_round_trip(tmp_path):
    cfg = load_config("tiny", ["model.liquid.heads=2", "model.attention_layers=[1,3]"])
    assert cfg.model.liquid.heads == 2
    assert cfg.model.layer_types() == ["liquid", "attention", "liquid", "attention"]
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("override, needle", [
    ("train.max_step=5", "did you mean 'train.max_steps'"),
    ("model.liquid.head=3", "did you mean 'model.liquid.heads'"),
    ("trian.seed=1", "did you mean 'train.seed'"),
])
def test_unknown_key_names_it_and_suggests(override, needle):
    with pytest.raises(ValueError) as err:
        load_config("tiny", [override])
    assert override.split("=")[0] in str(err.value)
    assert needle in str(err.value)


def test_wrong_type_names_the_key():
    with pytest.raises(ValueError, match="train.max_steps"):
        load_config("tiny", ["train.max_steps=lots"])


@pytest.mark.parametrize("overrides, key", [
    (["parallel.ep=3"], "parallel.ep"),
    (["train.global_batch_size=12"], "train.global_batch_size"),
    (["model.moe.top_k=9"], "model.moe.top_k"),
    (["model.attention_layers=[7]"], "model.attention_layers"),
    (["model.mixer=mamba"], "model.mixer"),
    (["parallel.dp=4", "train.micro_batch_size=4"], "cluster.num_workers"),
])
def test_semantic_errors_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config("tiny", overrides)


def test_bad_override_syntax_and_unknown_preset():
    with pytest.raises(ValueError, match="key=value"):
        load_config("tiny", ["train.max_steps"])
    with pytest.raises(ValueError, match="presets: .*tiny"):
        resolve_preset("no-such-preset")


def test_data_streams_with_proportions():
    cfg = load_config("tiny", ["data.streams=[{path: s3://b/web, proportion: 0.7}, {path: /data/code, proportion: 0.3}]"])
    assert [(s.path, s.proportion) for s in cfg.data.streams] == [("s3://b/web", 0.7), ("/data/code", 0.3)]
    with pytest.raises(ValueError, match="every stream a proportion, or none"):
        load_config("tiny", ["data.streams=[{path: a, proportion: 0.7}, {path: b}]"])
    with pytest.raises(ValueError, match=r"unknown config key 'pth' inside 'data.streams'.*did you mean 'path'"):
        load_config("tiny", ["data.streams=[{pth: a}]"])
    with pytest.raises(ValueError, match="data.path or data.streams, not both"):
        load_config("tiny", ["data.path=x", "data.streams=[{path: a}]"])


@pytest.mark.parametrize("preset", ["liquid-8b-a1b", "lfm2-8b-a1b", "liquid-8b-a1b-128k"])
def test_full_size_presets_train_on_38t_tokens(preset):
    """The presets' budget is the model class's 38T tokens, and max_tokens (not max_steps) ends the run."""
    from pretrain.train.loop import last_step

    t = load_config(preset).train
    steps = last_step(t)
    assert steps < t.max_steps
    assert 38e12 <= steps * t.global_batch_size * t.seq_len < 38e12 + t.global_batch_size * t.seq_len


def test_token_counts_written_with_an_exponent_are_ints(tmp_path):
    """`38e12` is how token counts are written; YAML reads it as a float, which an int key takes when it is
    integral (in overrides, in YAML files, inside list items); a fractional value is still refused."""
    cfg = load_config("tiny", ["train.max_tokens=4.096e6", "data.streams=[{path: /a}, {path: /b}]",
                               "data.phases=[{proportions: [1, 0]}, {start_tokens: 2e6, proportions: [0, 1]}]"])
    assert cfg.train.max_tokens == 4_096_000 and type(cfg.train.max_tokens) is int
    assert cfg.data.phases[1].start_tokens == 2_000_000 and type(cfg.data.phases[1].start_tokens) is int
    assert cfg.optim.lr == 3e-3  # float keys keep their floats
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  max_tokens: 38e12\n  max_steps: 1e3\n")
    cfg = load_config(str(path))
    assert (cfg.train.max_tokens, cfg.train.max_steps) == (38 * 10**12, 1000)
    with pytest.raises(ValueError, match=r"bad value for config key 'train.max_tokens'"):
        load_config("tiny", ["train.max_tokens=1.5"])
