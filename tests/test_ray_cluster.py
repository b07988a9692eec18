"""A real two-node Ray cluster on this machine (``ray start --head`` plus ``ray start --address``,
each with its own custom resource): ingest and EL2N scoring joined with ``--address`` run tasks on both
nodes and give the same bytes as a single-node run."""
import os
import re
import subprocess
from pathlib import Path

import pytest

from helpers import files_of, onion
from loopback import RAY_CLUSTER_ENV, LoopbackRayCluster
from shards import location
from shards.selections import read_selection
from trainer.config import TrainConfig
from trainer.launch import train

pytestmark = pytest.mark.slow  # a system test: ./run.sh test -m "not slow" leaves it out

SOURCE = ["synthetic", "--count", "1200", "--image-size", "16", "--shard-size", "60"]
NODES = re.compile(r"on (\d+) Ray nodes? \(([^)]*)\)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LoopbackRayCluster(str(tmp_path_factory.mktemp("ray-logs"))) as loopback:
        loopback.add_node()
        yield loopback.address


def onion_on(*args: str, address: str | None = None) -> subprocess.CompletedProcess:
    """``onion ARGS`` joined to the Ray cluster at ``address``, or with an embedded Ray of 2 CPUs; it must succeed."""
    env = {**os.environ, **(RAY_CLUSTER_ENV if address else {"RAY_ADDRESS": ""})}
    command = [*args, *(["--address", address] if address else ["--ray-cpus", "2"])]
    result = onion(*command, timeout=600, env=env)
    assert result.returncode == 0, f"onion {' '.join(command)}:\n{result.stderr[-3000:]}"
    return result


def nodes_used(output: str) -> int:
    found = NODES.search(output)
    assert found, output
    return int(found.group(1))


def test_ingest_and_scoring_use_both_nodes_and_equal_a_single_node_run(cluster, tmp_path):
    single, spread = tmp_path / "single", tmp_path / "cluster"
    onion_on("ingest", *SOURCE[:1], str(single), *SOURCE[1:])
    result = onion_on("ingest", *SOURCE[:1], str(spread), *SOURCE[1:], address=cluster)
    assert nodes_used(result.stdout) == 2
    reference = files_of(single)
    assert files_of(spread).keys() == reference.keys()
    for name, data in files_of(spread).items():
        if name != "manifest.json":  # it records the command line, which names the output
            assert data == reference[name], name

    run = tmp_path / "run"
    train(TrainConfig(dataset=str(single), out=str(run), epochs=1, depth=2, embed_dim=32, num_heads=2, patch_size=4,
                      batch_size=64, loader_workers=0, seed=0))
    onion_on("score", str(single), "el2n", "--run", str(run))
    result = onion_on("score", str(spread), "el2n", "--run", str(run), address=cluster)
    assert nodes_used(result.stderr) == 2
    scores = [files_of(root / "scores") for root in (single, spread)]  # el2n.json and its parts
    assert scores[0] == scores[1] and "el2n.json" in scores[0]


def test_cluster_launcher_config_passes_rays_schema():
    import yaml
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load((Path(__file__).parent.parent / "ray_cluster.yaml").read_text())
    validate_config(fillout_defaults(config))  # raises on a field Ray does not know or a missing one
    assert config["provider"]["type"] == "aws" and config["head_node_type"] in config["available_node_types"]
    assert any("pip install" in command and "onion" in command for command in config["setup_commands"])


CURATE = ["--rounds", "2", "--round-epochs", "2", "--remove-n", "30", "--depth", "1", "--embed-dim", "32",
          "--num-heads", "2", "--patch-size", "4", "--batch-size", "64", "--loader-workers", "0"]
WORKER_NODE = re.compile(r"Ray Train worker (\d) of 2 on node (\w+)")


def test_curate_on_two_ray_train_workers_across_the_nodes_selects_as_nproc_2(cluster, tmp_path):
    """Each round's training on 2 Ray Train workers, one on each node of the cluster, gives the selections of
    ``--nproc 2`` on one machine (the same threads per rank: the machine's CPUs shared by 2)."""
    source = tmp_path / "source"
    onion_on("ingest", "synthetic", str(source), "--count", "600", "--image-size", "16", "--shard-size", "100")
    local, spread = tmp_path / "local", tmp_path / "spread"
    for data in (local, spread):
        subprocess.run(["cp", "-r", str(source), str(data)], check=True)
    onion_on("curate", str(local), "--out", str(tmp_path / "run-nproc"), "--nproc", "2", *CURATE)
    result = onion_on("curate", str(spread), "--out", str(tmp_path / "run-ray"), "--ray-workers", "2", *CURATE,
                      address=cluster)
    workers = {rank: node for rank, node in WORKER_NODE.findall(result.stderr)}
    assert set(workers) == {"0", "1"} and len(set(workers.values())) == 2, result.stderr[-3000:]
    versions = [sorted(name for name in os.listdir(data / "selections") if name.endswith(".json"))
                for data in (local, spread)]
    assert len(versions[0]) == 2 and versions[0] == versions[1]
    versions = versions[0]
    for name in versions:
        tables = [read_selection(location(str(data)), name.removesuffix(".json"), columns=["key", "kept", "reason"])
                  for data in (local, spread)]
        assert tables[0].equals(tables[1]), name
