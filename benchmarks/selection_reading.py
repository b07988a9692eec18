"""Reading a selection through the index vs materialized survivor shards, for docs/benchmarks.md:

    .venv/bin/python benchmarks/selection_reading.py [--out benchmarks/results] [--repeats 3]

On 20k synthetic 32x32 images, random selections keeping 80% and 50%: decoded images/s of
``ShardDataset(source, selection=vNNNN)`` (survivors read from the source shards by byte range,
neighbours coalesced) vs ``ShardDataset(DATASET/kept/vNNNN)`` (survivors repacked by
``onion materialize``), 2 DataLoader workers, batches of 256, on local disk and on s3:// (moto's S3
server on loopback). Interleaved repeats, medians. Also the one-off cost of materializing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import fsspec
import torch
from torch.utils.data import DataLoader

from pipeline.bench.data import BATCH, images_per_second
from report_files import write_report
from scale_out import timed
from shards import ShardDataset

# The loopback servers are the tests' (tests/loopback.py, not installed with onion): run from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from loopback import aws_environment, environment, moto_server

KEEPS = {"v0001": 0.8, "v0002": 0.5}  # selection versions, in the order they are made


def make_dataset(root: Path, count: int) -> tuple[Path, dict[str, float]]:
    """Source dataset, its selections and their survivor shards; returns the materialize seconds."""
    data = root / "data"
    timed("ingest", "synthetic", str(data), "--count", str(count), "--image-size", "32", "--val-fraction", "0.0001",
          "--shard-size", "5000")
    materialize_seconds = {}
    for version, keep in KEEPS.items():
        timed("select", str(data), "--strategy", "random", "--keep", str(keep), "--seed", "1")
        materialize_seconds[version] = timed("materialize", str(data), "--selection", version)
    return data, materialize_seconds


def loaders(base: str) -> dict[tuple[float, str], DataLoader]:
    made = {}
    for version, keep in KEEPS.items():
        for how, dataset in (("selection", ShardDataset(base, batch_size=BATCH, buffer_size=1000, selection=version)),
                             ("survivor shards", ShardDataset(f"{base}/kept/{version}", batch_size=BATCH,
                                                              buffer_size=1000))):
            made[(keep, how)] = DataLoader(dataset, batch_size=None, num_workers=2)
    return made


def measure(base: str, repeats: int) -> dict[tuple[float, str], float]:
    made = loaders(base)
    for loader in made.values():
        images_per_second(loader)  # warm-up: page cache, worker imports
    rates: dict = {name: [] for name in made}
    for _ in range(repeats):  # interleaved, so drift favours no reader
        for name, loader in made.items():
            rates[name].append(images_per_second(loader))
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="where selection_reading.json and .md go")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--count", type=int, default=20_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        data, materialize_seconds = make_dataset(Path(scratch), args.count)
        rates = {"local disk": measure(str(data), args.repeats)}
        with moto_server() as endpoint, environment(aws_environment(endpoint)):
            s3 = fsspec.filesystem("s3")
            s3.mkdir("bench")
            s3.put(str(data), "bench/data", recursive=True)
            rates["s3:// (loopback)"] = measure("s3://bench/data", args.repeats)
    rows = [{"storage": storage, "keep": keep, "selection": measured[(keep, "selection")],
             "survivor_shards": measured[(keep, "survivor shards")],
             "ratio": measured[(keep, "selection")] / measured[(keep, "survivor shards")]}
            for storage, measured in rates.items() for keep in KEEPS.values()]
    report = {"machine": f"{os.cpu_count()} CPUs", "repeats": args.repeats, "images": args.count, "rows": rows,
              "materialize_seconds": {str(KEEPS[v]): s for v, s in materialize_seconds.items()}}
    write_report(Path(args.out), "selection_reading", report, render)


def render(report: dict) -> str:
    lines = [f"Reading a selection of {report['images']:,} synthetic 32x32 images ({report['machine']}, 2 DataLoader "
             f"workers, batches of 256, median of {report['repeats']}), decoded images/s:", "",
             "| storage | keep | through the index (selection) | survivor shards | index / shards |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['storage']} | {r['keep']} | {r['selection']:,.0f} | {r['survivor_shards']:,.0f} | "
              f"{r['ratio']:.2f}x |" for r in report["rows"]]
    made = ", ".join(f"keep {keep}: {seconds:.1f} s" for keep, seconds in report["materialize_seconds"].items())
    lines += ["", f"Materializing the survivor shards (onion materialize, whole command): {made}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
