"""``onion select`` on Ray actors that each hold some parts of the rows: the same decisions, at any scale.

:func:`pipeline.curation.selection.select` (and :func:`initial_round`, :func:`next_round`) hold every
row in one process. Here ``workers`` actors own the parts (part ``i`` on actor ``i % workers``) and
the driver holds only per-group counts, statistics, pivots and thresholds: never a row-sized array.
The decisions (kept, drop reason, score per key) are exactly the single-process ones, because every
order a selection uses is a total order on a composite key: ``(score with NaN as +inf, tiebreak,
key)`` from easiest, ``(draw, key)`` for "at random" (:mod:`shards.key_hash`). "The k smallest" is
then one set whatever the split, and the driver finds its boundary exactly by a distributed
selection search (:meth:`SelectionWorkers._smallest`):

* each actor sorts its members of each group by the composite key and keeps a window of them;
* the driver sends up to ``PIVOTS`` pivots per group (elements of the window); each actor counts its
  elements below each pivot and returns, for each interval between pivots, its size and up to
  ``SAMPLES`` evenly spaced elements;
* the driver sums the counts, knows the global rank of every pivot, keeps the interval holding rank
  ``k`` and picks the next pivots from that interval's samples (weighted quantiles). A window that
  fits in the samples is known whole, and the boundary is read off it. The windows shrink about
  ``PIVOTS + 1``-fold per round: about log16(n) rounds, all groups of a stage in one call per actor.

The budgets (class shares by :func:`largest_remainder`, stratified's bin shares in its order, the
fill and the hard cut) are computed by the driver from counts, as ``selection.py`` computes them.
Duplicate groups: each actor proposes its best member of every group (by the rule's total order);
the best of those is the group's keeper (``typical`` compares all members, so for it the actors
return every usable listed member: sized by the duplicates, like the grouping table itself).
"""
from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.curation.selection import (
    DEDUP_RULES,
    DUPLICATE,
    STRATEGIES,
    Candidates,
    SelectOptions,
    deduplicate,
    largest_remainder,
)
from pipeline.ray_runtime import ensure_ray
from shards import UsageError
from shards.key_hash import key_draws

PART_COLUMNS = ("key", "label", "ok", "score", "tiebreak")
PARENT_COLUMNS = ("parent_kept", "parent_reason")  # next_round: the parent selection's rows, per part
PIVOTS = 15  # pivots per group per round: a window shrinks about 16-fold per round
SAMPLES = 16  # elements an actor samples per interval between pivots; a smaller interval is sent whole
# The drop reasons selection.py's strategies give (before the ``<strategy>:`` prefix ``select`` adds).
EASY, HARD, RANDOM, HARD_CUT, SAMPLED_OUT = "easy", "hard", "random", "hard-cut", "bin-sampled-out"

PartSource = pa.Table | Callable[[], pa.Table]  # a part, or a picklable reader the owning actor calls
WritePart = Callable[[int, pa.Table], object]  # (part number, its decided rows) -> anything picklable
ReadParts = Callable[[list[int]], list[pa.Table]]  # part numbers -> their tables, run by the owning actor
Order = tuple  # ("easiest",) or ("draw", seed, purpose)
Pivot = tuple  # the composite key of one element: (field values..., key)
EASIEST: Order = ("easiest",)


def by_draw(seed: int, purpose: str) -> Order:
    return ("draw", int(seed), purpose)


@dataclass(frozen=True)
class DistributedResult:
    """What :class:`SelectionWorkers` hands back: ``write_part``'s results and the totals."""

    written: list[object]  # what write_part returned, by part number
    kept: int
    dropped: int
    quarantined: int
    calls: int  # rounds of calls (one call to every actor, in parallel), loading excluded
    largest_reply: int  # bytes of the largest reply an actor sent the driver (write_part's results excluded)
    replies: list[tuple[str, int]] = field(default_factory=list)  # (method, its largest reply in bytes) per call


class _Window:
    """One group's members on one actor, sorted by the composite key; ``[lo, hi)`` may still hold rank k."""

    def __init__(self, rows: np.ndarray, fields: list[np.ndarray], keys: np.ndarray):
        self.rows, self.fields, self.keys = rows, fields, keys
        self.lo, self.hi = 0, len(rows)
        self.starts, self.ends = [0], [len(rows)]  # the intervals the last pivots cut the window into

    def position(self, pivot: Pivot, side: str) -> int:
        """Elements below ``pivot`` (``left``) or at most ``pivot`` (``right``): nested binary searches."""
        lo, hi = self.lo, self.hi
        for values, value in zip(self.fields, pivot[:-1]):
            part = values[lo:hi]
            lo, hi = lo + int(np.searchsorted(part, value, "left")), lo + int(np.searchsorted(part, value, "right"))
            if lo == hi:
                return lo
        return lo + int(np.searchsorted(self.keys[lo:hi], pivot[-1], side))

    def narrow(self, interval: int | None) -> None:
        if interval is not None:
            self.lo, self.hi = self.starts[interval], self.ends[interval]

    def count(self, pivots: list[Pivot]) -> dict:
        """Counts below and up to each pivot, and samples of each interval between them."""
        below = [self.position(p, "left") for p in pivots]
        upto = [self.position(p, "right") for p in pivots]
        self.starts, self.ends = [self.lo, *upto], [*below, self.hi]
        picks, at = [], []
        for interval, (start, end) in enumerate(zip(self.starts, self.ends)):
            size = end - start
            chosen = (np.arange(start, end) if size <= SAMPLES
                      else start + ((2 * np.arange(SAMPLES) + 1) * size) // (2 * SAMPLES))
            picks.append(chosen)
            at.append(np.full(len(chosen), interval, np.int32))
        picked = np.concatenate(picks)
        return {"below": np.array(below, np.int64), "upto": np.array(upto, np.int64),
                "sizes": np.array([e - s for s, e in zip(self.starts, self.ends)], np.int64),
                "at": np.concatenate(at), "fields": [f[picked] for f in self.fields],
                "keys": self.keys[picked].tolist()}


class PartsWorker:
    """The rows of some parts, and one selection's state over them (a Ray actor: :class:`SelectionWorkers`)."""

    def load(self, numbers: list[int], sources: list[PartSource]) -> int:
        """Read and hold parts ``numbers``, each sorted by key; returns the number of rows held."""
        tables = []
        for number, source in zip(numbers, sources):
            table = source() if callable(source) else source
            missing = [c for c in PART_COLUMNS if c not in table.column_names]
            if missing:
                raise UsageError(f"part {number} lacks the columns {', '.join(missing)}")
            tables.append(table.sort_by("key"))
        self.numbers = list(numbers)
        self.bounds = np.cumsum([0] + [t.num_rows for t in tables])
        self.parent = bool(tables) and all(all(c in t.column_names for c in PARENT_COLUMNS) for t in tables)
        columns = [*PART_COLUMNS, *(PARENT_COLUMNS if self.parent else ())]
        rows = pa.concat_tables([t.select(columns).cast(_schema(self.parent)) for t in tables]) if tables else \
            _schema(self.parent).empty_table()
        self.key_column = rows["key"]
        self.keys = np.array(rows["key"].to_pylist(), dtype=object)
        self.labels = rows["label"].fill_null(-1).to_numpy()
        self.ok = rows["ok"].fill_null(False).to_numpy(zero_copy_only=False)
        self.score = rows["score"].fill_null(np.nan).to_numpy()
        self.tiebreak = rows["tiebreak"].fill_null(0.0).to_numpy()  # a key the scores lack: tiebreak 0
        if self.parent:
            self.parent_kept = rows["parent_kept"].to_numpy(zero_copy_only=False)
            self.parent_reason = np.array(rows["parent_reason"].to_pylist(), dtype=object)
        order = pc.sort_indices(rows["key"]).to_numpy() if len(rows) else np.zeros(0, np.int64)
        self.key_rank = np.empty(len(order), np.int64)  # the composite keys' last field, as a number
        self.key_rank[order] = np.arange(len(order))
        return len(self.keys)

    def load_with(self, numbers: list[int], reader: ReadParts) -> int:
        """Parts ``numbers`` as ``reader`` reads them, all in one call (one pass over shared inputs)."""
        return self.load(numbers, reader(numbers))

    # -- one selection ------------------------------------------------------------------------------

    def begin(self, mode: str, groups: pa.Table | None, rule: str, decomposable: bool) -> dict:
        """Start a selection (``select``, ``initial`` or ``next``); with ``groups``, this actor's candidates
        for each duplicate group's keeper: its best member by the rule, or every member (``typical``)."""
        n = len(self.keys)
        if mode == "next":
            if not self.parent:
                raise UsageError(f"next_round needs the parent selection's {' and '.join(PARENT_COLUMNS)} per part")
            self.kept, self.reason = self.parent_kept.copy(), self.parent_reason.copy()
            self.out_score, self.use_score, self.tie = self.score, self.score, self.tiebreak
            duplicate = np.array([r.startswith(DUPLICATE) for r in self.reason], dtype=bool)
            self.pool = ~self.kept & self.ok & ~duplicate
            return {"kept": int(self.kept.sum()), "pool": int(self.pool.sum())}
        self.kept = self.ok.copy()
        self.reason = np.where(self.ok, "kept", "quarantined").astype(object)
        self.out_score = np.where(self.ok, self.score, np.nan) if mode == "select" else np.full(n, np.nan)
        self.use_score = self.score if mode == "select" else np.full(n, np.nan)  # rounds dedup without scores
        self.tie = self.tiebreak if mode == "select" else np.zeros(n)
        self.listed = np.full(n, -1, np.int64)
        reply: dict = {"usable": int(self.ok.sum())}
        if groups is None:
            reply["classes"] = self.classes()
        else:
            at = pc.index_in(self.key_column, value_set=groups["key"]).fill_null(-1).to_numpy()
            listed = np.flatnonzero((at >= 0) & self.kept)
            self.listed[listed] = groups["group"].to_numpy()[at[listed]]
            members = Candidates(self.keys[listed], self.labels[listed], self.use_score[listed], self.tie[listed])
            if decomposable and len(listed):  # the best of each group here; the best of the bests is the keeper
                keepers, _ = deduplicate(members, groups, rule)
                members = members.subset(keepers)
            reply["members"] = members
        return reply

    def dedup(self, group_ids: np.ndarray, keepers: list[str]) -> dict:
        """Drop every listed member that is not its group's keeper; the classes of what remains."""
        rows = np.flatnonzero(self.listed >= 0)
        keeper = np.array(keepers, dtype=object)[np.searchsorted(group_ids, self.listed[rows])]
        dropped = rows[self.keys[rows] != keeper]
        self.kept[dropped] = False
        self.reason[dropped] = [DUPLICATE + k for k in keeper[self.keys[rows] != keeper]]
        return self.classes()

    def classes(self) -> dict:
        """Per label of the rows still kept: count, whether any score is finite, the largest non-NaN score."""
        rows = np.flatnonzero(self.kept)
        labels, inverse = np.unique(self.labels[rows], return_inverse=True)
        score = self.use_score[rows]
        valued = ~np.isnan(score)
        largest = np.full(len(labels), -np.inf)
        np.maximum.at(largest, inverse[valued], score[valued])
        return {"labels": labels, "counts": np.bincount(inverse, minlength=len(labels)),
                "finite": np.bincount(inverse, weights=np.isfinite(score), minlength=len(labels)) > 0,
                "valued": np.bincount(inverse[valued], minlength=len(labels)) > 0, "largest": largest}

    # -- the search for the k smallest of each group --------------------------------------------------

    def open(self, assign: tuple, orders: Order | dict[int, Order]) -> dict:
        """Put rows in groups (``assign``), sort each group by its order; one interval per group."""
        self.group = self._assign(*assign)
        self.selected = np.zeros(len(self.keys), dtype=bool)
        self.windows: dict[int, _Window] = {}
        present = np.unique(self.group[self.group >= 0])
        order_of = {int(g): orders if isinstance(orders, tuple) else orders[int(g)] for g in present}
        for order in set(order_of.values()):
            gids = np.array(sorted(g for g, o in order_of.items() if o == order))
            rows = np.flatnonzero(np.isin(self.group, gids))
            fields = self._fields(order, rows)
            sort = np.lexsort((self.key_rank[rows], *reversed(fields), self.group[rows]))
            rows, fields = rows[sort], [f[sort] for f in fields]
            starts = np.searchsorted(self.group[rows], gids, "left")
            ends = np.searchsorted(self.group[rows], gids, "right")
            for g, s, e in zip(gids.tolist(), starts, ends):
                self.windows[g] = _Window(rows[s:e], [f[s:e] for f in fields], self.keys[rows[s:e]])
        return {g: w.count([]) for g, w in self.windows.items()}

    def step(self, messages: dict[int, tuple], then: tuple | None = None) -> dict:
        """Per group: narrow to an interval and count new pivots (``step``), or cut (``cut``): the rows
        below the cut are the group's k smallest. ``then``: what the stage does with them, once all cut."""
        replies = {}
        for g, message in messages.items():
            window = self.windows.get(g)
            if window is None:  # no member of this group here
                continue
            window.narrow(message[1])
            if message[0] == "step":
                replies[g] = window.count(message[2])
            else:
                pivot, side = message[2], message[3]
                cut = window.position(pivot, side) if pivot is not None else (window.lo if side == "left"
                                                                               else window.hi)
                self.selected[window.rows[:cut]] = True
        return {"groups": replies, "then": self._then(*then) if then else None}

    def _fields(self, order: Order, rows: np.ndarray) -> list[np.ndarray]:
        """The composite key's numeric fields (the key itself is last, by ``key_rank``)."""
        if order[0] == "easiest":
            score = self.use_score[rows]
            return [np.where(np.isnan(score), np.inf, score), self.tie[rows]]
        return [key_draws(self.keys[rows], order[1], order[2])]

    def _assign(self, how: str, *args) -> np.ndarray:
        group = np.full(len(self.keys), -1, np.int64)
        if how == "class":  # the kept rows, by class (labels: the sorted classes; None: one group)
            labels = args[0]
            rows = np.flatnonzero(self.kept)
            group[rows] = 0 if labels is None else np.searchsorted(labels, self.labels[rows])
            self.cls = group.copy()
        elif how == "bins":  # stratified: the pool by class and equal-width score bin
            edges, bins = args
            for c, class_edges in edges.items():
                rows = np.flatnonzero(self.pool & (self.cls == c))
                b = np.clip(np.searchsorted(class_edges, self.filled[rows], side="right") - 1, 0, bins - 1)
                group[rows] = c * bins + b
        elif how == "rest":  # stratified: the pool not chosen from the bins, by class
            rest = self.pool & ~self.chosen
            group[rest] = self.cls[rest]
        elif how == "next":  # a later round: the kept (0), and the pool restores are drawn from (1)
            group[self.kept] = 0
            group[self.pool] = 1
        return group

    def _then(self, what: str, *args) -> object:
        member, selected = self.group >= 0, self.selected
        if what == "drop":  # the k smallest are dropped
            self.kept[selected], self.reason[selected] = False, args[0]
        elif what == "keep":  # the k smallest are kept, the other members dropped
            out = member & ~selected
            self.kept[out], self.reason[out] = False, args[0]
        elif what == "pool":  # stratified: the k easiest are the pool, the rest the hard cut
            reason, fills = args
            out = member & ~selected
            self.kept[out], self.reason[out] = False, reason
            self.pool, self.filled = selected.copy(), np.full(len(self.keys), np.nan)
            ranges = {}
            for c, fill in fills.items():
                rows = np.flatnonzero(self.pool & (self.cls == c))
                self.filled[rows] = np.where(np.isnan(self.use_score[rows]), fill, self.use_score[rows])
                if len(rows):
                    ranges[c] = (float(self.filled[rows].min()), float(self.filled[rows].max()))
            return ranges
        elif what == "chosen":  # stratified: what the bins chose
            self.chosen = selected.copy()
        elif what == "fill":  # stratified: the fill chose more; the rest of the pool is sampled out
            self.chosen |= selected
            out = self.pool & ~self.chosen
            self.kept[out], self.reason[out] = False, args[0]
        elif what == "next":  # a later round: drop the easiest kept, restore as many from the pool
            dropped, restored = selected & (self.group == 0), selected & (self.group == 1)
            self.kept[dropped], self.reason[dropped] = False, args[0]
            self.kept[restored], self.reason[restored] = True, args[1]
        return None

    def write(self, write_part: WritePart) -> list[tuple[int, object, int, int, int]]:
        """Each part's rows (``key, label, kept, reason, score``, by key) to ``write_part``; with the part's totals."""
        done = []
        for number, start, end in zip(self.numbers, self.bounds[:-1], self.bounds[1:]):
            score = self.out_score[start:end]
            table = pa.table({"key": self.key_column.slice(start, end - start).combine_chunks(),
                              "label": self.labels[start:end], "kept": self.kept[start:end],
                              "reason": pa.array(self.reason[start:end].tolist(), pa.string()),
                              "score": pa.array(score, pa.float64(), mask=np.isnan(score))})
            kept, ok = int(self.kept[start:end].sum()), int(self.ok[start:end].sum())
            done.append((number, write_part(number, table), kept, ok - kept, end - start - ok))
        return done


def _schema(parent: bool) -> pa.Schema:
    fields = [("key", pa.string()), ("label", pa.int64()), ("ok", pa.bool_()), ("score", pa.float64()),
              ("tiebreak", pa.float64())]
    return pa.schema(fields + ([("parent_kept", pa.bool_()), ("parent_reason", pa.string())] if parent else []))


@dataclass
class _Search:
    """The driver's side of one group's search: the rank sought and the global ranks still open."""

    k: int
    low: int = 0
    high: int = 0
    pivots: list[Pivot] = field(default_factory=list)

    def advance(self, replies: list[dict]) -> tuple:
        """The next message for this group, from every actor's counts and samples (``replies``)."""
        m = len(self.pivots)
        below = sum((r["below"] for r in replies), np.zeros(m, np.int64))
        upto = sum((r["upto"] for r in replies), np.zeros(m, np.int64))
        for i in range(m):
            if below[i] == self.k:
                return ("cut", None, self.pivots[i], "left")
            if upto[i] == self.k:
                return ("cut", None, self.pivots[i], "right")
        j = int((upto < self.k).sum())  # the interval between pivots j - 1 and j holds rank k
        self.low = int(upto[j - 1]) if j else self.low
        self.high = int(below[j]) if j < m else self.high
        if self.k <= self.low:
            return ("cut", j, None, "left")
        if self.k >= self.high:
            return ("cut", j, None, "right")
        fields, keys, weights, whole = [], [], [], True
        for r in replies:
            mine = np.flatnonzero(r["at"] == j)
            size = int(r["sizes"][j])
            if len(mine):
                fields.append([f[mine] for f in r["fields"]])
                keys.extend(r["keys"][i] for i in mine)
                weights.append(np.full(len(mine), size / len(mine)))
            whole &= len(mine) == size
        columns = [np.concatenate(c) for c in zip(*fields)]
        keys_array = np.array(keys, dtype=object)
        order = np.lexsort((keys_array, *reversed(columns)))
        sample = [(*(c[i] for c in columns), keys_array[i]) for i in order]
        if whole:  # every element of the window is known: the boundary is the (k - low)-th
            return ("cut", j, sample[self.k - self.low], "left")
        cumulative = np.cumsum(np.concatenate(weights)[order])
        targets = cumulative[-1] * np.arange(1, PIVOTS + 1) / (PIVOTS + 1)
        picks = np.unique(np.minimum(np.searchsorted(cumulative, targets), len(sample) - 1))
        self.pivots = [sample[i] for i in picks]
        return ("step", j, self.pivots)


def return_table(part_number: int, table: pa.Table) -> pa.Table:
    """A ``write_part`` that hands each part's rows back to the caller (tests; selections that fit in memory)."""
    return table


def multi_member_groups(groups: pa.Table) -> pa.Table:
    """The rows of ``groups`` whose group lists two keys or more: the same dedup, sized by the duplicates.

    A grouping table (``scores/exact``...) lists singletons too, one row per example; a group of one
    keeps its member either way, as an unlisted example is kept."""
    ids = groups["group"].to_numpy()
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    columns = [c for c in ("key", "group", "hash") if c in groups.column_names]
    return groups.select(columns).filter(pa.array(counts[inverse] > 1))


class SelectionWorkers:
    """``workers`` Ray actors holding the parts; selections run over them without the rows leaving them.

    Use as a context manager (or call :meth:`close`). :meth:`load` once, then any number of
    :meth:`select`, :meth:`initial_round` or :meth:`next_round`."""

    def __init__(self, workers: int):
        if workers < 1:
            raise UsageError(f"workers must be at least 1, not {workers}")
        ensure_ray()
        actor = ray.remote(num_cpus=0)(PartsWorker)  # waiting on the driver most of the time: no CPU reserved
        self.actors = [actor.remote() for _ in range(workers)]
        self.parts = 0
        self._trace: list[tuple[str, int]] = []

    def __enter__(self) -> SelectionWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def load(self, parts: Sequence[PartSource]) -> None:
        """Part ``i`` to actor ``i % workers``; each part a table or a reader the actor calls."""
        w = len(self.actors)
        ray.get([a.load.remote(list(range(i, len(parts), w)), list(parts[i::w])) for i, a in enumerate(self.actors)])
        self.parts = len(parts)

    def load_with(self, reader: ReadParts, count: int) -> None:
        """Parts ``0..count-1``, part ``i`` on actor ``i % workers``, each actor reading all of its own with one
        call of ``reader`` (which can then read an input the parts share, such as a scores file, once)."""
        w = len(self.actors)
        ray.get([a.load_with.remote(list(range(i, count, w)), reader) for i, a in enumerate(self.actors)])
        self.parts = count

    # -- the three selections ------------------------------------------------------------------------

    def select(self, options: SelectOptions, write_part: WritePart, groups: pa.Table | None = None,
               then_strategy: bool = True) -> DistributedResult:
        """:func:`pipeline.curation.selection.select` over the loaded parts."""
        self._trace = []
        remaining = self._begin("select", groups, options.dedup_rule)
        usable = self._usable
        keep = int(round(options.keep * usable))
        if then_strategy and int(remaining["counts"].sum()) > keep:
            if options.strategy not in STRATEGIES:
                raise UsageError(f"unknown strategy {options.strategy!r} (known: {', '.join(STRATEGIES)})")
            self._choose(remaining, keep, options)
        return self._write(write_part)

    def initial_round(self, keep: float, seed: int, write_part: WritePart, groups: pa.Table | None = None,
                      dedup_rule: str = "lowest-key") -> DistributedResult:
        """:func:`pipeline.curation.selection.initial_round` with ``duplicate_drops(source, groups, dedup_rule)``."""
        if groups is not None and dedup_rule == "highest-score":
            raise UsageError("--dedup-rule highest-score needs scores; the rounds dedup before any score exists")
        self._trace = []
        self._begin("initial", groups, dedup_rule)
        k = int(round(keep * self._usable))
        self._smallest(("class", None), by_draw(seed, "random-initial"), lambda _: {0: k}, ("keep", "random-initial"))
        return self._write(write_part)

    def next_round(self, remove_n: int, round_number: int, seed: int, label: str,
                   write_part: WritePart) -> DistributedResult:
        """:func:`pipeline.curation.selection.next_round`; each part carries its rows of the parent selection
        (``parent_kept``, ``parent_reason``) and ``label`` is ``drop_label(scores)``."""
        self._trace = []
        counts = self._call("begin", "next", None, "lowest-key", True)
        kept, pool = sum(c["kept"] for c in counts), sum(c["pool"] for c in counts)
        if remove_n > min(kept, pool):
            raise UsageError(f"--remove-n {remove_n} is more than the {kept} kept or the {pool} in the dropped pool")
        self._smallest(("next",), {0: EASIEST, 1: by_draw(seed, f"restore@r{round_number}")},
                       lambda sizes: {0: remove_n, 1: remove_n},
                       ("next", f"{label}@r{round_number}", f"restored@r{round_number}"))
        return self._write(write_part)

    # -- stages ----------------------------------------------------------------------------------------

    def _begin(self, mode: str, groups: pa.Table | None, rule: str) -> dict:
        """Start a selection on every actor, dedup when asked; the classes of the rows that remain."""
        if groups is not None and rule not in DEDUP_RULES:
            raise UsageError(f"unknown --dedup-rule {rule!r} (known: {', '.join(DEDUP_RULES)})")
        listed = multi_member_groups(groups) if groups is not None else None
        decomposable = rule != "typical" or not (listed is not None and "hash" in listed.column_names
                                                 and pa.types.is_fixed_size_binary(listed["hash"].type))
        shared = ray.put(listed) if listed is not None else None
        replies = self._call("begin", mode, shared, rule, decomposable)
        self._usable = sum(r["usable"] for r in replies)
        if listed is None:
            return _merge_classes([r["classes"] for r in replies])
        group_ids, keepers = _keepers([r["members"] for r in replies], listed, rule)
        return _merge_classes(self._call("dedup", group_ids, keepers))

    def _choose(self, classes: dict, keep: int, o: SelectOptions) -> None:
        """:func:`pipeline.curation.selection.choose`: budgets per class, then the strategy per class."""
        labels, counts = classes["labels"], classes["counts"]
        budgets = largest_remainder(keep, counts.tolist()) if o.class_balanced else [keep]
        sizes = counts.tolist() if o.class_balanced else [int(counts.sum())]
        assign = ("class", labels if o.class_balanced else None)
        prefix = f"{o.strategy}:"
        if o.strategy == "drop-easy":
            self._smallest(assign, EASIEST, lambda _: {c: n - b for c, (n, b) in enumerate(zip(sizes, budgets))},
                           ("drop", prefix + EASY))
        elif o.strategy == "drop-hard":
            self._smallest(assign, EASIEST, lambda _: dict(enumerate(budgets)), ("keep", prefix + HARD))
        elif o.strategy == "random":
            self._smallest(assign, by_draw(o.seed, "random"), lambda _: dict(enumerate(budgets)),
                           ("keep", prefix + RANDOM))
        else:
            self._stratified(classes, assign, sizes, budgets, o)

    def _stratified(self, classes: dict, assign: tuple, sizes: list[int], budgets: list[int],
                    o: SelectOptions) -> None:
        """:func:`pipeline.curation.selection.stratified` per class: the hard cut, bin shares, the fill."""
        prefix = f"{o.strategy}:"
        if o.class_balanced:
            fills = {c: (float(classes["largest"][c]) if classes["finite"][c] else 0.0) for c in range(len(sizes))}
        else:  # one group: np.nanmax over all of it
            fills = {0: float(classes["largest"][classes["valued"]].max()) if classes["finite"].any() else 0.0}
        cuts = [min(int(round(o.hard_cut * n)), n - keep) for n, keep in zip(sizes, budgets)]
        replies = self._smallest(assign, EASIEST, lambda _: {c: n - cut for c, (n, cut) in enumerate(zip(sizes, cuts))},
                                 ("pool", prefix + HARD_CUT, fills))
        edges = {}
        for c in range(len(sizes)):
            ranges = [r[c] for r in replies if c in r]
            if ranges:
                edges[c] = np.linspace(min(lo for lo, _ in ranges), max(hi for _, hi in ranges), o.bins + 1)
        left = {}

        def shares(counts: dict[int, int]) -> dict[int, int]:
            """Each class's budget over its bins, smallest bin first, as ``stratified`` splits it."""
            out = {}
            for c, budget in enumerate(budgets):
                members = [counts.get(c * o.bins + b, 0) for b in range(o.bins)]
                for rank, b in enumerate(sorted(range(o.bins), key=lambda b: (members[b], b))):
                    share = min(members[b], budget // (o.bins - rank))
                    out[c * o.bins + b] = share
                    budget -= share
                left[c] = budget
            return out

        self._smallest(("bins", edges, o.bins), by_draw(o.seed, "stratified-bin"), shares, ("chosen",))
        self._smallest(("rest",), by_draw(o.seed, "stratified-fill"), lambda _: left, ("fill", prefix + SAMPLED_OUT))

    def _smallest(self, assign: tuple, orders: Order | dict[int, Order],
                  targets: Callable[[dict[int, int]], dict[int, int]], then: tuple) -> list[object]:
        """Mark on every actor the ``k`` smallest members of each group by its order (``targets``: k per
        group, from the groups' sizes), then run ``then`` there; returns what ``then`` returned per actor."""
        per_actor = self._call("open", assign, orders)
        sizes: dict[int, int] = {}
        for r in per_actor:
            for g, reply in r.items():
                sizes[g] = sizes.get(g, 0) + int(reply["sizes"].sum())
        ks = targets(sizes)
        searches = {g: _Search(k=min(int(ks.get(g, 0)), n), high=n) for g, n in sizes.items()}
        while True:
            messages = {g: s.advance([r[g] for r in per_actor if g in r]) for g, s in searches.items()}
            searches = {g: s for g, s in searches.items() if messages[g][0] == "step"}
            if not searches:
                return [r["then"] for r in self._call("step", messages, then)]
            per_actor = [r["groups"] for r in self._call("step", messages, None)]

    def write(self, write_part: WritePart) -> DistributedResult:
        """The last selection's parts to ``write_part`` again (the actors keep its decisions until the next one)."""
        self._trace = []
        return self._write(write_part)

    def _write(self, write_part: WritePart) -> DistributedResult:
        done = sorted((row for rows in ray.get([a.write.remote(write_part) for a in self.actors]) for row in rows),
                      key=lambda row: row[0])
        assert [row[0] for row in done] == list(range(self.parts)), "every part is written once"
        trace = self._trace
        return DistributedResult(written=[row[1] for row in done], kept=sum(row[2] for row in done),
                                 dropped=sum(row[3] for row in done), quarantined=sum(row[4] for row in done),
                                 calls=len(trace) + 1, largest_reply=max((b for _, b in trace), default=0),
                                 replies=trace)

    def _call(self, method: str, *args: object) -> list:
        """One call to every actor, in parallel; the size of the largest reply is recorded."""
        replies = ray.get([getattr(a, method).remote(*args) for a in self.actors])
        self._trace.append((method, max(len(pickle.dumps(r, protocol=5)) for r in replies)))
        return replies


def _merge_classes(replies: list[dict]) -> dict:
    """The actors' per-label statistics summed, labels sorted (``np.unique``'s order, as ``choose`` uses)."""
    labels = np.unique(np.concatenate([r["labels"] for r in replies]))
    merged = {"labels": labels, "counts": np.zeros(len(labels), np.int64), "finite": np.zeros(len(labels), bool),
              "valued": np.zeros(len(labels), bool), "largest": np.full(len(labels), -np.inf)}
    for r in replies:
        at = np.searchsorted(labels, r["labels"])
        merged["counts"][at] += r["counts"]
        merged["finite"][at] |= r["finite"]
        merged["valued"][at] |= r["valued"]
        merged["largest"][at] = np.maximum(merged["largest"][at], r["largest"])
    return merged


def _keepers(proposals: list[Candidates], groups: pa.Table, rule: str) -> tuple[np.ndarray, list[str]]:
    """Each group's keeper, by :func:`deduplicate` over the actors' proposals: (group ids sorted, keeper keys)."""
    keys = np.concatenate([p.keys for p in proposals])
    if not len(keys):
        return np.zeros(0, np.int64), []
    by_key = np.argsort(keys, kind="stable")  # typical breaks ties by position, which must be key order
    merged = Candidates(*(np.concatenate([getattr(p, f) for p in proposals])[by_key]
                          for f in ("keys", "labels", "score", "tiebreak")))
    keepers, _ = deduplicate(merged, groups, rule)
    at = pc.index_in(pa.array(merged.keys[keepers].tolist(), pa.string()), value_set=groups["key"]).to_numpy()
    group_ids = groups["group"].to_numpy()[at]
    order = np.argsort(group_ids)
    return group_ids[order], merged.keys[keepers][order].tolist()


def distributed_select(parts: Sequence[PartSource], options: SelectOptions, write_part: WritePart,
                       workers: int = 2, groups: pa.Table | None = None,
                       then_strategy: bool = True) -> DistributedResult:
    """:func:`pipeline.curation.selection.select` over ``parts`` held by ``workers`` actors (started and
    stopped here; keep a :class:`SelectionWorkers` to run several selections on the same parts)."""
    with SelectionWorkers(workers) as pool:
        pool.load(parts)
        return pool.select(options, write_part, groups, then_strategy)
