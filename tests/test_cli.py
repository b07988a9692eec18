"""The ``onion`` command as a user runs it: real subprocesses, real embedded Ray."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shards import DatasetError, ShardDataset

ONION = [sys.executable, "-m", "pipeline"]
KILL_RUN = ["ingest", "synthetic", "--count", "3000", "--image-size", "16", "--shard-size", "60", "--workers", "2"]


def onion(*args, **kwargs):
    return subprocess.run([*ONION, *map(str, args)], capture_output=True, text=True, timeout=300, **kwargs)


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


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
    for option in ("--shard-size", "--shard-bytes", "--format", "--max-pixels", "--address", "--workers", "imagefolder:DIR"):
        assert option in result.stdout


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


def test_ingest_inspect_and_refuse_to_overwrite(tmp_path):
    out = tmp_path / "digits"
    assert onion("ingest", "digits", out, "--shard-size", "500", "--workers", "1").returncode == 0
    refused = onion("ingest", "synthetic", out)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [f"onion ingest: error: {out} already holds a different dataset (digits); choose another output or delete it"]
    summary = json.loads(onion("inspect", out, "--format", "json").stdout)
    assert summary["counts"]["total"] == 1797 and summary["accounting"]["ok"] == 1797
    assert sum(sum(c.values()) for c in summary["classes_by_split"].values()) == 1797
    assert sum(s["examples"] for s in summary["shards"]) == 1797
    table = onion("inspect", out).stdout
    assert "Examples by split and status" in table and "train-000000.tar" in table
