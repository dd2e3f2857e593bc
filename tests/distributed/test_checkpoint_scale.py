"""Loading a checkpoint costs each rank less, not more, as the ranks grow: at DP=2 and DP=4 (ZeRO-2) every
rank hashes a 1/world share of the files, reads only the rows of its fragments and its own rank file, and
the restored state trains on exactly as the single-process reference (tests/distributed/test_reshard.py).
A corrupted shard is found by the rank that hashes it and reported on every rank.

Each rank starts its load as a restarted worker would: nothing verified in its process, a freshly
initialised engine. What it opens and reads is counted twice: by the manager (verify_stats, load_stats)
and by a wrapper around safetensors.safe_open installed in the rank.
"""
import pytest
import torch
import torch.distributed as dist

from pretrain.config import ParallelConfig
from tests.distributed.harness import run_distributed
from tests.distributed.test_reshard import (MODEL, ROWS, SAVE_AT, SEQ, STEPS, _build, _check, _manager, _train,
                                            _weights, reference)  # noqa: F401 (reference: a fixture)

ZERO = 2


class _Loader:
    """The data loader's checkpoint interface: a position per DP rank, and what a load gave it."""

    def __init__(self, position):
        self.position, self.loaded = position, None

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state

    def load_rank_states(self, states: list[dict]) -> None:
        self.loaded = states


def _count_safe_open() -> dict:
    """Wrap safetensors.safe_open in this process: the files opened and the bytes of the tensors read."""
    import safetensors

    counted = {"files": set(), "bytes": 0}
    real = safetensors.safe_open

    def count(t):
        counted["bytes"] += t.numel() * t.element_size()
        return t

    class Slice:
        def __init__(self, s):
            self.s = s

        def __getitem__(self, index):
            return count(self.s[index])

    class Handle:
        def __init__(self, path, **kwargs):
            self.h = real(path, **kwargs)
            counted["files"].add(path.rsplit("/", 1)[-1])

        def keys(self):
            return self.h.keys()

        def get_tensor(self, key):
            return count(self.h.get_tensor(key))

        def get_slice(self, key):
            return Slice(self.h.get_slice(key))

    safetensors.safe_open = Handle
    return counted


def _load_fresh(topology, world, ckpt_or_auto, run_dir):
    """A restarted worker's load: forget what this process verified, build a differently initialised
    engine, verify together (resume=auto) or take the given checkpoint, load, train steps 3-4."""
    from checkpoints import manifest

    manifest._VERIFIED.clear()
    model, engine = _build(topology, world, 1, ZERO, seed=1)
    manager, loader = _manager(run_dir, topology, world, 1, ZERO), _Loader(None)
    ckpt = manager.resume_target("auto") if ckpt_or_auto == "auto" else ckpt_or_auto
    manager.load(ckpt, engine, loader)
    losses = _train(model, engine, topology, world, range(SAVE_AT + 1, STEPS + 1))
    files = manifest.read_manifest(ckpt)["files"]
    loaded = sorted(manager.load_stats.files)
    return manager, engine, {
        "loader": loader.loaded, "losses": losses, "weights": _weights(model), "ep_rank": 0,
        "verify": (sorted(manager.verify_stats.files), manager.verify_stats.bytes),
        "tensor_files": [f for f in loaded if f.endswith(".safetensors")],
        "json_files": [f for f in loaded if f.endswith(".json")],
        "tensor_bytes": manager.load_stats.bytes - sum(files[f]["bytes"] for f in loaded if f.endswith(".json")),
        "saved_tensor_bytes": sum(v["bytes"] for f, v in files.items() if f.endswith(".safetensors"))}


def _corrupt_newest(rank, world, manager, engine, run_dir) -> dict:
    """Save step 4, flip a byte of the last rank's shard, verify together: every rank reports it."""
    from checkpoints import manifest
    from checkpoints.manager import step_dir_name

    manager.save(STEPS, STEPS * ROWS * SEQ, engine, _Loader(rank))
    ckpt = run_dir / "checkpoints" / step_dir_name(STEPS)
    bad = f"rank{world - 1:05d}.safetensors"
    if rank == 0:
        data = bytearray((ckpt / bad).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (ckpt / bad).write_bytes(bytes(data))
    dist.barrier()
    manifest._VERIFIED.clear()  # rank 0 wrote the manifest: it would not hash its share again
    out = {"bad": bad, "hashed_by_me": bad in manifest.hash_share(manifest.read_manifest(ckpt), rank, world)}
    try:
        manager.verify(ckpt)
    except manifest.CorruptCheckpoint as err:
        out["error"] = str(err)
    messages = []
    manager.log = messages.append
    out["fallback"], out["messages"] = manager.resume_target("auto").name, messages
    return out


def _rank(rank, world, run_dir, reshard_from):
    from parallel.topology import build_topology, destroy_topology

    topology = build_topology(ParallelConfig(dp=world, ep=1), seq_len=SEQ, num_experts=MODEL.moe.num_experts)
    model, engine = _build(topology, world, 1, ZERO, seed=0)
    _train(model, engine, topology, world, range(1, SAVE_AT + 1))
    _manager(run_dir, topology, world, 1, ZERO).save(SAVE_AT, SAVE_AT * ROWS * SEQ, engine, _Loader(rank))
    counted = _count_safe_open()
    manager, engine, out = _load_fresh(topology, world, "auto", run_dir)
    out["counted"] = (sorted(counted["files"]), counted["bytes"])
    out["corrupt"] = _corrupt_newest(rank, world, manager, engine, run_dir)
    if reshard_from is not None:  # another world's checkpoint: a changed layout
        out["resharded"] = _load_fresh(topology, world, reshard_from, run_dir)[2]
    destroy_topology()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from checkpoints.manager import find_checkpoint

    dp2 = tmp_path_factory.mktemp("dp2")
    out = {2: run_distributed(_rank, 2, dp2, None, timeout=600)}
    out[4] = run_distributed(_rank, 4, tmp_path_factory.mktemp("dp4"), find_checkpoint(dp2, 2), timeout=600)
    return out


def test_each_rank_reads_its_own_share_and_no_more_as_the_world_grows(runs):
    for ranks in runs.values():
        for rank, r in enumerate(ranks):
            assert (r["tensor_files"], r["tensor_bytes"]) == r["counted"]  # the manager counts what it reads
            assert r["json_files"] == [f"rank{rank:05d}.json"]  # its own loader position and RNG only
            assert 1 <= len(r["tensor_files"]) <= 2, r["tensor_files"]  # its own shard and its predecessor's
    per_rank = {world: max(r["tensor_bytes"] for r in ranks) for world, ranks in runs.items()}
    # Each rank reads the rows of its fragments: about half of the state at DP=2, a quarter at DP=4.
    assert per_rank[2] <= 0.6 * runs[2][0]["saved_tensor_bytes"], per_rank
    assert per_rank[4] <= 0.6 * per_rank[2], per_rank


def test_verification_is_shared_every_file_hashed_once(runs):
    for world, ranks in runs.items():
        hashed = [f for r in ranks for f in r["verify"][0]]
        assert len(hashed) == len(set(hashed)) == 2 * world  # every rank's shard and rank file, once
        # A file is hashed whole, so the shares are as even as the files: within 1.5x of 1/world here.
        total = sum(r["verify"][1] for r in ranks)
        assert max(r["verify"][1] for r in ranks) <= 1.5 * total / world, [r["verify"] for r in ranks]
    assert max(r["verify"][1] for r in runs[4]) <= 0.75 * max(r["verify"][1] for r in runs[2])


def test_the_loaded_state_trains_as_the_reference(runs, reference):
    for world, ranks in runs.items():
        _check(ranks, reference, ep=1)
        assert [r["loader"] for r in ranks] == [{"position": rank} for rank in range(world)]


def test_a_changed_layout_merges_every_saved_position(runs, reference):
    resharded = [r["resharded"] for r in runs[4]]
    _check(resharded, reference, ep=1)
    assert all(r["loader"] == [{"position": 0}, {"position": 1}] for r in resharded)
    # Rank 0 read the two saved rank files and broadcast the positions; the others read none.
    assert [len(r["json_files"]) for r in resharded] == [2, 0, 0, 0]


def test_a_corrupt_shard_is_found_by_its_rank_and_reported_on_every_rank(runs):
    for world, ranks in runs.items():
        bad = ranks[0]["corrupt"]["bad"]
        assert [r["corrupt"]["hashed_by_me"] for r in ranks] == [rank == world - 1 for rank in range(world)]
        want = f"step_{STEPS:08d}/{bad}: sha256 does not match the manifest"
        assert all(r["corrupt"]["error"] == want for r in ranks)
        assert all(r["corrupt"]["fallback"] == f"step_{SAVE_AT:08d}" for r in ranks)
        assert ranks[0]["corrupt"]["messages"] == [f"checkpoint: skipping {want}"]
        assert all(r["corrupt"]["messages"] == [] for r in ranks[1:])
