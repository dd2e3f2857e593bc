"""The training data source for one data-parallel rank, built from the data config.

Prepared shards (`data.path` or `data.streams`) are read as they are; without them the embedded corpus is
prepared once into shards (cached) and read through the same loader.
"""
from __future__ import annotations

import os

from data_pipeline.loader import StreamingRows, StreamSpec


def stream_specs(data_cfg, *, log=print) -> tuple[list[StreamSpec], str | None]:
    """(streams, tokenizer path or None) named by the config; the embedded corpus when none is named."""
    if data_cfg.streams:
        return [StreamSpec(s.path, s.proportion) for s in data_cfg.streams], None
    if data_cfg.path:
        return [StreamSpec(data_cfg.path)], None
    from data_pipeline.builtin import builtin_dataset

    shards, tokenizer = builtin_dataset(data_cfg, log=log)
    return [StreamSpec(shards)], tokenizer


def data_phases(data_cfg, *, seq_len: int, global_batch: int) -> list[tuple[str, int, list[float]]]:
    """(name, first global step, proportions) of each of data.phases (pretrain/config.py phase_start_steps:
    start_tokens is rounded up to a whole step); [] without phases."""
    from pretrain.config import phase_names, phase_start_steps

    phases = data_cfg.phases
    return [(name, start, [float(x) for x in ph.proportions]) for name, start, ph in
            zip(phase_names(phases), phase_start_steps(phases, global_batch * seq_len), phases)]


def build_dataset(data_cfg, *, seq_len: int, vocab_size: int, seed: int, rank: int = 0, world: int = 1,
                  global_batch: int | None = None, record: str | None = None, log=print) -> StreamingRows:
    """Data-parallel rank `rank` of `world`'s rows of each global step of `global_batch` rows (the order
    does not depend on world: data_pipeline/order.py). `record`: a file each batch's row numbers go to."""
    specs, _ = stream_specs(data_cfg, log=log)
    phases = data_phases(data_cfg, seq_len=seq_len, global_batch=world if global_batch is None else global_batch)
    loader = StreamingRows(specs, seq_len=seq_len, seed=seed, cache_dir=os.path.expanduser(data_cfg.cache_dir),
                           shuffle=data_cfg.shuffle, shuffle_buffer_blocks=data_cfg.shuffle_buffer_blocks,
                           rank=rank, world=world, global_batch=global_batch, lanes=data_cfg.lanes,
                           validate_hash=data_cfg.validate_hash, cache_limit=None if data_cfg.cache_limit_gb is None
                           else int(data_cfg.cache_limit_gb * 2**30),
                           record=record, phases=[(start, props) for _, start, props in phases] or None,
                           phase_names=[name for name, _, _ in phases] or None)
    if loader.vocab_size > vocab_size:
        loader.close()
        raise ValueError(f"the data was tokenized with a vocabulary of {loader.vocab_size} tokens, more than "
                         f"model.vocab_size={vocab_size}; set model.vocab_size={-(-loader.vocab_size // 128) * 128}")
    return loader
