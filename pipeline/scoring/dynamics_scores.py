"""Scores computed from a training run's dynamics (one row per example presentation).

Vectorised over all presentations at once (numpy), so they run in the driver: a million rows
take well under a second, less than shipping them to Ray workers would.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


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

    Presentations are ordered by step. An example never classified correctly counts as the
    maximum (as forgettable as the most forgotten learned one). ``tiebreak`` orders equal scores,
    lower meaning easier: the negative mean variance of the last block's class-token attention
    (attention concentrated on few patches counts as easier).
    """
    sorted_keys = np.array(sorted(keys), dtype=object)
    codes, known = _codes(sorted_keys, dynamics["key"])
    codes = codes[known]
    correct = dynamics["correct"].to_numpy(zero_copy_only=False)[known].astype(bool)
    step = dynamics["step"].to_numpy()[known]
    variance = np.nan_to_num(dynamics["cls_attention_variance"].to_numpy(zero_copy_only=False)[known].astype(np.float64))
    order = np.lexsort((step, codes))
    codes, correct, variance = codes[order], correct[order], variance[order]
    n = len(sorted_keys)
    same = codes[1:] == codes[:-1]
    forgotten = same & correct[:-1] & ~correct[1:]
    events = np.bincount(codes[1:][forgotten], minlength=n).astype(np.float64)
    presentations = np.bincount(codes, minlength=n)
    learned = np.bincount(codes[correct], minlength=n) > 0
    ceiling = events[learned].max() if learned.any() else 0.0
    score = np.where(learned, events, ceiling)
    score[presentations == 0] = np.nan  # not trained in the window: no evidence
    mean_variance = np.bincount(codes, weights=variance, minlength=n) / np.maximum(presentations, 1)
    return pa.table({
        "key": pa.array(sorted_keys.tolist(), pa.string()), "score": score, "tiebreak": -mean_variance,
        "forgetting_events": events.astype(np.int64), "presentations": presentations, "learned": learned,
        "cls_attention_variance": mean_variance,
    })


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
