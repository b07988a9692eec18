"""Crash consistency: ingest, score, select, materialize and train are killed, with the embedded Ray
they started, and after every kill no file is visible under its final name unless it is complete;
once a re-run finishes, the output equals an uninterrupted run: bytes for datasets, scores and
selections, weights and dynamics for training.

Kills are placed two ways:

* at write boundaries (``shards.faults``): an uninterrupted run of each command, counted, gives its
  N boundaries (each temporary written, each rename or link into place, each temporary dropped,
  each removal); the command is then run once per chosen boundary k, SIGKILLed at exactly the
  k-th one, checked, and re-run to the end. ``ONION_FAULT_POINTS=all`` tries every boundary (the
  figure in docs/guarantees.md); by default an evenly spaced few per command. Commands run with
  ``--ray-cpus 1``, so the numbering is the same from run to run.
* at random wall-clock times (``ONION_KILL_POINTS`` per command, default 1, seeds fixed), with Ray
  using two CPUs, so kills also land between concurrent writers.

``ONION_FAULT_PARALLEL`` (default 3) runs that many killed workspaces at once; with ``-s`` each
command prints ``JOB: N of N write boundaries survived``.
"""
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import files_of
from pipeline.curation.scoring import read_scores, write_scores
from pipeline.curation.selection import SourceExamples, initial_round
from pipeline.ingest.job import IngestOptions, ingest
from pipeline.ingest.sources import SourceOptions, open_source
from shards import location
from shards.faults import COUNTER, FAULT_AT, kill_session, read_boundaries
from shards.selections import save_selection
from shards.urls import TEMP_MARKER, TEMPORARY
from trainer.config import TrainConfig
from trainer.dynamics import read_dynamics
from trainer.launch import train

pytestmark = pytest.mark.slow  # a system test: ./run.sh test -m "not slow" leaves it out

ONION = [sys.executable, "-m", "pipeline"]
KILL_POINTS = int(os.environ.get("ONION_KILL_POINTS", "1"))
FAULT_POINTS = os.environ.get("ONION_FAULT_POINTS", "2")  # "all", or how many boundaries per command
PARALLEL = int(os.environ.get("ONION_FAULT_PARALLEL", "3"))
TIMEOUT = 600
CLEAN_UP = ("ingest", "materialize")  # they delete a killed run's temporaries; the others leave them
TINY = ["--depth", "2", "--embed-dim", "32", "--num-heads", "2", "--patch-size", "4", "--batch-size", "16",
        "--loader-workers", "0", "--seed", "1"]


@dataclass
class Job:
    """One command on one output: how to start it, how to continue it, and what it writes."""

    name: str
    command: list[str]
    written: str  # the path, relative to the workspace, that the command produces
    resume: list[str] = field(default_factory=list)  # used instead of ``command`` once this file exists...
    resume_when: str = ""  # ...relative to the workspace

    def argv(self, workspace: Path, ray_cpus: str | None = None) -> list[str]:
        continuing = self.resume and (workspace / self.resume_when).exists()
        args = [str(workspace / a[1:]) if a.startswith("@") else a
                for a in (self.resume if continuing else self.command)]
        if ray_cpus and "--ray-cpus" in args:
            args[args.index("--ray-cpus") + 1] = ray_cpus
        return [*ONION, *args]


JOBS = [
    Job("ingest", ["ingest", "synthetic", "@out", "--count", "400", "--image-size", "16", "--shard-size", "100",
                   "--ray-cpus", "2"], "out"),
    # whole folders, so a re-run that wrote a second file (a v0003 selection, say) is caught too
    Job("score", ["score", "@data", "el2n", "--run", "@run", "--ray-cpus", "2"], "data/scores"),
    Job("select", ["select", "@data", "--strategy", "drop-easy", "--scores", "el2n-base", "--keep", "0.5",
                   "--seed", "3", "--ray-cpus", "2"], "data/selections"),  # a partitioned dataset: Ray actors
    Job("materialize", ["materialize", "@data", "--selection", "v0001", "--ray-cpus", "2"], "data/kept/v0001"),
    Job("train", ["train", "@data", "--out", "@out", "--epochs", "2", "--checkpoint-every", "30", *TINY], "out",
        resume=["train", "--resume", "@out"], resume_when="out/config.json"),
]


@pytest.fixture(scope="module")
def base(ray_local, tmp_path_factory):
    """A dataset with a selection and EL2N scores of a trained run: what the later commands start from."""
    root = tmp_path_factory.mktemp("crash-base")
    data, run = root / "data", root / "run"
    ingest(open_source("synthetic", SourceOptions(count=900, image_size=16)), str(data), IngestOptions(shard_size=60),
           command=["test"], progress=False)
    train(TrainConfig(dataset=str(data), out=str(run), epochs=1, depth=2, embed_dim=32, num_heads=2, patch_size=4,
                      batch_size=64, loader_workers=0))
    save_selection(location(str(data)), initial_round(SourceExamples.of(location(str(data))), 0.8, 0), {"test": True})
    subprocess.run([*ONION, "score", str(data), "el2n", "--run", str(run), "--ray-cpus", "2"], check=True,
                   capture_output=True, timeout=300)
    scores = location(str(data))  # the scores under another name, so the score job writes a new one
    write_scores(scores, "el2n-base", read_scores(scores, "el2n"))
    shutil.rmtree(data / "scores" / "parts" / "el2n")
    (data / "scores" / "el2n.json").unlink()
    return root


@dataclass
class Reference:
    """An uninterrupted, counted run of a job: its output and the write boundaries it passed."""

    workspace: Path
    files: dict
    boundaries: list[str]
    seconds: float


@pytest.fixture(scope="module")
def references(base, tmp_path_factory):
    made: dict[str, Reference] = {}

    def of(job: Job) -> Reference:
        if job.name not in made:
            space = workspace_from(base, tmp_path_factory.mktemp(f"reference-{job.name}") / "space")
            counter = space.parent / "boundaries"
            seconds = run_to_end(job, space, {COUNTER: str(counter)})
            made[job.name] = Reference(space, comparable(job, files_of(space / job.written)),
                                       [describe(b, space) for b in read_boundaries(str(counter))], seconds)
        return made[job.name]

    return of


def workspace_from(base: Path, target: Path) -> Path:
    shutil.copytree(base, target, symlinks=True)
    return target


def describe(boundary: tuple[int, str, str], workspace: Path) -> str:
    """``rename out/train-000001.tar``: a boundary without what differs between runs (pids, workspace)."""
    _, kind, path = boundary
    return f"{kind} {TEMPORARY.sub(TEMP_MARKER + '*', os.path.relpath(path, workspace))}"


def comparable(job: Job, files: dict[str, bytes]) -> dict:
    """Drop what legitimately differs between two runs: the output path in manifests' command line,
    wall-clock figures and the run path in training's bookkeeping (weights and dynamics stay)."""
    if job.name == "train":
        return {name: data for name, data in files.items() if name.endswith((".safetensors", ".parquet"))}
    kept = {}
    for name, data in files.items():
        if TEMPORARY.search(name) and job.name not in CLEAN_UP:
            continue  # a killed writer's temporary: garbage no reader opens (reported, see stale_temporaries)
        if name.endswith("manifest.json"):
            manifest = json.loads(data)
            manifest.pop("command")
            manifest.pop("source")  # a re-sharded dataset's source names the workspace
            data = json.dumps(manifest, sort_keys=True).encode()
        kept[name] = data
    return kept


def check_after_kill(job: Job, workspace: Path, reference: dict[str, bytes]) -> None:
    """Whatever is visible under a final name is complete: equal to the uninterrupted run's file."""
    visible = files_of(workspace / job.written) if (workspace / job.written).exists() else {}
    if job.name == "train":
        checkpoints = workspace / job.written / "checkpoints"
        if (checkpoints / "latest.json").exists():  # the pointer is written last, so what it names is whole
            folder = checkpoints / f"step-{json.loads((checkpoints / 'latest.json').read_text())['step']:09d}"
            load_file(str(folder / "model.safetensors"))
            for name in ("state.pt", "rng-r0.pt"):
                torch.load(folder / name, weights_only=False)
        return
    complete = comparable(job, visible)
    for name, data in complete.items():
        if TEMP_MARKER in name or name not in reference:
            continue  # temporaries and resume bookkeeping (_ingest.json, _parts/) are not results
        assert data == reference[name], f"{job.name}: {name} is visible but differs from the uninterrupted run"
    if "manifest.json" in complete:  # the commit point: once it is there, everything is
        assert {n: d for n, d in complete.items() if n in reference} == reference


def check_rerun_equals(job: Job, workspace: Path, ref: Reference) -> None:
    if job.name == "train":  # the newest checkpoint's weights, whatever the step folder names are
        final = [load_file(str(sorted((space / "out" / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))
                 for space in (ref.workspace, workspace)]
        assert final[0].keys() == final[1].keys()
        assert all(torch.equal(final[0][name], final[1][name]) for name in final[0]), "train: weights differ"
        order = [("step", "ascending"), ("key", "ascending")]
        rows = [read_dynamics(location(str(space / "out"))).sort_by(order) for space in (ref.workspace, workspace)]
        assert rows[0].equals(rows[1]), "train: dynamics differ"  # every presentation once, as if never interrupted
    else:
        assert comparable(job, files_of(workspace / job.written)) == ref.files, f"{job.name}: re-run differs"


def run_to_end(job: Job, workspace: Path, env: dict | None = None) -> float:
    started = time.perf_counter()
    result = subprocess.run(job.argv(workspace, ray_cpus="1"), capture_output=True, text=True, timeout=TIMEOUT,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, f"{job.name}: {result.stderr[-3000:]}"
    return time.perf_counter() - started


def chosen_boundaries(count: int) -> list[int]:
    """Every boundary (1..count) for ``ONION_FAULT_POINTS=all``, else that many, evenly spaced
    (the middle of equal stretches: 1 of 29 is boundary 15)."""
    wanted = count if FAULT_POINTS == "all" else min(count, int(FAULT_POINTS))
    return [int((i + 0.5) * count / wanted) + 1 for i in range(wanted)]


def stale_temporaries(workspace: Path) -> list[str]:
    return sorted(p.relative_to(workspace).as_posix() for p in workspace.rglob("*") if TEMPORARY.search(p.name))


@dataclass
class Outcome:
    failure: str | None  # what went wrong, or None: nothing partial was visible and the re-run equals the reference
    stale: list[str]  # temporaries of the killed run still there after the re-run (garbage, never read)


def killed_at_boundary(job: Job, base: Path, ref: Reference, at: int, scratch: Path) -> Outcome:
    """Kill a fresh run at boundary ``at``, check, re-run to the end, compare."""
    space = workspace_from(base, scratch / "space")
    counter = scratch / "boundaries"
    where = f"boundary {at} ({ref.boundaries[at - 1]})"
    process = subprocess.Popen(job.argv(space, ray_cpus="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True, env={**os.environ, COUNTER: str(counter), FAULT_AT: str(at)})
    try:
        _, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        kill_session(process.pid)  # nothing of it may run on (the hook already killed it all)
    passed = [describe(b, space) for b in read_boundaries(str(counter))]
    if process.returncode == 0 or passed != ref.boundaries[:at]:
        return Outcome(f"{where}: not reached the same way (exit {process.returncode}, passed {len(passed)}, "
                       f"last {passed[-1:]}): {stderr.decode()[-1500:]}", [])
    left = sorted(p.relative_to(space).as_posix() for p in (space / job.written).rglob("*")) \
        if (space / job.written).is_dir() else []
    try:
        check_after_kill(job, space, ref.files)
        run_to_end(job, space)
        check_rerun_equals(job, space, ref)
    except AssertionError as error:
        return Outcome(f"{where}, leaving {left}: {str(error)[:3000]}", [])
    stale = stale_temporaries(space)
    shutil.rmtree(space, ignore_errors=True)
    return Outcome(None, stale)


@pytest.mark.timeout(3600 if FAULT_POINTS == "all" else 600)  # every boundary of train takes ~12 min on 2 CPUs
@pytest.mark.parametrize("job", JOBS, ids=[job.name for job in JOBS])
def test_killed_at_write_boundaries_then_rerun_equals_uninterrupted(base, references, tmp_path, job):
    ref = references(job)
    count = len(ref.boundaries)
    assert count > 0, f"{job.name}: no write boundary counted; is the hook in shards.urls.Location wired?"
    points = chosen_boundaries(count)
    with ThreadPoolExecutor(PARALLEL) as pool:
        outcomes = list(pool.map(lambda at: killed_at_boundary(job, base, ref, at, tmp_path / f"at-{at}"), points))
    failed = [outcome.failure for outcome in outcomes if outcome.failure]
    assert not failed, f"{job.name}: {len(failed)} of {len(points)} boundaries failed:\n" + "\n".join(failed)
    kinds = Counter(boundary.split(" ", 1)[0] for boundary in ref.boundaries)
    print(f"\n{job.name}: {len(points)} of {count} write boundaries survived"
          + ("" if len(points) == count else " (evenly spaced; ONION_FAULT_POINTS=all tries every one)")
          + f" [{', '.join(f'{kind} {n}' for kind, n in kinds.items())}]")
    for at, outcome in zip(points, outcomes, strict=True):  # stale temporaries: no failure (nothing reads them)
        if outcome.stale:
            print(f"{job.name}: killed at boundary {at} ({ref.boundaries[at - 1]}), the re-run left {outcome.stale}")


@pytest.mark.parametrize("job", JOBS, ids=[job.name for job in JOBS])
def test_killed_at_random_times_then_rerun_equals_uninterrupted(base, references, tmp_path, job):
    """Random-time kills, with Ray on two CPUs. A command that finishes before its kill is not a
    kill: the try starts over on a fresh copy, with the latest kill time halved, so every counted kill
    is mid-run and the loop ends whatever the machine's speed: at the floor of 0.2 s no command has
    even finished importing."""
    ref = references(job)
    killed_space = workspace_from(base, tmp_path / "killed")
    rng = random.Random(f"{job.name}-{KILL_POINTS}")
    kills, latest = 0, ref.seconds
    while kills < KILL_POINTS:
        process = subprocess.Popen(job.argv(killed_space), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        time.sleep(rng.uniform(0.2, max(latest, 0.2)))
        finished = process.poll() is not None
        kill_session(process.pid)  # the command, its Ray, and Ray's workers (process groups of their own)
        process.wait()
        if finished:
            latest /= 2
            shutil.rmtree(killed_space)
            workspace_from(base, killed_space)
            continue
        kills += 1
        check_after_kill(job, killed_space, ref.files)
    result = subprocess.run(job.argv(killed_space), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"{job.name}: {result.stderr[-3000:]}"
    check_rerun_equals(job, killed_space, ref)
    print(f"\n{job.name}: survived {kills} random-time kills")
