"""The ``random`` scorer: each key's score is its seeded key-hash draw (:mod:`shards.key_hash`).

A key's score depends on ``(seed, key)`` alone, not on which other keys are scored or in what order,
so index parts scored apart on Ray actors hold the same numbers as the whole scored at once. (Until
this onion, the scores were one ``numpy`` generator's draws in key order: the same seed now gives
other, equally uniform, numbers.)
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from shards.key_hash import key_draws

PURPOSE = "random-score"  # the draws' purpose: independent of any selection's own draws
SCALE = float(2**64)


def random_scores(keys: list[str] | pa.Array, seed: int) -> pa.Table:
    """``key`` (sorted), ``score`` uniform in [0, 1] from each key's draw, ``tiebreak`` 0."""
    ordered = sorted(keys.to_pylist() if isinstance(keys, (pa.Array, pa.ChunkedArray)) else keys)
    score = key_draws(ordered, seed, PURPOSE).astype(np.float64) / SCALE
    return pa.table({"key": pa.array(ordered, pa.string()), "score": score, "tiebreak": np.zeros(len(ordered))})
