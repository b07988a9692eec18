"""Duplicate-finding figures for docs/benchmarks.md: what the grouping scorers find, and what they cost.

    .venv/bin/python benchmarks/duplicates.py [--out benchmarks/results]

1. On planted synthetic data (10% of train each: exact copies, near-copies shifted by up to 2
   pixels, re-lit and noised, label flips): for every grouping scorer (``exact``, ``phash``,
   ``embed`` on shift-normalised pixels and on the trained run's class token), the share of
   planted copies grouped with their original, the groups holding unrelated examples (false
   groups) and the unique examples a dedup would remove wrongly; on the 16x16 images of
   benchmarks/curation.py (with its trained run) and on 32x32 images. Then ``dedup`` +
   ``stratified`` in one selection at keep 0.8, with each difficulty scorer: the share of each
   planted kind removed.
2. Scoring time (features + grouping, whole call, Ray started first) on ``--scale`` synthetic 32x32
   examples with 1 and 2 Ray CPUs.
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from curation import planted_dataset, planted_masks, planted_run
from pipeline.curation.scoring import ScoreContext, compute_scores
from pipeline.curation.scoring.duplicates import duplicate_groups
from pipeline.curation.scoring.embeddings import FeatureSource, embedding_groups
from pipeline.curation.selection import SelectOptions, select
from pipeline.ingest.job import IngestOptions, ingest
from pipeline.ingest.sources import SourceOptions, open_source
from pipeline.ray_runtime import init_ray
from report_files import write_report
from shards import location, read_index
from shards.selections import SourceExamples

PIXELS = FeatureSource(model="pixels")


def planted_of(dataset: str) -> dict[str, str]:
    return {r["key"]: r["planted"] or "" for r in read_index(location(dataset), columns=["key", "planted"]).to_pylist()}


def content_of(planted: dict[str, str], keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each example's content id (its origin's key for a planted copy, else its own) and whether it is a copy."""
    copy = np.array([planted[k].startswith(("dup-of:", "near-dup-of:")) for k in keys])
    origin = [planted[k].split(":", 1)[1] if is_copy else k for k, is_copy in zip(keys, copy)]
    return np.array(origin, dtype=object), copy


def grouping_quality(dataset: str, kind: str, table: pa.Table) -> dict:
    """How well ``table`` (a grouping score of ``dataset``) groups the planted copies."""
    keys = np.array(table["key"].to_pylist(), dtype=object)
    group = table["group"].to_numpy()
    planted = planted_of(dataset)
    content, is_copy = content_of(planted, keys)
    position = {key: i for i, key in enumerate(keys.tolist())}
    found = {"duplicates": [], "near-duplicates": []}
    for i, key in enumerate(keys.tolist()):
        if is_copy[i] and content[i] in position:
            kind_name = "duplicates" if planted[key].startswith("dup-of:") else "near-duplicates"
            found[kind_name].append(group[i] == group[position[content[i]]])
    sizes = np.bincount(group)
    false_groups = sum(len(set(content[group == g])) > 1 for g in np.flatnonzero(sizes > 1))
    representative = np.array(table["representative"].to_pylist(), dtype=object)
    keeper_content = content[[position[r] for r in representative.tolist()]]
    wrongly = (keys != representative) & (content != keeper_content) & ~is_copy  # a unique example dropped
    return {"scorer": kind, **{name: float(np.mean(hits)) if hits else 0.0 for name, hits in found.items()},
            "false_groups": int(false_groups),
            "unique_removed_wrongly": float(wrongly.sum() / max(1, (~is_copy).sum()))}


def grouping_scores(dataset: str, run: str | None) -> dict[str, pa.Table]:
    """Every grouping scorer's table of ``dataset`` (embed also on ``run``'s class token when given)."""
    tables = {kind: duplicate_groups(dataset, kind, progress=False) for kind in ("exact", "phash")}
    tables["embed (pixels)"] = embedding_groups(dataset, PIXELS, progress=False)
    if run:
        tables["embed (run's class token)"] = embedding_groups(dataset, FeatureSource(run=run), progress=False)
    return tables


def redundant_removed(keys: np.ndarray, content: np.ndarray, copies: np.ndarray, kept: np.ndarray) -> float:
    """Of the redundant copies (an original and its planted copies of one kind, all but one of them),
    the share removed. Which member stays does not matter: a dedup that keeps the copy and drops the
    original removed the redundancy just the same."""
    originals = set(content[copies].tolist())
    members = np.array([c in originals for c in content.tolist()]) & (copies | (keys == content))
    redundant = removed = 0
    for original in originals:
        group = members & (content == original)
        redundant += int(group.sum()) - 1
        removed += min(int((group & ~kept).sum()), int(group.sum()) - 1)
    return removed / max(1, redundant)


def dedup_then_strategy(dataset: str, run: str, groupings: dict[str, pa.Table]) -> list[dict]:
    examples = SourceExamples.of(location(dataset))
    masks = planted_masks(dataset, examples)
    content, _ = content_of(planted_of(dataset), examples.keys)
    rows = []
    scores = {scorer: compute_scores(scorer, ScoreContext(dataset, run, progress=False))
              for scorer in ("forgetting", "loss", "el2n")}
    # the default hard cut (10%), and one sized to the label noise the planted set holds (10% of train,
    # 11% of what the exact dedup leaves): CCS's cut is meant to be set to the expected noise
    variants = [(grouping, scorer, 0.1) for grouping, scorer in itertools.product(groupings, scores)]
    variants += [("exact", scorer, 0.15) for scorer in scores]
    for grouping, scorer, hard_cut in variants:
        options = SelectOptions(keep=0.8, strategy="stratified", hard_cut=hard_cut)
        table = select(examples, scores[scorer], options, groupings[grouping])
        kept = np.array(table["kept"].to_pylist())
        cut = "" if hard_cut == 0.1 else f", hard cut {hard_cut:g}"
        rows.append({"selection": f"dedup ({grouping}) + stratified ({scorer}{cut})", "kept": float(kept.mean()),
                     "duplicates": redundant_removed(examples.keys, content, masks["duplicates"], kept),
                     "near-duplicates": redundant_removed(examples.keys, content, masks["near-duplicates"], kept),
                     "label flips": float((~kept & masks["label flips"]).sum() / max(1, masks["label flips"].sum()))})
    return rows


def scoring_time(root: Path, count: int, run: str) -> list[dict]:
    """Whole-call seconds of each grouping scorer on ``count`` examples, with 1 and 2 Ray CPUs (the
    run's class token with 2 only: the run is the planted one, its ViT fed these 32x32 images at 16x16)."""
    dataset = str(root / "scale")
    ingest(open_source("synthetic", SourceOptions(count=count, image_size=32, val_fraction=0.0001)), dataset,
           IngestOptions(shard_size=5000), ["benchmark"], progress=False)
    scorers = {"exact": lambda: duplicate_groups(dataset, "exact", progress=False),
               "phash": lambda: duplicate_groups(dataset, "phash", progress=False),
               "embed (pixels)": lambda: embedding_groups(dataset, PIXELS, progress=False),
               "embed (run's class token)": lambda: embedding_groups(dataset, FeatureSource(run=run), progress=False)}
    rows = []
    for cpus in (1, 2):
        ray.shutdown()
        init_ray(cpus=cpus)
        for name, score in scorers.items():
            if cpus == 1 and name.startswith("embed (run"):
                continue
            start = time.perf_counter()
            score()
            rows.append({"examples": count, "ray_cpus": cpus, "scorer": name, "seconds": time.perf_counter() - start})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--count", type=int, default=5000, help="synthetic examples for the planted figures")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--scale", type=int, default=100_000, help="examples for the timing")
    args = parser.parse_args()
    init_ray(cpus=2)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        dataset, run = planted_run(root, args.count, args.epochs)
        groupings = grouping_scores(dataset, run)
        larger = planted_dataset(root / "planted-32", args.count, image_size=32)
        report = {"grouping": [{**grouping_quality(dataset, name, table), "image": "16x16"}
                               for name, table in groupings.items()]
                  + [{**grouping_quality(larger, name, table), "image": "32x32"}
                     for name, table in grouping_scores(larger, None).items()],
                  "dedup_then_strategy": dedup_then_strategy(dataset, run, groupings),
                  "timing": scoring_time(root, args.scale, run)}
    write_report(Path(args.out), "duplicates", report, render)


def render(report: dict) -> str:
    lines = ["Planted copies grouped with their original (synthetic, 10% of train each kind):", "",
             "| images | scorer | exact copies | near-copies | false groups | unique examples removed wrongly |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['image']} | {r['scorer']} | {r['duplicates']:.0%} | {r['near-duplicates']:.0%} | "
              f"{r['false_groups']} | {r['unique_removed_wrongly']:.2%} |" for r in report["grouping"]]
    lines += ["", "At keep 0.8, dedup first in the same selection: share of the redundant copies removed (all "
              "but one per original, whichever stays) and of the label flips removed:", "",
              "| selection | kept | duplicates | near-duplicates | label flips |", "|---|---|---|---|---|"]
    lines += [f"| {r['selection']} | {r['kept']:.0%} | {r['duplicates']:.0%} | {r['near-duplicates']:.0%} | "
              f"{r['label flips']:.0%} |" for r in report["dedup_then_strategy"]]
    lines += ["", "Scoring time (features of every train image + grouping; whole call; embed on pixels):", "",
              "| examples | Ray CPUs | scorer | seconds |", "|---|---|---|---|"]
    lines += [f"| {r['examples']:,} | {r['ray_cpus']} | {r['scorer']} | {r['seconds']:.1f} |" for r in report["timing"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
