"""Scorers: how hard or useful each training example is, written to ``DATASET/scores/<name>.parquet``.

A registry, not an if-chain: add a function taking a :class:`ScoreContext` and returning a table
with at least ``key``, ``score`` (higher = harder / more worth keeping) and ``tiebreak`` (orders
equal scores, lower = easier), and name it in :data:`SCORERS`.
"""
from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shards import STATUS_OK, location, read_index, read_manifest
from shards.urls import Location

SCORES = "scores"


@dataclass(frozen=True)
class ScoreContext:
    dataset: str
    run: str | None = None  # a training run: dynamics for forgetting/loss, checkpoints for el2n
    first_epoch: int | None = None  # window of dynamics (inclusive); None: from the start
    last_epoch: int | None = None  # None: to the end
    seed: int = 0
    workers: int = 2
    progress: bool = True

    def train_keys(self) -> list[str]:
        index = read_index(location(self.dataset), columns=["key", "split", "status"])
        mask = pc.and_(pc.equal(index["split"], "train"), pc.equal(index["status"], STATUS_OK))
        return index.filter(mask)["key"].to_pylist()

    def dynamics(self) -> pa.Table:
        from trainer.dynamics import read_dynamics

        from pipeline.scoring.dynamics_scores import window_rows

        if not self.run:
            raise ValueError("this scorer reads a training run's dynamics: give --run RUN")
        table = read_dynamics(location(self.run))
        if table.num_rows == 0:
            raise ValueError(f"{self.run}: no dynamics/*.parquet (train with dynamics recording on)")
        return window_rows(table, self.first_epoch, self.last_epoch)


def _forgetting(context: ScoreContext) -> pa.Table:
    from pipeline.scoring.dynamics_scores import forgetting

    return forgetting(context.train_keys(), context.dynamics())


def _loss(context: ScoreContext) -> pa.Table:
    from pipeline.scoring.dynamics_scores import mean_loss

    return mean_loss(context.train_keys(), context.dynamics())


def _random(context: ScoreContext) -> pa.Table:
    keys = sorted(context.train_keys())
    return pa.table({"key": pa.array(keys, pa.string()),
                     "score": np.random.default_rng([context.seed, 11]).random(len(keys)),
                     "tiebreak": np.zeros(len(keys))})


def _el2n(context: ScoreContext) -> pa.Table:
    from pipeline.ray_runtime import init_ray
    from pipeline.scoring.el2n import el2n

    if not context.run:
        raise ValueError("el2n scores with a run's checkpoints: give --run RUN")
    init_ray(workers=None)
    shards = [s["name"] for s in read_manifest(location(context.dataset))["shards"] if s["split"] == "train"]
    return el2n(context.dataset, "train", shards, context.run, context.workers, context.progress)


SCORERS: dict[str, Callable[[ScoreContext], pa.Table]] = {
    "forgetting": _forgetting,
    "loss": _loss,
    "el2n": _el2n,
    "random": _random,
}


def compute_scores(name: str, context: ScoreContext) -> pa.Table:
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r} (known: {', '.join(SCORERS)})")
    return SCORERS[name](context)


def write_scores(dataset: Location, name: str, table: pa.Table) -> str:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    dataset.child(SCORES).write_atomic(f"{name}.parquet", sink.getvalue())
    return f"{dataset.url}/{SCORES}/{name}.parquet"


def read_scores(dataset: Location, name: str) -> pa.Table:
    scores = dataset.child(SCORES)
    if not scores.exists(f"{name}.parquet"):
        raise FileNotFoundError(f"{dataset.url}: no scores/{name}.parquet (run: onion score {dataset.url} {name} ...)")
    return pq.read_table(io.BytesIO(scores.read_bytes(f"{name}.parquet")))
