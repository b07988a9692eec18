"""Where a run's dynamics live and how they are read: ``RUN/dynamics/part-r<rank>-s<step>.parquet``.

Without torch (numpy and pyarrow only), so scoring and planning processes that read dynamics never
import it; :mod:`trainer.dynamics` records them during training.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shards.index import parquet_names, read_parquet
from shards.urls import Location
from trainer.run_folder import DYNAMICS


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
