"""Tokenizers: train a byte-level BPE locally with `tokenizers`, or load any existing tokenizer.json.

The model's vocabulary is the tokenizer's size padded up to a multiple of 128 (`padded_vocab_size`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>"}
# Names other tokenizers use for their end-of-document token, tried in order when loading one (after the
# `eos_token` of a tokenizer_config.json beside the tokenizer.json, as Hugging Face tokenizers and our
# exports and run directories ship it).
CONFIG_FILE = "tokenizer_config.json"
EOS_CANDIDATES = ("<|eos|>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
VOCAB_MULTIPLE = 128


def pad_vocab(size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-size // multiple) * multiple


def configured_eos(directory: str | Path) -> str | None:
    """The eos_token named by directory/tokenizer_config.json (a string, or {"content": ...}), if any."""
    path = Path(directory) / CONFIG_FILE
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    return eos if isinstance(eos, str) and eos else None


def write_eos_config(directory: str | Path, eos_token: str) -> Path:
    """Record the end-of-document token beside a tokenizer.json (tokenizer_config.json), so every later
    load of that directory finds it."""
    path = Path(directory) / CONFIG_FILE
    config = {}
    if path.exists():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            config = {}
    config["eos_token"] = eos_token
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


class TextTokenizer:
    """A loaded tokenizer.json with the ids the pipeline needs. The end-of-document token: `eos_token` when
    given (`--eos-token`, `data.eos_token`), else the tokenizer_config.json's beside it, else the first of
    EOS_CANDIDATES the vocabulary has."""

    def __init__(self, path: str | Path, eos_token: str | None = None):
        from tokenizers import Tokenizer

        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / "tokenizer.json"
        if not self.path.exists():
            raise ValueError(f"tokenizer file {self.path} does not exist; train one with "
                             "`liquid data tokenizer train` or pass an existing tokenizer.json")
        try:
            self.tok = Tokenizer.from_file(str(self.path))
        except Exception as err:  # the library raises plain Exception subclasses for bad files
            raise ValueError(f"{self.path} is not a valid tokenizer.json: {err}") from None
        # Text that spells a special token ("<|eos|>" in a document) is encoded as text, never as the token:
        # otherwise a document could end itself early or smuggle in BOS/PAD.
        self.tok.encode_special_tokens = True
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find(eos_token or configured_eos(self.path.parent), EOS_CANDIDATES, "end-of-document")
        self.bos_id = self.tok.token_to_id(SPECIAL_TOKENS["bos"])
        self.pad_id = self.tok.token_to_id(SPECIAL_TOKENS["pad"])
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()

    def _find(self, explicit, candidates, what) -> int:
        names = (explicit,) if explicit else candidates
        for name in names:
            idx = self.tok.token_to_id(name)
            if idx is not None:
                return idx
        raise ValueError(f"{self.path} has no {what} token (looked for {', '.join(names)}); name it with "
                         "--eos-token (liquid data prepare, liquid eval) or data.eos_token (liquid pretrain)")

    @property
    def padded_vocab_size(self) -> int:
        return pad_vocab(self.vocab_size)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def check_model_vocab(self, model_vocab_size: int) -> None:
        """The model must be able to embed every id the tokenizer produces."""
        if model_vocab_size < self.vocab_size:
            raise ValueError(f"model.vocab_size={model_vocab_size} is smaller than the tokenizer's vocabulary "
                             f"({self.vocab_size} in {self.path}); set model.vocab_size={self.padded_vocab_size}")


def train_tokenizer(texts: Iterable[str], *, vocab_size: int, out_dir: str | Path) -> Path:
    """Byte-level BPE trained locally (no network); writes out_dir/tokenizer.json and returns its path.

    Deterministic for the same texts in the same order. BOS/EOS/PAD are the first three ids.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"--vocab-size {vocab_size} is below the 256 bytes + {len(SPECIAL_TOKENS)} special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.json"
    tok.save(str(path))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": SPECIAL_TOKENS["bos"], "eos_token": SPECIAL_TOKENS["eos"], "pad_token": SPECIAL_TOKENS["pad"],
         "model_max_length": 1 << 20, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    return path
