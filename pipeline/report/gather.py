"""What the report shows, read from the dataset (index, manifest, selections, scores) and from
training runs and a bench folder, as plain JSON-ready data.

Per-example data is columnar and aligned to one order (the index's keys, sorted), so a
100,000-example dataset stays a few MB: every selection version is one string with one character
per example (the code of its ``(reason, kept)`` pair), score arrays are rounded to 5 significant
digits and stored once however many versions or scorers share them. The summaries people read as
tables come from :mod:`pipeline.inspection` (the same numbers ``onion inspect`` prints).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import string
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.curation.scoring import SCORES, read_scores, score_names, scorer_of
from pipeline.inspection.dataset import dataset_summary
from pipeline.inspection.selections import distance_unit, ranked_groups, selection_summary
from shards import STATUS_OK, DatasetDamaged, UsageError, location, read_index, read_manifest
from shards.selections import read_selection, selection_parameters, selection_versions
from shards.urls import Location
from trainer.run_folder import CONFIG, CURATION, EPOCH_SELECTIONS, METRICS, SUMMARY, run_config

# One character per example and selection version: 64 codes that need no escaping in JSON.
CODE_ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase + "-_"
ABSENT = "."  # an example a version has no row for (val and quarantined-in-another-split examples)
# Reasons that carry a per-example detail after the colon (the kept key of a duplicate group): they
# are grouped under the part before it, and the detail is stored per example.
DETAILED_REASONS = r"^(duplicate-of):.*$"
INDEX_COLUMNS = ["key", "label", "class_name", "split", "status", "reason", "shard", "image_offset", "image_size",
                 "sha256", "source_ref"]
GROUPS_SHOWN = 100  # largest duplicate groups listed per grouping scorer
MEMBERS_SHOWN = 24  # members listed per group
SCORE_DIGITS = 5  # significant digits of scores on the page
RUN_SUMMARY = ("val_top1", "val_top1_ema", "train_seconds", "images_per_second", "epochs", "steps", "train_images",
               "device", "world_size")
RUN_CONFIG = ("dataset", "selection", "model", "example_strategy", "token_keep", "attn_keep", "attn_mode",
              "epochs", "batch_size", "depth", "embed_dim")


@contextlib.contextmanager
def readable(what: str) -> Iterator[None]:
    """A file of the dataset that exists but cannot be parsed is damage, reported on one line."""
    try:
        yield
    except (pa.ArrowException, OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetDamaged(f"{what}: unreadable ({type(error).__name__}: {str(error).splitlines()[0][:200]})") \
            from error


@dataclass
class Examples:
    """Every index row as parallel arrays, sorted by key: position ``i`` is example ``i`` everywhere."""

    keys: pa.Array
    labels: np.ndarray  # -1: none (quarantined before a class was known)
    splits: list[str]
    split_code: np.ndarray
    ok: np.ndarray
    shards: list[str]
    shard_code: np.ndarray  # -1: no stored image
    offsets: np.ndarray
    sizes: np.ndarray
    sha256: list[str | None]
    source_refs: list[str]
    reasons: list[str | None]

    @classmethod
    def of(cls, dataset: Location) -> Examples:
        with readable(f"{dataset.url} index"):
            index = read_index(dataset, columns=INDEX_COLUMNS).sort_by("key")
        split_codes = pc.dictionary_encode(index["split"]).combine_chunks()
        shard_codes = pc.dictionary_encode(index["shard"]).combine_chunks()
        stored = pc.and_(pc.is_valid(index["shard"]), pc.greater(pc.fill_null(index["image_size"], 0), 0))
        return cls(
            keys=index["key"].combine_chunks(),
            labels=index["label"].fill_null(-1).to_numpy().astype(np.int64),
            splits=split_codes.dictionary.to_pylist(), split_code=split_codes.indices.to_numpy(),
            ok=pc.equal(index["status"], STATUS_OK).to_numpy(zero_copy_only=False),
            shards=shard_codes.dictionary.to_pylist(),
            shard_code=np.where(stored.to_numpy(zero_copy_only=False),
                                shard_codes.indices.fill_null(-1).to_numpy(zero_copy_only=False), -1),
            offsets=index["image_offset"].fill_null(0).to_numpy(), sizes=index["image_size"].fill_null(0).to_numpy(),
            sha256=index["sha256"].to_pylist(), source_refs=index["source_ref"].to_pylist(),
            reasons=index["reason"].to_pylist(),
        )

    def __len__(self) -> int:
        return len(self.keys)

    def positions(self, keys: pa.Array | pa.ChunkedArray, what: str) -> np.ndarray:
        """Where each of ``keys`` is among the examples; a key the index lacks means damage."""
        found = pc.index_in(keys, value_set=self.keys)
        if found.null_count:
            missing = pc.filter(keys, pc.is_null(found))[0]
            raise DatasetDamaged(f"{what}: key {missing.as_py()!r} is not in the dataset's index")
        return found.to_numpy(zero_copy_only=False).astype(np.int64)

    def payload(self, thumbnails: list[int]) -> dict:
        quarantined = np.flatnonzero(~self.ok)
        return {
            "key": self.keys.to_pylist(), "label": self.labels.tolist(), "splits": self.splits,
            "split": self.split_code.tolist(), "ok": self.ok.astype(np.int8).tolist(), "shards": self.shards,
            "shard": self.shard_code.tolist(), "source": self.source_refs, "thumb": thumbnails,
            "quarantine": {str(i): self.reasons[i] for i in quarantined.tolist()},
        }


def rounded(values: np.ndarray) -> list[float | int | None]:
    """Scores for the page: NaN and infinities as null, whole numbers as ints, others to 5 digits."""
    out: list[float | int | None] = []
    for value in values.tolist():
        if not math.isfinite(value):
            out.append(None)
        elif value.is_integer() and abs(value) < 2 ** 53:
            out.append(int(value))
        else:
            out.append(float(f"{value:.{SCORE_DIGITS}g}"))
    return out


@dataclass
class ScoreArrays:
    """Per-example score arrays, each stored once: a version's scores are usually a scorer's."""

    arrays: list[list] = field(default_factory=list)
    _refs: dict[str, int] = field(default_factory=dict)

    def add(self, values: np.ndarray) -> int | None:
        """The reference of ``values`` (aligned to the examples, NaN = none); None when all are NaN."""
        if not np.isfinite(values).any():
            return None
        array = rounded(values)
        digest = hashlib.sha256(json.dumps(array).encode()).hexdigest()
        if digest not in self._refs:
            self._refs[digest] = len(self.arrays)
            self.arrays.append(array)
        return self._refs[digest]


def aligned(examples: Examples, positions: np.ndarray, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    result = np.full(len(examples), np.nan)
    result[positions] = values.to_numpy(zero_copy_only=False).astype(np.float64)
    return result


@dataclass
class Version:
    """One selection version as the page stores it, and what thumbnail sampling needs of it."""

    version: str
    meta: dict
    codes: str
    details: dict[str, str]
    kept: np.ndarray  # per example: in the version and kept
    dropped: np.ndarray  # in the version, not kept, not quarantined
    score: np.ndarray


def encode_version(examples: Examples, dataset: Location, version: str, with_scores: bool,
                   scores: ScoreArrays) -> Version:
    with readable(f"{dataset.url}/selections/{version}"):  # vNNNN.parquet, or vNNNN.json and its parts
        table = read_selection(dataset, version, columns=["key", "kept", "score", "reason", "round", "parent",
                                                          "strategy"])
    positions = examples.positions(table["key"], f"selections/{version}")
    reasons = pc.fill_null(table["reason"], "").combine_chunks()
    kinds = pc.replace_substring_regex(reasons, DETAILED_REASONS, r"\1")
    kept = table["kept"].to_numpy(zero_copy_only=False).astype(bool)
    kind_codes = pc.dictionary_encode(kinds)
    pair = kind_codes.indices.to_numpy(zero_copy_only=False).astype(np.int64) * 2 + kept
    unique, code = np.unique(pair, return_inverse=True)
    kind_names = kind_codes.dictionary.to_pylist()
    reason_table = [[kind_names[p // 2], bool(p % 2)] for p in unique.tolist()]
    width = 1 if len(unique) <= len(CODE_ALPHABET) else 2
    alphabet = np.frombuffer(CODE_ALPHABET.encode(), dtype=np.uint8)
    chars = np.full((len(examples), width), ord(ABSENT), dtype=np.uint8)
    if width == 1:
        chars[positions, 0] = alphabet[code]
    else:
        chars[positions, 0], chars[positions, 1] = alphabet[code // 64], alphabet[code % 64]
    detailed = np.flatnonzero(pc.not_equal(reasons, kinds).to_numpy(zero_copy_only=False))
    reason_list = reasons.to_pylist() if len(detailed) else []
    kind_list = kinds.to_pylist() if len(detailed) else []
    details = {str(positions[i]): reason_list[i][len(kind_list[i]) + 1:] for i in detailed.tolist()}
    in_version = np.zeros(len(examples), bool)
    in_version[positions] = True
    kept_all = np.zeros(len(examples), bool)
    kept_all[positions] = kept
    quarantined = np.zeros(len(examples), bool)
    quarantined[positions] = pc.equal(reasons, "quarantined").to_numpy(zero_copy_only=False)
    score = aligned(examples, positions, table["score"])
    first = {name: table[name][0].as_py() if table.num_rows else None for name in ("round", "parent", "strategy")}
    meta = {"version": version, **first, "parameters": selection_parameters(table), "reasons": reason_table,
            "width": width, "rows": table.num_rows, "shown": with_scores,
            "score": scores.add(score) if with_scores else None}
    return Version(version, meta, chars.tobytes().decode("ascii"), details, kept_all,
                   in_version & ~kept_all & ~quarantined, score)


def shown_summary(url: str, version: str) -> dict:
    """``onion inspect --selection``'s summary, reasons grouped as on the page (duplicate-of:KEY as one)."""
    summary = selection_summary(url, version)
    by_kind: Counter = Counter()
    for reason, count in summary["by_reason"].items():
        by_kind[reason.split(":", 1)[0] if reason.startswith("duplicate-of:") else reason] += count
    return {**summary, "by_reason": dict(sorted(by_kind.items(), key=lambda item: (-item[1], item[0])))}


@dataclass
class Scorer:
    name: str
    meta: dict
    groups: dict | None  # the largest groups, for a grouping scorer
    members: dict[str, list] | None  # example position -> [group, size, representative position, distance]
    order: np.ndarray  # positions in the listed groups, largest group first (thumbnail priority)


def read_scorers(examples: Examples, dataset: Location, arrays: ScoreArrays) -> list[Scorer]:
    scorers = []
    for name in score_names(dataset):
        with readable(f"{dataset.url}/{SCORES}/{name}"):  # name.parquet, or name.json and its parts
            table = read_scores(dataset, name)
        if "key" not in table.column_names or "score" not in table.column_names:
            raise DatasetDamaged(f"{dataset.url}/{SCORES}/{name}: no key and score columns")
        positions = examples.positions(table["key"], f"{SCORES}/{name}")
        meta = {"name": name, "scorer": scorer_of(table) or name, "examples": table.num_rows,
                "ref": arrays.add(aligned(examples, positions, table["score"])),
                "grouping": "group" in table.column_names}
        groups, members, order = (grouping(examples, table, positions) if meta["grouping"]
                                  else (None, None, np.zeros(0, np.int64)))
        scorers.append(Scorer(name, meta, groups, members, order))
    return scorers


def grouping(examples: Examples, table: pa.Table, positions: np.ndarray) -> tuple[dict, dict, np.ndarray]:
    """Groups of two or more, largest first (ties: lowest group id), members nearest the representative first."""
    group = table["group"].to_numpy(zero_copy_only=False).astype(np.int64)
    size = table["group_size"].to_numpy(zero_copy_only=False).astype(np.int64)
    distance = rounded(table["distance"].to_numpy(zero_copy_only=False).astype(np.float64))
    representative = examples.positions(table["representative"], "representative")
    multi = np.flatnonzero(size > 1)
    members = {str(positions[i]): [int(group[i]), int(size[i]), int(representative[i]), distance[i]]
               for i in multi.tolist()}
    ids, first = np.unique(group[multi], return_index=True)
    sizes = size[multi][first]
    listed, order = [], []
    for rows in ranked_groups(table, GROUPS_SHOWN):
        group_id = int(group[rows[0]])
        order.extend(positions[rows[:MEMBERS_SHOWN]].tolist())
        listed.append({"group": group_id, "size": int(size[rows[0]]), "representative": int(representative[rows[0]]),
                       "members": [[int(positions[i]), distance[i]] for i in rows[:MEMBERS_SHOWN].tolist()]})
    summary = {"groups": len(ids), "examples": len(multi), "removable": int(len(multi) - len(ids)),
               "largest": int(sizes.max()) if len(sizes) else 0, "listed": listed,
               "groups_shown": GROUPS_SHOWN, "members_shown": MEMBERS_SHOWN,
               "distance": distance_unit(table)}
    return summary, members, np.array(order, dtype=np.int64)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_run(url: str) -> dict:
    """A training run's curves (metrics.csv), its summary, and the share of examples each epoch trained on."""
    run = location(url)
    if not run.exists(METRICS) and not run.exists(SUMMARY):
        raise UsageError(f"{url}: not a training run (no metrics.csv or summary.json)")
    with readable(f"{url}/metrics.csv"):
        text = run.read_bytes(METRICS).decode() if run.exists(METRICS) else ""
        summary = json.loads(run.read_bytes(SUMMARY)) if run.exists(SUMMARY) else {}
        config = run_config(run) if run.exists(CONFIG) else summary.get("config", {})
        curation = json.loads(run.read_bytes(CURATION)) if run.exists(CURATION) else None
        epochs = json.loads(run.read_bytes(EPOCH_SELECTIONS)) if run.exists(EPOCH_SELECTIONS) else None
    rows = list(csv.DictReader(io.StringIO(text)))
    columns = {name: [_number(row[name]) for row in rows] for name in (rows[0] if rows else {}) if name}
    example_keep = []
    for epoch in columns.get("epoch", []):
        if curation:  # the rounds keep a constant number of examples: the plan's share
            example_keep.append(curation["plan"]["keep"])
        elif epochs is not None:  # per-epoch pruning: the epoch's own share (0-based in the file)
            chosen = epochs.get(str(int(epoch) - 1))
            example_keep.append(chosen["kept"] / (chosen["kept"] + chosen["left_out"]) if chosen else 1.0)
        else:
            example_keep.append(None if config.get("selection") else 1.0)
    if example_keep:
        columns["example_keep"] = example_keep
    return {"name": url, "metrics": columns,
            "summary": {k: summary[k] for k in RUN_SUMMARY if k in summary},
            "config": {k: config[k] for k in RUN_CONFIG if k in config},
            "examples": run_examples(config, curation),
            "curation": curation["selections"] if curation else None}


def run_examples(config: dict, curation: dict | None) -> str:
    """What a run trained on, in words: ``all``, a selection, or a curation's rounds (whose
    config.json names only round 0's selection, the one its trainer started on)."""
    if curation is None:
        return config.get("selection") or "all"
    versions, planned = curation.get("selections", []), curation.get("plan", {}).get("rounds")
    done = f"{len(versions)} of {planned}" if planned and planned != len(versions) else str(len(versions))
    rounds = f"curation: {done} round{'s' if (planned or len(versions)) != 1 else ''}"
    if not versions:
        return rounds
    return f"{rounds} ({versions[0]})" if len(versions) == 1 else f"{rounds} ({versions[0]} … {versions[-1]})"


def read_bench(folder: str) -> tuple[dict, bytes | None]:
    """``onion bench train``'s table (results.json) and its title, and its plot's bytes."""
    bench = location(folder)
    if not bench.exists("results.json"):
        raise UsageError(f"{folder}: not a bench folder (no results.json; make one with: onion bench train)")
    with readable(f"{folder}/results.json"):
        results = json.loads(bench.read_bytes("results.json"))
        title = bench.read_bytes("results.md").decode().split("\n", 1)[0] if bench.exists("results.md") else ""
    plot = bench.read_bytes("results.png") if bench.exists("results.png") else None
    arms = [{k: v for k, v in arm.items() if not isinstance(v, (dict, list))}
            for arm in results.get("arms", {}).values()]
    return {"name": folder, "title": title, "preset": results.get("preset"),
            "parity_margin": results.get("parity_margin"), "arms": arms, "plot": plot is not None}, plot


@dataclass
class Gathered:
    """Everything but the thumbnails."""

    report: dict
    examples: Examples
    versions: list[Version]
    scorers: list[Scorer]
    arrays: ScoreArrays
    bench_plot: bytes | None


def gather(url: str, selection: str | None, all_selections: bool, runs: list[str], bench: str | None) -> Gathered:
    dataset = location(url)
    manifest = read_manifest(dataset)
    examples = Examples.of(dataset)
    summary = dataset_summary(url)
    versions_found = selection_versions(dataset)
    if selection and selection not in versions_found:
        read_selection(dataset, selection)  # the one-line error naming the known versions
    shown = set(versions_found if all_selections else [selection] if selection else versions_found[-1:])
    arrays = ScoreArrays()
    versions = [encode_version(examples, dataset, v, v in shown, arrays) for v in versions_found]
    for version in versions:
        if version.version in shown:
            version.meta["summary"] = shown_summary(url, version.version)
    scorers = read_scorers(examples, dataset, arrays)
    bench_data, bench_plot = read_bench(bench) if bench else (None, None)
    report = {
        "title": dataset.url.rstrip("/").rsplit("/", 1)[-1],
        "dataset": {**summary, "class_names": manifest.get("class_names", [])},
        "selections": [v.meta for v in versions],
        "default_selection": (selection or versions_found[-1]) if versions_found else None,
        "scorers": [s.meta for s in scorers],
        "groups": {s.name: s.groups for s in scorers if s.groups is not None},
        "runs": [read_run(run) for run in runs],
        "bench": bench_data,
    }
    return Gathered(report, examples, versions, scorers, arrays, bench_plot)
