"""Atomic checkpoints: model weights (safetensors, timm's keys), the model EMA's (with ``--ema``),
optimiser, schedule, RNG, position.

A checkpoint is a folder ``checkpoints/step-<N>/``; ``checkpoints/latest.json`` names the newest
complete one and is written last, so a run killed while saving resumes from the previous one.
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from shards.urls import Location
from trainer.errors import RunError
from trainer.run_folder import CHECKPOINTS, EMA_FILE, LATEST, MODEL_FILE, STATE_FILE, STEP_PREFIX, rng_file, step_folder

KEEP_CHECKPOINTS = 2


@dataclass
class Position:
    """Where training stands: the next batch to train is ``batch`` of ``epoch``."""

    step: int
    epoch: int
    batch: int
    train_seconds: float = 0.0  # totals over finished epochs, so a resumed run reports the whole run
    train_images: int = 0
    train_flops: float = 0.0  # matrix-product FLOPs of the steps taken (forward x 3), at their real token counts
    val_top1: float = float("nan")  # after the last finished epoch
    val_top1_ema: float = float("nan")  # the model EMA's, likewise (nan without --ema; absent before it existed)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> object:
    # Our own file (optimizer state, numpy RNG tuples): not an untrusted pickle.
    return torch.load(io.BytesIO(data), weights_only=False)


def save_rank_state(run: Location, position: Position, rank: int) -> None:
    """Each rank's RNG, written before rank 0 commits the checkpoint."""
    run.child(CHECKPOINTS, step_folder(position.step)).write_atomic(rng_file(rank), to_bytes(rng_state()))


def weights_bytes(model: torch.nn.Module) -> bytes:
    """``model``'s state_dict as a safetensors file (timm's keys)."""
    return save_safetensors({name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()})


def commit_checkpoint(run: Location, position: Position, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      scheduler: torch.optim.lr_scheduler.LRScheduler, ema: torch.nn.Module | None = None) -> None:
    """Rank 0: weights (and the EMA's: ``ema`` is its averaged model) and optimiser state, then the
    pointer that makes the checkpoint current."""
    folder = run.child(CHECKPOINTS, step_folder(position.step))
    folder.write_atomic(MODEL_FILE, weights_bytes(model))
    if ema is not None:
        folder.write_atomic(EMA_FILE, weights_bytes(ema))
    folder.write_atomic(STATE_FILE, to_bytes({"optimizer": optimizer.state_dict(),
                                              "scheduler": scheduler.state_dict()}))
    checkpoints = run.child(CHECKPOINTS)
    checkpoints.write_atomic(LATEST, json.dumps(vars(position)).encode())
    complete = sorted(n for n in checkpoints.list_names() if n.startswith(STEP_PREFIX))
    for old in complete[:-KEEP_CHECKPOINTS]:
        checkpoints.remove(old, recursive=True)


def latest_position(run: Location) -> Position | None:
    checkpoints = run.child(CHECKPOINTS)
    if not checkpoints.exists(LATEST):
        return None
    return Position(**json.loads(checkpoints.read_bytes(LATEST)))


def load_checkpoint(run: Location, position: Position, rank: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    ema: torch.nn.Module | None = None) -> bool:
    """Restore a checkpoint into the run's objects; ``ema`` (the EMA's averaged model) only from a
    checkpoint that holds its weights. Returns whether it did (False: none saved, or no ``ema``)."""
    folder = run.child(CHECKPOINTS, step_folder(position.step))
    model.load_state_dict(load_safetensors(folder.read_bytes(MODEL_FILE)))
    ema_loaded = ema is not None and folder.exists(EMA_FILE)
    if ema_loaded:
        ema.load_state_dict(load_safetensors(folder.read_bytes(EMA_FILE)))
    state = from_bytes(folder.read_bytes(STATE_FILE))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(from_bytes(folder.read_bytes(rng_file(rank))))
    return ema_loaded


def load_weights(run: Location) -> dict[str, torch.Tensor]:
    """The newest checkpoint's weights, with timm's state_dict keys."""
    position = latest_position(run)
    if position is None:
        raise RunError(f"{run.url}: no checkpoint to load weights from")
    return load_safetensors(run.child(CHECKPOINTS, step_folder(position.step)).read_bytes(MODEL_FILE))
