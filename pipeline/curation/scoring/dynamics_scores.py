"""Scores computed from a training run's dynamics (one row per example presentation).

Vectorised over all presentations at once (numpy). Each key's numbers depend only on its own rows,
so the same functions score a subset of the keys from a subset of the rows:
:mod:`~pipeline.curation.scoring.by_part` runs them per index part on Ray actors, and only
forgetting's window-wide P and the signal check's median are combined, from presentation counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shards import UsageError


def window_rows(dynamics: pa.Table, first_epoch: int | None, last_epoch: int | None) -> pa.Table:
    mask = pc.and_(pc.greater_equal(dynamics["epoch"], first_epoch if first_epoch is not None else -1),
                   pc.less_equal(dynamics["epoch"], last_epoch if last_epoch is not None else 2**31 - 1))
    return dynamics.filter(mask)


def sorted_keys_of(keys: list[str] | np.ndarray | pa.Array) -> np.ndarray:
    """``keys`` sorted, as an object array (sorted in Arrow: its UTF-8 byte order is Python's str order)."""
    array = keys if isinstance(keys, pa.Array | pa.ChunkedArray) else pa.array(list(keys), pa.string())
    return np.array(array.take(pc.sort_indices(array)).to_pylist(), dtype=object)


def _codes(keys: np.ndarray, dynamics_keys: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Index of each presentation's key in ``keys`` (sorted); rows of unknown keys are dropped.
    A hash lookup in Arrow: comparing Python strings took most of a scoring actor's time at 10^7 rows."""
    at = pc.index_in(dynamics_keys, value_set=pa.array(keys.tolist(), pa.string()))
    known = pc.is_valid(at).to_numpy(zero_copy_only=False)
    return at.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64), known


@dataclass(frozen=True)
class ForgettingStats:
    """Per-example counts from the presentations of ``keys`` (sorted), before the window-wide scaling."""

    keys: np.ndarray  # sorted, object
    events: np.ndarray  # correct -> incorrect transitions
    presentations: np.ndarray
    learned: np.ndarray  # classified correctly at least once
    mean_variance: np.ndarray  # of the last block's class-token attention

    @property
    def longest(self) -> int:
        """P: the most presentations any example had (the window's longest record)."""
        return int(self.presentations.max()) if len(self.keys) else 0


def forgetting_stats(keys: list[str] | np.ndarray | pa.Array, dynamics: pa.Table) -> ForgettingStats:
    """Each key's forgetting counts from ``dynamics``, rows of other keys ignored. A key's numbers depend
    only on its own rows (ordered by step), so counting a subset of the keys gives their numbers exactly."""
    sorted_keys = sorted_keys_of(keys)
    codes, known = _codes(sorted_keys, dynamics["key"])
    codes = codes[known]
    correct = dynamics["correct"].to_numpy(zero_copy_only=False)[known].astype(bool)
    step = dynamics["step"].to_numpy()[known]
    variance = np.nan_to_num(
        dynamics["cls_attention_variance"].to_numpy(zero_copy_only=False)[known].astype(np.float64))
    order = np.lexsort((step, codes))
    codes, correct, variance = codes[order], correct[order], variance[order]
    n = len(sorted_keys)
    same = codes[1:] == codes[:-1]
    forgotten = same & correct[:-1] & ~correct[1:]
    events = np.bincount(codes[1:][forgotten], minlength=n).astype(np.float64)
    presentations = np.bincount(codes, minlength=n)
    learned = np.bincount(codes[correct], minlength=n) > 0
    mean_variance = np.bincount(codes, weights=variance, minlength=n) / np.maximum(presentations, 1)
    return ForgettingStats(sorted_keys, events, presentations, learned, mean_variance)


def forgetting_table(stats: ForgettingStats, longest: int) -> pa.Table:
    """The scores of ``stats``' keys in a window whose longest record is ``longest`` presentations."""
    transitions = np.maximum(stats.presentations - 1, 1)
    score = np.where(stats.learned, stats.events * max(longest - 1, 0) / transitions, float(longest))
    score[stats.presentations == 0] = np.nan  # not trained in the window: no evidence
    return pa.table({
        "key": pa.array(stats.keys.tolist(), pa.string()), "score": score, "tiebreak": -stats.mean_variance,
        "forgetting_events": stats.events.astype(np.int64), "presentations": stats.presentations,
        "learned": stats.learned, "cls_attention_variance": stats.mean_variance,
    })


def forgetting(keys: list[str], dynamics: pa.Table) -> pa.Table:
    """Forgetting events per example: correct -> incorrect transitions between its presentations.

    Presentations are ordered by step. ``forgetting_events`` is the raw count; ``score`` makes
    examples comparable when their presentation counts differ (a restored example is seen fewer
    times in a window than one kept throughout):

    * learned examples: events per observed transition, scaled to the window's longest record,
      ``events * (P - 1) / (p - 1)`` with ``p`` the example's presentations and ``P`` the most any
      example had (an example seen once has no transition: 0). This is at most ``P - 1``;
    * never-learned examples (never classified correctly in the window): ``P``, strictly above
      every learned example whatever the window, as the paper's code counts them as the maximum.

    ``tiebreak`` orders equal scores, lower meaning easier: the negative mean variance of the last
    block's class-token attention (attention concentrated on few patches counts as easier).
    """
    stats = forgetting_stats(keys, dynamics)
    return forgetting_table(stats, stats.longest)


MIN_PRESENTATIONS = 2  # a forgetting event needs two presentations of the example in the window


def presentation_counts(presentations: np.ndarray) -> np.ndarray:
    """How many examples had 0, 1, 2, ... presentations: what :func:`median_presentations` needs, summed
    over any split of the examples."""
    return np.bincount(presentations, minlength=1)


def summed_counts(counts: list[np.ndarray]) -> np.ndarray:
    """Several :func:`presentation_counts` (of disjoint sets of examples) as one."""
    total = np.zeros(max((len(part) for part in counts), default=1), np.int64)
    for part in counts:
        total[:len(part)] += part
    return total


def median_presentations(counts: np.ndarray) -> float:
    """Median presentations per example in the window, over the examples it presented, from
    :func:`presentation_counts` (``counts[p]`` examples presented ``p`` times)."""
    presented = counts.copy()
    presented[0] = 0
    total = int(presented.sum())
    if total == 0:
        return 0.0
    cumulative = np.cumsum(presented)
    lower = int(np.searchsorted(cumulative, (total + 1) // 2))  # the middle value (the lower one if even)
    upper = int(np.searchsorted(cumulative, total // 2 + 1))
    return (lower + upper) / 2


def require_signal(scores: pa.Table, window: str) -> None:
    """Refuse forgetting scores from a window too short to hold a forgetting event."""
    require_counts_signal(presentation_counts(scores["presentations"].to_numpy(zero_copy_only=False)), window)


def require_counts_signal(counts: np.ndarray, window: str) -> None:
    """:func:`require_signal` from the examples' :func:`presentation_counts`."""
    median = median_presentations(counts)
    if median < MIN_PRESENTATIONS:
        raise UsageError(
            f"forgetting has no signal in {window}: {median:g} presentation(s) per example, and a forgetting "
            f"event needs {MIN_PRESENTATIONS}; use --round-epochs {MIN_PRESENTATIONS} or more (curate), a wider "
            "--first-epoch/--last-epoch window (score), or the loss scorer (--scorer loss / --scores loss)")


def mean_loss(keys: list[str] | pa.Array, dynamics: pa.Table) -> pa.Table:
    """Mean training loss of each example over its presentations (higher = harder)."""
    sorted_keys = sorted_keys_of(keys)
    codes, known = _codes(sorted_keys, dynamics["key"])
    codes = codes[known]
    loss = dynamics["loss"].to_numpy(zero_copy_only=False)[known].astype(np.float64)
    presentations = np.bincount(codes, minlength=len(sorted_keys))
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.bincount(codes, weights=loss, minlength=len(sorted_keys)) / presentations
    return pa.table({"key": pa.array(sorted_keys.tolist(), pa.string()), "score": score,
                     "tiebreak": np.zeros(len(sorted_keys)), "presentations": presentations})
