"""Validation during training (eval.interval, eval.streams, eval.tokens), and `liquid eval RUN --held-out`.

Every eval.interval steps, and after the last step, every rank scores the held-out rows with the current
weights: no gradients, the training forward with its document masking, under the training autocast. The
rows are the first ceil(eval.tokens / train.seq_len) rows of each held-out stream in stored order
(`liquid data prepare`'s shards, read through the same loader as training, unshuffled, one lane): the same
rows at every validation and under every layout, so curves are comparable across a run, its resumes and
its resizes.

Data parallel: the rows are split into dp equal contiguous runs (the last padded with rows whose labels are
all ignored), each data-parallel rank scores its run in micro-batches of eval.micro_batch_size, context
parallel ranks their slice of each row, and the sums of token losses and of label counts meet in ONE
all_reduce per stream (float64). Every rank runs the same number of forwards, so the expert-parallel
all_to_alls pair up. The result is exactly the token-weighted mean over the rows, whatever the layout:
`liquid eval RUN --held-out` runs this same code on one process over a checkpoint's weights.

The embedded corpus holds out the standard-library documents after those it trains on
(data_pipeline/builtin.py, stream "heldout"); other data names its held-out streams in eval.streams.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from parallel.collectives import barrier, sum_over
from parallel.context_parallel import split_for_context_parallel
from pretrain.model.model import IGNORE_INDEX


def eval_specs(cfg, *, log=print) -> list[tuple[str, object]]:
    """[(name, StreamSpec)] of the held-out streams: eval.streams, or the embedded corpus's held-out part
    when the run trains on the embedded corpus and names none."""
    from data_pipeline.loader import StreamSpec

    if cfg.eval.streams:
        return [(s.name, StreamSpec(s.path)) for s in cfg.eval.streams]
    if cfg.data.path or cfg.data.streams:
        raise ValueError("config key 'eval.streams': name the held-out streams (name and path of prepared "
                         "shards) to validate on")
    from data_pipeline.builtin import builtin_heldout

    return [("heldout", StreamSpec(builtin_heldout(cfg.data, log=log)))]


@dataclass
class _HeldOut:
    name: str
    loader: object  # data_pipeline.loader.StreamingRows over the stream, unshuffled
    rows: int  # rows scored (the first `rows` of the stream)
    per_rank: int  # rows each data-parallel rank reads (the last rank's tail is padding)


class Validator:
    """The held-out rows of each stream for this rank; `run(model)` scores them (collective)."""

    def __init__(self, cfg, topology, place, *, log=print):
        from data_pipeline.loader import StreamingRows

        self.cfg, self.topology, self.place = cfg, topology, place
        self.interval = cfg.eval.interval
        self.micro = cfg.eval.micro_batch_size or cfg.train.micro_batch_size
        seq = cfg.train.seq_len
        quiet = lambda *a, **k: None  # noqa: E731
        local_first = int(os.environ.get("LOCAL_RANK", "0")) == 0
        if local_first:  # prepares the embedded corpus's held-out part, once per node
            specs = eval_specs(cfg, log=log if topology.rank == 0 else quiet)
        barrier()
        if not local_first:
            specs = eval_specs(cfg, log=quiet)
        want, dp = -(-cfg.eval.tokens // seq), topology.dp

        def open_rows(spec, per_rank: int):  # this data-parallel rank's run of per_rank rows, unshuffled
            return StreamingRows([spec], seq_len=seq, seed=0, cache_dir=os.path.expanduser(cfg.data.cache_dir),
                                 shuffle=False, lanes=1, rank=topology.dp_rank, world=dp, global_batch=per_rank * dp,
                                 validate_hash=cfg.data.validate_hash)

        self.streams: list[_HeldOut] = []
        try:
            for name, spec in specs:
                per_rank = -(-want // dp)
                loader = open_rows(spec, per_rank)
                rows = min(want, loader.order.rows_per_epoch)
                if -(-rows // dp) < per_rank:  # a stream smaller than eval.tokens: fewer rows per rank
                    loader.close()
                    per_rank = -(-rows // dp)
                    loader = open_rows(spec, per_rank)
                if loader.vocab_size > cfg.model.vocab_size:
                    loader.close()
                    raise ValueError(f"held-out stream '{name}' was tokenized with a vocabulary of "
                                     f"{loader.vocab_size} tokens, more than model.vocab_size={cfg.model.vocab_size}")
                self.streams.append(_HeldOut(name, loader, rows, per_rank))
        except BaseException:
            self.close()
            raise
        if topology.rank == 0 and self.interval:
            scored = ", ".join(f"{s.name}: {s.rows} rows ({s.rows * seq:,} tokens"
                               f"{', the whole stream' if s.rows < want else ''})" for s in self.streams)
            log(f"validation every {self.interval} steps on {scored}")

    def due(self, step: int, last_step: int) -> bool:
        return self.interval > 0 and (step % self.interval == 0 or step == last_step)

    @torch.no_grad()
    def run(self, model) -> dict:
        """{"val/<name>/loss", "val/<name>/perplexity", "val/<name>/tokens"} of every stream, on every rank
        (collective: every rank of the job calls it at the same step)."""
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        try:
            out = {}
            for stream in self.streams:
                total, count = self._score(model, stream)
                loss = total / count if count else float("nan")
                out[f"val/{stream.name}/loss"] = loss
                out[f"val/{stream.name}/perplexity"] = math.exp(loss) if loss < 700 else float("inf")
                out[f"val/{stream.name}/tokens"] = int(count)
            out["val_s"] = round(time.perf_counter() - start, 4)
            return out
        finally:
            model.train(was_training)

    def _score(self, model, stream: _HeldOut) -> tuple[float, int]:
        topology, place = self.topology, self.place
        loader = stream.loader
        loader.load_state_dict({**loader.state_dict(), "rows": 0, "in_step": 0})  # the same rows every time
        sums = torch.zeros(2, dtype=torch.float64, device=place.device)  # [sum of token losses, labels]
        first = topology.dp_rank * stream.per_rank  # this rank's first row number
        done = 0
        dtype = place.autocast_dtype
        while done < stream.per_rank:
            n = min(self.micro, stream.per_rank - done)
            batch = loader.next_batch(n)
            padding = torch.from_numpy(np.arange(first + done, first + done + n) >= stream.rows)
            batch["labels"][padding] = IGNORE_INDEX
            batch = {k: v.to(place.device) for k, v in batch.items() if v is not None}
            if topology.cp > 1:
                batch = split_for_context_parallel(batch, topology.cp_rank, topology.cp)
            with torch.autocast(place.device.type, dtype=dtype, enabled=dtype is not None):
                out = model(batch["input_ids"], labels=batch["labels"], doc_start=batch.get("doc_start"))
            sums[0] += out.lm_loss_sum.double()
            sums[1] += (batch["labels"] != IGNORE_INDEX).sum()
            done += n
        total, count = sum_over(sums, topology.dp_cp_group).tolist()  # this stream's one host read
        return total, int(count)

    def close(self) -> None:
        for stream in self.streams:
            stream.loader.close()
        self.streams = []


def open_validator(cfg, topology, place, *, log=print) -> Validator | None:
    """The run's validator, or None: eval.interval is 0, or the data is not the embedded corpus and
    eval.streams names no held-out data (said once, by rank 0)."""
    if cfg.eval.interval <= 0:
        return None
    if not cfg.eval.streams and (cfg.data.path or cfg.data.streams):
        if topology.rank == 0:
            log(f"validation: off (eval.interval={cfg.eval.interval}, but eval.streams names no held-out data "
                "for this data; list eval.streams to validate)")
        return None
    return Validator(cfg, topology, place, log=log)


def evaluate_held_out(run_dir, *, step: int | None = None, device: str = "auto", tokens: int | None = None) -> dict:
    """`liquid eval RUN --held-out`: the run's validation (eval.streams, eval.tokens, train.seq_len, its
    autocast) on one process over a checkpoint's weights -> {"source", "step", "val/<name>/loss", ...}."""
    import dataclasses
    from pathlib import Path

    from checkpoints.evaluate import resolve_device
    from checkpoints.export import _step_of, load_run_config
    from checkpoints.manager import find_checkpoint, read_model_state
    from parallel.topology import single_process_topology
    from pretrain.model.model import build_model
    from pretrain.train.step import Placement

    from pretrain.train.worker import resolve_device as run_device

    cfg = load_run_config(run_dir)
    if tokens is not None:
        if tokens < 1:
            raise ValueError(f"--tokens must be >= 1, got {tokens}")
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, tokens=tokens))
    ckpt = Path(find_checkpoint(run_dir, step))
    # --device as `liquid eval` reads it; the autocast the run trains with on that device (train.dtype)
    dev, dtype = run_device(dataclasses.replace(cfg.train, device=resolve_device(device)))
    place = Placement(single_process_topology(), dev, dtype)
    model = build_model(cfg.model, dev)
    model.load_state_dict({k: v.float() for k, v in read_model_state(ckpt).items()})
    validator = Validator(cfg, place.topology, place, log=lambda *a, **k: None)
    try:
        scores = validator.run(model)
    finally:
        validator.close()
    scores.pop("val_s", None)
    return {"source": str(ckpt), "step": _step_of(ckpt), **scores}
