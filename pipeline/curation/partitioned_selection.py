"""``onion select`` on a dataset with a partitioned index: decided on Ray actors, stored part by part.

The driver holds the manifest, the duplicate groups (``--dedup``: sized by the duplicates) and the
engine's per-group counts; never a row per example. Each actor (:class:`PartReader`) reads its index
parts' train rows, the same parts of the scores (or, for scores stored as one file, that file once,
filtered to its keys) and, for a later round, the same parts of the parent selection (or the parent's
one file, once). The decisions are those of :mod:`pipeline.curation.selection`
(:mod:`pipeline.curation.distributed_selection` shows why) and are stored as a partitioned version
(:mod:`shards.selections`): first each actor returns its parts' digests, so a selection that already
exists is found without writing anything; else each actor writes its parts and the driver commits the
version's JSON.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.curation.distributed_selection import SelectionWorkers
from pipeline.curation.scoring import SCORES, drop_label, read_scores
from pipeline.curation.scoring.stored import read_scores_part, scores_layout
from pipeline.curation.selection import Made, SelectRequest, read_grouping
from pipeline.ray_runtime import default_workers
from shards.index import IndexPart, matching_rows
from shards.key_hash import RULE
from shards.selections import (
    commit_partitioned_selection,
    part_digest,
    partitioned_version,
    parts_fingerprint,
    read_selection,
    selection_part_table,
    stored_version,
    train_rows_of_part,
    with_parent_decisions,
    write_selection_part,
)
from shards.urls import Location, location


@dataclass(frozen=True)
class PartReader:
    """Reads an actor's parts: ``key, label, ok, score, tiebreak`` (and the parent's ``parent_kept,
    parent_reason``) of each index part's train rows, by key. Picklable: it runs in the actor."""

    dataset: str
    parts: tuple[IndexPart, ...]
    scores: str | None = None
    parent: str | None = None

    def __call__(self, numbers: list[int]) -> list[pa.Table]:
        dataset = location(self.dataset)
        rows = [train_rows_of_part(dataset, self.parts[n]) for n in numbers]
        if self.scores:
            rows = self._with_scores(dataset, numbers, rows)
        else:
            rows = [r.append_column("score", pa.nulls(r.num_rows, pa.float64()))
                    .append_column("tiebreak", pa.nulls(r.num_rows, pa.float64())) for r in rows]
        if self.parent:
            layout = partitioned_version(dataset, self.parent)
            whole = None if layout is not None else read_selection(dataset, self.parent, ["key", "kept", "reason"])
            rows = [with_parent_decisions(dataset, self.parent, self.parts[n], r, layout, whole)
                    for n, r in zip(numbers, rows)]
        return rows

    def _with_scores(self, dataset: Location, numbers: list[int], rows: list[pa.Table]) -> list[pa.Table]:
        """This actor's parts' scores: the scores' own parts of the same index parts when they are partitioned,
        else one scan of the scores file for all of its keys; then each part's scores by key."""
        keys = pa.concat_arrays([r["key"].combine_chunks() for r in rows]) if rows else pa.array([], pa.string())
        columns = ["key", "score", "tiebreak"]
        layout = scores_layout(dataset, self.scores)
        if layout is not None:
            entries = {entry["name"]: entry for entry in layout["parts"]}
            held = [read_scores_part(dataset, self.scores, layout, entries[self.parts[n].name], columns)
                    for n in numbers if self.parts[n].name in entries]
            scores = pa.concat_tables(held) if held else pa.table({c: pa.array([], pa.float64()) for c in columns})
            scores = scores.cast(pa.schema([("key", pa.string()), ("score", pa.float64()),
                                            ("tiebreak", pa.float64())]))
        else:
            scores = matching_rows(dataset.child(SCORES), self.scores, pc.field("key").isin(keys), columns=columns)
        at = pc.index_in(keys, value_set=scores["key"])  # one hash table for all parts, not one per part
        score, tiebreak = (pc.take(scores[name], at).cast(pa.float64()) for name in ("score", "tiebreak"))
        out, start = [], 0
        for r in rows:
            out.append(r.append_column("score", score.slice(start, r.num_rows))
                       .append_column("tiebreak", tiebreak.slice(start, r.num_rows)))
            start += r.num_rows
        return out

@dataclass(frozen=True)
class DigestPart:
    """A part's identity: the digest of the rows it will store."""

    round_number: int
    parent: str | None
    strategy: str

    def __call__(self, number: int, decided: pa.Table) -> str:
        return part_digest(selection_part_table(decided, self.round_number, self.parent, self.strategy))


@dataclass(frozen=True)
class WritePart:
    dataset: str
    identity: str
    names: tuple[str, ...]
    round_number: int
    parent: str | None
    strategy: str

    def __call__(self, number: int, decided: pa.Table) -> dict:
        table = selection_part_table(decided, self.round_number, self.parent, self.strategy)
        return write_selection_part(location(self.dataset), self.identity, self.names[number], table)


def select_partitioned(dataset: Location, parts: list[IndexPart], request: SelectRequest, parameters: dict,
                       strategy: str, workers: int | None = None) -> Made:
    """The selection ``request`` (already checked by ``make_selection``) over ``parts``, stored as a
    partitioned version described by ``parameters`` and ``strategy``."""
    options = request.options
    groups = read_grouping(dataset, request.dedup, only_copies=True) if request.dedup else None
    round_number = request.round_number or 0
    parent = request.parent if round_number >= 1 else None
    reader = PartReader(dataset.url, tuple(parts), request.scores, parent)
    digest = DigestPart(round_number, parent, strategy)
    with SelectionWorkers(workers or default_workers(len(parts))) as pool:
        pool.load_with(reader, len(parts))
        if request.round_number is None:
            digests = pool.select(options, digest, groups, request.then_strategy)
        elif request.round_number == 0:
            digests = pool.initial_round(options.keep, options.seed, digest, groups, options.dedup_rule)
        else:
            label = drop_label(read_scores(dataset, request.scores, columns=[]))
            digests = pool.next_round(request.remove_n, request.round_number, options.seed, label, digest)
        identity = parts_fingerprint(list(digests.written), round_number, parent, RULE)
        version = stored_version(dataset, identity)
        if version is None:
            writer = WritePart(dataset.url, identity, tuple(p.name for p in parts), round_number, parent, strategy)
            version = commit_partitioned_selection(dataset, identity, pool.write(writer).written, parameters, RULE)
    return Made(version, digests.kept, digests.kept + digests.dropped + digests.quarantined, f"{version}.json")
