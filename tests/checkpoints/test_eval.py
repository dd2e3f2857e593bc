"""`liquid eval`: loss/perplexity of a checkpoint or an export on held-out text. The number on an export equals
what transformers computes from the same export on the same tokens, and a model (in memory or a run's
checkpoint) scores the same as its fp32 export."""
from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import save_file

from checkpoints.evaluate import (batches, document_windows, evaluate, evaluate_model, read_documents,
                                  tokenize_documents)
from checkpoints.export import export_model
from pretrain.cli import main
from tests.checkpoints.test_export import (LFM2, LIQUID, config, random_model, run_hf_check, tokenizer,  # noqa: F401
                                           trained_run)

SEQ = 32


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """A .jsonl of documents (one longer than three windows) and a .txt (one document)."""
    d = tmp_path_factory.mktemp("heldout")
    docs = ["A short one.", "hello world, " * 40, "Experts are picked by a sigmoid router with a bias. " * 3,
            "The state of a liquid layer decays with an input-dependent rate."]
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    (d / "notes.txt").write_text("Convolutions see three tokens; attention sees them all.\n")
    return [str(d / "docs.jsonl"), str(d / "notes.txt")]


def test_windows_cover_every_next_token_once_and_stay_inside_documents():
    docs = [list(range(100, 105)), list(range(200, 200 + 70)), [7, 8]]
    windows = document_windows(docs, 32)
    assert [len(w) for w in windows] == [5, 33, 33, 6, 2]
    assert windows[1][-1] == windows[2][0] and windows[2][-1] == windows[3][0]  # overlap by one token
    assert sum(len(w) - 1 for w in windows) == sum(len(d) - 1 for d in docs)
    targets = [w[1:] for w in windows]
    assert [t for ts in targets for t in ts] == [t for d in docs for t in d[1:]]
    ids, labels = next(batches(windows, 8))
    assert ids.shape == labels.shape == (5, 32)
    assert labels[0].tolist() == [101, 102, 103, 104] + [-100] * 28
    assert document_windows([[5]], 32) == []  # one token: nothing to predict


def test_eval_of_an_export_equals_transformers_on_the_same_tokens(tmp_path, tokenizer, heldout):
    cfg = config(LIQUID)
    model = random_model(cfg.model)
    out = tmp_path / "export"
    export_model(cfg.model, model.state_dict(), out, tokenizer=tokenizer, seq_len=SEQ, dtype="fp32")
    res = evaluate(out, heldout, device="cpu")
    assert res["source"] == str(out) and res["format"] == "liquid_moe" and res["seq_len"] == SEQ
    assert res["documents"] == 5 and res["windows"] > res["documents"]  # the long document spans windows

    # transformers, from the export alone, on the same windows.
    token_docs = tokenize_documents(read_documents(heldout), out / "tokenizer.json")
    windows = document_windows(token_docs, SEQ)
    ids, labels = next(batches(windows, len(windows)))
    save_file({"input_ids": ids, "labels": labels}, str(tmp_path / "windows.safetensors"))
    (hf,) = run_hf_check([(out, tmp_path / "windows.safetensors", "LiquidMoeForCausalLM")], tmp_path)
    assert hf["ok"] and hf["transformers"].startswith("4."), hf
    assert hf["tokens"] == res["tokens"] == sum(len(d) - 1 for d in token_docs)
    assert abs(hf["nll_sum"] / hf["tokens"] - res["loss"]) <= 1e-5
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))


@pytest.mark.parametrize("preset", [LIQUID, LFM2], ids=["liquid_moe", "lfm2_moe"])
def test_a_model_scores_the_same_as_its_fp32_export(tmp_path, tokenizer, heldout, preset):
    cfg = config(preset)
    model = random_model(cfg.model, seed=5)
    out = tmp_path / "export"
    summary = export_model(cfg.model, model.state_dict(), out, tokenizer=tokenizer, seq_len=SEQ, dtype="fp32")
    assert summary["format"] == ("liquid_moe" if preset is LIQUID else "lfm2_moe")
    token_docs = tokenize_documents(read_documents(heldout), tokenizer)
    in_memory = evaluate_model(model, token_docs, SEQ)
    exported = evaluate(out, heldout, device="cpu")
    assert exported["tokens"] == in_memory["tokens"]
    assert abs(exported["loss"] - in_memory["loss"]) <= 1e-6
    # Padding in a batch does not change the numbers (causal layers, dropless MoE).
    one_by_one = evaluate_model(model, token_docs, SEQ, batch_size=1)
    assert abs(one_by_one["loss"] - in_memory["loss"]) <= 1e-6
    # A bf16 export is close, not equal.
    export_model(cfg.model, model.state_dict(), tmp_path / "bf16", tokenizer=tokenizer, seq_len=SEQ)
    assert abs(evaluate(tmp_path / "bf16", heldout, device="cpu")["loss"] - in_memory["loss"]) <= 1e-2


def test_cli_eval_prints_one_json_line(tmp_path, tokenizer, heldout, capsys):
    cfg = config(LIQUID)
    out = tmp_path / "export"
    export_model(cfg.model, random_model(cfg.model).state_dict(), out, tokenizer=tokenizer, seq_len=SEQ)
    assert main(["eval", str(out), "--input", *heldout, "--device", "cpu", "--seq-len", "16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert {"loss", "perplexity", "tokens", "source"} <= set(res) and res["seq_len"] == 16
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"])) and res["tokens"] > 100


def test_eval_errors_are_clear(tmp_path, tokenizer, heldout, capsys):
    def run(*args):
        code = main(["eval", *map(str, args)])
        return code, capsys.readouterr().err

    code, err = run(tmp_path / "missing", "--input", *heldout)
    assert code == 2 and "does not exist" in err
    (tmp_path / "plain").mkdir()
    code, err = run(tmp_path / "plain", "--input", *heldout)
    assert code == 2 and "neither a run directory (config.yaml) nor an export directory (config.json)" in err
    cfg = config(LIQUID)
    out = tmp_path / "export"
    export_model(cfg.model, random_model(cfg.model).state_dict(), out, tokenizer=tokenizer, seq_len=SEQ)
    code, err = run(out, "--input", tmp_path / "nothing-*.txt")
    assert code == 2 and "matches no file" in err
    code, err = run(out, "--input", *heldout, "--step", "3")
    assert code == 2 and "--step applies to run directories" in err
    code, err = run(out, "--input", *heldout, "--device", "tpu")
    assert code == 2 and "unknown device 'tpu'" in err
    (out / "model.safetensors").unlink()
    code, err = run(out, "--input", *heldout)
    assert code == 2 and "has neither model.safetensors nor model.safetensors.index.json" in err


def test_eval_of_a_run_equals_eval_of_its_fp32_export(trained_run, tmp_path, heldout, capsys):  # noqa: F811
    from_run = evaluate(trained_run, heldout, device="cpu")
    assert from_run["source"].endswith("step_00000004") and from_run["step"] == 4
    assert from_run["seq_len"] == 32  # the run's train.seq_len
    assert main(["export", str(trained_run), "--out", str(tmp_path / "export"), "--dtype", "fp32"]) == 0
    from_export = evaluate(tmp_path / "export", heldout, device="cpu")
    assert from_export["tokens"] == from_run["tokens"]
    assert abs(from_export["loss"] - from_run["loss"]) <= 1e-6
    capsys.readouterr()
    assert main(["eval", str(trained_run), "--step", "4", "--input", *heldout]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(from_run["loss"], abs=1e-9)
    assert main(["eval", str(trained_run), "--step", "3", "--input", *heldout]) == 2
    assert "no checkpoint at step 3" in capsys.readouterr().err
