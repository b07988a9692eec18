"""Forgetting, loss and random scores of a dataset with a partitioned index, on Ray actors, part by part.

Each of these scorers scores a key from its own rows alone (``random``: from its seeded key-hash
draw), so no process holds the whole dynamics, the whole index or the whole score table. Actor ``w``
of ``W`` owns the index parts ``w::W``: it reads their usable train keys, then the run's dynamics one
file at a time (in the single-process order), keeping only the rows of its keys, and counts each
example with the functions of :mod:`pipeline.curation.scoring.dynamics_scores`: the single-process
numbers exactly. The one window-wide number, forgetting's P (the most presentations any example
had), and the signal check's median come to the driver as a histogram of presentation counts (one
integer per possible count). The actors then score with P, return their parts' checksums (the parts
folder is named by them), write their parts, and the driver commits ``scores/<name>.json``: the same
bytes :func:`~pipeline.curation.scoring.stored.write_scores` writes for the table computed in one
process, for any number of actors.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.actor import ActorHandle

from pipeline.curation.scoring.dynamics_scores import (
    forgetting_stats,
    forgetting_table,
    mean_loss,
    presentation_counts,
    require_counts_signal,
    summed_counts,
    window_rows,
)
from pipeline.curation.scoring.random_scores import random_scores
from pipeline.curation.scoring.stored import (
    METADATA,
    commit_scores,
    score_part_entry,
    scorer_metadata,
    scores_identity,
    write_score_part,
)
from pipeline.fan_out import fan_out
from pipeline.ray_runtime import default_workers, on_fresh_actors
from shards.index import IndexPart, parquet_names, read_index_part, read_parquet, table_to_parquet_bytes, usable_train
from shards.urls import location
from trainer.run_folder import DYNAMICS

# The dynamics columns each scorer reads (every actor reads every file: only these, to read less)
COLUMNS = {"forgetting": ["key", "epoch", "step", "correct", "cls_attention_variance"],
           "loss": ["key", "epoch", "loss"]}

if TYPE_CHECKING:
    from pipeline.curation.scoring import ScoreContext

PARTITIONED_SCORERS = ("forgetting", "loss", "random")  # scored per part here; the others compute one table


# No CPU reserved, so any --actors count starts (reserving one each would leave actors beyond the
# cluster's CPUs waiting forever); SPREAD places them over the nodes, as the work is the reading.
@ray.remote(num_cpus=0, scheduling_strategy="SPREAD")
class PartsScorer:
    """The scores of some index parts' train examples (from a run's dynamics, or their keys' draws)."""

    def __init__(self, scorer: str, dataset: str, run: str | None, window: tuple[int | None, int | None], seed: int,
                 parts: list[tuple[int, IndexPart]]) -> None:
        self.scorer, self.dataset, self.run, self.window, self.seed = scorer, dataset, run, window, seed
        self.parts = parts
        self.keys: list[pa.Array] = []
        self.stats = None
        self.written: list[tuple[int, dict, bytes]] = []

    def count(self) -> np.ndarray:
        """Read this actor's keys and their presentations; the examples' presentation counts."""
        dataset = location(self.dataset)
        self.keys = [usable_train(read_index_part(dataset, part, ["key", "split", "status"]))["key"].combine_chunks()
                     for _, part in self.parts]
        keys = pa.concat_arrays(self.keys) if self.keys else pa.array([], pa.string())
        if self.scorer == "random":  # no dynamics: every key counts as presented 0 times
            self.stats = random_scores(keys, self.seed)
            return presentation_counts(np.zeros(len(keys), np.int64))
        rows = self._rows_of(keys)
        if self.scorer == "loss":
            self.stats = mean_loss(keys, rows)
            return presentation_counts(self.stats["presentations"].to_numpy())
        self.stats = forgetting_stats(keys, rows)
        return presentation_counts(self.stats.presentations)

    def _rows_of(self, keys: pa.Array) -> pa.Table:
        """The window's dynamics rows of ``keys``, one file at a time, in the files' order."""
        folder = location(self.run).child(DYNAMICS)
        kept = []
        for name in parquet_names(folder):
            rows = window_rows(read_parquet(folder, name, COLUMNS[self.scorer]), *self.window)
            kept.append(rows.filter(pc.is_in(rows["key"], value_set=keys)))
        return pa.concat_tables(kept)

    def encode(self, longest: int, keep_empty: bool) -> list[tuple[int, dict]]:
        """Score with the window's P and serialise this actor's parts (see :func:`encode_parts`)."""
        table = forgetting_table(self.stats, longest) if self.scorer == "forgetting" else self.stats
        table = table.replace_schema_metadata(scorer_metadata(self.scorer))
        self.stats = None
        self.written = encode_parts(table, self.keys, self.parts, keep_empty)
        return [(number, entry) for number, entry, _ in self.written]

    def write(self, name: str, identity: str) -> None:
        write_parts(self.dataset, name, identity, self.written)


def encode_parts(table: pa.Table, keys: list[pa.Array], parts: list[tuple[int, IndexPart]],
                 keep_empty: bool) -> list[tuple[int, dict, bytes]]:
    """``table`` (scores of the usable train ``keys`` of each of ``parts``, by key) serialised part by part,
    as :func:`~pipeline.curation.scoring.stored.write_scores` writes them: each part that holds scored keys
    (with ``keep_empty``, nothing was scored anywhere: the first part, empty, keeps the columns);
    ``(part number, its entry in the JSON, its bytes)``."""
    # each key's part, in key order (the table's order: Arrow's UTF-8 byte order is Python's str order)
    part_of = np.concatenate([np.full(len(part_keys), at, np.int64) for at, part_keys in enumerate(keys)] or
                             [np.zeros(0, np.int64)])
    in_key_order = pc.sort_indices(pa.concat_arrays(keys) if keys else pa.array([], pa.string()))
    part_of = part_of[in_key_order.to_numpy()]
    by_part = np.argsort(part_of, kind="stable")
    bounds = np.searchsorted(part_of[by_part], np.arange(len(parts) + 1))
    written = []
    for at, (number, part) in enumerate(parts):
        if bounds[at + 1] > bounds[at] or (keep_empty and number == 0):
            data = table_to_parquet_bytes(table.take(by_part[bounds[at]:bounds[at + 1]]))
            written.append((number, score_part_entry(part.name, data), data))
    return written


def write_parts(dataset: str, name: str, identity: str, written: list[tuple[int, dict, bytes]]) -> None:
    """An actor's encoded parts, written under ``identity`` (before the driver commits the JSON)."""
    for _, entry, data in written:
        write_score_part(location(dataset), name, identity, entry["name"], data)


def commit_actors_parts(pool: list[ActorHandle], replies: list[list[tuple[int, dict]]], dataset: str, name: str,
                        scorer: str) -> tuple[str, int]:
    """The actors of ``pool`` write the parts they encoded (``replies``: their ``(part number, entry)``),
    then ``scores/<name>.json`` lists them; ``(the JSON's URL, rows)``."""
    listed = [entry for _, entry in sorted((pair for reply in replies for pair in reply), key=lambda pair: pair[0])]
    identity = scores_identity(listed)
    ray.get([worker.write.remote(name, identity) for worker in pool])
    url = commit_scores(location(dataset), name, identity, listed, scorer_metadata(scorer)[METADATA])
    return url, sum(entry["rows"] for entry in listed)


def score_parts(scorer: str, name: str, context: ScoreContext, parts: list[IndexPart]) -> tuple[str, int]:
    """Score ``parts``' train examples with ``scorer`` (forgetting, loss: from ``context.run``'s dynamics
    in its window of epochs; random: ``context.seed``) and store them as ``scores/<name>``;
    ``(the JSON's URL, rows)``."""
    return on_fresh_actors(f"{scorer} scores", lambda: _score_parts(scorer, name, context, parts))


def _score_parts(scorer: str, name: str, context: ScoreContext, parts: list[IndexPart]) -> tuple[str, int]:
    dataset, progress = context.dataset, context.progress
    window = (context.first_epoch, context.last_epoch)
    count = context.actors or default_workers(len(parts))
    numbered = list(enumerate(parts))
    pool = [PartsScorer.remote(scorer, dataset, context.run, window, context.seed, numbered[w::count])
            for w in range(count)]
    loading = fan_out(range(count), lambda w: pool[w].count.remote(), desc=f"{scorer} scores", unit="part",
                      progress=progress, weight=lambda w: len(numbered[w::count]),
                      label=lambda w: f"index parts {w}::{count}")
    replies = [part_counts for _, part_counts in loading]
    counts = summed_counts(replies)
    if scorer == "forgetting":
        require_counts_signal(counts, context.window())
    longest = int(np.flatnonzero(counts).max()) if counts.any() else 0
    nothing_scored = not counts.any()
    replies = ray.get([worker.encode.remote(longest, nothing_scored) for worker in pool])
    return commit_actors_parts(pool, replies, dataset, name, scorer)
