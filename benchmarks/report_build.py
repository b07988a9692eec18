"""How long ``onion report`` takes on a 100,000-example dataset, and how big the site is.

The dataset: ``onion ingest synthetic`` (32x32 colour images, planted copies), scored with
``exact`` (copy groups) and ``random``, with three selection versions: dedup + random at keep 0.8,
round 0 at keep 0.8 and round 1 swapping 5,000. Timed: the whole ``onion report DATASET
--all-selections --out DIR`` command in a subprocess (Python start included), the median of
``--repeats`` builds. Size: the bytes of the files, and what they take on disk (``du``). Then the
page in headless Chromium: how long opening it, the gallery, a class filter and an example take.

    .venv/bin/python benchmarks/report_build.py            # writes benchmarks/results/report_build.{json,md}
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

from pipeline.curation.scoring import ScoreContext, compute_scores, write_scores
from pipeline.curation.selection import SelectOptions, SelectRequest, make_selection
from pipeline.ingest.job import IngestOptions, ingest
from pipeline.ingest.sources import SourceOptions, open_source
from pipeline.ray_runtime import init_ray
from report_files import write_report
from shards import location

MIB = 1 << 20


def make_dataset(root: Path, count: int) -> str:
    url = str(root / "syn")
    source = open_source("synthetic", SourceOptions(count=count, image_size=32))
    ingest(source, url, IngestOptions(shard_size=5000), ["benchmark"], progress=False)
    dataset = location(url)
    write_scores(dataset, "exact", compute_scores("exact", ScoreContext(url, progress=False)))
    write_scores(dataset, "random", compute_scores("random", ScoreContext(url)))
    make_selection(dataset, SelectRequest(dedup="exact", options=SelectOptions(keep=0.8, strategy="random")))
    first = make_selection(dataset, SelectRequest(round_number=0, options=SelectOptions(keep=0.8))).version
    make_selection(dataset, SelectRequest(scores="random", round_number=1, parent=first, remove_n=count // 20))
    return url


def site_size(folder: Path) -> tuple[int, int, int]:
    """Bytes of the files, bytes on disk (``du``), number of files."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    on_disk = int(subprocess.run(["du", "-sk", str(folder)], capture_output=True, text=True,
                                 check=True).stdout.split()[0]) * 1024
    return sum(p.stat().st_size for p in files), on_disk, len(files)


def browse(site: Path) -> dict:
    """Milliseconds, in headless Chromium, to open the page, draw the selection tab with its gallery,
    filter the gallery by a class, and open an example's lineage (each measured inside the page)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        start = time.perf_counter()
        page.goto(site.joinpath("index.html").as_uri())
        page.wait_for_function("window.ONION_READY === true")
        timings = {"open_ms": (time.perf_counter() - start) * 1000}
        for name, action, done in (
                ("selection_tab_ms", "() => { location.hash = 'selection'; }", "#gallery .card"),
                ("class_filter_ms", "() => { const s = document.getElementById('f-class'); s.value = '3'; "
                                    "s.dispatchEvent(new Event('change')); }", "#gallery .card"),
                ("example_ms", "() => { location.hash = 'example=' + ONION.examples.key[4242]; }", "#lineage")):
            start = time.perf_counter()
            page.evaluate(action)
            page.wait_for_selector(done)
            timings[name] = (time.perf_counter() - start) * 1000
        browser.close()
    return timings


def render(report: dict) -> str:
    rows = "\n".join(f"| {r['examples']:,} | {r['selections']} | {r['seconds']:.1f} | {r['thumbnails']:,} | "
                     f"{r['mib']:.1f} | {r['mib_on_disk']:.1f} | {r['files']:,} |" for r in report["rows"])
    return (f"onion report on synthetic 32x32 data, {report['cpus']} CPUs ({report['command']}); "
            f"median of {report['repeats']} builds, whole command:\n\n"
            "| examples | selection versions | seconds | thumbnails | site MiB | MiB on disk | files |\n"
            "|---|---|---|---|---|---|---|\n" + rows + "\n\n"
            "In headless Chromium (milliseconds): " + ", ".join(
                f"{name.removesuffix('_ms').replace('_', ' ')} {value:.0f}"
                for name, value in report["browser"].items()) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    init_ray(cpus=2)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        url = make_dataset(root, args.count)
        site = root / "site"
        command = [sys.executable, "-m", "pipeline", "report", url, "--all-selections", "--out", str(site)]
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            seconds.append(time.perf_counter() - start)
        size, on_disk, files = site_size(site)
        row = {"examples": args.count, "selections": 3, "seconds": statistics.median(seconds), "all_seconds": seconds,
               "thumbnails": len(list((site / "thumbs").iterdir())), "mib": size / MIB, "mib_on_disk": on_disk / MIB,
               "files": files}
        timings = browse(site)
    report = {"cpus": os.cpu_count(), "repeats": args.repeats, "rows": [row], "browser": timings,
              "command": "onion report DATASET --all-selections --out DIR"}
    write_report(Path(args.out), "report_build", report, render)


if __name__ == "__main__":
    main()
