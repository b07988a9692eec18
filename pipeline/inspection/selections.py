"""What a person asks of selections: a summary, one example's lineage, what changed between two."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.curation.scoring.stored import matching_score_rows, score_names
from shards import UsageError, location
from shards.manifest import read_manifest
from shards.reader import index_row
from shards.selections import read_selection, selection_row, selection_rule, selection_versions
from shards.urls import Location


def class_names(dataset: Location) -> dict[int, str]:
    """Label -> class name, from the manifest (a label is the position of its class there)."""
    return dict(enumerate(read_manifest(dataset)["class_names"]))


EARLIER_RULE = "chosen by the earlier (order-dependent) random rule"


def rule_of(table: pa.Table) -> str:
    """How a version's random choices were made: its recorded rule, or a word that it predates them (those
    still read as before; only rerunning them today may choose otherwise)."""
    return selection_rule(table) or EARLIER_RULE


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
    scored = scores[~np.isnan(scores)]
    tied = len(scored) > 1 and bool(np.all(scored == scored[0]))
    return {
        "dataset": dataset.url, "selection": version, "strategy": rows[0]["strategy"] if rows else None,
        "round": rows[0]["round"] if rows else None, "parent": rows[0]["parent"] if rows else None,
        "rule": rule_of(table), "counts": dict(Counter(status)), "examples": len(rows),
        "by_class": {name: dict(counts) for name, counts in sorted(per_class.items())},
        "by_reason": dict(Counter(r["reason"] for r in rows).most_common()),
        "score_quantiles": quantiles,
        **({"all_scores_tied": float(scored[0])} if tied else {}),
    }


def key_lineage(dataset: Location, key: str) -> list[dict]:
    """Every selection's decision about ``key``, oldest first, with the score it was given."""
    lineage = []
    for version in selection_versions(dataset):
        row = selection_row(dataset, version, key)
        if row:
            lineage.append({"version": version, "round": row["round"], "parent": row["parent"], "kept": row["kept"],
                            "score": row["score"], "rank": row["rank"], "reason": row["reason"]})
    return lineage


def key_scores(dataset: Location, key: str) -> dict[str, float]:
    found = {}
    for name in score_names(dataset):
        match = matching_score_rows(dataset, name, pc.field("key") == key, columns=["key", "score"]).to_pylist()
        if match:
            found[name] = match[0]["score"]
    return found


def distance_unit(scores: pa.Table) -> str:
    """What a grouping table's ``distance`` counts: hash bits, or 1 - cosine for embeddings."""
    return "1 - cosine" if pa.types.is_floating(scores.schema.field("distance").type) else "bits"


def key_groups(dataset: Location, key: str) -> list[dict]:
    """``key``'s duplicate group in each grouping score table (exact, phash, embed), members nearest first."""
    found = []
    for name in score_names(dataset):
        match = matching_score_rows(dataset, name, pc.field("key") == key).to_pylist()
        if match and "group" not in match[0]:
            continue
        if not match:
            continue
        members = matching_score_rows(dataset, name, pc.field("group") == match[0]["group"],
                                      columns=["key", "distance"])
        for member in sorted(members.to_pylist(), key=lambda m: (m["distance"], m["key"])):
            found.append({"scores": name, "member": member["key"], "distance_to_representative": member["distance"],
                          "unit": distance_unit(members), "representative": member["key"] == match[0]["representative"],
                          "this": member["key"] == key})
    return found


def grouping_scores(dataset: Location, name: str) -> pa.Table:
    """A grouping score table (``scores/<name>.parquet`` with groups), or a usage error saying how to make one."""
    from pipeline.curation.scoring import read_scores

    table = read_scores(dataset, name)
    if "group" not in table.column_names:
        raise UsageError(f"scores/{name} holds no groups (grouping scorers: onion score DATASET exact|phash|embed)")
    return table


def ranked_groups(table: pa.Table, limit: int) -> list[np.ndarray]:
    """Row numbers of the ``limit`` largest groups (two or more members) of a grouping table, largest
    first (ties: lowest group id), each group's rows nearest its representative first (ties: key)."""
    group = table["group"].to_numpy(zero_copy_only=False).astype(np.int64)
    size = table["group_size"].to_numpy(zero_copy_only=False).astype(np.int64)
    distance = table["distance"].to_numpy(zero_copy_only=False).astype(np.float64)
    multi = np.flatnonzero(size > 1)
    ids, first = np.unique(group[multi], return_index=True)
    ranked = ids[np.lexsort((ids, -size[multi][first]))][:limit]
    keys = np.array(table["key"].to_pylist(), dtype=object)
    listed = []
    for group_id in ranked.tolist():
        rows = multi[group[multi] == group_id]
        listed.append(rows[np.lexsort((keys[rows], distance[rows]))])
    return listed


def largest_groups(url: str, name: str, limit: int = 20) -> list[dict]:
    """The ``limit`` largest groups of copies in ``scores/<name>``: size, representative, members nearest first."""
    table = grouping_scores(location(url), name)
    unit = distance_unit(table)
    keys, distances = table["key"].to_pylist(), table["distance"].to_pylist()
    representatives, groups = table["representative"].to_pylist(), table["group"].to_pylist()
    return [{"group": groups[rows[0]], "size": len(rows), "representative": representatives[rows[0]],
             "members": [{"key": keys[i], "distance": distances[i]} for i in rows.tolist()], "unit": unit}
            for rows in ranked_groups(table, limit)]


def describe_key(url: str, key: str) -> dict:
    """One example: where it is, what it is, its scores, and what every selection decided about it."""
    dataset = location(url)
    row = index_row(dataset, key)
    names = class_names(dataset)
    about = {"key": key, "split": row["split"], "label": row["label"], "class": names.get(row["label"]),
             "status": row["status"], "shard": row["shard"],
             "image_bytes": f"{row['image_offset']}-{row['image_offset'] + row['image_size']}"
             if row["image_size"] else None, "source": row["source_ref"]}
    if row["reason"]:
        about["reason"] = row["reason"]
    if row["split"] != "train":
        about["note"] = f"a {row['split']} example: selections only ever choose among train examples"
    groups = key_groups(dataset, key)
    return {**about, "scores": key_scores(dataset, key), **({"duplicate_groups": groups} if groups else {}),
            "lineage": key_lineage(dataset, key)}


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
