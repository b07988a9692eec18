"""Two jobs racing for one output location: exactly one owns it, the other stops with a clear error
before writing anything, and the output is never a mix of the two."""
import subprocess

import pytest

from helpers import ONION, files_of, onion_ok
from shards.verify import verify_dataset

pytestmark = pytest.mark.slow  # a system test: ./run.sh test -m "not slow" leaves it out

SYNTHETIC = ["--count", "600", "--image-size", "16", "--shard-size", "30", "--ray-cpus", "1"]


def race(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    processes = [subprocess.Popen([*ONION, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for command in commands]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=600), *p.communicate()) for p in processes]


def test_two_different_ingests_into_one_output(tmp_path):
    out = tmp_path / "out"
    results = race(["ingest", "synthetic", str(out), *SYNTHETIC, "--seed", "1"],
                   ["ingest", "synthetic", str(out), *SYNTHETIC, "--seed", "2"])
    codes = sorted(result.returncode for result in results)
    assert codes == [0, 2], [r.stderr[-2000:] for r in results]
    winner, loser = sorted(results, key=lambda result: result.returncode)
    message = loser.stderr.strip().splitlines()
    assert len(message) == 1 and str(out) in message[0] and any(
        reason in message[0] for reason in ("being written by another ingest", "holds an unfinished ingest of a "
                                            "different dataset", "ingested with other settings")), message
    assert verify_dataset(str(out))[1] == []
    alone = tmp_path / "alone"
    seed = winner.args[winner.args.index("--seed") + 1]
    onion_ok("ingest", "synthetic", alone, *SYNTHETIC, "--seed", seed, timeout=600)
    raced, clean = files_of(out), files_of(alone)
    raced.pop("manifest.json"), clean.pop("manifest.json")  # their command lines name the outputs
    assert raced == clean  # exactly the winner's dataset, nothing of the loser's


def test_two_identical_ingests_agree(tmp_path):
    out = tmp_path / "out"
    results = race(*[["ingest", "synthetic", str(out), *SYNTHETIC]] * 2)
    assert [result.returncode for result in results] == [0, 0], [r.stderr[-2000:] for r in results]
    assert verify_dataset(str(out))[1] == []


def test_two_trainings_into_one_run_directory(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    onion_ok("ingest", "digits", data, "--ray-cpus", "1", timeout=600)
    train = ["train", str(data), "--out", str(run), "--epochs", "1", "--depth", "1", "--embed-dim", "32",
             "--num-heads", "2", "--loader-workers", "0"]
    results = race([*train, "--seed", "1"], [*train, "--seed", "2"])
    assert sorted(result.returncode for result in results) == [0, 2], [r.stderr[-2000:] for r in results]
    loser = max(results, key=lambda result: result.returncode)
    assert "already holds a run" in loser.stderr
    winner = min(results, key=lambda result: result.returncode)
    config = (run / "config.json").read_text()
    assert f'"seed": {winner.args[-1]}' in config  # the run is the winner's alone
