"""The on-disk shard format shared by `prepare` (writer) and the loader (reader).

Each MDS sample is one block of BLOCK_TOKENS tokens: many training rows, so the per-epoch sample count
stays small at tens of trillions of tokens. Columns:
  tokens      ndarray:uint16 (vocabulary <= 65536) or ndarray:uint32, exactly `block_tokens` long;
              a file's last block is padded with pad_id after its real tokens
  doc_starts  ndarray:int32, sorted offsets in [0, num_tokens) where a document starts; MDS cannot
              store an empty array, so a block inside one long document holds the single sentinel
              [block_tokens] (out of range on purpose: readers keep only offsets < num_tokens)
  num_tokens  int, the real (unpadded) tokens in the block
Documents are joined with EOS (each document's tokens are followed by eos_id). The dataset root holds
MDS `index.json` and `liquid_data.json` (this module's metadata: block size, dtype, special ids,
tokenizer hash and vocabulary size, document and token counts).
A row of seq_len takes seq_len + 1 tokens (inputs and shifted labels); block r covers rows
[i * seq_len, i * seq_len + seq_len + 1) for i < (block_tokens - 1) // seq_len, so with the default
block of 2**16 + 1 tokens every power-of-two seq_len up to 65536 uses the whole block.
"""
from __future__ import annotations

import json
from pathlib import Path

FORMAT_VERSION = 1
BLOCK_TOKENS = 2**16 + 1
META_FILE = "liquid_data.json"
TOKENIZER_FILE = "tokenizer.json"  # a copy of the tokenizer the shards were made with
SUMMARY_FILE = "prepare_summary.json"


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def mds_columns(vocab_size: int) -> dict:
    return {"tokens": f"ndarray:{token_dtype(vocab_size)}", "doc_starts": "ndarray:int32", "num_tokens": "int"}


def rows_per_block(block_tokens: int, seq_len: int) -> int:
    rows = (block_tokens - 1) // seq_len
    if rows < 1:
        raise ValueError(f"train.seq_len={seq_len} does not fit a data block of {block_tokens} tokens; "
                         f"prepare the data with --block-tokens > {seq_len}")
    return rows


def write_meta(local_root: str | Path, meta: dict) -> Path:
    path = Path(local_root) / META_FILE
    path.write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2, sort_keys=True))
    return path
