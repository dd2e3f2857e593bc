"""A tokenizer whose end-of-document token has an unusual name: named by --eos-token (liquid data prepare,
liquid eval), data.eos_token (liquid pretrain, which records it beside the run's copy of the tokenizer), or
a tokenizer_config.json beside the tokenizer.json."""
from __future__ import annotations

import json

import pytest

from checkpoints.evaluate import tokenize_documents
from data_pipeline.tokenizer import TextTokenizer, configured_eos, write_eos_config
from pretrain.run_dir import RunDir
from tests.test_cli import run_cli

EOS = "<|doc_end|>"
TEXTS = [f"document {i}: the liquid layer keeps a state of fixed size. " * (i % 4 + 1) for i in range(30)]


@pytest.fixture(scope="module")
def odd_tokenizer(tmp_path_factory):
    """A byte-level BPE whose only special token is EOS, none of the usual names."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    path = tmp_path_factory.mktemp("odd") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_unnamed_eos_is_a_clear_error_naming_every_way_to_name_it(odd_tokenizer):
    with pytest.raises(ValueError, match="--eos-token .*data.eos_token"):
        TextTokenizer(odd_tokenizer)
    tok = TextTokenizer(odd_tokenizer, eos_token=EOS)
    assert tok.tok.id_to_token(tok.eos_id) == EOS
    docs = tokenize_documents(["a b", "c"], odd_tokenizer, EOS)
    assert [d[-1] for d in docs] == [tok.eos_id] * 2


def test_tokenizer_config_beside_it_names_the_eos(odd_tokenizer, tmp_path):
    directory = tmp_path / "tok"
    directory.mkdir()
    (directory / "tokenizer.json").write_bytes(odd_tokenizer.read_bytes())
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": EOS}, "x": 1}))
    assert configured_eos(directory) == EOS
    assert TextTokenizer(directory).tok.id_to_token(TextTokenizer(directory).eos_id) == EOS
    write_eos_config(directory, EOS)  # keeps the other keys
    assert json.loads((directory / "tokenizer_config.json").read_text()) == {"eos_token": EOS, "x": 1}


def test_run_directory_copy_keeps_the_eos(odd_tokenizer, tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.copy_tokenizer(odd_tokenizer, EOS)
    assert TextTokenizer(run.tokenizer_dir).tok.id_to_token(TextTokenizer(run.tokenizer_dir).eos_id) == EOS
    run.copy_tokenizer(odd_tokenizer)  # without one, no stale record is left behind (the worker passes
    # data.eos_token, else the source's tokenizer_config.json's)
    with pytest.raises(ValueError, match="--eos-token"):
        TextTokenizer(run.tokenizer_dir)


def test_prepare_cli_accepts_eos_token(odd_tokenizer, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    args = ("data", "prepare", "--input", str(corpus), "--tokenizer", str(odd_tokenizer), "--no-ray")
    refused = run_cli(*args, "--output", str(tmp_path / "a"))
    assert refused.returncode == 2 and "--eos-token" in refused.stderr and "Traceback" not in refused.stderr
    prep = run_cli(*args, "--output", str(tmp_path / "b"), "--eos-token", EOS)
    assert prep.returncode == 0, prep.stderr
    meta = json.loads((tmp_path / "b" / "liquid_data.json").read_text())
    assert meta["eos_id"] == TextTokenizer(odd_tokenizer, eos_token=EOS).eos_id
    assert json.loads((tmp_path / "b" / "prepare_summary.json").read_text())["documents"] == len(TEXTS)
