"""Scores computed from a training run's dynamics (one row per example presentation).

Vectorised over all presentations at once (numpy), so they run in the driver: a million rows
take well under a second, less than shipping them to Ray workers would.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shards import UsageError


def window_rows(dynamics: pa.Table, first_epoch: int | None, last_epoch: int | None) -> pa.Table:
    mask = pc.and_(pc.greater_equal(dynamics["epoch"], first_epoch if first_epoch is not None else -1),
                   pc.less_equal(dynamics["epoch"], last_epoch if last_epoch is not None else 2**31 - 1))
    return dynamics.filter(mask)


def _codes(keys: np.ndarray, dynamics_keys: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Index of each presentation's key in ``keys`` (sorted); rows of unknown keys are dropped."""
    values = np.asarray(dynamics_keys.to_numpy(zero_copy_only=False), dtype=object)
    codes = np.searchsorted(keys, values)
    known = (codes < len(keys)) & (keys[np.minimum(codes, len(keys) - 1)] == values)
    return codes, known


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
    sorted_keys = np.array(sorted(keys), dtype=object)
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
    longest = int(presentations.max()) if n else 0
    transitions = np.maximum(presentations - 1, 1)
    score = np.where(learned, events * max(longest - 1, 0) / transitions, float(longest))
    score[presentations == 0] = np.nan  # not trained in the window: no evidence
    mean_variance = np.bincount(codes, weights=variance, minlength=n) / np.maximum(presentations, 1)
    return pa.table({
        "key": pa.array(sorted_keys.tolist(), pa.string()), "score": score, "tiebreak": -mean_variance,
        "forgetting_events": events.astype(np.int64), "presentations": presentations, "learned": learned,
        "cls_attention_variance": mean_variance,
    })


MIN_PRESENTATIONS = 2  # a forgetting event needs two presentations of the example in the window


def presentations_per_example(scores: pa.Table) -> float:
    """Median presentations per example in the window, over the examples it presented."""
    counts = scores["presentations"].to_numpy(zero_copy_only=False)
    counts = counts[counts > 0]
    return float(np.median(counts)) if len(counts) else 0.0


def require_signal(scores: pa.Table, window: str) -> None:
    """Refuse forgetting scores from a window too short to hold a forgetting event."""
    median = presentations_per_example(scores)
    if median < MIN_PRESENTATIONS:
        raise UsageError(
            f"forgetting has no signal in {window}: {median:g} presentation(s) per example, and a forgetting "
            f"event needs {MIN_PRESENTATIONS}; use --round-epochs {MIN_PRESENTATIONS} or more (curate), a wider "
            "--first-epoch/--last-epoch window (score), or the loss scorer (--scorer loss / --scores loss)")


def mean_loss(keys: list[str], dynamics: pa.Table) -> pa.Table:
    """Mean training loss of each example over its presentations (higher = harder)."""
    sorted_keys = np.array(sorted(keys), dtype=object)
    codes, known = _codes(sorted_keys, dynamics["key"])
    codes = codes[known]
    loss = dynamics["loss"].to_numpy(zero_copy_only=False)[known].astype(np.float64)
    presentations = np.bincount(codes, minlength=len(sorted_keys))
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.bincount(codes, weights=loss, minlength=len(sorted_keys)) / presentations
    return pa.table({"key": pa.array(sorted_keys.tolist(), pa.string()), "score": score,
                     "tiebreak": np.zeros(len(sorted_keys)), "presentations": presentations})
