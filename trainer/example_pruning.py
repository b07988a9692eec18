"""Per-epoch soft pruning of well-learned examples (InfoBatch, Qin et al., ICLR 2024).

Before each epoch, every example's score is its loss at its latest presentation (read from the
dynamics the trainer writes, so every rank computes the same selection from the same files, and a
resumed run recomputes it exactly). Examples whose score is below the mean are well-learned; a
seeded random ``ratio`` of them sits the epoch out, and the well-learned ones that stay have their
loss scaled by ``1 / (1 - ratio)``, so the expected gradient equals the full-data one. The first
epoch (no scores yet) and the last ``anneal`` share of epochs train on every example.

Each pruned epoch's decision is stored as a selection version of the dataset (``reason``
``well-learned@eN`` for who sat out, ``score`` the loss it was judged by), so ``onion inspect
--key`` and ``--diff`` explain who was left out when and why, like any other selection.

This module is the rule, decided in one process over every key (:func:`plan_epoch`); a dataset whose
index is in parts is planned by :mod:`trainer.epoch_planner`, part by part across the ranks, with
exactly the same decisions (the mean by :func:`exact_sum`, which any split of the losses agrees on).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pyarrow as pa

from shards.key_hash import RULE, choose_at_random
from shards.selections import SourceExamples, read_selection, save_selection, selection_table
from shards.urls import Location
from trainer.run_folder import EPOCH_SELECTIONS

STRATEGY = "infobatch"


@dataclass(frozen=True)
class PlannedEpoch:
    """An epoch's decision as stored: its selection version and what it kept and left out."""

    version: str
    kept: int
    left_out: int
    threshold: float  # the mean latest loss: below it is well-learned


@dataclass(frozen=True)
class EpochPlan:
    """Who trains in one epoch and with which loss weight."""

    epoch: int
    keys: np.ndarray  # the candidates (the base training set), sorted
    kept: np.ndarray  # bool per key
    weights: np.ndarray  # loss weight per key (1, or 1 / (1 - ratio) for kept well-learned ones)
    scores: np.ndarray  # latest loss per key (NaN: never presented)
    threshold: float  # the mean score: below it is well-learned

    @property
    def pruned(self) -> bool:
        return not bool(self.kept.all())

    def weight_of(self) -> dict[str, float]:
        """Weights that differ from 1, by key (what the training step looks up)."""
        heavy = np.flatnonzero(self.kept & (self.weights != 1.0))
        return dict(zip(self.keys[heavy].tolist(), self.weights[heavy].tolist()))


def prunes_epoch(epoch: int, epochs: int, anneal: float) -> bool:
    """Epoch 0 has no scores; the last ``round(anneal * epochs)`` epochs use every example."""
    return 1 <= epoch < epochs - round(anneal * epochs)


def plan_epoch(keys: np.ndarray, scores: np.ndarray, epoch: int, epochs: int, ratio: float, anneal: float,
               seed: int) -> EpochPlan:
    """The epoch's selection and weights from each candidate's latest loss (hand-checkable: see the tests)."""
    order = np.argsort(keys, kind="stable")
    keys, scores = keys[order], scores[order]
    kept = np.ones(len(keys), dtype=bool)
    weights = np.ones(len(keys))
    presented = ~np.isnan(scores)
    threshold = exact_mean([(exact_sum(scores[presented]), int(presented.sum()))])
    if prunes_epoch(epoch, epochs, anneal) and presented.any():
        well_learned = np.flatnonzero(presented & (scores < threshold))
        # the left-out share drawn by the key-hash rule: the same on any number of ranks or workers
        out = well_learned[choose_at_random(keys[well_learned], round(ratio * len(well_learned)), seed,
                                            f"infobatch@e{epoch}")]
        kept[out] = False
        weights[well_learned] = 1.0 / (1.0 - ratio)
        weights[out] = 0.0
    return EpochPlan(epoch, keys, kept, weights, scores, threshold)


def exact_sum(values: np.ndarray) -> Fraction | None:
    """The exact sum of float64 ``values`` as a rational number (None when one is infinite): the sums of
    disjoint pieces add up to the whole's exactly, whatever the split, which float sums would not."""
    values = np.asarray(values, dtype=np.float64)
    if np.isnan(values).any():
        raise ValueError("exact_sum: a NaN has no sum (leave out the examples never presented)")
    if np.isinf(values).any():
        return None
    mantissa, exponent = np.frexp(values)
    units = (mantissa * 2.0**53).astype(np.int64)  # exact: a float64 mantissa has 53 bits
    high, low = units >> 26, units & ((1 << 26) - 1)  # sums of 27-bit halves fit int64 for 2^36 values
    total = Fraction(0)
    for power in np.unique(exponent).tolist():
        at = exponent == power
        total += Fraction((int(high[at].sum()) << 26) + int(low[at].sum())) * Fraction(2) ** (power - 53)
    return total


def exact_mean(pieces: list[tuple[Fraction | None, int]]) -> float:
    """The mean of values given as ``(exact_sum, count)`` pieces, correctly rounded: the same whatever the
    pieces (NaN for no value, infinite when a piece holds an infinite value)."""
    count = sum(n for _, n in pieces)
    if not count:
        return math.nan
    if any(total is None for total, n in pieces if n):
        return math.inf
    return float(sum((total for total, n in pieces if n), Fraction(0)) / count)


def record_plan(dataset: Location, plan: EpochPlan, base: str | None, parameters: dict) -> str:
    """Store the epoch's decision as a selection version over the whole train split; returns the version."""
    source = SourceExamples.of(dataset)
    position = {key: i for i, key in enumerate(source.keys.tolist())}
    at = np.array([position[key] for key in plan.keys.tolist()], dtype=np.int64)
    kept = np.zeros(len(source.keys), dtype=bool)
    kept[at] = plan.kept
    if base is not None:  # outside the base set: the base selection's own reasons
        reasons = np.array(read_selection(dataset, base, columns=["key", "reason"])
                           .sort_by("key")["reason"].to_pylist(), dtype=object)
    else:
        reasons = np.where(source.ok, "kept", "quarantined").astype(object)
    reasons[at] = np.where(plan.kept, "kept", f"well-learned@e{plan.epoch}")
    score = np.full(len(source.keys), np.nan)
    score[at] = plan.scores
    table = selection_table(source, kept, reasons, score, plan.epoch, base, STRATEGY, rule=RULE)
    return save_selection(dataset, table, {**parameters, "epoch": plan.epoch, "threshold": plan.threshold})


def record_epoch(run: Location, epoch: int, planned: PlannedEpoch) -> None:
    """Note in the run folder which version the epoch trained on and what it left out."""
    record = json.loads(run.read_bytes(EPOCH_SELECTIONS)) if run.exists(EPOCH_SELECTIONS) else {}
    record[str(epoch)] = {"version": planned.version, "kept": planned.kept, "left_out": planned.left_out,
                          "threshold": planned.threshold}
    run.write_atomic(EPOCH_SELECTIONS, json.dumps(dict(sorted(record.items(), key=lambda i: int(i[0]))),
                                                  indent=2).encode())


def kept_keys_of(plan: EpochPlan) -> pa.Array:
    return pa.array(plan.keys[plan.kept].tolist(), pa.string())
