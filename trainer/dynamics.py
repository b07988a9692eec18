"""Per-example training dynamics, one row per presentation, written as Parquet parts.

Rows are built from whole-batch tensors (no per-sample Python loop) and written at every
checkpoint as ``dynamics/part-r<rank>-s<step>.parquet``. A resumed run deletes parts written
after its checkpoint and writes them again with the same name and content.
"""
from __future__ import annotations

import pyarrow as pa
import torch
import torch.nn.functional as F

from shards.index import table_to_parquet_bytes
from shards.urls import Location
from trainer.dynamics_files import latest_losses, part_step, read_dynamics  # noqa: F401 - re-exported
from trainer.run_folder import DYNAMICS, dynamics_part, rank_dynamics_prefix


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
        self.folder.write_atomic(dynamics_part(self.rank, step), table_to_parquet_bytes(pa.table(columns)))
        self._keys, self._tensors = [], {}

    def drop_parts_after(self, step: int) -> None:
        """Forget parts that a killed run wrote after the checkpoint being resumed."""
        for name in self.folder.list_names():
            if name.startswith(rank_dynamics_prefix(self.rank)) and part_step(name) > step:
                self.folder.remove(name)
