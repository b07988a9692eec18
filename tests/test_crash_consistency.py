"""Crash consistency: ingest, score, select, materialize and train are SIGKILLed (with the embedded
Ray they started) at random points, seeds fixed, again and again on one output; after every kill no
file is visible under its final name unless it is complete, and once a re-run finishes the output
equals an uninterrupted run: bytes for datasets, scores and selections, weights for training.

``ONION_KILL_POINTS`` sets the kills per command (default 3 in the suite; the README's figure
comes from ``ONION_KILL_POINTS=20``)."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.ingest import IngestOptions, ingest
from pipeline.selection import SourceExamples, initial_round, save_selection
from pipeline.sources import SourceOptions, open_source
from shards import location
from shards.urls import TEMP_MARKER
from trainer.config import TrainConfig
from trainer.dynamics import read_dynamics
from trainer.launch import train

ONION = [sys.executable, "-m", "pipeline"]
KILL_POINTS = int(os.environ.get("ONION_KILL_POINTS", "3"))
TINY = ["--depth", "2", "--embed-dim", "32", "--num-heads", "2", "--patch-size", "4", "--batch-size", "16",
        "--workers", "0", "--seed", "1"]


@dataclass
class Job:
    """One command on one output: how to start it, how to continue it, and what it writes."""

    name: str
    command: list[str]
    written: str  # the path, relative to the workspace, that the command produces
    resume: list[str] = field(default_factory=list)  # used instead of ``command`` once this file exists...
    resume_when: str = ""  # ...relative to the workspace

    def argv(self, workspace: Path) -> list[str]:
        continuing = self.resume and (workspace / self.resume_when).exists()
        return [*ONION, *[str(workspace / a[1:]) if a.startswith("@") else a for a in (self.resume if continuing else self.command)]]


JOBS = [
    Job("ingest", ["ingest", "synthetic", "@out", "--count", "1500", "--image-size", "16", "--shard-size", "50",
                   "--workers", "2"], "out"),
    Job("score", ["score", "@data", "el2n", "--run", "@run", "--workers", "2"], "data/scores/el2n.parquet"),
    Job("select", ["select", "@data", "--strategy", "drop-easy", "--scores", "el2n-base", "--keep", "0.5", "--seed", "3"],
        "data/selections/v0002.parquet"),
    Job("materialize", ["materialize", "@data", "--selection", "v0001", "--workers", "2"], "data/kept/v0001"),
    Job("train", ["train", "@data", "--out", "@out", "--epochs", "3", "--checkpoint-every", "7", *TINY], "out",
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
                      batch_size=64, workers=0))
    save_selection(location(str(data)), initial_round(SourceExamples.of(location(str(data))), 0.8, 0), {"test": True})
    subprocess.run([*ONION, "score", str(data), "el2n", "--run", str(run), "--workers", "2"], check=True,
                   capture_output=True, timeout=300)
    os.rename(data / "scores" / "el2n.parquet", data / "scores" / "el2n-base.parquet")
    return root


def workspace_from(base: Path, target: Path) -> Path:
    shutil.copytree(base, target, symlinks=True)
    return target


def files_of(root: Path) -> dict[str, bytes]:
    if root.is_file():
        return {"": root.read_bytes()}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def comparable(job: Job, files: dict[str, bytes]) -> dict:
    """Drop what legitimately differs between two runs: the output path in manifests' command line,
    wall-clock figures and the run path in training's bookkeeping (weights and dynamics stay)."""
    if job.name == "train":
        return {name: data for name, data in files.items() if name.endswith((".safetensors", ".parquet"))}
    kept = {}
    for name, data in files.items():
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
        latest = workspace / job.written / "checkpoints" / "latest.json"
        if latest.exists():  # the pointer is written last, so what it names is whole
            step = json.loads(latest.read_text())["step"]
            load_file(str(workspace / job.written / "checkpoints" / f"step-{step:09d}" / "model.safetensors"))
        return
    complete = comparable(job, visible)
    for name, data in complete.items():
        if TEMP_MARKER in name or name not in reference:
            continue  # temporaries and resume bookkeeping (_ingest.json, _parts/) are not results
        assert data == reference[name], f"{job.name}: {name} is visible but differs from the uninterrupted run"
    if "manifest.json" in complete:  # the commit point: once it is there, everything is
        assert {n: d for n, d in complete.items() if n in reference} == reference


def run_to_end(job: Job, workspace: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run(job.argv(workspace), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{job.name}: {result.stderr[-3000:]}"
    return time.perf_counter() - started


@pytest.mark.parametrize("job", JOBS, ids=[job.name for job in JOBS])
def test_killed_at_random_points_then_rerun_equals_uninterrupted(base, tmp_path, job):
    reference_space = workspace_from(base, tmp_path / "reference")
    seconds = run_to_end(job, reference_space)
    reference = comparable(job, files_of(reference_space / job.written))
    killed_space = workspace_from(base, tmp_path / "killed")
    rng = random.Random(f"{job.name}-{KILL_POINTS}")
    kills = 0
    while kills < KILL_POINTS:
        process = subprocess.Popen(job.argv(killed_space), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        time.sleep(rng.uniform(0.2, seconds))
        if process.poll() is not None:  # finished first: start over on a fresh copy, so every kill is mid-run
            shutil.rmtree(killed_space)
            workspace_from(base, killed_space)
            continue
        os.killpg(process.pid, signal.SIGKILL)  # the command and the Ray it started
        process.wait()
        kills += 1
        check_after_kill(job, killed_space, reference)
    run_to_end(job, killed_space)
    if job.name == "train":  # the newest checkpoint's weights, whatever the step folder names are
        final = [load_file(str(sorted((space / "out" / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))
                 for space in (reference_space, killed_space)]
        assert all(torch.equal(final[0][name], final[1][name]) for name in final[0])
        order = [("step", "ascending"), ("key", "ascending")]
        rows = [read_dynamics(location(str(space / "out"))).sort_by(order) for space in (reference_space, killed_space)]
        assert rows[0].equals(rows[1])  # every presentation recorded once, as if never interrupted
    else:
        assert comparable(job, files_of(killed_space / job.written)) == reference
    print(f"{job.name}: survived {kills} kill points")
