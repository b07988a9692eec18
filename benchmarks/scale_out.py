"""Scale-out figures for docs/benchmarks.md, with real servers on loopback (the same ones the tests start):

    .venv/bin/python benchmarks/scale_out.py [--out benchmarks/results] [--repeats 3]

  1. the shard reader streaming from s3:// (moto's S3 server) vs the same shards on local disk:
     decoded images/s with 2 DataLoader workers, interleaved repeats, medians;
  2. ``onion ingest`` and ``onion score el2n`` joined to a loopback Ray cluster of 1 node, then of
     2 nodes (one CPU each): whole-command wall clock, medians.

Everything shares this machine's CPUs: the S3 server and both Ray nodes included.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import torch
from torch.utils.data import DataLoader

from pipeline.bench.data import BATCH, images_per_second
from report_files import write_report
from shards import ShardDataset
from trainer.config import TrainConfig
from trainer.launch import train

# The loopback servers are the tests' (tests/loopback.py, not installed with onion): run from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from loopback import RAY_CLUSTER_ENV, LoopbackRayCluster, aws_environment, environment, moto_server

ONION = [sys.executable, "-m", "pipeline"]


def reader_figures(root: Path, count: int, repeats: int) -> dict:
    local = root / "reader"
    # In a subprocess: a Ray started and stopped in this process slows its DataLoaders for a while.
    timed("ingest", "synthetic", str(local), "--count", str(count), "--image-size", "32", "--val-fraction", "0.0001",
          "--shard-size", "5000")
    with moto_server() as endpoint, environment(aws_environment(endpoint)):
        s3 = fsspec.filesystem("s3")
        s3.mkdir("bench")
        s3.put(str(local), "bench/reader", recursive=True)
        urls = {"local disk": str(local), "s3:// (loopback)": "s3://bench/reader"}
        loaders = {name: DataLoader(ShardDataset(url, batch_size=BATCH, buffer_size=1000), batch_size=None,
                                    num_workers=2)
                   for name, url in urls.items()}
        for loader in loaders.values():
            images_per_second(loader)  # warm-up: page cache, worker imports
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for _ in range(repeats):
            for name, loader in loaders.items():
                rates[name].append(images_per_second(loader))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    return {"images": count, "images_per_s": medians, "ratio": medians["s3:// (loopback)"] / medians["local disk"]}


def timed(*args: str) -> float:
    start = time.perf_counter()
    result = subprocess.run([*ONION, *args], capture_output=True, text=True, env={**os.environ, **RAY_CLUSTER_ENV})
    if result.returncode:
        raise RuntimeError(f"onion {' '.join(args)}: {result.stderr[-2000:]}")
    return time.perf_counter() - start


def cluster_figures(root: Path, count: int, repeats: int) -> dict:
    scored = root / "scored"
    timed("ingest", "synthetic", str(scored), "--count", str(count), "--image-size", "32", "--shard-size", "500")
    run = root / "run"
    train(TrainConfig(dataset=str(scored), out=str(run), epochs=1, depth=4, embed_dim=96, num_heads=3, patch_size=4,
                      batch_size=128, loader_workers=1))
    figures: dict = {"examples": count}
    with LoopbackRayCluster(str(root)) as cluster:
        for nodes in (1, 2):
            if nodes == 2:
                cluster.add_node()
            ingest_s, score_s = [], []
            for repeat in range(repeats):
                ingest_s.append(timed("ingest", "synthetic", str(root / f"ingest-{nodes}-{repeat}"),
                                      "--count", str(count), "--image-size", "32", "--shard-size", "500",
                                      "--address", cluster.address))
                score_s.append(timed("score", str(scored), "el2n", "--run", str(run), "--address", cluster.address))
            figures[f"{nodes} node"] = {"ingest_examples_per_s": count / statistics.median(ingest_s),
                                        "el2n_examples_per_s": count / statistics.median(score_s)}
    for task in ("ingest", "el2n"):
        rate = f"{task}_examples_per_s"
        figures[f"{task} speed-up"] = figures["2 node"][rate] / figures["1 node"][rate]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="where scale_out.json and scale_out.md go")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reader-count", type=int, default=20_000)
    parser.add_argument("--cluster-count", type=int, default=10_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    report: dict = {"machine": f"{os.cpu_count()} CPUs", "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as scratch:
        report["reader"] = reader_figures(Path(scratch), args.reader_count, args.repeats)
        report["cluster"] = cluster_figures(Path(scratch), args.cluster_count, args.repeats)
    write_report(Path(args.out), "scale_out", report, render)


def render(report: dict) -> str:
    reader, cluster = report["reader"], report["cluster"]
    lines = [f"Reader, {reader['images']:,} synthetic 32x32 PNGs, 2 DataLoader workers, batches of {BATCH} "
             f"({report['machine']}, median of {report['repeats']}):", "",
             "| shards on | images/s |", "|---|---|"]
    lines += [f"| {name} | {rate:,.0f} |" for name, rate in reader["images_per_s"].items()]
    lines += ["", f"s3:// vs local disk: {reader['ratio']:.2f}x", "",
              f"Loopback Ray cluster, one CPU per node, {cluster['examples']:,} examples, whole command "
              f"(driver start and connect included):", "",
              "| nodes | ingest examples/s | el2n scoring examples/s |", "|---|---|---|"]
    lines += [f"| {n} | {cluster[f'{n} node']['ingest_examples_per_s']:,.0f} "
              f"| {cluster[f'{n} node']['el2n_examples_per_s']:,.0f} |" for n in (1, 2)]
    lines += ["", f"Speed-up 2 vs 1 node: ingest {cluster['ingest speed-up']:.2f}x, "
              f"el2n {cluster['el2n speed-up']:.2f}x", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
