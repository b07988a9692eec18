"""Scorers: how hard or useful each training example is, written to ``DATASET/scores/<name>`` (see stored.py).

A registry, not an if-chain: add a function taking a :class:`ScoreContext` and returning a table
with at least ``key``, ``score`` (higher = harder / more worth keeping) and ``tiebreak`` (orders
equal scores, lower = easier), and name it in :data:`SCORERS`. Grouping scorers (``exact``,
``phash``, ``embed``) add ``group``, ``group_size``, ``representative`` and ``distance``: the ``dedup`` step of
a selection keeps one example per group. The scorer's name is stored in the
file's metadata, so what a drop is called (``unforgettable@r2``) never depends on the file's name.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from pipeline.curation.scoring.stored import (  # noqa: F401 - re-exported: where scores are stored
    SCORES,
    matching_score_rows,
    read_scores,
    score_names,
    scorer_metadata,
    write_scores,
)
from shards import UsageError, location, read_index, read_manifest
from shards.index import index_parts, usable_train
from shards.manifest import require_labels


@dataclass(frozen=True)
class ScoreContext:
    dataset: str
    run: str | None = None  # a training run: dynamics for forgetting/loss, checkpoints for el2n
    first_epoch: int | None = None  # window of dynamics (inclusive); None: from the start
    last_epoch: int | None = None  # None: to the end
    seed: int = 0
    actors: int | None = None  # el2n's Ray actors (default: one per CPU of the cluster)
    progress: bool = True
    radius: int | None = None  # phash: Hamming radius in bits (default: duplicates.PHASH_RADIUS)
    model: str | None = None  # embed: a timm model name (with weights) or "pixels"; else the run's features
    weights: str | None = None  # embed: the timm model's local weights file
    threshold: float | None = None  # embed: cosine similarity for copies (default: embeddings.EMBED_THRESHOLD)

    def train_keys(self) -> list[str]:
        index = read_index(location(self.dataset), columns=["key", "split", "status"])
        return usable_train(index)["key"].to_pylist()

    def dynamics_files(self) -> list[str]:
        """The run's dynamics files (names), or an error saying why there are none."""
        from shards.index import parquet_names
        from trainer.run_folder import DYNAMICS

        if not self.run:
            raise UsageError("this scorer reads a training run's dynamics: give --run RUN")
        names = parquet_names(location(self.run).child(DYNAMICS))
        if not names:
            raise UsageError(f"{self.run}: no dynamics/*.parquet (train with dynamics recording on)")
        return names

    def dynamics(self) -> pa.Table:
        from pipeline.curation.scoring.dynamics_scores import window_rows
        from trainer.dynamics_files import read_dynamics

        self.dynamics_files()
        return window_rows(read_dynamics(location(self.run)), self.first_epoch, self.last_epoch)

    def window(self) -> str:
        first = "start" if self.first_epoch is None else f"epoch {self.first_epoch}"
        last = "end" if self.last_epoch is None else f"epoch {self.last_epoch}"
        return f"{self.run}, {first} to {last}"


def _forgetting(context: ScoreContext) -> pa.Table:
    from pipeline.curation.scoring.dynamics_scores import forgetting, require_signal

    table = forgetting(context.train_keys(), context.dynamics())
    require_signal(table, context.window())
    return table


def _loss(context: ScoreContext) -> pa.Table:
    from pipeline.curation.scoring.dynamics_scores import mean_loss

    return mean_loss(context.train_keys(), context.dynamics())


def _random(context: ScoreContext) -> pa.Table:
    from pipeline.curation.scoring.random_scores import random_scores

    return random_scores(context.train_keys(), context.seed)


def _el2n(context: ScoreContext) -> pa.Table:
    from pipeline.curation.scoring.el2n import el2n
    from pipeline.curation.scoring.shard_tasks import train_shards

    return el2n(context.dataset, "train", train_shards(context.dataset), _checkpoints_run(context), context.actors,
                context.progress)


def _checkpoints_run(context: ScoreContext) -> str:
    if not context.run:
        raise UsageError("el2n scores with a run's checkpoints: give --run RUN")
    return context.run


def _exact(context: ScoreContext) -> pa.Table:
    from pipeline.curation.scoring.duplicates import duplicate_groups

    return duplicate_groups(context.dataset, "exact", progress=context.progress)


def _phash_radius(context: ScoreContext) -> int:
    from pipeline.curation.scoring.duplicates import PHASH_RADIUS

    return PHASH_RADIUS if context.radius is None else context.radius


def _phash(context: ScoreContext) -> pa.Table:
    from pipeline.curation.scoring.duplicates import duplicate_groups

    return duplicate_groups(context.dataset, "phash", _phash_radius(context), progress=context.progress)


def _embed(context: ScoreContext) -> pa.Table:
    from pipeline.curation.scoring.embeddings import EMBED_THRESHOLD, FeatureSource, embedding_groups

    source = FeatureSource(context.run, context.model, context.weights)
    threshold = EMBED_THRESHOLD if context.threshold is None else context.threshold
    return embedding_groups(context.dataset, source, threshold, context.actors, context.progress)


SCORERS: dict[str, Callable[[ScoreContext], pa.Table]] = {
    "forgetting": _forgetting,
    "loss": _loss,
    "el2n": _el2n,
    "random": _random,
    "exact": _exact,
    "phash": _phash,
    "embed": _embed,
}
LABEL_SCORERS = ("forgetting", "loss", "el2n")  # they read a classifier trained on the labels
RAY_SCORERS = ("el2n", "exact", "phash", "embed")  # they run Ray tasks or actors over the shards

# What dropping the lowest scores of a scorer removes, as written in a selection's reasons.
DROP_LABELS = {"forgetting": "unforgettable"}


def drop_label(scores: pa.Table) -> str:
    """``unforgettable`` for forgetting scores, ``easy`` for the others (from the file's metadata)."""
    return DROP_LABELS.get(scorer_of(scores), "easy")


def scorer_of(scores: pa.Table) -> str:
    metadata = scores.schema.metadata or {}
    return json.loads(metadata.get(b"onion", b"{}")).get("scorer", "")


def compute_scores(name: str, context: ScoreContext) -> pa.Table:
    """Scorer ``name``'s table, computed in this process (its Ray scorers gather their results here)."""
    _check_scorer(name, context)
    table = SCORERS[name](context)
    return table.replace_schema_metadata(scorer_metadata(name))


def _check_scorer(name: str, context: ScoreContext) -> None:
    if name not in SCORERS:
        raise UsageError(f"unknown scorer {name!r} (known: {', '.join(SCORERS)})")
    if name in LABEL_SCORERS:
        require_labels(read_manifest(location(context.dataset)), context.dataset,
                       f"the {name} score (how a classifier learns each example's label)")


def scored_on_ray(name: str, dataset: str) -> bool:
    """Whether :func:`store_scores` runs Ray tasks or actors for scorer ``name`` on ``dataset``."""
    from pipeline.curation.scoring.by_part import PARTITIONED_SCORERS

    partitioned = name in PARTITIONED_SCORERS and index_parts(read_manifest(location(dataset))) is not None
    return name in RAY_SCORERS or partitioned


def store_scores(name: str, context: ScoreContext, stored_as: str | None = None) -> tuple[str, int]:
    """Score with ``name`` and store the result as ``scores/<stored_as or name>``; ``(where, rows scored)``.

    On a dataset with a partitioned index, forgetting, loss and random are computed part by part on Ray
    actors (:mod:`~pipeline.curation.scoring.by_part`: no process holds the whole dynamics or
    score table), and so are ``exact`` and ``phash`` groups (:mod:`~pipeline.curation.scoring.groups_by_part`:
    no process holds every hash); ``el2n``'s driver sets each part's scores aside as its shards are
    scored (:func:`~pipeline.curation.scoring.el2n.el2n_parts`); the stored bytes are those of the table
    computed here, which every other case stores.
    """
    from pipeline.curation.scoring.by_part import PARTITIONED_SCORERS, score_parts

    dataset = location(context.dataset)
    parts = index_parts(read_manifest(dataset))
    if name == "exact" and parts is not None:
        from pipeline.curation.scoring.groups_by_part import group_exact_parts  # imports torch: only when used

        return group_exact_parts(stored_as or name, context, parts)
    if name == "phash" and parts is not None:
        from pipeline.curation.scoring.groups_by_part import group_phash_parts

        return group_phash_parts(stored_as or name, context, parts, _phash_radius(context))
    if name == "el2n" and parts is not None:
        from pipeline.curation.scoring.el2n import el2n_parts

        _check_scorer(name, context)
        _checkpoints_run(context)
        return el2n_parts(stored_as or name, context, parts)
    if name in PARTITIONED_SCORERS and parts is not None:
        _check_scorer(name, context)
        if name != "random":
            context.dynamics_files()  # the same errors as one process gives: no run, no dynamics
        return score_parts(name, stored_as or name, context, parts)
    table = compute_scores(name, context)
    return write_scores(dataset, stored_as or name, table), table.num_rows
