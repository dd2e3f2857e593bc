"""Placement on a 2-node Ray cluster on one machine (ray.cluster_utils.Cluster: two raylets, one CPU each):
`liquid pretrain` joins it by address, the placement group puts one worker on each node, and the workers'
status files show both nodes with rank 0's node hosting the rendezvous."""
import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def test_workers_spread_over_two_nodes_train(two_nodes, tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "pretrain.cli", "pretrain", "tiny", f"run.dir={run_dir}",
            f"cluster.address={two_nodes.address}", "parallel.dp=2", "parallel.ep=1", "cluster.num_workers=2",
            "train.max_steps=3", "train.log_interval=1", "train.seq_len=64", "train.global_batch_size=4",
            "train.micro_batch_size=2", "data.corpus_max_mb=0.5", "data.tokenizer_vocab_size=512",
            "model.vocab_size=512", "checkpoint.export=false"]
    env = {**os.environ, "LIQUID_CACHE": str(tmp_path / "cache"), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    workers = [json.loads((run_dir / "workers" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(w["status"] == "finished" for w in workers)
    # One worker per node: both of the cluster's nodes appear.
    assert {w["node_id"] for w in workers} == {node.node_id for node in two_nodes.list_all_nodes()}, workers
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world"] == 2 and summary["steps"] == 3
