"""What the test files share: the ``onion`` command as a subprocess, a folder's files as bytes, a tiny
training configuration and its checkpoints' weights, and small real datasets written through the
public shards API (no Ray needed)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from safetensors.torch import load_file

from shards.index import INDEX_FOLDER, INDEX_NAME, read_index, rows_to_table, table_to_parquet_bytes
from shards.manifest import MANIFEST_NAME, DatasetInfo
from shards.tarwriter import ShardExample
from shards.urls import location
from shards.writer import commit_dataset, write_index_by_shard, write_shard
from trainer.config import TrainConfig

# ``onion`` as a user runs it, from this interpreter (not relying on the console script being on PATH).
ONION = [sys.executable, "-m", "pipeline"]


def onion(*args: object, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``onion ARGS`` in a subprocess, its output captured as text; the exit status is left to the caller."""
    return subprocess.run([*ONION, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kwargs)


def printed_version(output: str) -> str:
    """The selection version ``onion select`` printed (``.../selections/v0003.json: kept ...``)."""
    found = re.search(r"selections/(v\d{4,})\.(?:parquet|json)", output)
    assert found, f"no selection version in: {output[-500:]}"
    return found.group(1)


def onion_ok(*args: object, **kwargs) -> subprocess.CompletedProcess:
    """``onion ARGS`` that must exit 0; a failure shows the command and the end of its stderr."""
    result = onion(*args, **kwargs)
    command = " ".join(map(str, args))
    assert result.returncode == 0, f"onion {command} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


def kill_first_process_running(marker: str, killed: list[int], stop: threading.Event) -> None:
    """Kill the first process whose command line shows ``marker`` (a busy Ray worker is titled
    ``ray::Actor.method`` or ``ray::task``); its pid goes into ``killed``. Runs until ``stop``."""
    while not stop.is_set():
        for process in psutil.process_iter(["cmdline"]):
            if any(marker in part for part in process.info["cmdline"] or []):
                process.kill()
                killed.append(process.pid)
                return
        time.sleep(0.01)


class FileBytes(bytes):
    """A file's bytes that print as their size and digest: a failed comparison of two folders names the
    files that differ instead of printing every byte of every shard."""

    def __repr__(self) -> str:
        return f"<{len(self):,} bytes, sha256 {hashlib.sha256(self).hexdigest()[:16]}>"


def files_of(path: Path) -> dict[str, bytes]:
    """Every file under the folder ``path``, by POSIX path relative to it, in sorted order; a single
    file is ``{"": its bytes}``."""
    if path.is_file():
        return {"": FileBytes(path.read_bytes())}
    return {p.relative_to(path).as_posix(): FileBytes(p.read_bytes()) for p in sorted(path.rglob("*")) if p.is_file()}


def saved_config_of(dataset: str, run: Path | str, **settings) -> TrainConfig:
    """A tiny run (1 block of width 32, 4-pixel patches, half the tokens kept; ``settings`` override any of it):
    an epoch of digits in seconds."""
    tiny = dict(depth=1, embed_dim=32, num_heads=2, patch_size=4, batch_size=64, loader_workers=0, token_keep=0.5,
                token_blocks=[0], warmup_epochs=0.5)
    return TrainConfig(dataset=dataset, out=str(run), **{**tiny, **settings})


def last_weights(run: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    """The weights file ``name`` of the run's newest checkpoint folder (model.safetensors, ema.safetensors)."""
    return load_file(str(sorted((run / "checkpoints").glob("step-*"))[-1] / name))


def resumed_from_mid_epoch(run: Path, copy: Path) -> Path:
    """A copy of the finished ``run`` (checkpointed every few steps, 2 epochs or more) rewound to its
    last checkpoint inside an epoch after the first, as if stopped there, then resumed to its end."""
    from trainer.loop import Trainer
    from trainer.resume import resumed_config
    from trainer.run_folder import step_folder

    shutil.copytree(run, copy)
    (copy / "summary.json").unlink()
    latest = json.loads((copy / "checkpoints" / "latest.json").read_text())
    per_epoch = latest["step"] // latest["epoch"]
    steps = sorted(int(p.name.split("-")[1]) for p in (copy / "checkpoints").glob("step-*"))
    mid = [step for step in steps if step > per_epoch and step % per_epoch][-1]
    for step in steps:
        if step > mid:
            shutil.rmtree(copy / "checkpoints" / step_folder(step))
    (copy / "checkpoints" / "latest.json").write_text(json.dumps(
        {**latest, "step": mid, "epoch": mid // per_epoch, "batch": mid % per_epoch}))
    trainer = Trainer(resumed_config(str(copy), {})[0])
    assert trainer.resume()
    trainer.train()
    return copy


def loader_epoch(dataset, workers: int) -> list[tuple[torch.Tensor, list[str]]]:  # noqa: ANN001 - a ShardDataset
    """A reader's batches of one epoch through a DataLoader with ``workers`` workers: (images, keys) each."""
    from torch.utils.data import DataLoader

    return [(images, keys) for images, _, keys in DataLoader(dataset, batch_size=None, num_workers=workers)]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def random_pixels(rng: np.random.Generator, size: int = 8, channels: int = 3) -> np.ndarray:
    shape = (size, size, channels) if channels == 3 else (size, size)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def write_direct_dataset(url: str, shard_sizes: list[int], split: str = "train", seed: int = 0,
                         image_bytes=None) -> dict[str, tuple[int, bytes]]:
    """A dataset with shards of exactly ``shard_sizes`` examples; returns key -> (label, png).

    ``image_bytes(key, png)`` may replace an example's stored bytes (to plant bad members).
    """
    rng = np.random.default_rng(seed)
    dataset = location(url)
    rows, entries, truth = [], [], {}
    counter = 0
    for number, size in enumerate(shard_sizes):
        examples = []
        for _ in range(size):
            key = f"ex-{counter:05d}"
            counter += 1
            label = int(rng.integers(3))
            image = png_bytes(random_pixels(rng))
            image = image_bytes(key, image) if image_bytes else image
            truth[key] = (label, image)
            examples.append(ShardExample(key, image, "png", label, {"key": key}))
        name = f"{split}-{number:06d}.tar"
        entry, spans = write_shard(dataset, name, split, examples)
        entries.append(entry)
        for example, span in zip(examples, spans, strict=True):
            rows.append({"key": example.key, "label": example.label, "class_name": str(example.label),
                         "split": split, "status": "ok", "shard": name, "image_ext": "png",
                         "image_offset": span.image.offset, "image_size": span.image.size,
                         "cls_offset": span.cls.offset, "cls_size": span.cls.size,
                         "json_offset": span.json.offset, "json_size": span.json.size,
                         "sha256": hashlib.sha256(example.image).hexdigest(),
                         "width": 8, "height": 8, "source_ref": f"test[{example.key}]"})
    commit_dataset(dataset, parts=write_index_by_shard(dataset, rows_to_table(rows)), shards=entries,
                   info=DatasetInfo(class_names=["0", "1", "2"], source="test", fingerprint="test", command=["test"]))
    return truth


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels but holds almost no data (a bomb)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


class RunsCode:
    """Pickled, it runs ``touch marker`` when unpickled: what a malicious weights file does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def run_quick_benchmark(script: str, out: Path, timeout: int) -> dict:
    """``python benchmarks/<script> --quick --out OUT`` (it must exit 0); its ``results.json``."""
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, str(root / "benchmarks" / script), "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=timeout, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def as_single_file_index(url: str) -> None:
    """Rewrite a dataset's index as an earlier onion wrote it: one ``index.parquet`` (sorted by key) that the
    manifest names, no ``index/`` parts. What ``onion upgrade`` reads."""
    dataset = location(url)
    manifest = json.loads(dataset.read_bytes(MANIFEST_NAME))
    data = table_to_parquet_bytes(read_index(dataset, manifest=manifest))
    dataset.write_atomic(INDEX_NAME, data)
    manifest["index"] = {"name": INDEX_NAME, "rows": manifest["index"]["rows"],
                         "sha256": hashlib.sha256(data).hexdigest()}
    dataset.write_atomic(MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    dataset.remove(INDEX_FOLDER, recursive=True)


def top_level(names) -> list[str]:
    """Sorted distinct names with the index parts (``index/part-000000.parquet`` ...) shown as one ``index/``."""
    return sorted({"index/" if name.startswith("index/") else name for name in names})
