"""A run folder (``onion train --out RUN``, ``onion curate ... --out RUN``): the names of everything in it,
who owns it, and the records that are not checkpoints: its configuration, its resumes, its summary.

Every module that writes or reads a run's files takes their names from here, so a reader of the
folder (the report, the scorers, a benchmark) and its writers cannot drift apart::

    RUN/config.json               the resolved configuration the run was started with
    RUN/model.json                the timm model name and kwargs, mean and std (to rebuild it for scoring)
    RUN/metrics.csv               one row per epoch
    RUN/summary.json              the last epoch's numbers, once the run has trained all its epochs
    RUN/history.jsonl             one line per resume: when, the command, where it stood, what changed
    RUN/curation.json             onion curate's record (its plan, each round's selection): a curation run
    RUN/example_selections.json   per-epoch pruning (--example-strategy): which selection each epoch used
    RUN/tensorboard/              TensorBoard events (local runs)
    RUN/checkpoints/latest.json   the last complete checkpoint (the commit point)
    RUN/checkpoints/step-<step>/  model.safetensors, ema.safetensors (--ema), state.pt, rng-r<rank>.pt
    RUN/dynamics/part-r<rank>-s<step>.parquet   per-example training dynamics, one file per rank and checkpoint

**One owner.** ``onion train`` and ``onion curate`` claim a folder the same way: by creating
``config.json`` exclusively (:func:`claim`), so of two jobs started on one folder, whatever their
commands, only the first trains there; ``onion curate`` then adds ``curation.json``, which marks the run
as a curation (its rounds swap the data: a plain ``--resume`` would not). ``config.json`` is written
once, at the claim: a resume that applies new options (``onion train --resume RUN --epochs 40``)
records the configuration it continues with in ``history.jsonl``, and :func:`run_config` is the
configuration now in force (``config.json``, then the last resume's).
"""
from __future__ import annotations

import json
import time

from shards.urls import Location

CONFIG = "config.json"
MODEL_JSON = "model.json"
METRICS = "metrics.csv"
SUMMARY = "summary.json"
HISTORY = "history.jsonl"
CURATION = "curation.json"  # written by onion curate, which owns such a run
EPOCH_SELECTIONS = "example_selections.json"
TENSORBOARD = "tensorboard"

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
STEP_PREFIX = "step-"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"  # the model EMA's weights (--ema), timm's keys as in MODEL_FILE
STATE_FILE = "state.pt"  # optimiser, scheduler, scaler, the reader's position

DYNAMICS = "dynamics"
DYNAMICS_PREFIX = "part-r"


def step_folder(step: int) -> str:
    """A checkpoint's folder under ``checkpoints/``: ``step-<step, 9 digits>`` (sorts by step)."""
    return f"{STEP_PREFIX}{step:09d}"


def rng_file(rank: int) -> str:
    """A rank's random-number generator states in a checkpoint folder."""
    return f"rng-r{rank}.pt"


def dynamics_part(rank: int, step: int) -> str:
    """A rank's dynamics written at the checkpoint of ``step``, under ``dynamics/``."""
    return f"{DYNAMICS_PREFIX}{rank}-s{step:09d}.parquet"


def rank_dynamics_prefix(rank: int) -> str:
    """What every dynamics file of ``rank`` begins with."""
    return f"{DYNAMICS_PREFIX}{rank}-s"


def claim(run: Location, config: dict) -> bool:
    """Create ``config.json`` exclusively: whether this call made the claim (False: the folder holds a run)."""
    return run.create_exclusive(CONFIG, json.dumps(config, indent=2).encode())


def has_checkpoint(run: Location) -> bool:
    return run.child(CHECKPOINTS).exists(LATEST)


def release_unstarted(run: Location) -> None:
    """A job that claimed the folder and failed before its first checkpoint leaves nothing to continue:
    free the folder, so the corrected command can run there (once a checkpoint exists the claim stays)."""
    if not has_checkpoint(run):
        run.remove(CURATION)
        run.remove(CONFIG)


def latest_checkpoint(run: Location) -> dict | None:
    """The last complete checkpoint's position (epoch, batch, step, ...), or None before the first."""
    return json.loads(run.child(CHECKPOINTS).read_bytes(LATEST)) if has_checkpoint(run) else None


def resumes(run: Location) -> list[dict]:
    """The run's resumes, oldest first (``history.jsonl``)."""
    if not run.exists(HISTORY):
        return []
    return [json.loads(line) for line in run.read_bytes(HISTORY).decode().splitlines() if line.strip()]


def run_config(run: Location) -> dict:
    """The configuration in force: the last resume's (an earlier onion rewrote ``config.json`` instead,
    and its resumes recorded no configuration), else ``config.json``'s."""
    recorded = [entry["config"] for entry in resumes(run) if "config" in entry]
    return recorded[-1] if recorded else json.loads(run.read_bytes(CONFIG))


def record_resume(run: Location, config: dict, changed: dict[str, tuple[object, object]], command: list[str]) -> None:
    """Append a resume to ``history.jsonl``: when, the command, where the run stood, what changed, and the
    configuration it continues with (rewritten whole, so object-store runs get it too)."""
    position = latest_checkpoint(run)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command,
             "resumed_at": None if position is None else {name: position[name] for name in ("epoch", "batch", "step")},
             "changed": {name: {"before": before, "now": now} for name, (before, now) in changed.items()},
             "config": config}
    previous = run.read_bytes(HISTORY).decode() if run.exists(HISTORY) else ""
    run.write_atomic(HISTORY, (previous + json.dumps(entry, sort_keys=True) + "\n").encode())


def write_summary(run: Location, summary: dict) -> None:
    run.write_atomic(SUMMARY, json.dumps(summary, indent=2).encode())


def read_summary(run: Location) -> dict | None:
    return json.loads(run.read_bytes(SUMMARY)) if run.exists(SUMMARY) else None
