"""Per-epoch pruning planned part by part, across the training ranks: nothing sized by the whole dataset.

:func:`trainer.example_pruning.plan_epoch` decides an epoch in one process, over every key. On a dataset
whose index is partitioned with one shard per part (what ingest writes), each rank plans instead the
index parts ``rank, rank + world, ...`` and stores them as the parts of one partitioned selection version
(:mod:`shards.selections`); the reader then reads that version per shard (``ShardDataset.restrict``).
The decisions are exactly ``plan_epoch``'s, for any number of ranks, because the only global quantities
are exchanged exactly:

* the threshold, the mean of the latest losses, from each rank's exact sum (:func:`exact_sum`: a
  rational number, so the total does not depend on how the sum was split) and count;
* "``round(ratio * n)`` well-learned at random" by the key-hash rule: the ``k`` smallest ``(draw, key)``
  pairs, whose boundary a radix search finds in four rounds of 16 bits (:func:`kth_smallest`), each
  round one exchange of a 65,536-bin histogram, then the keys that share the boundary's draw (a 64-bit
  collision: in practice none).

A rank holds its parts' keys and latest losses (the dataset divided by the ranks), one dynamics file at a
time while it scans them, and the histograms. What it does not avoid: each rank reads every dynamics file
of the run once per planned epoch (they are written per rank and step, not per shard), so the bytes read
per epoch grow with the dataset and the epochs trained.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shards.index import IndexPart, index_parts
from shards.key_hash import RULE, key_draws
from shards.manifest import read_manifest
from shards.selections import (
    commit_partitioned_selection,
    part_digest,
    partitioned_version,
    parts_fingerprint,
    read_selection,
    read_selection_part,
    selection_part_table,
    train_rows_of_part,
    with_parent_decisions,
    write_selection_part,
)
from shards.urls import Location
from trainer.dynamics_files import latest_losses
from trainer.example_pruning import STRATEGY, PlannedEpoch, exact_mean, exact_sum

HISTOGRAM_BITS = 16
DRAW_BATCH = 65536  # keys hashed at a time (each becomes a Python string while it is hashed)


@dataclass(frozen=True)
class Collective:
    """What the planner exchanges between ranks: every rank's object, in rank order (one rank: itself)."""

    rank: int = 0
    world_size: int = 1
    gather: Callable[[object], list] | None = None  # torch.distributed.all_gather_object, as a function
    reduce_sum: Callable[[np.ndarray], np.ndarray] | None = None  # an all-reduce, where one is at hand

    def all_gather(self, value: object) -> list:
        return [value] if self.world_size == 1 else self.gather(value)

    def all_gather_parts(self, items: list, parts: int) -> list:
        """Every rank's ``items`` for its parts (rank r holds parts r, r + world, ...), in part order."""
        order = [number for rank in range(self.world_size) for number in range(rank, parts, self.world_size)]
        placed: list = [None] * parts
        for number, item in zip(order, [item for per_rank in self.all_gather(items) for item in per_rank]):
            placed[number] = item
        return placed

    def all_sum(self, counts: np.ndarray) -> np.ndarray:
        """The element-wise sum of every rank's int64 ``counts`` (a histogram: one of it held, not one per rank)."""
        if self.world_size == 1:
            return counts
        return self.reduce_sum(counts) if self.reduce_sum else sum(self.all_gather(counts))


def torch_collective(rank: int, world_size: int) -> Collective:
    """The collective of an initialised torch.distributed group (gloo or NCCL)."""
    import torch
    import torch.distributed as dist

    def gather(value: object) -> list:
        out: list = [None] * world_size
        dist.all_gather_object(out, value)
        return out

    def reduce_sum(counts: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(counts, dtype=np.int64))
        if dist.get_backend() == "nccl":  # NCCL reduces device tensors only
            tensor = tensor.cuda()
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()

    return Collective(rank, world_size, gather, reduce_sum)


def plans_in_parts(dataset: Location) -> bool:
    """Whether the epoch can be planned part by part: a partitioned index with one shard per part."""
    parts = index_parts(read_manifest(dataset))
    return parts is not None and all(len(part.shards) <= 1 for part in parts)


def plan_epoch_in_parts(dataset: Location, run: Location, base: str | None, epoch: int, ratio: float, seed: int,
                        collective: Collective, parameters: dict) -> PlannedEpoch:
    """Plan a pruned epoch (see the module's docstring) and store it; every rank calls it and gets the same."""
    parts = index_parts(read_manifest(dataset)) or []
    mine = parts[collective.rank::collective.world_size]
    rows = _candidates(dataset, mine, base)
    # keys stay Arrow strings: no Python object per key is held (the draws make theirs one part at a time)
    keys = pa.concat_arrays([r["key"].combine_chunks() for r in rows]) if rows else pa.array([], pa.string())
    candidate = np.concatenate([r["candidate"].to_numpy(zero_copy_only=False) for r in rows]) if rows \
        else np.array([], bool)
    losses = latest_losses(run, keys.filter(pa.array(candidate)), epoch)
    scores = np.full(len(keys), np.nan)
    scores[candidate] = losses
    presented = ~np.isnan(scores)
    threshold = exact_mean(collective.all_gather((exact_sum(scores[presented]), int(presented.sum()))))
    well_learned = presented & (scores < threshold)
    n_well = sum(collective.all_gather(int(well_learned.sum())))
    well_keys = keys.filter(pa.array(well_learned))
    draws = np.concatenate([key_draws(well_keys.slice(start, DRAW_BATCH), seed, f"infobatch@e{epoch}")
                            for start in range(0, len(well_keys), DRAW_BATCH)] or [np.array([], np.uint64)])
    boundary = kth_smallest(draws, well_keys, round(ratio * n_well), collective)
    out = np.zeros(len(keys), bool)
    if boundary is not None:
        draw, key = boundary
        at_most = pc.less_equal(well_keys, key).to_numpy(zero_copy_only=False)
        out[np.flatnonzero(well_learned)] = (draws < draw) | ((draws == draw) & at_most)
    tables, start = [], 0
    for part_rows in rows:
        stop = start + part_rows.num_rows
        tables.append(_decided(part_rows, scores[start:stop], out[start:stop], epoch, base))
        start = stop
    digests = collective.all_gather_parts([part_digest(t) for t in tables], len(parts))
    identity = parts_fingerprint(digests, epoch, base, RULE)
    written = [write_selection_part(dataset, identity, part.name, table) for part, table in zip(mine, tables)]
    entries = collective.all_gather_parts(written, len(parts))
    version = collective.all_gather(
        commit_partitioned_selection(dataset, identity, entries, {**parameters, "epoch": epoch,
                                                                  "threshold": threshold}, RULE)
        if collective.rank == 0 else None)[0]
    left_out = sum(collective.all_gather(int(out.sum())))
    return PlannedEpoch(version, sum(e["kept"] for e in entries), left_out, threshold)


def loss_weights(dataset: Location, planned: PlannedEpoch, shards: set[str], ratio: float) -> dict[str, float]:
    """The loss weights other than 1 of the examples of ``shards`` (a rank's shards this epoch): the kept
    well-learned weigh ``1 / (1 - ratio)``, so the expected gradient is the full data's."""
    layout = partitioned_version(dataset, planned.version)
    entries = {entry["name"]: entry for entry in layout["parts"]}
    weights: dict[str, float] = {}
    for part in index_parts(read_manifest(dataset)) or []:
        if part.shards and part.shards[0] in shards:
            rows = read_selection_part(dataset, planned.version, entries[part.name], layout, ["key", "kept", "score"])
            heavy = rows.filter(pc.and_(rows["kept"], pc.less(rows["score"], planned.threshold)))
            weights.update(dict.fromkeys(heavy["key"].to_pylist(), 1.0 / (1.0 - ratio)))
    return weights


def _candidates(dataset: Location, parts: list[IndexPart], base: str | None) -> list[pa.Table]:
    """Each part's train rows (``key, label, ok``, by key) with ``candidate`` (usable, and kept by ``base``)
    and ``base_reason`` (why a row that is no candidate is not: the base's reason, or ``quarantined``)."""
    layout = partitioned_version(dataset, base) if base else None
    whole = read_selection(dataset, base, ["key", "kept", "reason"]) if base and layout is None else None
    out = []
    for part in parts:
        rows = train_rows_of_part(dataset, part)
        if base:
            rows = with_parent_decisions(dataset, base, part, rows, layout, whole)
            candidate = pc.and_(rows["ok"], rows["parent_kept"])
            reason = rows["parent_reason"]
        else:
            candidate = rows["ok"]
            reason = pc.if_else(rows["ok"], "kept", "quarantined")
        out.append(pa.table({"key": rows["key"], "label": rows["label"], "candidate": candidate,
                             "base_reason": reason}))
    return out


def _decided(rows: pa.Table, scores: np.ndarray, out: np.ndarray, epoch: int, base: str | None) -> pa.Table:
    """One part's stored rows: candidates kept or left out (``well-learned@eN``) with their latest loss;
    the others as the base left them."""
    candidate = rows["candidate"].to_numpy(zero_copy_only=False)
    reason = np.where(candidate, np.where(out, f"well-learned@e{epoch}", "kept"),
                      np.array(rows["base_reason"].to_pylist(), dtype=object))
    score = np.where(candidate, scores, np.nan)
    decided = pa.table({"key": rows["key"], "label": rows["label"], "kept": pa.array(candidate & ~out),
                        "score": pa.array(score, mask=np.isnan(score)),
                        "reason": pa.array(reason.tolist(), pa.string())})
    return selection_part_table(decided, epoch, base, STRATEGY)


def kth_smallest(draws: np.ndarray, keys: pa.Array, k: int, collective: Collective) -> tuple[int, str] | None:
    """The ``k``-th smallest ``(draw, key)`` over every rank's pairs (None when ``k`` is 0): ``(draw, key) <=``
    it are the ``k`` chosen at random by the key-hash rule (:func:`shards.key_hash.smallest`)."""
    if k <= 0:
        return None
    inside = np.ones(len(draws), bool)  # pairs whose draw shares the boundary's leading bits found so far
    below, prefix = 0, 0
    for shift in range(64 - HISTOGRAM_BITS, -1, -HISTOGRAM_BITS):
        digits = ((draws[inside] >> np.uint64(shift)) & np.uint64((1 << HISTOGRAM_BITS) - 1)).astype(np.int64)
        counts = collective.all_sum(np.bincount(digits, minlength=1 << HISTOGRAM_BITS))
        cumulative = np.cumsum(counts)
        digit = int(np.searchsorted(cumulative, k - below, side="left"))
        below += int(cumulative[digit - 1]) if digit else 0
        prefix = (prefix << HISTOGRAM_BITS) | digit
        inside[np.flatnonzero(inside)] = digits == digit
    mine = sorted(keys.filter(pa.array(inside)).to_pylist())
    tied = sorted(key for per_rank in collective.all_gather(mine) for key in per_rank)
    return prefix, tied[k - below - 1]
