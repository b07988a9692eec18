"""Two jobs racing for one output location: exactly one owns it, the other stops with a clear error
before writing anything, and the output is never a mix of the two."""
import os
import signal
import subprocess
import time

import pytest

from helpers import ONION, files_of, onion_ok
from pipeline.ingest.job import PLAN_NAME, IngestOptions, check_output, claim_output, ingest
from pipeline.ingest.sources import SourceOptions, open_source
from shards import DatasetError, location
from shards.urls import Location, is_temporary
from shards.verify import verify_dataset

SYNTHETIC = ["--count", "600", "--image-size", "16", "--shard-size", "30", "--ray-cpus", "1"]


def race(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    processes = [subprocess.Popen([*ONION, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for command in commands]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=600), *p.communicate()) for p in processes]


@pytest.mark.slow  # a system test: ./run.sh test -m "not slow" leaves it out
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


@pytest.mark.slow  # a system test: ./run.sh test -m "not slow" leaves it out
def test_two_identical_ingests_agree(tmp_path):
    out = tmp_path / "out"
    results = race(*[["ingest", "synthetic", str(out), *SYNTHETIC]] * 2)
    assert [result.returncode for result in results] == [0, 0], "\n---\n".join(r.stderr[-3000:] for r in results)
    assert verify_dataset(str(out))[1] == []


@pytest.mark.slow  # a system test: ./run.sh test -m "not slow" leaves it out
@pytest.mark.parametrize("pause_after", ["link OUT/_ingest.json", "temp OUT/_parts/"],
                         ids=["claimed", "writing-a-part"])
def test_a_twin_that_finishes_first_completes_the_other(tmp_path, pause_after):
    """The same ingest twice on one output, the second paused right after a chosen write (in the driver
    when it has claimed the output; in a Ray worker with a shard's record in a temporary under _parts/)
    while the first runs to its end and removes its bookkeeping (_parts/ with that temporary): the paused
    one, continued, ends well too, and leaves the same dataset."""
    out, counter = tmp_path / "out", tmp_path / "boundaries"
    command = [*ONION, "ingest", "synthetic", str(out), *SYNTHETIC]
    paused = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True,
                              env={**os.environ, "ONION_FAULT_COUNTER": str(counter), "ONION_FAULT_AT": "1",
                                   "ONION_FAULT_SIGNAL": "STOP",
                                   "ONION_FAULT_MATCH": pause_after.replace("OUT", str(out))})
    try:
        pid = wait_for_pause(counter, pause_after.replace("OUT", str(out)), paused)
        onion_ok("ingest", "synthetic", out, *SYNTHETIC, timeout=600)
        # the paused job's temporary aside
        finished = {name: data for name, data in files_of(out).items() if not is_temporary(name)}
        os.kill(pid, signal.SIGCONT)
        stdout, stderr = paused.communicate(timeout=600)
    finally:
        if paused.poll() is None:
            os.killpg(paused.pid, signal.SIGKILL)
    assert paused.returncode == 0, stderr[-3000:]
    assert verify_dataset(str(out))[1] == []
    assert files_of(out) == finished  # the twin's dataset, unchanged by the one that came second


def wait_for_pause(counter, match: str, process: subprocess.Popen, timeout: float = 600) -> int:
    """The process that reached the first boundary matching ``match``, once it is stopped there (state T)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        lines = [line for line in (counter.read_text() if counter.exists() else "").splitlines() if match in line]
        if lines:
            pid = int(lines[0].split()[0])
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "T":
                    return pid
        time.sleep(0.05)
    raise AssertionError(f"the ingest did not reach {counter} within {timeout} s")


@pytest.mark.slow  # a system test: ./run.sh test -m "not slow" leaves it out
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


@pytest.mark.parametrize("twin", ["same", "different"])
def test_a_claim_made_between_the_checks_and_the_listing_is_judged_as_a_claim(tmp_path, monkeypatch, twin):
    """The window CI once hit by chance, made deterministic: a twin claims the output (and writes a shard)
    after this job found no plan and no manifest, before it lists the folder. A same-dataset twin is
    joined; a different dataset's owner is named; neither is called a foreign folder."""
    dataset, source = location(str(tmp_path / "out")), open_source("digits")
    listing = Location.list_names

    def claimed_just_before_listing(self: Location) -> list[str]:
        if not dataset.exists(PLAN_NAME):
            claim_output(dataset, "fingerprint" if twin == "same" else "other", source, IngestOptions())
            dataset.write_atomic("shard-000000.tar", b"a shard the owner has written")
        return listing(self)

    monkeypatch.setattr(Location, "list_names", claimed_just_before_listing)
    if twin == "same":
        assert check_output(dataset, "fingerprint", source, IngestOptions()) is False
    else:
        with pytest.raises(DatasetError, match="holds an unfinished ingest of a different dataset"):
            check_output(dataset, "fingerprint", source, IngestOptions())


@pytest.fixture(scope="module")
def finished_elsewhere(ray_local, tmp_path_factory) -> bytes:
    """The manifest of a finished ingest of another dataset (synthetic), to plant where a job looks."""
    out = tmp_path_factory.mktemp("finished") / "out"
    ingest(open_source("synthetic", SourceOptions(count=20, image_size=8)), str(out), IngestOptions(shard_size=10),
           command=["test"], progress=False)
    return (out / "manifest.json").read_bytes()


def test_a_plan_removed_between_its_check_and_its_read_is_judged_by_what_its_job_left(tmp_path, monkeypatch,
                                                                                      finished_elsewhere):
    """Another dataset's job holds the output; it finishes (its manifest in, its plan out) after this job
    saw the plan and before it read it: the one-line error names what the output holds, no traceback."""
    out = tmp_path / "out"
    dataset, source = location(str(out)), open_source("digits")
    claim_output(dataset, "other", open_source("synthetic"), IngestOptions())
    reading = Location.read_bytes

    def finished_before_the_read(self: Location, *parts: str) -> bytes:
        if parts == (PLAN_NAME,) and not (out / "manifest.json").exists():
            (out / "manifest.json").write_bytes(finished_elsewhere)
            (out / PLAN_NAME).unlink()
        return reading(self, *parts)

    monkeypatch.setattr(Location, "read_bytes", finished_before_the_read)
    with pytest.raises(DatasetError, match="already holds a different dataset .synthetic"):
        check_output(dataset, "fingerprint", source, IngestOptions())
    monkeypatch.undo()
    (out / "manifest.json").unlink()  # the claim's own read: the same
    claim_output(dataset, "other", open_source("synthetic"), IngestOptions())
    monkeypatch.setattr(Location, "read_bytes", finished_before_the_read)
    with pytest.raises(DatasetError, match="already holds a different dataset .synthetic"):
        claim_output(dataset, "fingerprint", source, IngestOptions())


def test_a_claim_after_another_job_finished_there_stops_and_leaves_no_plan(tmp_path, finished_elsewhere):
    """The output was empty when this job checked it; another dataset's job then claimed, finished and
    removed its plan before this one claimed: this one stops, naming it, and leaves its manifest alone."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_bytes(finished_elsewhere)
    with pytest.raises(DatasetError, match="already holds a different dataset .synthetic"):
        claim_output(location(str(out)), "fingerprint", open_source("digits"), IngestOptions())
    assert sorted(path.name for path in out.iterdir()) == ["manifest.json"]
    assert (out / "manifest.json").read_bytes() == finished_elsewhere


def test_removing_what_a_twin_removed_first_is_not_an_error(tmp_path, monkeypatch):
    """Two jobs cleaning the same stale file: both saw it, the other removed it first."""
    folder = location(str(tmp_path))
    seen = type(folder.fs).exists
    monkeypatch.setattr(type(folder.fs), "exists", lambda fs, path, **kw: True if path.endswith("gone") else
                        seen(fs, path, **kw))
    folder.remove("gone")  # the file is not there: the twin removed it after our look
    folder.remove("folder-gone", recursive=True)
