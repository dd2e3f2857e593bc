import json

from pretrain.bench.data import main_data


def test_bench_data_prints_one_json_line(capsys, tmp_path):
    main_data(["--mb", "0.5", "--loader-tokens", "20000", "--train-steps", "1", "--seq-len", "64",
               "--batch", "4", "--workdir", str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["bench"] == "data"
    for key in ("prepare", "loader", "raw_memmap"):
        assert out[key]["tokens"] > 0
    assert out["prepare"]["tokens_per_s_per_process"] > 0
    assert out["loader"]["tokens_per_s"] > 0 and out["raw_memmap"]["tokens_per_s"] > 0
    assert out["summary"]["loader_over_raw"] > 0 and out["tiny_training_tokens_per_s"] > 0


def test_bench_data_scale_opens_the_loader_on_a_simulated_index(capsys, tmp_path):
    """--scale: a generated index (no shard files), the loader opened in a fresh process as the last rank
    of 64 deep into the run, and the StreamingDataset anchor beside it."""
    main_data(["--scale", "1e9", "--workdir", str(tmp_path), "--resume-step", "1000"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["bench"] == "data-scale" and out["world"] == 64
    (row,) = out["scales"]
    assert row["blocks"] == 15_259 and row["shards"] == 30
    assert row["loader"]["startup_s"] >= 0 and row["loader"]["next_step_shards"] >= 1
    assert row["loader"]["peak_rss_mib"] > 0 and row["streaming_dataset"]["num_samples"] == row["blocks"]
