"""WebDataset shards indexed in place vs copied into onion's shards, for docs/benchmarks.md:

    .venv/bin/python benchmarks/in_place.py [--out runs/bench-in-place] [--shards 24] [--repeats 3] [--quick]

The data: ``--shards`` WebDataset tars written by webdataset's ``ShardWriter``, each sample a JPEG photo
(scikit-learn's two sample photos, random crops resized so the long side is 300-1000 px, quality 90:
``pipeline.bench.photos.write_photos``), its class as ``.cls`` and a ``.json`` of where it came from.
Made once per size under OUT/data and kept.

  1. Indexing, with Ray already started (its start-up is reported on its own), interleaved repeats,
     medians, warm page cache: ``cat`` of the tars to /dev/null vs ``ingest --in-place`` (default checks:
     tar structure, sha256, image header) vs a copy into onion shards (``ingest`` without ``--in-place``:
     every image stored byte for byte, as many shards as the source); then the same three on s3:// (moto's
     S3 server on loopback; the reference reads every tar once through s3fs). ``--check decode`` once.
     Where the page cache can be dropped (root), ``cat`` and ``--in-place`` again cold, from the disk.
     Every output is checked to keep every sample. Also each whole command once (start-up included).
  2. Reading: the training loader (224 px ``basic`` crops, the ``onion train`` path) over the in-place
     index and over the copy, and ``onion train`` (a tiny ViT, same seed and settings) on both;
     interleaved repeats, medians.
  3. What the index costs: one in-place task's work on one core, split by step (read, shard sha256, tar
     walk, image sha256, image header; decode for ``--check decode``), and the index bytes per example
     beside a wids JSON descriptor of the same tars.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import TypeVar

import fsspec
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.bench.photos import BATCH, SIZE, run_epoch, write_photos
from report_files import write_report
from scale_out import timed
from shards import STATUS_OK, ShardDataset, location, read_index, read_manifest
from shards.decode import decode_pixels
from trainer.augment import ImageTransform
from trainer.run_folder import SUMMARY

# The loopback servers are the tests' (tests/loopback.py, not installed with onion): run from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from loopback import aws_environment, environment, moto_server

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("china", "flower")  # write_photos' classes, in label order
VAL_FRACTION = 0.05  # a small val split, so `onion train` evaluates; the same keys go to val in both datasets
MTIME = 1_700_000_000.0  # tar members' mtime: the same arguments give the same tar bytes
DONE = "_complete.json"
CAT, S3_READ = "read once (cat)", "read once (s3fs)"
IN_PLACE, COPY, DECODE = "in place", "copy", "in place, --check decode"
T, R = TypeVar("T"), TypeVar("R")
# The code measured: the figures belong to these files as they were when the run started.
CODE = ("pipeline/ingest/in_place.py", "shards/tar_members.py", "pipeline/ingest/sources/webdataset.py",
        "pipeline/ingest/job.py", "shards/reader.py")


def build_shards(data: Path, shards: int, per_shard: int, seed: int = 0) -> Path:
    """``shards`` WebDataset tars of ``per_shard`` samples (``.jpg``, ``.cls``, ``.json``), the photos in a
    seeded random order; kept under ``data`` and reused when the same arguments ask again."""
    import webdataset as wds

    folder = data / f"wds-{shards}x{per_shard}-seed{seed}"
    if (folder / DONE).exists():
        return folder
    count = shards * per_shard
    photos = data / f"photos-{count}-seed{seed}"
    # Two halves with seeds of their own, made at once on two cores (write_photos is one seeded stream).
    halves = [(photos / "a", -(-count // 2), 2 * seed), (photos / "b", count // 2, 2 * seed + 1)]
    with ProcessPoolExecutor(2) as pool:
        for made in [pool.submit(write_photos, path, n, seed=s) for path, n, s in halves]:
            made.result()
    files = [(half.name, path) for half, _, _ in halves for path in sorted(half.glob("*/*.jpg"))]
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with wds.ShardWriter(str(partial / "shard-%06d.tar"), maxcount=per_shard, verbose=0, mtime=MTIME) as sink:
        for number in np.random.default_rng(seed).permutation(len(files)):
            half, path = files[number]
            image = path.read_bytes()
            with Image.open(io.BytesIO(image)) as opened:
                width, height = opened.size
            name = path.parent.name
            sink.write({"__key__": f"{half}-{path.stem}", "jpg": image, "cls": str(CLASSES.index(name)).encode(),
                        "json": json.dumps({"photo": name, "width": width, "height": height}).encode()})
    (partial / DONE).write_text(json.dumps({"shards": shards, "per_shard": per_shard, "seed": seed}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    shutil.rmtree(photos)
    return folder


def call(arm: Callable[[], float]) -> float:
    return arm()


def tars(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.tar"))


def seconds_of(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def index_in_place(pattern: str, out: str, check: str = "header") -> None:
    """``onion ingest wds:PATTERN OUT --in-place [--check decode]`` without the CLI (Ray already up)."""
    from pipeline.ingest.in_place import InPlaceOptions, ingest_in_place
    from pipeline.ingest.sources import SourceOptions, open_source

    source = open_source(f"wds:{pattern}", SourceOptions(val_fraction=VAL_FRACTION))
    ingest_in_place(source, out, InPlaceOptions(check=check), command=["benchmark"], progress=False)


def copy_shards(pattern: str, out: str, per_shard: int) -> None:
    """``onion ingest wds:PATTERN OUT --shard-size N`` without the CLI: the default encode options store
    every RGB JPEG byte for byte; as many shards as the source, so both arms spread over the cores alike."""
    from pipeline.ingest.job import IngestOptions, ingest
    from pipeline.ingest.sources import SourceOptions, open_source

    source = open_source(f"wds:{pattern}", SourceOptions(val_fraction=VAL_FRACTION))
    ingest(source, out, IngestOptions(shard_size=per_shard), command=["benchmark"], progress=False)


class Outputs:
    """Fresh outputs under ``root`` (a path or URL) for timed ingests: an existing one would be found
    complete. Each is checked to keep all ``examples`` (a run that quarantined good samples would be
    fast and wrong), then removed; neither is timed."""

    def __init__(self, root: str, examples: int) -> None:
        self.root, self.examples, self.made = root, examples, 0
        self.fs = fsspec.core.url_to_fs(root)[0]

    def timed(self, work: Callable[[str], None]) -> Callable[[], float]:
        def run() -> float:
            self.made += 1
            out = f"{self.root}/out-{self.made}"
            elapsed = seconds_of(lambda: work(out))
            accounting = read_manifest(location(out))["accounting"]
            if accounting["ok"] != self.examples:
                raise RuntimeError(f"{out}: {accounting}, but all {self.examples} samples are sound")
            self.fs.rm(out, recursive=True)
            return elapsed

        return run


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only), so the next read comes from the disk; False when not allowed."""
    try:
        os.sync()
        DROP_CACHES.write_text("3\n")
        return True
    except OSError:
        return False


def cold(arm: Callable[[], float]) -> Callable[[], float]:
    """The arm with the page cache dropped first (not timed)."""
    return lambda: drop_page_cache() and arm()


def read_once(read: Callable[[], object]) -> Callable[[], float]:
    return lambda: seconds_of(read)


def in_turn(arms: dict[str, T], repeats: int, measure: Callable[[T], R], warm: bool = True) -> dict[str, list[R]]:
    """``measure`` of each arm ``repeats`` times, the arms taking turns, in reverse order every other
    round, so neither drift nor going first favours one; with ``warm``, one untimed round first (the
    page cache, Ray's or the DataLoader's workers)."""
    if warm:
        for arm in arms.values():
            measure(arm)
    results: dict[str, list[R]] = {name: [] for name in arms}
    names = list(arms)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            results[name].append(measure(arms[name]))
    return results


def indexing_figures(folder: Path, per_shard: int, repeats: int, scratch: Path, keep: dict[str, Path]) -> dict:
    """Ray start-up, the local arms and the s3:// arms, each set interleaved over the repeats; the cost
    split; then the datasets the reading arms use, written to ``keep``. Run in a process of its own: a
    Ray started in the main process would slow its DataLoaders."""
    import ray

    from pipeline.ray_runtime import init_ray

    paths, examples = tars(folder), len(tars(folder)) * per_shard
    pattern = f"{folder}/*.tar"
    figures: dict = {}
    # The S3 variables must be set before Ray starts: its workers inherit the environment then.
    with moto_server() as endpoint, environment(aws_environment(endpoint)):
        figures["ray_startup_s"] = seconds_of(init_ray)
        local = Outputs(str(scratch), examples)
        cat = read_once(lambda: subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True))
        in_place = local.timed(lambda out: index_in_place(pattern, out))
        arms = {CAT: cat, IN_PLACE: in_place, COPY: local.timed(lambda out: copy_shards(pattern, out, per_shard))}
        figures["local"] = in_turn(arms, repeats, call)
        if drop_page_cache():  # the other reading: both from the disk, the page cache dropped before each
            figures["local, cold"] = in_turn({CAT: cold(cat), IN_PLACE: cold(in_place)}, repeats, call, warm=False)
        figures["local"][DECODE] = [local.timed(lambda out: index_in_place(pattern, out, "decode"))()]
        s3 = fsspec.filesystem("s3")
        s3.mkdir("bench")
        figures["s3_upload_s"] = seconds_of(lambda: s3.put([str(p) for p in paths], "bench/wds/"))
        remote, s3_pattern = Outputs("s3://bench/out", examples), "s3://bench/wds/*.tar"
        arms = {S3_READ: read_once(lambda: [s3.cat_file(f"bench/wds/{p.name}") for p in paths]),  # one stream
                IN_PLACE: remote.timed(lambda out: index_in_place(s3_pattern, out)),
                COPY: remote.timed(lambda out: copy_shards(s3_pattern, out, per_shard))}
        figures["s3"] = in_turn(arms, repeats, call, warm=False)  # Ray's workers are warm now
        figures["cost"] = index_cost(folder)
        index_in_place(pattern, str(keep[IN_PLACE]))
        copy_shards(pattern, str(keep[COPY]), per_shard)
        ray.shutdown()
    return figures


def index_cost(folder: Path) -> dict:
    """One core, one pass over the tars: what an in-place task does (``scan_shard``, as a whole), and the
    same work split by step, each step alone over every shard."""
    from pipeline.ingest.in_place import InPlaceOptions, image_facts, scan_shard
    from pipeline.ingest.sources.webdataset import IMAGE_EXTENSIONS, _is_metadata, group_samples
    from shards.tar_members import walk_tar

    seconds: Counter[str] = Counter()
    images, header = 0, InPlaceOptions()

    def step(name: str, work: Callable[..., object], *args: object) -> object:
        start = time.perf_counter()
        result = work(*args)
        seconds[name] += time.perf_counter() - start
        return result

    def samples_of(data: bytes) -> list:
        return list(group_samples(walk_tar(io.BytesIO(data), len(data), read=_is_metadata)))

    for path in tars(folder):
        step("scan_shard, the whole task", scan_shard, location(str(folder)), path.name, header)
        data = step("read the file", path.read_bytes)
        step("sha256 of the whole tar", lambda data: hashlib.sha256(data).hexdigest(), data)
        samples = step("tar walk and grouping", samples_of, data)
        spans = [next((m.offset, m.size) for ext, m in s.members.items() if ext in IMAGE_EXTENSIONS) for s in samples]
        members = [memoryview(data)[a:a + n] for a, n in spans]
        images += len(members)
        step("sha256 of each image", lambda views: [hashlib.sha256(v).hexdigest() for v in views], members)
        step("image header (PIL opens it, no decode)", lambda views: [image_facts(v, header) for v in views], members)
        step("decode (--check decode only)", lambda views: [decode_pixels(v) for v in views], members)
    return {"images": images, "seconds": dict(seconds)}


def index_bytes(folder: Path, in_place: Path, copy: Path) -> dict:
    """Bytes per example of each index, and of a wids descriptor of the same tars (a count and size per tar)."""
    examples = len(read_index(location(str(in_place))))
    wids = {"wids_version": 1, "shardlist": [{"url": p.name, "nsamples": samples_in(p), "filesize": p.stat().st_size}
                                             for p in tars(folder)]}
    return {"examples": examples,
            "in place: index parts": folder_bytes(in_place / "index") / examples,
            "in place: manifest.json": (in_place / "manifest.json").stat().st_size / examples,
            "copy: index parts": folder_bytes(copy / "index") / examples,
            "wids descriptor (JSON)": len(json.dumps(wids).encode()) / examples}


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir())


def samples_in(path: Path) -> int:
    with tarfile.open(path) as tar:
        return sum(name.endswith(".jpg") for name in tar.getnames())


def same_examples(in_place: Path, copy: Path) -> dict:
    """Whether the two datasets keep the same keys, and the same splits, labels and image bytes (sha256)."""
    def kept(path: Path) -> set[tuple]:
        rows = read_index(location(str(path))).to_pylist()
        return {(r["key"], r["split"], r["label"], r["sha256"]) for r in rows if r["status"] == STATUS_OK}

    a, b = kept(in_place), kept(copy)
    return {"kept": len(a), "same_keys": {r[0] for r in a} == {r[0] for r in b}, "same_rows": a == b}


def loader_figures(datasets: dict[str, Path], repeats: int, workers: int) -> dict:
    """The training loader (``basic`` 224 px crops, batches stacked in the workers) over each dataset."""
    transform = ImageTransform(SIZE, "basic", seed=0)
    loaders = {name: DataLoader(ShardDataset(str(path), batch_size=BATCH, channels=3, image_transform=transform),
                                batch_size=None, num_workers=workers) for name, path in datasets.items()}
    epochs = in_turn(loaders, repeats, run_epoch)
    # images per CPU-second (workers and main process) too: less moved than images/s by other work on the machine
    return {name: {"images_per_s": [run["images"] / run["seconds"] for run in runs],
                   "images_per_cpu_s": [run["images"] / (run["main_cpu"] + run["worker_cpu"]) for run in runs],
                   "images": runs[0]["images"]} for name, runs in epochs.items()}


def train_once(dataset: Path, run: Path, settings: list[str]) -> dict:
    """One ``onion train`` command: its images/s (summary.json: training time only, evaluation left out)
    and the CPU seconds of the whole command (its loader workers included)."""
    shutil.rmtree(run, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    timed("train", str(dataset), "--out", str(run), *settings)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = json.loads((run / SUMMARY).read_text())
    shutil.rmtree(run)
    return {"images_per_s": summary["images_per_second"], "images": summary["train_images"],
            "cpu_s": after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime}


def training_figures(datasets: dict[str, Path], repeats: int, settings: list[str], runs: Path) -> dict:
    """``onion train`` on each dataset, the same settings and seed (no warm-up round: a run is long)."""
    made = in_turn({name: path for name, path in datasets.items()}, repeats,
                   lambda path: train_once(path, runs / path.name, settings), warm=False)
    return {name: {"images_per_s": [run["images_per_s"] for run in results],
                   "cpu_s_per_run": [run["cpu_s"] for run in results], "images": results[0]["images"]}
            for name, results in made.items()}


def code_versions() -> dict[str, str]:
    return {path: hashlib.sha256((ROOT / path).read_bytes()).hexdigest()[:12] for path in CODE}


def load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-in-place", help="where results.md, results.json and data/ go")
    parser.add_argument("--shards", type=int, default=24, help="WebDataset tars to make (default 24)")
    parser.add_argument("--per-shard", type=int, default=200, help="samples per tar (default 200)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of every arm (default 3)")
    parser.add_argument("--train-epochs", type=int, default=1, help="epochs of each onion train run (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of seconds: 4 tars of 8, 1 repeat, no whole-command timings")
    args = parser.parse_args()
    if args.quick:
        args.shards, args.per_shard, args.repeats, args.train_epochs = 4, 8, 1, 1
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict = {"machine": f"{os.cpu_count()} CPUs", "repeats": args.repeats, "quick": args.quick,
                    "recorded": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "load_before": load(),
                    "code": code_versions()}
    report["build_s"] = seconds_of(lambda: build_shards(out / "data", args.shards, args.per_shard))
    folder = build_shards(out / "data", args.shards, args.per_shard)
    sizes = [p.stat().st_size for p in tars(folder)]
    report["data"] = {"tars": len(sizes), "examples": args.shards * args.per_shard, "bytes": sum(sizes)}
    datasets = {IN_PLACE: out / "data" / "in-place", COPY: out / "data" / "copy"}
    for path in datasets.values():
        shutil.rmtree(path, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            report["indexing"] = pool.submit(indexing_figures, folder, args.per_shard, args.repeats, Path(scratch),
                                             datasets).result()
        if not args.quick:  # what a user waits for: Python and Ray start-up included
            pattern, val = f"wds:{folder}/*.tar", ["--val-fraction", str(VAL_FRACTION)]
            report["whole_command_s"] = {
                IN_PLACE: timed("ingest", pattern, f"{scratch}/in-place", "--in-place", *val),
                COPY: timed("ingest", pattern, f"{scratch}/copy", "--shard-size", str(args.per_shard), *val)}
    report["same_examples"] = same_examples(datasets[IN_PLACE], datasets[COPY])
    report["loader"] = loader_figures(datasets, args.repeats, workers=2)
    train_settings = ["--epochs", str(args.train_epochs), "--depth", "2", "--embed-dim", "64", "--num-heads", "2",
                      "--img-size", "112", "--patch-size", "16", "--batch-size", "8" if args.quick else "64",
                      "--loader-workers", "2", "--seed", "0", "--device", "cpu", "--amp", "off",
                      "--no-record-dynamics", "--eval-every", str(args.train_epochs), "--progress-seconds", "60"]
    report["training"] = training_figures(datasets, args.repeats, train_settings, out / "runs")
    report["training_settings"] = " ".join(train_settings)
    report["index_bytes"] = index_bytes(folder, datasets[IN_PLACE], datasets[COPY])
    report["load_after"], report["total_s"] = load(), time.perf_counter() - started
    report["code_changed_during_run"] = [path for path, digest in code_versions().items()
                                         if digest != report["code"][path]]
    summarise(report)
    write_report(out, "results", report, render)


def summarise(report: dict) -> None:
    """Medians and the goals' ratios, beside the raw repeats."""
    indexing, size = report["indexing"], report["data"]["bytes"]
    reference = {"local": CAT, "local, cold": CAT, "s3": S3_READ}
    report["medians"] = {}
    for store, read in reference.items():
        if store not in indexing:
            continue
        medians = {arm: statistics.median(values) for arm, values in indexing[store].items()}
        report["medians"][store] = {arm: {"seconds": s, "mb_per_s": size / s / 1e6, "vs_read_once": s / medians[read]}
                                    for arm, s in medians.items()}
    for part, measure in (("loader", "images_per_s"), ("loader", "images_per_cpu_s"), ("training", "images_per_s"),
                          ("training", "cpu_s_per_run")):
        rates = {name: statistics.median(figures[measure]) for name, figures in report[part].items()}
        report.setdefault(part + "_medians", {})[measure] = {**rates, "ratio": rates[IN_PLACE] / rates[COPY]}
    local, s3 = report["medians"]["local"], report["medians"]["s3"]
    report["goals"] = {
        "in place vs reading the bytes once, local (goal <= 2)": local[IN_PLACE]["vs_read_once"],
        **({"in place vs reading the bytes once, local, page cache dropped (goal <= 2)":
            report["medians"]["local, cold"][IN_PLACE]["vs_read_once"]} if "local, cold" in report["medians"] else {}),
        "in place vs reading the bytes once, s3": s3[IN_PLACE]["vs_read_once"],
        "in place vs copy, local": local[IN_PLACE]["seconds"] / local[COPY]["seconds"],
        "in place vs copy, s3": s3[IN_PLACE]["seconds"] / s3[COPY]["seconds"],
        "--check decode vs --check header, local": local[DECODE]["seconds"] / local[IN_PLACE]["seconds"],
        "onion train images/s, in place / copy (goal >= 0.95)": report["training_medians"]["images_per_s"]["ratio"],
        "training loader images/s, in place / copy (goal >= 0.95)": report["loader_medians"]["images_per_s"]["ratio"],
        "training loader images per CPU-s, in place / copy": report["loader_medians"]["images_per_cpu_s"]["ratio"]}


def render(report: dict) -> str:
    data = report["data"]
    lines = [f"{data['tars']} WebDataset tars, {data['examples']:,} JPEG photos, {data['bytes'] / 1e6:,.0f} MB "
             f"({report['machine']}, median of {report['repeats']} interleaved repeats, warm page cache unless "
             "marked cold (dropped before each run: the bytes come from the disk); load average "
             f"{report['load_before'][0]:.2f} before, {report['load_after'][0]:.2f} after; {report['recorded']}):", "",
             "| storage | arm | seconds | MB/s | vs reading the bytes once |", "|---|---|---|---|---|"]
    for store, arms in report["medians"].items():
        label = {"local": "local disk", "local, cold": "local disk, cold", "s3": "s3:// (moto, loopback)"}[store]
        lines += [f"| {label} | {arm} | {m['seconds']:.2f} | {m['mb_per_s']:,.0f} | {m['vs_read_once']:.1f}x |"
                  for arm, m in arms.items()]
    whole = report.get("whole_command_s")
    lines += ["", f"Ray start-up, not in the figures above: {report['indexing']['ray_startup_s']:.1f} s."
                  + (" Whole commands once (`onion ingest`, Python and Ray start-up included): "
                     + ", ".join(f"{name} {s:.1f} s" for name, s in whole.items()) + "." if whole else ""),
              "", "Reading (medians), in place vs copied:", "",
              "| reader | in place | copy | in place / copy |", "|---|---|---|---|"]
    loader = f"training loader ({SIZE} px basic crops, 2 workers, batches of {BATCH})"
    for part, measure, label in (("loader", "images_per_s", f"{loader}: images/s"),
                                 ("loader", "images_per_cpu_s", f"{loader}: images per CPU-s"),
                                 ("training", "images_per_s", "onion train, tiny ViT (settings below): images/s"),
                                 ("training", "cpu_s_per_run", "onion train: CPU seconds of the whole command")):
        m = report[part + "_medians"][measure]
        lines.append(f"| {label} | {m[IN_PLACE]:,.0f} | {m[COPY]:,.0f} | {m['ratio']:.3f}x |")
    same = report["same_examples"]
    cost = report["indexing"]["cost"]
    lines += ["", f"onion train settings: `{report['training_settings']}`.",
              f"Kept examples: {same['kept']:,}; the same keys in both: {same['same_keys']}; the same keys, splits, "
              f"labels and image sha256: {same['same_rows']}.", "",
              f"What indexing costs, one core, one pass over the {cost['images']:,} images:", "",
              "| step | seconds | us per image |", "|---|---|---|"]
    lines += [f"| {step} | {s:.2f} | {1e6 * s / cost['images']:,.0f} |" for step, s in cost["seconds"].items()]
    lines += ["", "Index bytes per example:", "", "| file | bytes per example |", "|---|---|"]
    lines += [f"| {name} | {value:,.1f} |" for name, value in report["index_bytes"].items() if name != "examples"]
    lines += ["", "Goals (ratios):", ""]
    lines += [f"- {goal}: {value:.2f}" for goal, value in report["goals"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
