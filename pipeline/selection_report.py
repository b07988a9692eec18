"""What a person asks of selections: a summary, one example's lineage, what changed between two."""
from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shards import location, read_index
from shards.urls import Location

from pipeline.scoring import SCORES
from pipeline.selection import SELECTIONS, read_selection


def versions(dataset: Location) -> list[str]:
    return sorted(n[: -len(".parquet")] for n in dataset.child(SELECTIONS).list_names() if n.endswith(".parquet"))


def class_names(dataset: Location) -> dict[int, str]:
    rows = read_index(dataset, columns=["label", "class_name"]).to_pylist()
    return {r["label"]: r["class_name"] for r in rows if r["label"] is not None}


def selection_summary(url: str, version: str) -> dict:
    dataset = location(url)
    table = read_selection(dataset, version)
    names = class_names(dataset)
    rows = table.to_pylist()
    status = ["kept" if r["kept"] else "quarantined" if r["reason"] == "quarantined" else "dropped" for r in rows]
    per_class: dict[str, Counter] = {}
    for row, state in zip(rows, status):
        per_class.setdefault(str(names.get(row["label"], row["label"])), Counter())[state] += 1
    scores = table["score"].to_numpy(zero_copy_only=False).astype(np.float64)
    quantiles = {}
    for state in ("kept", "dropped"):
        values = scores[[s == state for s in status]]
        values = values[~np.isnan(values)]
        if len(values):
            quantiles[state] = dict(zip(("min", "q25", "median", "q75", "max"),
                                        np.quantile(values, [0, 0.25, 0.5, 0.75, 1]).round(6).tolist()))
    return {
        "dataset": dataset.url, "selection": version, "strategy": rows[0]["strategy"] if rows else None,
        "round": rows[0]["round"] if rows else None, "parent": rows[0]["parent"] if rows else None,
        "counts": dict(Counter(status)), "examples": len(rows),
        "by_class": {name: dict(counts) for name, counts in sorted(per_class.items())},
        "by_reason": dict(Counter(r["reason"] for r in rows).most_common()),
        "score_quantiles": quantiles,
    }


def key_lineage(url: str, key: str) -> list[dict]:
    """Every selection's decision about ``key``, oldest first, with the score it was given."""
    dataset = location(url)
    lineage = []
    for version in versions(dataset):
        table = read_selection(dataset, version)
        match = table.filter(pc.equal(table["key"], key)).to_pylist()
        if match:
            row = match[0]
            lineage.append({"version": version, "round": row["round"], "parent": row["parent"], "kept": row["kept"],
                            "score": row["score"], "rank": row["rank"], "reason": row["reason"]})
    if not lineage and key not in set(read_index(dataset, columns=["key"])["key"].to_pylist()):
        raise KeyError(f"{dataset.url}: no example with key {key!r}")
    return lineage


def key_scores(url: str, key: str) -> dict[str, float]:
    dataset = location(url)
    folder = dataset.child(SCORES)
    found = {}
    for name in folder.list_names():
        if name.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(folder.read_bytes(name)), columns=["key", "score"])
            match = table.filter(pc.equal(table["key"], key)).to_pylist()
            if match:
                found[name[: -len(".parquet")]] = match[0]["score"]
    return found


def selection_diff(url: str, old: str, new: str) -> dict:
    dataset = location(url)
    before = {r["key"]: r for r in read_selection(dataset, old).to_pylist()}
    after = {r["key"]: r for r in read_selection(dataset, new).to_pylist()}
    dropped = sorted(k for k in before if before[k]["kept"] and not after.get(k, {}).get("kept"))
    added = sorted(k for k in after if after[k]["kept"] and not before.get(k, {}).get("kept"))
    return {
        "from": old, "to": new, "kept_before": sum(r["kept"] for r in before.values()),
        "kept_after": sum(r["kept"] for r in after.values()),
        "newly_dropped": [{"key": k, "reason": after[k]["reason"], "score": after[k]["score"]} for k in dropped],
        "newly_kept": [{"key": k, "reason": after[k]["reason"], "score": after[k]["score"]} for k in added],
    }
