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
