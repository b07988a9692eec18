"""What grows with the dataset today: one rank's reader, select, score, report, inspect --key, at 10^6 and 10^7 rows.

    .venv/bin/python benchmarks/scale.py [--rows 1000000,10000000] [--out runs/bench-scale] [--quick]

For each size a synthetic dataset is written WITHOUT most image bytes: the index has one row per
example over ``rows / 2000`` shards (onion's default shard size), with 26-character keys like an
ingest's (``00003-000000123-3f2a9c0d1e``), labels over 1000 classes, offsets, sizes and sha256.
Only the shards that rank 0 of 64 reads in epoch 0 hold their own examples (real tars of 32x32
PNGs, so the reader can decode a first batch and check every member's tar header and sha256);
every other shard is a hard link to one template shard whose members the index rows point into
(same offsets, sizes and sha256, so the report's thumbnails, which check size and sha256, read
real images; only those shards' tar header names differ from their keys, which nothing measured
here reads). Because those rows repeat the template's 2000 sha256 values, the dataset's own
index compresses better than a real one: the bytes per example are therefore also measured on
the same index with a unique random sha256 per row (``index_unique_sha256``), the figure to quote.
``scores/random`` is written as ``onion score DATASET random`` writes it (same seed, same columns
and metadata; one part per index part, through the same ``write_scores``).

Then, each in a fresh process whose peak RSS ``/usr/bin/time`` reads (that process alone, not this driver):

* one rank's reader (rank 0 of 64, no DataLoader, ``verify="members"``): seconds and peak RSS up to
  its first batch of 64 images; ``plain`` (the whole split), ``restrict`` (per-epoch pruning as
  ``onion train --example-strategy infobatch`` does it: ``keys()``, sorted, 80% kept,
  ``restrict(keys)``), ``restrict-none`` (what ``onion train`` always does once: ``restrict(None)``)
  and ``selection`` (``ShardDataset(selection="v0001")``); ``import`` is the interpreter with the
  reader's imports and nothing else;
* ``onion select DATASET --scores random --keep 0.8`` (drop-easy);
* ``onion score DATASET loss --run RUN`` over epoch 0's dynamics as 64 ranks write them (one file
  each): the driver's peak RSS, and the largest process's (a Ray actor scoring its index parts);
* ``onion report DATASET --out DIR`` (stopped after ``--step-timeout`` seconds);
* ``onion inspect DATASET --key KEY``;
* bytes on disk per example of the index, ``scores/random`` and the selection (each with its parts).

``results.md`` and ``results.json`` go to ``--out``, with the load average before and after (other
jobs on the machine slow every figure down).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from trainer.run_folder import DYNAMICS, dynamics_part

ROOT = Path(__file__).resolve().parent.parent
SHARD_SIZE = 2000  # examples per shard: onion's default
CLASSES = 1000
WORLD_SIZE = 64
BATCH = 64
KEEP = 0.8
IMAGE_SIDE = 32
CHUNK_SHARDS = 500  # shards per piece of the index built and written at a time (10^6 rows)
READER_MODES = ("import", "plain", "restrict", "prune", "restrict-none", "selection")
PRUNE_RATIO = 0.5  # --prune-ratio of the planned epoch (onion train's default)
ONION = [sys.executable, "-m", "pipeline"]
MiB = 1 << 20


# ---------------------------------------------------------------- the synthetic dataset

def digits(values, width: int):
    """Zero-padded decimal digits of ``values`` as an (n, width) uint8 matrix of ASCII."""
    import numpy as np

    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((values[:, None] // powers) % 10 + ord("0")).astype(np.uint8)


def hex_digits(values, width: int):
    import numpy as np

    table = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    shifts = (4 * np.arange(width - 1, -1, -1)).astype(np.uint64)
    return table[((values[:, None] >> shifts) & np.uint64(15)).astype(np.int64)]


def fixed_strings(matrix):
    """An (n, width) uint8 matrix of ASCII as a pyarrow string array (no per-row Python objects)."""
    import numpy as np
    import pyarrow as pa

    n, width = matrix.shape
    offsets = np.arange(n + 1, dtype=np.int32) * width
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(matrix.tobytes())])


def example_keys(first: int, count: int, shard_of_row):
    """``SSSSS-NNNNNNNNN-hhhhhhhhhh``: shard number, running number and 10 hex digits of a hash of it,
    26 characters like an ingest's keys; sorted as the rows are."""
    import numpy as np

    numbers = np.arange(first, first + count, dtype=np.int64)
    mixed = (numbers.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(24)
    dash = np.full((count, 1), ord("-"), dtype=np.uint8)
    return fixed_strings(np.hstack([digits(shard_of_row, 5), dash, digits(numbers, 9), dash,
                                    hex_digits(mixed, 10)]))


def template_images(count: int) -> list[bytes]:
    """``count`` distinct small PNGs (blocky 32x32 RGB: a few hundred bytes each)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(7)
    images = []
    for _ in range(count):
        pixels = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def build_dataset(path: Path, rows: int) -> dict:
    """Write the synthetic dataset of ``rows`` examples at ``path``; return what was written."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.curation.scoring import write_scores
    from pipeline.curation.scoring.random_scores import random_scores
    from shards.index import INDEX_SCHEMA, read_index, table_to_parquet_bytes
    from shards.manifest import (
        FORMAT_NAME,
        FORMAT_VERSION,
        MANIFEST_NAME,
        index_entry,
        library_versions,
        manifest_bytes,
    )
    from shards.partition import epoch_segments
    from shards.tarwriter import ShardExample, build_shard
    from shards.urls import location
    from shards.writer import write_index_part

    started = time.perf_counter()
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    shard_count = -(-rows // SHARD_SIZE)
    names = [f"train-{number:06d}.tar" for number in range(shard_count)]
    counts = {name: min(SHARD_SIZE, rows - number * SHARD_SIZE) for number, name in enumerate(names)}
    # the shards rank 0 of 64 reads in epoch 0 (seed 0, shuffled, one loader-free worker): real tars
    segments = epoch_segments(counts, seed=0, epoch=0, shuffle=True, rank=0, world_size=WORLD_SIZE,
                              worker=0, num_workers=1)
    real = sorted({segment.shard for segment in segments})
    class_names = [f"n{10_000_000 + 7919 * c:08d}" for c in range(CLASSES)]  # wnid-like: n0xxxxxxx
    rng = np.random.default_rng([rows, 5])
    labels = rng.integers(0, CLASSES, size=rows).astype(np.int32)
    images = template_images(SHARD_SIZE)
    image_sha = [hashlib.sha256(image).hexdigest() for image in images]

    def shard_examples(number: int) -> list:
        first = number * SHARD_SIZE
        count = counts[names[number]]
        keys = example_keys(first, count, np.full(count, number, dtype=np.int64)).to_pylist()
        return [ShardExample(key, images[j], "png", int(labels[first + j]), {"key": key})
                for j, key in enumerate(keys)]

    # the template every absent shard links to: the first shard rank 0 does not read, written for real
    template_number = next(n for n, name in enumerate(names) if name not in set(real)) if len(real) < shard_count else 0
    template_data, spans = build_shard(shard_examples(template_number))
    template_sha = hashlib.sha256(template_data).hexdigest()
    (path / names[template_number]).write_bytes(template_data)
    image_offset = np.array([s.image.offset for s in spans], np.int64)
    image_size = np.array([s.image.size for s in spans], np.int64)
    cls_offset = np.array([s.cls.offset for s in spans], np.int64)
    json_offset = np.array([s.json.offset for s in spans], np.int64)
    json_size = np.array([s.json.size for s in spans], np.int64)
    entries = {}
    for name in real:
        number = names.index(name)
        data, written = build_shard(shard_examples(number))
        if [w.image.offset for w in written] != image_offset[:len(written)].tolist():
            raise AssertionError(f"{name}: member layout differs from the template's")
        (path / name).write_bytes(data)
        entries[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    for number, name in enumerate(names):
        if name not in entries:
            if number != template_number:
                os.link(path / names[template_number], path / name)
            entries[name] = {"bytes": len(template_data), "sha256": template_sha}
    real_bytes = sum(entries[name]["bytes"] for name in real) + len(template_data)

    shard_array = pa.array(names, pa.string())
    class_array = pa.array(class_names, pa.string())
    sha_array = pa.array(image_sha, pa.string())
    constant = {text: pa.array([text], pa.string()) for text in ("train", "ok", "png")}
    dataset = location(str(path))
    # the index parts (one per shard, as an ingest writes them), and their size with a unique sha256 per row
    parts, honest_bytes = [], 0
    by_class = np.bincount(labels, minlength=CLASSES)
    for first_shard in range(0, shard_count, CHUNK_SHARDS):
        first = first_shard * SHARD_SIZE
        stop = min(rows, (first_shard + CHUNK_SHARDS) * SHARD_SIZE)
        count = stop - first
        row = np.arange(first, stop, dtype=np.int64)
        shard_of_row, slot = row // SHARD_SIZE, row % SHARD_SIZE
        zeros = np.zeros(count, np.int64)
        chunk_labels = labels[first:stop]
        keys = example_keys(first, count, shard_of_row)
        class_name = class_array.take(pa.array(chunk_labels))
        sizes = rng.integers(200, 1200, size=(2, count)).astype(np.int32)
        columns = {
            "key": keys, "label": pa.array(chunk_labels, pa.int32()), "class_name": class_name,
            "split": constant["train"].take(pa.array(zeros)), "status": constant["ok"].take(pa.array(zeros)),
            "reason": pa.nulls(count, pa.string()), "shard": shard_array.take(pa.array(shard_of_row)),
            "image_ext": constant["png"].take(pa.array(zeros)),
            "image_offset": pa.array(image_offset[slot]), "image_size": pa.array(image_size[slot]),
            "cls_offset": pa.array(cls_offset[slot]),
            "cls_size": pa.array(1 + (chunk_labels >= 10) + (chunk_labels >= 100), pa.int64()),
            "json_offset": pa.array(json_offset[slot]), "json_size": pa.array(json_size[slot]),
            "sha256": sha_array.take(pa.array(slot)),
            "width": pa.array(np.full(count, IMAGE_SIDE, np.int32)),
            "height": pa.array(np.full(count, IMAGE_SIDE, np.int32)),
            "original_width": pa.array(sizes[0]), "original_height": pa.array(sizes[1]),
            "source_ref": pc.binary_join_element_wise("train/", class_name, "/", keys, ".JPEG", ""),
            "planted": pa.nulls(count, pa.string()),
        }
        table = pa.table(columns, schema=INDEX_SCHEMA)
        unique = np.frombuffer(os.urandom(32 * count), np.uint8).reshape(count, 32)
        hexed = np.frombuffer(b"0123456789abcdef", np.uint8)[np.stack([unique >> 4, unique & 15], 2).reshape(count, 64)]
        honest = table.set_column(table.schema.get_field_index("sha256"), "sha256", fixed_strings(hexed))
        for start in range(0, count, SHARD_SIZE):
            number = (first + start) // SHARD_SIZE
            parts.append(write_index_part(dataset, names[number].removesuffix(".tar") + ".parquet",
                                          table.slice(start, SHARD_SIZE))[0])
            honest_bytes += len(table_to_parquet_bytes(honest.slice(start, SHARD_SIZE)))
    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "source": "synthetic:benchmarks/scale.py",
        "fingerprint": f"bench-scale-{rows}", "class_names": class_names,
        "counts": {"total": rows, "by_status": {"ok": rows}, "by_split": {"train": rows},
                   "by_class": dict(sorted((class_names[c], int(n)) for c, n in enumerate(by_class) if n)),
                   "by_split_status": {"train/ok": rows}},
        "index": index_entry(parts),
        "shards": [{"name": name, "split": "train", "examples": counts[name], **entries[name]} for name in names],
        "command": ["benchmarks/scale.py", "--rows", str(rows)], "versions": library_versions(),
    }
    (path / MANIFEST_NAME).write_bytes(manifest_bytes(manifest))
    # scores/random.parquet exactly as ``onion score DATASET random`` writes it (keys sorted, seed 0)
    keys = read_index(dataset, ["key"], manifest=manifest)["key"].combine_chunks()
    write_scores(location(str(path)), "random", random_scores(keys, 0).replace_schema_metadata(
        {b"onion": json.dumps({"scorer": "random"}).encode()}))
    middle = keys[rows // 2].as_py()
    return {"rows": rows, "shards": shard_count, "real_shards": len(real) + 1, "real_shard_bytes": real_bytes,
            "rank0_shards": len(real), "build_seconds": round(time.perf_counter() - started, 1),
            "index_parts": len(parts), "index_unique_sha256_bytes": honest_bytes,
            "inspect_key": middle}


def write_dynamics(run: Path, rows: int) -> None:
    """Epoch 0's training dynamics as 64 ranks write them (a part each: key, epoch, step, loss), for the
    ``prune`` reader mode to plan epoch 1 from."""
    import numpy as np
    import pyarrow as pa

    from shards.index import table_to_parquet_bytes

    folder = run / DYNAMICS
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([rows, 13])
    bounds = np.linspace(0, rows, WORLD_SIZE + 1).astype(np.int64)
    for rank, (first, stop) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        row = np.arange(first, stop, dtype=np.int64)
        table = pa.table({"key": example_keys(first, stop - first, row // SHARD_SIZE),
                          "epoch": pa.array(np.zeros(stop - first, np.int32)),
                          "step": pa.array((row - first) // BATCH), "loss": pa.array(rng.gamma(2.0, 0.5, stop - first)
                                                                                     .astype(np.float32))})
        (folder / dynamics_part(rank, 0)).write_bytes(table_to_parquet_bytes(table))


class FileExchange:
    """An all-gather and an all-reduce through files in ``folder`` (each round a subfolder): lets the
    measured rank 0 plan with 63 ranks that run in another process (:func:`planner_helper`), whose
    memory is not measured. The sum reads the ranks' arrays one at a time, as an all-reduce holds one."""

    def __init__(self, folder: Path, rank: int, world_size: int):
        import itertools

        self.folder, self.rank, self.world_size, self.rounds = folder, rank, world_size, itertools.count()

    def _post(self, value: object) -> list[Path]:
        import pickle

        where = self.folder / f"{next(self.rounds):04d}"
        where.mkdir(parents=True, exist_ok=True)
        temporary = where / f".{self.rank}.tmp"
        temporary.write_bytes(pickle.dumps(value))
        temporary.rename(where / f"{self.rank}.pkl")
        paths = [where / f"{r}.pkl" for r in range(self.world_size)]
        while not all(path.exists() for path in paths):
            time.sleep(0.005)
        return paths

    def gather(self, value: object) -> list:
        import pickle

        return [pickle.loads(path.read_bytes()) for path in self._post(value)]

    def sum(self, counts):
        import pickle

        total = None
        for path in self._post(counts):
            value = pickle.loads(path.read_bytes())
            total = value if total is None else total + value
        return total


def plan_as_rank(rank: int, dataset: str, run: str, exchange: Path):
    """Plan epoch 1 of a pruned run (``--prune-ratio 0.5``) as ``rank`` of 64."""
    from shards.urls import location
    from trainer.epoch_planner import Collective, plan_epoch_in_parts

    files = FileExchange(exchange, rank, WORLD_SIZE)
    collective = Collective(rank, WORLD_SIZE, files.gather, files.sum)
    return plan_epoch_in_parts(location(dataset), location(run), None, 1, PRUNE_RATIO, 0, collective,
                               {"strategy": "infobatch", "benchmark": "scale"})


def planner_helper(dataset: str, run: str, exchange: str) -> None:
    """Ranks 1 to 63 of the planned epoch, one thread each (started beside the measured rank 0)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(WORLD_SIZE - 1) as pool:
        planned = list(pool.map(lambda rank: plan_as_rank(rank, dataset, run, Path(exchange)), range(1, WORLD_SIZE)))
    print(json.dumps({"version": planned[-1].version, "kept": planned[-1].kept, "left_out": planned[-1].left_out}),
          flush=True)


# ---------------------------------------------------------------- measuring a fresh process

def run_measured(command: list[str], log: Path, timeout: float) -> dict:
    """Run ``command`` in a new process group; its wall clock and its own peak RSS, stopped after ``timeout`` s;
    also the largest RSS any one process of its tree (Ray's actors included) had when sampled every 0.5 s.

    The peak comes from ``/usr/bin/time``, which forks the command from its own small process: a process
    started straight from this one by Python (vfork, then exec) would inherit this process's high-water
    RSS in its ``ru_maxrss`` (Linux carries it across exec), so every figure would be at least what
    building the synthetic dataset took here. A stopped command's peak is the largest RSS of its
    processes sampled every 0.5 s."""
    figures = log.with_suffix(".time")
    started = time.perf_counter()
    with open(log, "w") as output:
        process = subprocess.Popen([*peak_launcher(figures), *command], stdout=output, stderr=subprocess.STDOUT,
                                   cwd=ROOT, start_new_session=True)
    sampled = 0
    while process.poll() is None:
        if time.perf_counter() - started > timeout:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return {"timed_out": True, "seconds_at_least": round(time.perf_counter() - started, 1),
                    "peak_rss_mib_at_least": round(sampled / MiB, 1)}
        sampled = max(sampled, tree_rss(process.pid))
        try:
            process.wait(timeout=0.5)  # returns as soon as it ends
        except subprocess.TimeoutExpired:
            pass
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}; see {log}:\n{log.read_text()[-3000:]}")
    peak_kib = int(figures.read_text().split()[-1])
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(peak_kib / 1024, 1),
            "largest_process_rss_mib": round(sampled / MiB, 1)}


# Where /usr/bin/time is missing: a bare interpreter that forks the command and writes its ru_maxrss (KiB).
LAUNCHER = ("import os, sys\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    os.execvp(sys.argv[2], sys.argv[2:])\n"
            "_, status, usage = os.wait4(pid, 0)\n"
            "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
            "sys.exit(os.waitstatus_to_exitcode(status))\n")


def peak_launcher(figures: Path) -> list[str]:
    """The command prefix that runs a command from a small process and writes its peak RSS (KiB) to ``figures``."""
    if Path("/usr/bin/time").exists():
        return ["/usr/bin/time", "-f", "%M", "-o", str(figures)]
    return [sys.executable, "-S", "-c", LAUNCHER, str(figures)]


def tree_rss(pid: int) -> int:
    """Bytes resident in the largest process of ``pid``'s tree now (0 when it is gone)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        return max((p.memory_info().rss for p in [parent, *parent.children(recursive=True)]), default=0)
    except psutil.Error:
        return 0


def rss_mib() -> float:
    """This process's resident set now (from /proc, no psutil import)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return round(pages * os.sysconf("SC_PAGE_SIZE") / MiB, 1)


def peak_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def reader_child(mode: str, dataset: str) -> None:
    """One rank's reader up to its first batch; prints phase figures as JSON on stdout's last line. In
    ``prune`` mode the rank first plans its share of epoch 1 (see :func:`plan_as_rank`) with the run in
    ``DATASET/../run`` and the exchange folder ``DATASET/../exchange``."""
    started = time.perf_counter()
    import numpy as np
    import pyarrow as pa

    from shards.reader import ShardDataset

    figures = {"import_seconds": time.perf_counter() - started, "rss_after_import_mib": rss_mib()}
    if mode == "import":
        finish(figures)
    started = time.perf_counter()
    data = ShardDataset(dataset, "train", rank=0, world_size=WORLD_SIZE, batch_size=BATCH, channels=3,
                        selection="v0001" if mode == "selection" else None)
    figures.update(construct_seconds=time.perf_counter() - started, rss_after_construct_mib=rss_mib(),
                   peak_after_construct_mib=peak_mib(),
                   arrow_bytes_after_construct_mib=pa.total_allocated_bytes() / MiB)
    if mode == "restrict":  # as onion train --example-strategy infobatch: all keys, sorted, a share kept
        keys = data.keys()
        keys = keys[np.argsort(keys, kind="stable")]
        kept = np.random.default_rng([0, 23, 1]).random(len(keys)) < KEEP
        data.restrict(keys[kept])
    elif mode == "prune":  # as onion train --example-strategy infobatch plans an epoch now: its parts only
        from trainer.epoch_planner import loss_weights

        planned = plan_as_rank(0, dataset, str(Path(dataset).parent / "run"), Path(dataset).parent / "exchange")
        figures.update(plan_seconds=time.perf_counter() - started, peak_after_plan_mib=peak_mib(),
                       left_out=planned.left_out)
        data.restrict(planned.version)  # read in epoch 0's shard order: the shards rank 0 reads then are real
        weights = loss_weights(data.dataset, planned, {s.shard for s in data.segments()}, PRUNE_RATIO)
        figures.update(weighted_examples_this_rank=len(weights))
    elif mode == "restrict-none":  # what onion train does once for every run (no pruning)
        data.restrict(None)
    figures.update(rss_after_restrict_mib=rss_mib(), peak_after_restrict_mib=peak_mib())
    images, labels, keys = next(iter(data))
    if tuple(images.shape) != (BATCH, 3, IMAGE_SIDE, IMAGE_SIDE):
        raise AssertionError(f"first batch of shape {tuple(images.shape)}")
    figures.update(to_first_batch_seconds=time.perf_counter() - started, rss_at_first_batch_mib=rss_mib(),
                   peak_at_first_batch_mib=peak_mib(), examples_this_rank=len(data))
    finish(figures)


def finish(figures: dict) -> None:
    """Print the figures and end at once: an interpreter that imported torch grows by ~140 MiB while it
    finalizes, which is not the reader's (the peak RSS is up to the first batch)."""
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}), flush=True)
    os._exit(0)


def measure_reader(mode: str, dataset: Path, logs: Path, timeout: float, rows: int) -> dict:
    log = logs / f"reader-{mode}.log"
    helper = None
    if mode == "prune":  # ranks 1..63 plan beside the measured rank 0, in a process of their own
        if not (dataset.parent / "run" / DYNAMICS).exists():
            write_dynamics(dataset.parent / "run", rows)
        shutil.rmtree(dataset.parent / "exchange", ignore_errors=True)
        helper = subprocess.Popen([sys.executable, __file__, "--planner-helper", str(dataset),
                                   str(dataset.parent / "run"), str(dataset.parent / "exchange")],
                                  stdout=open(logs / "planner-helper.log", "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        result = run_measured([sys.executable, __file__, "--reader-child", mode, str(dataset)], log, timeout)
    finally:
        if helper is not None and helper.wait(timeout=timeout) != 0:
            raise RuntimeError(f"the planner helper exited {helper.returncode}: see {logs / 'planner-helper.log'}")
    if not result.get("timed_out"):
        result.update(json.loads(log.read_text().strip().splitlines()[-1]))
    return result


# ---------------------------------------------------------------- one size

def file_bytes(path: Path) -> int:
    return path.stat().st_size


def stored_bytes(folder: Path, name: str) -> int:
    """Bytes of a stored table: ``name.parquet``, or ``name.json`` and the parts it lists."""
    if (folder / f"{name}.parquet").exists():
        return file_bytes(folder / f"{name}.parquet")
    layout = json.loads((folder / f"{name}.json").read_text())
    return file_bytes(folder / f"{name}.json") + sum(file_bytes(folder / layout["folder"] / part["name"])
                                                    for part in layout["parts"])


def measure_size(rows: int, out: Path, timeout: float, keep_data: bool, skip: frozenset[str] = frozenset()) -> dict:
    work = out / f"data-{rows}"
    logs = out / f"logs-{rows}"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"[{rows}] building the synthetic dataset", flush=True)
    built = build_dataset(work / "dataset", rows)
    dataset = work / "dataset"
    print(f"[{rows}] built in {built['build_seconds']} s; onion select", flush=True)
    figures: dict = {**built}
    figures["select"] = run_measured([*ONION, "select", str(dataset), "--scores", "random", "--keep", str(KEEP)],
                                     logs / "select.log", timeout)
    # the version's file: one Parquet (single-file index) or a JSON listing its parts (partitioned)
    stored = [dataset / "selections" / f"v0001{suffix}" for suffix in (".json", ".parquet")]
    selection = next((path for path in stored if path.exists()), stored[1])
    figures["reader"] = {}
    for mode in READER_MODES:
        if mode in skip or (mode == "selection" and not selection.exists()):
            continue
        print(f"[{rows}] reader {mode}", flush=True)
        figures["reader"][mode] = measure_reader(mode, dataset, logs, timeout, rows)
    if "score" not in skip:  # forgetting counts over the ranks' dynamics, reduced per index part on actors
        print(f"[{rows}] onion score loss", flush=True)
        run = work / "run"
        if not (run / DYNAMICS).exists():
            write_dynamics(run, rows)
        figures["score"] = run_measured([*ONION, "score", str(dataset), "loss", "--run", str(run), "--ray-cpus", "2"],
                                        logs / "score.log", timeout)
    if "report" not in skip:
        print(f"[{rows}] onion report", flush=True)
        figures["report"] = run_measured([*ONION, "report", str(dataset), "--out", str(work / "report")],
                                         logs / "report.log", timeout)
    if "inspect" not in skip:
        print(f"[{rows}] onion inspect --key", flush=True)
        figures["inspect_key_lookup"] = run_measured([*ONION, "inspect", str(dataset), "--key", built["inspect_key"]],
                                                     logs / "inspect.log", timeout)
    sizes = {"index": sum(file_bytes(part) for part in (dataset / "index").iterdir()),
             "index_unique_sha256": built["index_unique_sha256_bytes"],
             "scores_random": stored_bytes(dataset / "scores", "random"),
             "manifest": file_bytes(dataset / "manifest.json")}
    if selection.exists():
        sizes["selection"] = stored_bytes(dataset / "selections", "v0001")
    figures["bytes"] = sizes
    per = {name: round(size / rows, 2) for name, size in sizes.items()}
    if selection.exists():
        per["index_scores_selection"] = round((sizes["index_unique_sha256"] + sizes["scores_random"]
                                               + sizes["selection"]) / rows, 2)
    figures["bytes_per_example"] = per
    if not keep_data:
        shutil.rmtree(work)
    return figures


# ---------------------------------------------------------------- output

def mib(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def cell(step: dict, what: str) -> str:
    if step.get("timed_out"):
        return f"> {step[what + '_at_least']:,.0f} (stopped)"
    return f"{step[what]:,.1f}" if what == "seconds" else mib(step[what])


def render(report: dict) -> str:
    lines = [
        "# onion at scale: what grows with the dataset (benchmarks/scale.py)", "",
        f"Date {report['date']}; machine: {report['machine']['cores']} cores, "
        f"{report['machine']['memory_gib']} GiB RAM, {report['machine']['platform']}, no GPU; "
        f"load average before {report['load_before']}, after {report['load_after']} "
        "(other jobs shared the machine).", "",
        f"Command: `{report['command']}`", "",
        "Peak RSS is each fresh process's own (`/usr/bin/time`), in MiB; seconds are wall clock, interpreter start "
        "and imports included. Reader: rank 0 of 64, "
        "no DataLoader, `verify=\"members\"`, up to its first batch of 64 images.", "",
        "| rows | shards | reader plain: s / peak MiB | reader restrict(keys) (per-epoch pruning before) "
        "| reader prune (per-epoch pruning: plan its parts, restrict(version)) | reader restrict(None) "
        "| reader selection=v0001 | select --keep 0.8: s / driver peak MiB (largest process, sampled) "
        "| score loss: s / driver peak MiB (largest process, sampled) | report: s / peak MiB "
        "| inspect --key: s / peak MiB "
        "| bytes/example index (unique sha256) + scores + selection |",
        "|---:|---:|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in report["sizes"]:
        reader = size["reader"]

        def pair(step: dict | None, largest: bool = False) -> str:
            if step is None:
                return "-"
            shown = f"{cell(step, 'seconds')} / {cell(step, 'peak_rss_mib')}"
            if largest and step.get("largest_process_rss_mib"):  # the select's Ray actors
                shown += f" ({mib(step['largest_process_rss_mib'])})"
            return shown

        per = size["bytes_per_example"]
        lines.append(
            f"| {size['rows']:,} | {size['shards']:,} | {pair(reader.get('plain'))} | {pair(reader.get('restrict'))} "
            f"| {pair(reader.get('prune'))} "
            f"| {pair(reader.get('restrict-none'))} | {pair(reader.get('selection'))} "
            f"| {pair(size['select'], largest=True)} "
            f"| {pair(size.get('score'), largest=True)} "
            f"| {pair(size.get('report'))} | {pair(size.get('inspect_key_lookup'))} "
            f"| {per['index_unique_sha256']} + {per['scores_random']} + {per.get('selection', '-')} "
            f"= {per.get('index_scores_selection', '-')} |")
    lines += ["", "Reader phases (MiB; RSS now / peak so far):", "",
              "| rows | mode | after imports | after ShardDataset() | Arrow bytes held | after restrict "
              "| at first batch | examples this rank |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for size in report["sizes"]:
        for mode, step in size["reader"].items():
            if step.get("timed_out"):
                lines.append(f"| {size['rows']:,} | {mode} | stopped after {step['seconds_at_least']} s | | | | | |")
                continue
            lines.append(
                f"| {size['rows']:,} | {mode} | {mib(step.get('rss_after_import_mib'))} "
                f"| {mib(step.get('rss_after_construct_mib'))} / {mib(step.get('peak_after_construct_mib'))} "
                f"| {mib(step.get('arrow_bytes_after_construct_mib'))} "
                f"| {mib(step.get('rss_after_restrict_mib'))} / {mib(step.get('peak_after_restrict_mib'))} "
                f"| {mib(step.get('rss_at_first_batch_mib'))} / {mib(step.get('peak_at_first_batch_mib'))} "
                f"| {step.get('examples_this_rank', '-')} |")
    lines += ["", "Bytes on disk per example:", "", "| rows | index.parquet (as built) | index, unique sha256 "
              "| scores/random | selection v0001 | manifest.json |", "|---:|---:|---:|---:|---:|---:|"]
    for size in report["sizes"]:
        per = size["bytes_per_example"]
        lines.append(f"| {size['rows']:,} | {per['index']} | {per['index_unique_sha256']} | {per['scores_random']} "
                     f"| {per.get('selection', '-')} | {per['manifest']} |")
    return "\n".join(lines) + "\n"


def machine() -> dict:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cores": os.cpu_count(), "memory_gib": round(memory / (1 << 30), 1),
            "platform": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    parser.add_argument("--rows", default="1000000,10000000", help="dataset sizes, comma-separated (default 10^6,10^7)")
    parser.add_argument("--out", default="runs/bench-scale", help="where results.md, results.json and data go")
    parser.add_argument("--quick", action="store_true", help="a smoke run of seconds: 20000 and 200000 rows")
    parser.add_argument("--step-timeout", type=float, default=600,
                        help="seconds after which a measured step is stopped and reported as 'over' (default 600)")
    parser.add_argument("--keep-data", action="store_true", help="keep the synthetic datasets (default: deleted)")
    parser.add_argument("--skip", default="", metavar="STEPS",
                        help="steps to leave out, comma-separated: report, inspect, score, and the reader modes "
                             f"({', '.join(m for m in READER_MODES if m != 'selection')}); select always runs")
    parser.add_argument("--reader-child", nargs=2, metavar=("MODE", "DATASET"), help=argparse.SUPPRESS)
    parser.add_argument("--planner-helper", nargs=3, metavar=("DATASET", "RUN", "EXCHANGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reader_child:
        reader_child(*args.reader_child)
        return
    if args.planner_helper:
        planner_helper(*args.planner_helper)
        return
    skip = frozenset(filter(None, args.skip.split(",")))
    unknown = skip - {"report", "inspect", "score", *READER_MODES} | ({"selection"} & skip)
    if unknown:
        parser.error(f"--skip: unknown step(s) {', '.join(sorted(unknown))}")
    sizes = [20_000, 200_000] if args.quick else [int(text) for text in args.rows.split(",")]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = "benchmarks/scale.py " + " ".join(sys.argv[1:])
    report = {"date": datetime.date.today().isoformat(), "machine": machine(), "command": command.strip(),
              "quick": args.quick, "world_size": WORLD_SIZE, "shard_size": SHARD_SIZE, "batch": BATCH, "keep": KEEP,
              "load_before": [round(x, 2) for x in os.getloadavg()], "sizes": []}
    for rows in sizes:
        report["sizes"].append(measure_size(rows, out, args.step_timeout, args.keep_data, skip))
        # written after every size, so a long run shows its finished sizes
        report["load_after"] = [round(x, 2) for x in os.getloadavg()]
        (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "results.md").write_text(render(report))
    print(render(report))


if __name__ == "__main__":
    main()
