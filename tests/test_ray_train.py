"""``onion train --ray-workers N``: Ray Train's CPU workers train with the exact-once reader, to the weights of
``--nproc N``; a worker killed mid-epoch is restarted by Ray Train and the run ends with the same weights."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from helpers import assert_same_weights, last_weights, onion_ok
from pipeline.curation.selection import SourceExamples
from shards import location
from trainer.dynamics import read_dynamics
from trainer.run_folder import DYNAMICS, dynamics_part

pytestmark = pytest.mark.slow  # each trains through an embedded Ray of its own (~30 s)

TINY = ("--epochs", "2", "--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--patch-size", "4",
        "--batch-size", "64", "--loader-workers", "0", "--token-keep", "0.5", "--checkpoint-every", "5")


@pytest.fixture(scope="module")
def on_two_processes(digits, tmp_path_factory) -> Path:
    """The run as ``--nproc 2`` trains it: the weights every 2-worker run must end with."""
    run = tmp_path_factory.mktemp("nproc") / "run"
    onion_ok("train", digits, "--out", run, "--nproc", "2", *TINY, timeout=600)
    return run


def test_two_ray_train_workers_read_each_example_once_per_epoch_to_the_weights_of_nproc_2(digits, on_two_processes,
                                                                                           tmp_path):
    run = tmp_path / "run"
    onion_ok("train", digits, "--out", run, "--ray-workers", "2", "--ray-cpus", "2", *TINY, timeout=600)
    dynamics = read_dynamics(location(str(run)), ["key", "epoch"])
    presented = Counter(zip(dynamics["epoch"].to_pylist(), dynamics["key"].to_pylist()))
    train_keys = set(SourceExamples.of(location(digits)).keys.tolist())
    for epoch in (0, 1):  # every train example once per epoch, over the 2 workers' shares
        assert {key for (at, key), count in presented.items() if at == epoch and count == 1} == train_keys
    assert max(presented.values()) == 1
    assert {name.split("-s")[0] for name in os.listdir(run / DYNAMICS)} == {"part-r0", "part-r1"}
    assert_same_weights(last_weights(run), last_weights(on_two_processes))


def test_a_ray_train_worker_killed_mid_epoch_is_restarted_and_the_run_ends_with_the_same_weights(
        digits, on_two_processes, tmp_path):
    """Rank 1 dies right after writing its dynamics at step 10 (of 12 in the first epoch), before rank 0 commits
    that checkpoint: Ray Train starts the workers again, they continue from step 5's checkpoint."""
    run, counter = tmp_path / "run", tmp_path / "boundaries.txt"
    fault = {"ONION_FAULT_COUNTER": str(counter), "ONION_FAULT_AT": "2", "ONION_FAULT_SIGNAL": "DIE",
             "ONION_FAULT_MATCH": f"rename {run / DYNAMICS / dynamics_part(1, 0).split('-s')[0]}-"}
    onion_ok("train", digits, "--out", run, "--ray-workers", "2", "--ray-cpus", "2", *TINY, timeout=600,
                      env={**os.environ, **fault})
    lines = [line.split(" ", 2) for line in counter.read_text().splitlines()]
    killed = next(pid for pid, kind, path in lines if path == str(run / DYNAMICS / dynamics_part(1, 10)))
    assert lines[-1][0] != killed  # the killed worker wrote nothing after its death; a new one finished the run
    assert [path for pid, kind, path in lines if pid == killed][-1] == str(run / DYNAMICS / dynamics_part(1, 10))
    assert any(pid != killed and path == str(run / DYNAMICS / dynamics_part(1, 10)) and kind == "rename"
               for pid, kind, path in lines)  # step 10 trained again, after the restart
    assert_same_weights(last_weights(run), last_weights(on_two_processes))
