"""Grouping scorers at scale: ``exact`` and ``phash`` on 100k, 300k and 1M synthetic examples.

    .venv/bin/python benchmarks/duplicates_scale.py [--sizes 100000 300000 1000000] [--out benchmarks/results]

For each size: ingest synthetic 16x16 images (5% planted exact copies, 5% near-copies) once, then
score with 2 Ray CPUs (and, at ``--speedup-size``, with 1 Ray CPU as well): wall clock of the
whole call (hashing in Ray tasks over the shards, grouping by multi-index hashing with one Ray
task per block), and peak memory sampled every 0.2 s (each scorer in a fresh process): the
driver's RSS, and the driver plus its Ray worker processes together as PSS (shared pages, such as
torch's libraries that every worker maps, counted once; Ray's own daemons, GCS and raylet, are
left out: a fixed cost that does not grow with the data). The growth check divides each time by
n log2 n: a flat or falling column means the cost grows no faster than n log n.

``exact (by part)`` and ``phash (by part)`` are ``onion score DATASET exact|phash`` on the partitioned
index: Ray actors that each hash some index parts and exchange hashes by bucket, each writing its parts
of the scores (the driver holds references, and for phash the near pairs); ``exact`` and ``phash`` are
the one-process grouping (every hash in the driver). ``--scorers`` picks among them; ``--name`` names the result files.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray

from pipeline.curation.scoring import ScoreContext, read_scores, store_scores
from pipeline.curation.scoring.duplicates import duplicate_groups
from pipeline.ingest.job import IngestOptions, ingest
from pipeline.ingest.sources import SourceOptions, open_source
from pipeline.ray_runtime import init_ray
from report_files import write_report
from shards import location

GiB = 1 << 30


class PeakMemory:
    """Peak RSS of this process, and PSS of this process plus Ray's worker processes, sampled in a thread."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.driver, self.total = interval, 0, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        me = psutil.Process(os.getpid())
        while not self.stop.is_set():
            driver = me.memory_info().rss
            total = me.memory_full_info().pss
            for process in psutil.process_iter(["cmdline"]):
                cmdline = process.info["cmdline"] or []
                if cmdline and cmdline[0].startswith("ray::"):
                    with contextlib.suppress(psutil.Error):  # a worker that ended meanwhile
                        total += process.memory_full_info().pss
            self.driver, self.total = max(self.driver, driver), max(self.total, total)
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()


def make_dataset(root: Path, count: int) -> tuple[str, float]:
    dataset = str(root / f"syn-{count}")
    if (root / f"syn-{count}" / "manifest.json").exists():  # kept from an earlier run (--root)
        return dataset, float("nan")
    source = open_source("synthetic", SourceOptions(count=count, image_size=16, dup_rate=0.05, near_dup_rate=0.05,
                                                    flip_rate=0.0, val_fraction=0.0001))
    start = time.perf_counter()
    ingest(source, dataset, IngestOptions(shard_size=10_000), ["benchmark"], progress=False)
    return dataset, time.perf_counter() - start


SCORERS = ("exact", "exact (by part)", "phash", "phash (by part)")
BY_PART = " (by part)"


def timed(dataset: str, kind: str, count: int, cpus: int) -> dict:
    scorer = kind.removesuffix(BY_PART)
    with PeakMemory() as memory:
        start = time.perf_counter()
        if kind.endswith(BY_PART):
            store_scores(scorer, ScoreContext(dataset, progress=False), stored_as=f"{scorer}-by-part")
        else:
            table = duplicate_groups(dataset, kind, progress=False)
        seconds = time.perf_counter() - start
    if kind.endswith(BY_PART):
        table = read_scores(location(dataset), f"{scorer}-by-part", columns=["group_size"])
    copies = int((table["group_size"].to_numpy() > 1).sum())
    return {"examples": count, "scorer": kind, "ray_cpus": cpus, "seconds": seconds,
            "per_n_log_n_us": seconds / (count * math.log2(count)) * 1e6, "in_groups": copies,
            "driver_peak_gib": memory.driver / GiB, "total_peak_gib": memory.total / GiB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--speedup-size", type=int, default=1_000_000, help="size also scored with 1 Ray CPU")
    parser.add_argument("--scorers", nargs="+", choices=SCORERS, default=list(SCORERS))
    parser.add_argument("--name", default="duplicates_scale", help="the result files' name (default %(default)s)")
    parser.add_argument("--root", help="keep the datasets here and reuse them in later runs (default: a temporary "
                                           "folder, each dataset removed after its size is measured)")
    parser.add_argument("--child", nargs=4, metavar=("SCORER", "DATASET", "EXAMPLES", "CPUS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, dataset, count, cpus = args.child
        init_ray(cpus=int(cpus))
        print(json.dumps(timed(dataset, kind, int(count), int(cpus))))
        return
    rows, ingests = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for count in args.sizes:
            init_ray(cpus=2)
            dataset, seconds = make_dataset(Path(args.root or scratch), count)
            ingests.append({"examples": count, "seconds": seconds})
            ray.shutdown()
            for cpus in (2, 1) if count == args.speedup_size else (2,):
                for kind in args.scorers:  # each in a fresh process: what one leaves allocated is not the next's
                    child = subprocess.run([sys.executable, __file__, "--child", kind, dataset, str(count), str(cpus)],
                                           check=True, capture_output=True, text=True)
                    rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
                    print(rows[-1], flush=True)
            if not args.root:  # room for the next size
                shutil.rmtree(dataset)
    write_report(Path(args.out), args.name, {"scoring": rows, "ingest": ingests}, render)


def render(report: dict) -> str:
    lines = ["Grouping scorers at scale (synthetic 16x16, 10% planted copies; whole call: hashing on Ray "
             "+ grouping):", "",
             "| examples | scorer | Ray CPUs | seconds | us per n log2 n | in groups | driver peak RSS GiB | "
             "driver + workers peak PSS GiB |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['examples']:,} | {r['scorer']} | {r['ray_cpus']} | {r['seconds']:.1f} | {r['per_n_log_n_us']:.3f} "
              f"| {r['in_groups']:,} | {r['driver_peak_gib']:.2f} | {r['total_peak_gib']:.2f} |"
              for r in report["scoring"]]
    by_key = {(r["examples"], r["scorer"], r["ray_cpus"]): r["seconds"] for r in report["scoring"]}
    speedups = [f"{kind} at {n:,}: {by_key[(n, kind, 1)] / by_key[(n, kind, 2)]:.2f}x"
                for (n, kind, cpus) in by_key if cpus == 1]
    if speedups:
        lines += ["", "2 Ray CPUs against 1: " + "; ".join(speedups)]
    ingested = [r for r in report["ingest"] if not math.isnan(r["seconds"])]  # NaN: reused from --root
    if ingested:
        lines += ["", "Ingest (not part of the scoring figures): " + "; ".join(
            f"{r['examples']:,} examples in {r['seconds']:.0f} s" for r in ingested)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
