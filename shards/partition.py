"""Who reads what in an epoch: the exact-once rule.

The shards of a split are put in an order (shuffled by ``(seed, epoch)`` or as stored),
concatenated into one sequence of examples, and cut into ``world_size`` contiguous pieces whose
sizes differ by at most one; each rank's piece is cut the same way among its DataLoader workers.
A piece may start or end inside a shard: that part is read by byte range through the index.
So every example is read exactly once per epoch in total, uneven shards included, and every rank
yields the same number of examples (plus or minus one), which keeps DDP ranks in step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of one shard, rows being the shard's examples in stored order."""

    shard: str
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def shard_order(names: list[str], seed: int, epoch: int, shuffle: bool) -> list[str]:
    ordered = sorted(names)
    if not shuffle:
        return ordered
    permutation = np.random.default_rng([seed, epoch]).permutation(len(ordered))
    return [ordered[i] for i in permutation]


def even_cuts(total: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering ``[0, total)``, sizes differing by at most one."""
    base, extra = divmod(total, parts)
    cuts, start = [], 0
    for part in range(parts):
        stop = start + base + (1 if part < extra else 0)
        cuts.append((start, stop))
        start = stop
    return cuts


def slice_sequence(ordered: list[tuple[str, int]], start: int, stop: int) -> list[Segment]:
    """The segments of shards covering positions ``[start, stop)`` of the concatenation."""
    segments, position = [], 0
    for name, count in ordered:
        lo, hi = max(start, position), min(stop, position + count)
        if lo < hi:
            segments.append(Segment(name, lo - position, hi - position))
        position += count
    return segments


def epoch_segments(
    shard_counts: dict[str, int],
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
) -> list[Segment]:
    """The segments one DataLoader worker of one rank reads in ``epoch``."""
    if not (0 <= rank < world_size and 0 <= worker < num_workers):
        raise ValueError(f"rank {rank}/{world_size}, worker {worker}/{num_workers} out of range")
    ordered = [(name, shard_counts[name]) for name in shard_order(list(shard_counts), seed, epoch, shuffle)]
    total = sum(count for _, count in ordered)
    rank_start, rank_stop = even_cuts(total, world_size)[rank]
    worker_start, worker_stop = even_cuts(rank_stop - rank_start, num_workers)[worker]
    return slice_sequence(ordered, rank_start + worker_start, rank_start + worker_stop)


def rank_size(total: int, rank: int, world_size: int) -> int:
    start, stop = even_cuts(total, world_size)[rank]
    return stop - start
