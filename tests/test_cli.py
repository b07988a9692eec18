"""The ``onion`` command as a user runs it: real subprocesses, real embedded Ray."""
import json
import os
import signal
import subprocess
import time

import pytest

from helpers import ONION, files_of, onion
from shards import DatasetError, ShardDataset

KILL_RUN = ["ingest", "synthetic", "--count", "3000", "--image-size", "16", "--shard-size", "60", "--ray-cpus", "2"]


@pytest.mark.parametrize("args, message", [
    (["ingest", "imagefolder:/no/such/dir", "OUT"], "'/no/such/dir' is not a directory"),
    (["ingest", "nosuch", "OUT"], "unknown source 'nosuch'"),
    (["ingest", "digits", "OUT", "--shard-size", "0"], "must be at least 1"),
    (["inspect", "/no/such/dataset"], "no such dataset"),
])
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, args, message):
    result = onion(*[str(tmp_path / a) if a == "OUT" else a for a in args])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_help_explains_the_options():
    result = onion("ingest", "--help")
    assert result.returncode == 0
    for option in ("--shard-size", "--shard-bytes", "--image-format", "--max-pixels", "--address", "--ray-cpus",
                   "imagefolder:DIR"):
        assert option in result.stdout


@pytest.mark.slow
def test_killed_ingest_rerun_gives_identical_bytes(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert onion(*KILL_RUN[:2], reference, *KILL_RUN[2:]).returncode == 0
    process = subprocess.Popen([*ONION, *KILL_RUN[:2], str(killed), *KILL_RUN[2:]],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((killed / "_parts").glob("*.json"))) < 8:
        assert process.poll() is None, "ingest finished before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the local Ray it started, mid-run
    process.wait()
    assert not (killed / "manifest.json").exists()
    with pytest.raises(DatasetError, match="incomplete"):
        ShardDataset(str(killed))
    rerun = onion(*KILL_RUN[:2], killed, *KILL_RUN[2:])
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed" in rerun.stdout
    resumed, uninterrupted = files_of(killed), files_of(reference)
    manifests = [json.loads(files.pop("manifest.json")) for files in (resumed, uninterrupted)]
    assert resumed == uninterrupted  # every shard and the index, byte for byte
    for manifest in manifests:
        manifest.pop("command")  # names the output directory, which differs here on purpose
    assert manifests[0] == manifests[1]


@pytest.mark.slow  # ~15 s: two ingests and two inspects, each a fresh onion process
def test_ingest_inspect_and_refuse_to_overwrite(tmp_path):
    out = tmp_path / "digits"
    assert onion("ingest", "digits", out, "--shard-size", "500", "--ray-cpus", "1").returncode == 0
    refused = onion("ingest", "synthetic", out)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"onion ingest: error: {out} already holds a different dataset (digits); choose another output or delete it"]
    summary = json.loads(onion("inspect", out, "--format", "json").stdout)
    assert summary["counts"]["total"] == 1797 and summary["accounting"]["ok"] == 1797
    assert sum(sum(c.values()) for c in summary["classes_by_split"].values()) == 1797
    assert sum(s["examples"] for s in summary["shards"]) == 1797
    table = onion("inspect", out).stdout
    assert "Examples by split and status" in table and "train-000000.tar" in table
