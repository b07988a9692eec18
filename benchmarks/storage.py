"""Storage-layer figures for docs/benchmarks.md: ingest and reader throughput, reader memory.

    .venv/bin/python benchmarks/storage.py [--out benchmarks/results] [--repeats 3]

Every speed is measured side by side in this one run on this machine, as medians over repeats:
  1. ingest of synthetic 50k at 32x32 with 1 vs 2 Ray workers (examples/s);
  2. our shard reader vs torchvision ImageFolder over the same 20k images as PNG files,
     with 1 and 2 DataLoader workers (decoded images/s);
  3. the reader's peak RSS over a whole epoch of 10k vs 100k examples.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from pipeline.bench.data import export_image_folder, measure_readers, peak_rss_mib
from pipeline.ingest.job import IngestOptions, ingest
from pipeline.ingest.sources import SourceOptions, open_source
from pipeline.ray_runtime import init_ray
from report_files import write_report

BATCH = 256


def make_synthetic(out: Path, count: int, workers: int | None = None) -> float:
    """Ingest synthetic data into ``out``; returns examples/s (Ray start-up not counted)."""
    init_ray(cpus=workers)
    source = open_source("synthetic", SourceOptions(count=count, image_size=32, val_fraction=0.0001))
    start = time.perf_counter()
    ingest(source, str(out), IngestOptions(shard_size=5000), command=["benchmark"], progress=False)
    elapsed = time.perf_counter() - start
    ray.shutdown()
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="where storage.json and storage.md go")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ingest-count", type=int, default=50_000)
    parser.add_argument("--reader-count", type=int, default=20_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    report: dict = {"machine": f"{os.cpu_count()} CPUs", "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        ingest_rates = {1: [], 2: []}
        for repeat in range(args.repeats):
            for workers in (1, 2):
                ingest_rates[workers].append(make_synthetic(root / f"ingest-{workers}-{repeat}", args.ingest_count,
                                                            workers))
        report["ingest"] = {f"{w} workers": statistics.median(r) for w, r in ingest_rates.items()}
        report["ingest"]["speed-up"] = report["ingest"]["2 workers"] / report["ingest"]["1 workers"]
        make_synthetic(root / "reader", args.reader_count)
        export_image_folder(root / "reader", root / "folder")
        report["reader"] = measure_readers(root / "reader", root / "folder", args.repeats)
        make_synthetic(root / "rss-10k", 10_000)
        make_synthetic(root / "rss-100k", 100_000)
        small, large = peak_rss_mib(root / "rss-10k"), peak_rss_mib(root / "rss-100k")  # our reader
        report["reader_peak_rss_mib"] = {"10k": small, "100k": large, "ratio": large["peak"] / small["peak"]}
    write_report(Path(args.out), "storage", report, render)


def render(report: dict) -> str:
    lines = [f"Ingest, synthetic 32x32 ({report['machine']}, median of {report['repeats']}):", ""]
    lines += ["| Ray workers | examples/s |", "|---|---|"]
    lines += [f"| {k} | {v:,.0f} |" for k, v in report["ingest"].items() if k != "speed-up"]
    lines += ["", f"Speed-up 2 vs 1 workers: {report['ingest']['speed-up']:.2f}x", ""]
    lines += ["Reader, 20k 32x32 PNGs, decoded uint8 tensors in batches of 256:", ""]
    lines += ["| reader | DataLoader workers | images/s | vs ImageFolder |", "|---|---|---|---|"]
    lines += [f"| {r['reader']} | {r['workers']} | {r['images_per_s']:,.0f} | {r['vs_imagefolder']:.2f}x |"
              for r in report["reader"]]
    rss = report["reader_peak_rss_mib"]
    lines += ["", "Reader peak RSS over one epoch (one process):", "",
              "| examples | RSS after imports | peak RSS |", "|---|---|---|"]
    lines += [f"| {n} | {rss[n]['after_imports']:.0f} MiB | {rss[n]['peak']:.0f} MiB |" for n in ("10k", "100k")]
    lines += ["", f"Peak ratio 100k / 10k: {rss['ratio']:.2f}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
