"""Who survives: strategies over scores, the paper's curation rounds, immutable selection versions.

A selection has one row per train-split example of the source dataset: ``key, label, kept,
score, rank, reason, round, parent, strategy``. Quarantined examples are rows too (never kept), so
``kept + dropped + quarantined`` always equals the source's train examples. Versions
(``selections/v0001.parquet`` ...) are never rewritten: the same inputs and seed give the same
rows, and asking again returns the version that already holds them. Every random choice is made
by the key-hash rule (:mod:`shards.key_hash`): the same whatever the order of the rows or
how they are split across workers.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.curation.scoring import drop_label
from shards import UsageError
from shards.key_hash import RULE, choose_at_random
from shards.selections import SourceExamples, read_selection, require_version, save_selection, selection_table
from shards.urls import Location


@dataclass(frozen=True)
class Candidates:
    """The examples a strategy chooses among, as parallel arrays."""

    keys: np.ndarray
    labels: np.ndarray
    score: np.ndarray
    tiebreak: np.ndarray

    def easiest_first(self) -> np.ndarray:
        """Positions ordered from easiest to hardest; unscored (NaN) examples count as hardest."""
        score = np.where(np.isnan(self.score), np.inf, self.score)
        return np.lexsort((self.keys, self.tiebreak, score))

    def subset(self, positions: np.ndarray) -> Candidates:
        return Candidates(self.keys[positions], self.labels[positions], self.score[positions], self.tiebreak[positions])


@dataclass(frozen=True)
class SelectOptions:
    keep: float = 0.8
    strategy: str = "drop-easy"
    class_balanced: bool = False
    hard_cut: float = 0.1  # stratified: share of the hardest cut first, as likely label noise
    bins: int = 20  # stratified: equal-width score bins sampled evenly
    seed: int = 0
    dedup_rule: str = "lowest-key"  # which member of a duplicate group stays (see DEDUP_RULES)


# A strategy returns the kept positions and one drop reason per dropped position, in position order.
# Its random choices (``options.seed``) go by the key-hash rule, never by the candidates' order.
Strategy = Callable[[Candidates, int, SelectOptions], tuple[np.ndarray, np.ndarray]]


def drop_easy(c: Candidates, keep: int, o: SelectOptions) -> tuple[np.ndarray, np.ndarray]:
    order = c.easiest_first()
    return order[len(order) - keep:], np.full(len(order) - keep, "easy", dtype=object)


def drop_hard(c: Candidates, keep: int, o: SelectOptions) -> tuple[np.ndarray, np.ndarray]:
    order = c.easiest_first()
    return order[:keep], np.full(len(order) - keep, "hard", dtype=object)


def random_keep(c: Candidates, keep: int, o: SelectOptions) -> tuple[np.ndarray, np.ndarray]:
    return choose_at_random(c.keys, keep, o.seed, "random"), np.full(len(c.keys) - keep, "random", dtype=object)


def stratified(c: Candidates, keep: int, o: SelectOptions) -> tuple[np.ndarray, np.ndarray]:
    """Coverage-centric (CCS, Zheng et al. 2023): cut the hardest, then sample evenly across score bins."""
    order = c.easiest_first()
    cut = min(int(round(o.hard_cut * len(order))), len(order) - keep)
    pool = order[: len(order) - cut]
    scores = np.where(np.isnan(c.score[pool]), np.nanmax(c.score) if np.isfinite(c.score).any() else 0, c.score[pool])
    edges = np.linspace(scores.min(), scores.max(), o.bins + 1) if len(pool) else np.zeros(2)
    bins = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, o.bins - 1)
    members = [pool[bins == b] for b in range(o.bins)]
    chosen: list[np.ndarray] = []
    budget = keep
    for rank, b in enumerate(sorted(range(o.bins), key=lambda b: (len(members[b]), b))):
        share = min(len(members[b]), budget // (o.bins - rank))
        chosen.append(members[b][choose_at_random(c.keys[members[b]], share, o.seed, "stratified-bin")])
        budget -= share
    kept = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    if budget:  # rounding left places: fill from the unchosen pool at random
        rest = np.setdiff1d(pool, kept)
        kept = np.concatenate([kept, rest[choose_at_random(c.keys[rest], budget, o.seed, "stratified-fill")]])
    dropped_hard = set(order[len(order) - cut:].tolist())
    dropped = np.setdiff1d(order, kept)
    reasons = np.array(["hard-cut" if i in dropped_hard else "bin-sampled-out" for i in dropped], dtype=object)
    return kept, reasons


STRATEGIES: dict[str, Strategy] = {"drop-easy": drop_easy, "drop-hard": drop_hard, "random": random_keep,
                                   "stratified": stratified}


def choose(c: Candidates, keep: int, options: SelectOptions) -> tuple[np.ndarray, dict[int, str]]:
    """Kept positions and the drop reason of every other position (per class when balanced)."""
    if options.strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {options.strategy!r} (known: {', '.join(STRATEGIES)})")
    strategy = STRATEGIES[options.strategy]
    groups = [np.arange(len(c.keys))]
    budgets = [keep]
    if options.class_balanced:
        classes = np.unique(c.labels)
        groups = [np.flatnonzero(c.labels == label) for label in classes]
        budgets = largest_remainder(keep, [len(g) for g in groups])
    kept_parts, reasons = [], {}
    for group, budget in zip(groups, budgets):
        kept, dropped_reasons = strategy(c.subset(group), budget, options)
        kept_parts.append(group[kept])
        for position, reason in zip(np.setdiff1d(np.arange(len(group)), kept), dropped_reasons):
            reasons[int(group[position])] = reason
    return np.sort(np.concatenate(kept_parts)), reasons


def largest_remainder(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` in proportion to ``sizes`` with whole numbers that add up exactly."""
    n = sum(sizes)
    exact = [total * s / n for s in sizes] if n else [0.0] * len(sizes)
    shares = [int(x) for x in exact]
    for i in sorted(range(len(sizes)), key=lambda i: exact[i] - shares[i], reverse=True)[: total - sum(shares)]:
        shares[i] += 1
    return shares


def candidates_with_scores(source: SourceExamples, positions: np.ndarray, scores: pa.Table | None) -> Candidates:
    score = np.full(len(positions), np.nan)
    tiebreak = np.zeros(len(positions))
    if scores is not None:
        lookup = {k: i for i, k in enumerate(scores["key"].to_pylist())}
        values, ties = scores["score"].to_numpy(zero_copy_only=False), scores["tiebreak"].to_numpy(zero_copy_only=False)
        at = np.array([lookup.get(k, -1) for k in source.keys[positions]])
        found = at >= 0
        score[found], tiebreak[found] = values[at[found]], ties[at[found]]
    return Candidates(source.keys[positions], source.labels[positions], score, tiebreak)


DEDUP_RULES = {
    "lowest-key": "the member with the lowest key",
    "typical": "the member closest to all others of its group (fewest differing hash bits in total; for embed "
               "groups their leader, which every member is within the threshold of)",
    "highest-score": "the member the --scores rank hardest (most worth keeping)",
}


def deduplicate(candidates: Candidates, groups: pa.Table, rule: str) -> tuple[np.ndarray, dict[int, str]]:
    """Keep one member of every duplicate group among ``candidates``; the others' reason names the
    member kept (``duplicate-of:<key>``). Examples the grouping table does not list are unique."""
    if rule not in DEDUP_RULES:
        raise UsageError(f"unknown --dedup-rule {rule!r} (known: {', '.join(DEDUP_RULES)})")
    at = pc.index_in(pa.array(candidates.keys.tolist(), pa.string()), value_set=groups["key"]).to_numpy(
        zero_copy_only=False)
    listed = ~np.isnan(at.astype(np.float64))
    group_ids = np.full(len(candidates.keys), -1, dtype=np.int64)
    group_ids[listed] = groups["group"].to_numpy()[at[listed].astype(np.int64)]
    group_ids[~listed] = -1 - np.arange(int((~listed).sum()))  # unlisted: groups of their own
    score = np.where(np.isnan(candidates.score), -np.inf, candidates.score)
    preference = -score if rule == "highest-score" else np.zeros(len(score))
    order = np.lexsort((candidates.keys, preference, group_ids))
    starts = np.flatnonzero(np.r_[True, group_ids[order][1:] != group_ids[order][:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    keepers = order[starts]
    if rule == "typical" and "hash" in groups.column_names and pa.types.is_fixed_size_binary(groups["hash"].type):
        keepers = keepers.copy()
        hashes = np.frombuffer(b"".join(groups["hash"].to_pylist()), dtype=np.uint8).reshape(groups.num_rows, -1)
        for slot in np.flatnonzero(sizes > 2):  # with two members either is as typical
            members = np.sort(order[starts[slot]:starts[slot] + sizes[slot]])
            packed = hashes[at[members].astype(np.int64)]
            distances = np.unpackbits(packed[:, None, :] ^ packed[None, :, :], axis=2).sum(axis=(1, 2))
            keepers[slot] = members[int(np.argmin(distances))]  # ties: the lowest key (members are key-sorted)
    keeper_of = np.repeat(keepers, sizes)
    reasons = {int(position): f"duplicate-of:{candidates.keys[keeper]}"
               for position, keeper in zip(order, keeper_of) if position != keeper}
    return np.sort(keepers), reasons


def select(source: SourceExamples, scores: pa.Table | None, options: SelectOptions,
           groups: pa.Table | None = None, then_strategy: bool = True) -> pa.Table:
    """One-shot selection: keep ``options.keep`` of the usable examples. With duplicate ``groups``, one
    member of each group first (the others dropped as ``duplicate-of:<key>``); then, when
    ``then_strategy``, the strategy chooses among the rest until ``keep`` of all usable examples remain."""
    usable = np.flatnonzero(source.ok)
    candidates = candidates_with_scores(source, usable, scores)
    keep = int(round(options.keep * len(usable)))
    drop_reasons: dict[int, str] = {}
    remaining = np.arange(len(usable))
    if groups is not None:
        remaining, drop_reasons = deduplicate(candidates, groups, options.dedup_rule)
    if then_strategy and len(remaining) > keep:
        chosen, strategy_reasons = choose(candidates.subset(remaining), keep, options)
        drop_reasons.update({int(remaining[p]): f"{options.strategy}:{r}" for p, r in strategy_reasons.items()})
        remaining = remaining[chosen]
    kept = np.zeros(len(source.keys), dtype=bool)
    kept[usable[remaining]] = True
    reasons = np.where(source.ok, "kept", "quarantined").astype(object)
    for position, reason in drop_reasons.items():
        reasons[usable[position]] = reason
    score = np.full(len(source.keys), np.nan)
    score[usable] = candidates.score
    strategy = "+".join(["dedup"] * (groups is not None) + [options.strategy] * then_strategy)
    return selection_table(source, kept, reasons, score, 0, None, strategy, rule=RULE)


DUPLICATE = "duplicate-of:"  # the reason prefix of a dedup drop; such examples never return in later rounds


def duplicate_drops(source: SourceExamples, groups: pa.Table, rule: str) -> dict[int, str]:
    """Source positions a dedup of ``groups`` drops, each with its ``duplicate-of:<key>`` reason."""
    if rule == "highest-score":
        raise UsageError("--dedup-rule highest-score needs scores; the rounds dedup before any score exists")
    usable = np.flatnonzero(source.ok)
    _, reasons = deduplicate(candidates_with_scores(source, usable, None), groups, rule)
    return {int(usable[position]): reason for position, reason in reasons.items()}


def initial_round(source: SourceExamples, keep: float, seed: int, duplicates: dict[int, str] | None = None) -> pa.Table:
    """Round 0 of the paper's schedule: drop a random share. ``duplicates`` (from :func:`duplicate_drops`)
    are dropped first and never kept; the random draw then keeps ``keep`` of all usable examples
    from the rest (or all of the rest, when the duplicates were more than ``1 - keep``)."""
    usable = np.flatnonzero(source.ok)
    duplicates = duplicates or {}
    unique = usable[~np.isin(usable, np.fromiter(duplicates, dtype=np.int64, count=len(duplicates)))]
    kept = np.zeros(len(source.keys), dtype=bool)
    kept[unique[choose_at_random(source.keys[unique], int(round(keep * len(usable))), seed, "random-initial")]] = True
    reasons = np.where(kept, "kept", np.where(source.ok, "random-initial", "quarantined")).astype(object)
    for position, reason in duplicates.items():
        reasons[position] = reason
    strategy = "dedup+random-initial" if duplicates else "random-initial"
    return selection_table(source, kept, reasons, np.full(len(kept), np.nan), 0, None, strategy, rule=RULE)


def next_round(source: SourceExamples, parent: pa.Table, parent_version: str, scores: pa.Table, remove_n: int,
               round_number: int, seed: int) -> pa.Table:
    """A later round: drop the ``remove_n`` easiest kept examples, restore as many from the pool.

    The pool is what earlier rounds dropped, duplicates (``duplicate-of:``) excepted; the examples
    dropped now join it only after the draw, so they cannot come straight back. The number kept
    stays the same. Drops are named by the scorer (``unforgettable@rN`` for forgetting, ``easy@rN``
    otherwise).
    """
    if parent["key"].to_pylist() != source.keys.tolist():
        raise UsageError(f"{parent_version} does not cover this dataset's train examples")
    label = drop_label(scores)
    kept = parent["kept"].to_numpy(zero_copy_only=False).copy()
    reasons = np.array(parent["reason"].to_pylist(), dtype=object)
    kept_positions = np.flatnonzero(kept)
    duplicate = np.array([reason.startswith(DUPLICATE) for reason in reasons], dtype=bool)
    pool = np.flatnonzero(~kept & source.ok & ~duplicate)
    if remove_n > min(len(kept_positions), len(pool)):
        raise UsageError(f"--remove-n {remove_n} is more than the {len(kept_positions)} kept or the {len(pool)} "
                         "in the dropped pool")
    candidates = candidates_with_scores(source, kept_positions, scores)
    dropped = kept_positions[candidates.easiest_first()[:remove_n]]
    restored = pool[choose_at_random(source.keys[pool], remove_n, seed, f"restore@r{round_number}")]
    kept[dropped], kept[restored] = False, True
    reasons[dropped] = f"{label}@r{round_number}"
    reasons[restored] = f"restored@r{round_number}"
    score = np.full(len(kept), np.nan)
    all_scores = candidates_with_scores(source, np.arange(len(kept)), scores)
    score[:] = all_scores.score
    return selection_table(source, kept, reasons, score, round_number, parent_version, "rounds", rule=RULE)


@dataclass(frozen=True)
class Made:
    """What a selection job made: its version, how many train examples it keeps, of how many rows."""

    version: str
    kept: int
    rows: int
    file: str  # the version's file under selections/: vNNNN.parquet, or vNNNN.json listing its parts


@dataclass(frozen=True)
class SelectRequest:
    """What ``onion select`` asks for: a strategy over scores, or one round of the paper's schedule."""

    scores: str | None = None  # a name under DATASET/scores/
    options: SelectOptions = SelectOptions()
    dedup: str | None = None  # a grouping score name (exact, phash): one example per group first
    round_number: int | None = None  # None: a one-shot strategy; 0: random initial round; >= 1: a later round
    parent: str | None = None  # the previous round's version (rounds >= 1)
    remove_n: int | None = None  # examples swapped this round (rounds >= 1)

    @property
    def then_strategy(self) -> bool:
        """Whether a one-shot selection runs its strategy (after any dedup): it needs scores, but random."""
        return self.scores is not None or self.options.strategy == "random"


def read_grouping(dataset: Location, name: str, only_copies: bool = False) -> pa.Table:
    """``scores/<name>`` when it holds duplicate groups; a usage error naming the grouping scorers otherwise.

    ``only_copies``: only the rows of groups of two or more (a dedup decides nothing about the others),
    read part by part when the scores are partitioned, so the caller never holds a row per example."""
    from pipeline.curation.scoring import matching_score_rows, read_scores
    from pipeline.curation.scoring.stored import read_scores_part, scores_layout

    layout = scores_layout(dataset, name) if only_copies else None
    if layout is None or not layout["parts"]:
        groups = read_scores(dataset, name)
    else:
        first = read_scores_part(dataset, name, layout, layout["parts"][0])  # one part, for the columns
        groups = (matching_score_rows(dataset, name, pc.field("group_size") > 1)
                  if "group_size" in first.column_names else read_scores(dataset, name))
        if not groups.column_names:  # no group of two or more: the columns, without rows
            groups = first.slice(0, 0)
    if "group" not in groups.column_names:
        raise UsageError(f"--dedup {name}: scores/{name} holds no groups "
                         "(make them with onion score DATASET exact, phash or embed)")
    return groups


def make_selection(dataset: Location, request: SelectRequest, workers: int | None = None,
                   parameters: dict | None = None) -> Made:
    """Compute and store the selection ``request`` describes; returns its version and counts.
    ``parameters``: what the version records instead of the request's own (``onion curate``: its plan).

    On a dataset with a partitioned index it is decided on Ray actors and stored part by part
    (:mod:`pipeline.curation.partitioned_selection`): the same decisions as here, for any ``workers``."""
    from pipeline.curation.partitioned_selection import select_partitioned
    from pipeline.curation.scoring import read_scores, scorer_of
    from pipeline.curation.scoring.dynamics_scores import presentation_counts, require_counts_signal, summed_counts
    from pipeline.curation.scoring.stored import column_parts
    from shards.index import index_parts
    from shards.manifest import read_manifest

    options = request.options
    if request.dedup and request.round_number not in (None, 0):
        raise UsageError("--dedup goes with a one-shot selection or round 0; later rounds keep round 0's "
                         "duplicates dropped (they never return from the pool)")
    if request.scores:
        scores = read_scores(dataset, request.scores, columns=[])  # exists? which scorer? (no rows read)
        if scorer_of(scores) == "forgetting":
            counts = [presentation_counts(part.to_numpy())
                      for part in column_parts(dataset, request.scores, "presentations")]
            require_counts_signal(summed_counts(counts), f"scores/{request.scores}")
    if request.round_number is None:
        if not request.then_strategy and not request.dedup:
            raise UsageError(f"strategy {options.strategy} needs --scores NAME")
        own: dict = {"strategy": vars(options), "scores": request.scores, "dedup": request.dedup}
        strategy = "+".join(["dedup"] * bool(request.dedup) + [options.strategy] * request.then_strategy)
    elif request.round_number == 0:
        own = {"round": 0, "keep": options.keep, "seed": options.seed,
               **({"dedup": request.dedup, "dedup_rule": options.dedup_rule} if request.dedup else {})}
        strategy = "dedup+random-initial" if request.dedup else "random-initial"
    else:
        if not (request.parent and request.remove_n and request.scores):
            raise UsageError("rounds >= 1 need --parent vNNNN, --remove-n N and --scores NAME")
        own = {"round": request.round_number, "parent": request.parent, "remove_n": request.remove_n,
               "scores": request.scores, "seed": options.seed}
        strategy = "rounds"
        require_version(dataset, request.parent)
    parameters = own if parameters is None else parameters
    if request.dedup and request.round_number == 0 and options.dedup_rule == "highest-score":
        raise UsageError("--dedup-rule highest-score needs scores; the rounds dedup before any score exists")
    parts = index_parts(read_manifest(dataset))
    if parts is not None:
        return select_partitioned(dataset, parts, request, parameters, strategy, workers)
    table = _select_in_one_process(dataset, request)
    version = save_selection(dataset, table, parameters)
    return Made(version, int(pc.sum(table["kept"]).as_py() or 0), table.num_rows, f"{version}.parquet")


def _select_in_one_process(dataset: Location, request: SelectRequest) -> pa.Table:
    """The rows of ``request``'s selection over a single-file index, decided in this process."""
    from pipeline.curation.scoring import read_scores

    source = SourceExamples.of(dataset)
    scores = read_scores(dataset, request.scores) if request.scores else None
    options = request.options
    groups = read_grouping(dataset, request.dedup) if request.dedup else None
    if request.round_number is None:
        return select(source, scores, options, groups, request.then_strategy)
    if request.round_number == 0:
        duplicates = duplicate_drops(source, groups, options.dedup_rule) if groups is not None else None
        return initial_round(source, options.keep, options.seed, duplicates)
    return next_round(source, read_selection(dataset, request.parent), request.parent, scores,
                      request.remove_n, request.round_number, options.seed)
