"""Pack documents into fixed-length training rows that carry their document boundaries.

A row of seq_len + 1 tokens gives input_ids (the first seq_len), labels (the last seq_len) and doc_start
(True where a document begins inside the row, and at position 0 when a document begins exactly there).
"""
from __future__ import annotations

import numpy as np

# The byte-level vocabulary used until a trained tokenizer is given: 256 bytes + specials, padded to 128.
BYTE_VOCAB = {"bos": 256, "eos": 257, "pad": 258}
BYTE_VOCAB_SIZE = 384


def byte_tokens(documents) -> tuple[np.ndarray, np.ndarray]:
    """Documents (bytes) -> one token stream (uint16) with EOS after each document, and doc start offsets."""
    parts, starts, pos = [], [], 0
    for data in documents:
        arr = np.frombuffer(data, dtype=np.uint8).astype(np.uint16)
        starts.append(pos)
        parts.append(arr)
        parts.append(np.array([BYTE_VOCAB["eos"]], dtype=np.uint16))
        pos += len(arr) + 1
    if not parts:
        raise ValueError("the corpus has no documents")
    return np.concatenate(parts), np.asarray(starts, dtype=np.int64)


def pack_rows(tokens: np.ndarray, doc_starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut the stream into rows of seq_len + 1 tokens (the tail that does not fill a row is dropped).

    Rows overlap by nothing: row i covers tokens [i * seq_len, i * seq_len + seq_len + 1).
    Returns tokens [rows, seq_len + 1] and doc_start [rows, seq_len] for the input positions.
    """
    num_rows = (len(tokens) - 1) // seq_len
    if num_rows < 1:
        raise ValueError(f"the corpus has {len(tokens)} tokens, fewer than one row of train.seq_len={seq_len}")
    starts_mask = np.zeros(len(tokens), dtype=bool)
    starts_mask[doc_starts] = True
    idx = np.arange(num_rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return tokens[idx], starts_mask[idx[:, :seq_len]]
