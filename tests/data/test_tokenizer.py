"""Tokenizers: local BPE training, special ids, exact round trips, clear errors."""
import json

import pytest

from data_pipeline.tokenizer import SPECIAL_TOKENS, TextTokenizer, pad_vocab, train_tokenizer

TEXTS = [f"document {i}: the quick brown fox, über naïve 中文 🤖\n\tindented line {i * 7}" for i in range(200)]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return train_tokenizer(TEXTS, vocab_size=320, out_dir=tmp_path_factory.mktemp("tok"))


def test_training_is_deterministic_with_specials_first(tok_path, tmp_path):
    again = train_tokenizer(TEXTS, vocab_size=320, out_dir=tmp_path)
    assert again.read_bytes() == tok_path.read_bytes()
    tok = TextTokenizer(tok_path.parent)  # a directory holding tokenizer.json works too
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.vocab_size <= 320 and tok.padded_vocab_size == pad_vocab(tok.vocab_size) == 384
    assert len(tok.sha256) == 64
    config = json.loads((tok_path.parent / "tokenizer_config.json").read_text())
    assert config["eos_token"] == SPECIAL_TOKENS["eos"]


@pytest.mark.parametrize("text", ["plain", "  leading and trailing  ", "emoji 🤖 and 中文", "a\r\nb\x00c", ""])
def test_round_trip_is_exact(tok_path, text):
    tok = TextTokenizer(tok_path)
    (ids,) = tok.encode_batch([text])
    assert tok.decode(ids) == text


def test_text_spelling_a_special_token_stays_text(tok_path):
    """A document containing "<|eos|>" must not get an EOS (or BOS/PAD) id in the middle of it."""
    tok = TextTokenizer(tok_path)
    text = "before <|eos|> middle <|bos|><|pad|> after"
    (ids,) = tok.encode_batch([text])
    assert not {tok.eos_id, tok.bos_id, tok.pad_id} & set(ids)
    assert tok.decode(ids) == text


def test_errors_are_clear(tmp_path, tok_path):
    with pytest.raises(ValueError, match="does not exist"):
        TextTokenizer(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not a tokenizer")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        TextTokenizer(tmp_path / "junk.json")
    with pytest.raises(ValueError, match="no end-of-document token .*--eos-token"):
        TextTokenizer(tok_path, eos_token="<|nope|>")
    with pytest.raises(ValueError, match="below the 256 bytes"):
        train_tokenizer(TEXTS, vocab_size=200, out_dir=tmp_path / "t")
    tok = TextTokenizer(tok_path)
    with pytest.raises(ValueError, match=f"model.vocab_size={tok.padded_vocab_size}"):
        tok.check_model_vocab(tok.vocab_size - 1)
    tok.check_model_vocab(tok.padded_vocab_size)
