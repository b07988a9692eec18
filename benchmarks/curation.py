"""Example-level figures for docs/benchmarks.md: planted redundancy removed, scoring and selection speed.

    .venv/bin/python benchmarks/curation.py [--out benchmarks/results]

1. On synthetic data with planted duplicates, near-duplicates and label flips, train a small ViT
   for a few epochs, score the examples with every scorer, select with every strategy at keep 0.8,
   and report the share of each planted kind that was removed (random removes ~20% of each).
2. EL2N scoring throughput with 1 vs 2 Ray actors (warm), same data, median of repeats.
3. Select + materialize time for 100k synthetic examples.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from ray.util import ActorPool

from pipeline.curation.materialize import materialize
from pipeline.curation.scoring import ScoreContext, compute_scores
from pipeline.curation.scoring.el2n import EL2NScorer, checkpoint_folders
from pipeline.curation.selection import STRATEGIES, SelectOptions, SourceExamples, select
from pipeline.ingest.job import IngestOptions, ingest
from pipeline.ingest.sources import SourceOptions, open_source
from pipeline.ray_runtime import init_ray
from report_files import write_report
from shards import location, read_index, read_manifest
from shards.selections import save_selection
from trainer.config import TrainConfig
from trainer.launch import train

KINDS = {"duplicates": "dup-of:", "near-duplicates": "near-dup-of:", "label flips": "label-flip"}
DIFFICULTY_SCORERS = ("forgetting", "loss", "el2n", "random")  # the grouping ones: benchmarks/duplicates.py


def planted_dataset(path: Path, count: int, image_size: int) -> str:
    """Synthetic data with 10% of train each planted kind: exact copies, near-copies, label flips."""
    source = open_source("synthetic", SourceOptions(count=count, image_size=image_size, dup_rate=0.1,
                                                    near_dup_rate=0.1, flip_rate=0.1))
    ingest(source, str(path), IngestOptions(shard_size=500), ["benchmark"], progress=False)
    return str(path)


def planted_run(root: Path, count: int, epochs: int) -> tuple[str, str]:
    """Synthetic data with 10% of train each planted kind, and a small ViT trained on it (for scores)."""
    dataset, run = planted_dataset(root / "planted", count, image_size=16), str(root / "run")
    train(TrainConfig(dataset=dataset, out=run, epochs=epochs, batch_size=64, depth=2, embed_dim=64, num_heads=2,
                      patch_size=4, lr=2e-3, warmup_epochs=0.3, loader_workers=1, label_smoothing=0.0,
                      weight_decay=0.01))
    return dataset, run


def planted_masks(dataset: str, examples: SourceExamples) -> dict[str, np.ndarray]:
    planted = {r["key"]: r["planted"] or ""
               for r in read_index(location(dataset), columns=["key", "planted"]).to_pylist()}
    return {kind: np.array([planted[k].startswith(prefix) for k in examples.keys]) for kind, prefix in KINDS.items()}


def planted_table(root: Path, count: int, epochs: int) -> list[dict]:
    dataset, run = planted_run(root, count, epochs)
    examples = SourceExamples.of(location(dataset))
    masks = planted_masks(dataset, examples)
    rows = []
    for scorer in DIFFICULTY_SCORERS:
        scores = compute_scores(scorer, ScoreContext(dataset, run, progress=False))
        for strategy in STRATEGIES:
            kept = np.array(select(examples, scores, SelectOptions(keep=0.8, strategy=strategy))["kept"].to_pylist())
            rows.append({"scorer": scorer, "strategy": strategy,
                         **{kind: float((~kept & mask).sum() / max(1, mask.sum())) for kind, mask in masks.items()}})
    return rows


def scoring_speed(root: Path, count: int, repeats: int) -> dict:
    """EL2N examples/s with 1 and 2 actors, started and warmed up first (start-up is not counted)."""
    dataset, run = str(root / "speed"), str(root / "run")
    ingest(open_source("synthetic", SourceOptions(count=count, image_size=16, seed=1)), dataset,
           IngestOptions(shard_size=1000), ["benchmark"], progress=False)
    shards = [s["name"] for s in read_manifest(location(dataset))["shards"] if s["split"] == "train"]
    examples = len(SourceExamples.of(location(dataset)).keys)
    folders = checkpoint_folders(run)
    rates: dict[int, float] = {}
    for workers in (1, 2):
        actors = [EL2NScorer.remote(run, folders) for _ in range(workers)]
        ray.get([actor.score_shard.remote(dataset, "train", shards[0]) for actor in actors])  # warm up
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            list(ActorPool(actors).map_unordered(lambda a, shard: a.score_shard.remote(dataset, "train", shard),
                                                 shards))
            seconds.append(time.perf_counter() - start)
        rates[workers] = examples / statistics.median(seconds)
        for actor in actors:
            ray.kill(actor)
    return {"examples": examples, "1 actor": rates[1], "2 actors": rates[2], "speed-up": rates[2] / rates[1]}


def select_and_materialize(root: Path, count: int) -> dict:
    dataset = str(root / "big")
    ingest(open_source("synthetic", SourceOptions(count=count, image_size=16)), dataset, IngestOptions(shard_size=5000),
           ["benchmark"], progress=False)
    examples = SourceExamples.of(location(dataset))
    start = time.perf_counter()
    scores = compute_scores("random", ScoreContext(dataset))
    table = select(examples, scores, SelectOptions(keep=0.8, strategy="stratified"))
    version = save_selection(location(dataset), table, {"benchmark": True})
    selected = time.perf_counter()
    materialize(dataset, version, IngestOptions(shard_size=5000), ["benchmark"], progress=False)
    done = time.perf_counter()
    return {"examples": count, "train_examples": len(examples.keys), "select_seconds": selected - start,
            "materialize_seconds": done - selected}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--count", type=int, default=5000, help="synthetic examples for the planted table")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--big", type=int, default=100_000, help="examples for select + materialize")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--speed-count", type=int, default=30_000, help="examples for the EL2N speed test")
    args = parser.parse_args()
    init_ray(cpus=2)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        report = {"planted": planted_table(root, args.count, args.epochs),
                  "scoring": scoring_speed(root, args.speed_count, args.repeats),
                  "select_materialize": select_and_materialize(root, args.big)}
    write_report(Path(args.out), "curation", report, render)


def render(report: dict) -> str:
    lines = ["Share of planted examples removed at keep 0.8 (synthetic, 10% of train each kind):", "",
             "| scorer | strategy | duplicates | near-duplicates | label flips |", "|---|---|---|---|---|"]
    lines += [f"| {r['scorer']} | {r['strategy']} | {r['duplicates']:.0%} | {r['near-duplicates']:.0%} | "
              f"{r['label flips']:.0%} |"
              for r in report["planted"]]
    s = report["scoring"]
    lines += ["", f"EL2N scoring of {s['examples']:,} examples (actors started and warm, median): "
              f"1 actor {s['1 actor']:,.0f}/s, 2 actors {s['2 actors']:,.0f}/s, speed-up {s['speed-up']:.2f}x", ""]
    m = report["select_materialize"]
    lines += [f"{m['examples']:,} synthetic examples ({m['train_examples']:,} train): select (stratified) "
              f"{m['select_seconds']:.1f} s, materialize {m['materialize_seconds']:.1f} s", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
