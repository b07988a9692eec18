"""Per-example training dynamics, one row per presentation, written as Parquet parts.

Rows are built from whole-batch tensors (no per-sample Python loop) and written at every
checkpoint as ``dynamics/part-r<rank>-s<step>.parquet``. A resumed run deletes parts written
after its checkpoint and writes them again with the same name and content.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from shards.index import parquet_names, read_parquet, table_to_parquet_bytes
from shards.urls import Location

DYNAMICS = "dynamics"


def presentation_stats(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Correctness, loss and margin of each example, on its stored (un-mixed, un-smoothed) label."""
    logits = logits.detach().float()
    loss = F.cross_entropy(logits, labels, reduction="none")
    true_logit = logits.gather(1, labels[:, None])[:, 0]
    other = logits.scatter(1, labels[:, None], float("-inf")).max(dim=1).values
    return {"correct": logits.argmax(dim=1) == labels, "loss": loss, "margin": true_logit - other}


class DynamicsRecorder:
    def __init__(self, run: Location, rank: int) -> None:
        self.folder = run.child(DYNAMICS)
        self.rank = rank
        self._keys: list[str] = []
        self._tensors: dict[str, list[torch.Tensor]] = {}

    def record(self, keys: list[str], epoch: int, step: int, logits: torch.Tensor, labels: torch.Tensor,
               cls_attention_variance: torch.Tensor | None) -> None:
        stats = presentation_stats(logits, labels)
        size = len(keys)
        stats["epoch"] = torch.full((size,), epoch, dtype=torch.int32)
        stats["step"] = torch.full((size,), step, dtype=torch.int64)
        stats["cls_attention_variance"] = (cls_attention_variance.detach().float() if cls_attention_variance is not None
                                           else torch.full((size,), float("nan")))
        self._keys.extend(keys)
        for name, values in stats.items():
            # No wait for the device: a CUDA tensor is copied to (pinned) host memory asynchronously
            # and read only at flush, after a synchronize; a CPU tensor is kept as it is.
            self._tensors.setdefault(name, []).append(values.to("cpu", non_blocking=True))

    def flush(self, step: int) -> None:
        """Write the rows recorded since the last flush as one part, named by ``step``."""
        if not self._keys:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the asynchronous copies of record() have landed
        columns = {"key": pa.array(self._keys, pa.string())}
        for name in ("epoch", "step", "correct", "loss", "margin", "cls_attention_variance"):
            columns[name] = pa.array(torch.cat(self._tensors[name]).numpy())
        self.folder.write_atomic(part_name(self.rank, step), table_to_parquet_bytes(pa.table(columns)))
        self._keys, self._tensors = [], {}

    def drop_parts_after(self, step: int) -> None:
        """Forget parts that a killed run wrote after the checkpoint being resumed."""
        for name in self.folder.list_names():
            if name.startswith(f"part-r{self.rank}-s") and part_step(name) > step:
                self.folder.remove(name)


def part_name(rank: int, step: int) -> str:
    return f"part-r{rank}-s{step:09d}.parquet"


def part_step(name: str) -> int:
    return int(name.rsplit("-s", 1)[1].split(".")[0])


def read_dynamics(run: Location, columns: list[str] | None = None) -> pa.Table:
    folder = run.child(DYNAMICS)
    tables = [read_parquet(folder, name, columns) for name in parquet_names(folder)]
    return pa.concat_tables(tables) if tables else pa.table({})


def latest_losses(run: Location, keys: np.ndarray | pa.Array, before_epoch: int) -> np.ndarray:
    """Each of ``keys``' loss at its latest presentation before ``before_epoch`` (NaN if never presented),
    read one dynamics part at a time: what is held is sized by ``keys`` and one part."""
    folder = run.child(DYNAMICS)
    wanted = keys if isinstance(keys, pa.Array) else pa.array(np.asarray(keys, dtype=object).tolist(), pa.string())
    latest_step = np.full(len(wanted), -1, np.int64)
    latest_loss = np.full(len(wanted), np.nan)
    for name in parquet_names(folder):
        rows = read_parquet(folder, name, ["key", "epoch", "step", "loss"])
        rows = rows.filter(pc.less(rows["epoch"], before_epoch))
        at = pc.index_in(rows["key"], value_set=wanted).fill_null(-1).to_numpy().astype(np.int64)
        found = at >= 0
        at = at[found]
        step = rows["step"].to_numpy(zero_copy_only=False)[found]
        loss = rows["loss"].to_numpy(zero_copy_only=False).astype(np.float64)[found]
        order = np.lexsort((step, at))  # by key position, then step: the last of each key is its latest here
        at, step, loss = at[order], step[order], loss[order]
        last = np.r_[at[1:] != at[:-1], True] if len(at) else np.array([], bool)
        at, step, loss = at[last], step[last], loss[last]
        newer = step > latest_step[at]
        latest_step[at[newer]], latest_loss[at[newer]] = step[newer], loss[newer]
    return latest_loss
