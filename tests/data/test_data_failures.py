"""A shard that turns out corrupt in the middle of a run stops it with the shard's name, and the newest
checkpoint (written asynchronously before the bad shard was reached) is complete and resumable."""
import pytest

from data_pipeline.loader import DataCorruptionError
from tests.data.test_loader import write_dataset

VOCAB = 8192


def _config(data_path, run_dir):
    from pretrain.config import load_config

    return load_config("tiny", [
        "parallel.dp=1", "parallel.ep=1", "cluster.num_workers=1", "cluster.launcher=local", "train.device=cpu",
        "train.dtype=fp32", "train.threads=1", "train.seq_len=32", "train.global_batch_size=4",
        "train.micro_batch_size=2", "train.max_steps=40", "train.log_interval=1", f"model.vocab_size={VOCAB}",
        f"data.path={data_path}", "data.shuffle_buffer_blocks=1", "checkpoint.interval=2",
        "checkpoint.export=false", f"run.dir={run_dir}"])


def _first_reads(cfg, steps: int) -> dict[str, int]:
    """The step at which the run first reads each shard file (the loader's own order, read ahead)."""
    from data_pipeline.dataset import build_dataset

    first: dict[str, int] = {}
    with build_dataset(cfg.data, seq_len=cfg.train.seq_len, vocab_size=VOCAB, seed=cfg.train.seed,
                       global_batch=cfg.train.global_batch_size) as rows:
        for step in range(1, steps + 1):
            for stream, shard in sorted(rows.upcoming_shards(cfg.train.global_batch_size)):
                name = rows._streams[stream].table.entry(shard)["raw_data"]["basename"]
                first.setdefault(name, step)
            rows.next_batch(cfg.train.global_batch_size)
    return first


def test_a_corrupt_shard_stops_the_run_by_name_after_the_newest_checkpoint(tmp_path):
    from checkpoints.manifest import find_checkpoint, verify
    from pretrain.train.worker import train_main

    path = write_dataset(tmp_path / "ds", vocab_size=VOCAB)
    cfg = _config(path, tmp_path / "run")
    first = _first_reads(cfg, 40)
    name, step = min(((n, s) for n, s in first.items() if s >= 5), key=lambda item: item[1])
    shard = tmp_path / "ds" / name
    shard.write_bytes(shard.read_bytes()[:-50])
    with pytest.raises(DataCorruptionError, match=f"shard {name} .*truncated or corrupt"):
        train_main(cfg, progress=False)
    newest = find_checkpoint(tmp_path / "run")
    saved = verify(newest)["step"]
    assert saved == (step - 1) // 2 * 2  # the last checkpoint before the step that read the bad shard
