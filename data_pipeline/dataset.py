"""The training data source: rows with document boundaries, shuffled per epoch from a seed, resumable.

Until prepared shards exist (`data.path`), the source is the embedded corpus packed in memory.
"""
from __future__ import annotations

import numpy as np
import torch

from data_pipeline.corpus import iter_stdlib_documents
from data_pipeline.packing import BYTE_VOCAB_SIZE, byte_tokens, pack_rows


class RowDataset:
    """Deterministic micro-batches over packed rows; `state_dict` records the position for exact resume."""

    def __init__(self, rows: np.ndarray, doc_start: np.ndarray, *, seed: int, rank: int = 0, world: int = 1):
        self.rows, self.doc_start = rows, doc_start
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def __len__(self):
        return len(self.rows)

    def next_batch(self, batch_size: int) -> dict:
        """The next micro-batch of this rank: ranks take interleaved slices of one global order."""
        picks = []
        while len(picks) < batch_size:
            if self.cursor >= len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            pos = self.cursor + self.rank
            if pos < len(self._order):
                picks.append(self._order[pos])
            self.cursor += self.world
        rows = torch.from_numpy(self.rows[picks].astype(np.int64))
        return {
            "input_ids": rows[:, :-1],
            "labels": rows[:, 1:],
            "doc_start": torch.from_numpy(self.doc_start[picks]),
        }

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)


def build_dataset(data_cfg, *, seq_len: int, vocab_size: int, seed: int, rank: int = 0, world: int = 1) -> RowDataset:
    if data_cfg.path is not None:
        raise ValueError(f"data.path={data_cfg.path!r}: reading prepared shards is not available yet; "
                         "leave data.path unset to train on the embedded corpus")
    if vocab_size < BYTE_VOCAB_SIZE:
        raise ValueError(f"model.vocab_size={vocab_size} is too small for the byte-level vocabulary "
                         f"({BYTE_VOCAB_SIZE})")
    docs = (data for _, data in iter_stdlib_documents(int(data_cfg.corpus_max_mb * 2**20)))
    tokens, starts = byte_tokens(docs)
    rows, doc_start = pack_rows(tokens, starts, seq_len)
    return RowDataset(rows, doc_start, seed=seed, rank=rank, world=world)
