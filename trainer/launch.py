"""Starting training: one process, ``--nproc N`` local processes, or under ``torchrun``.

``onion train`` (:func:`train`) and every training phase of ``onion curate`` start training the same way,
through :func:`run_training`; curate only supplies each phase's data (its round's selection) and the epoch
it ends at, and scores the dynamics the phase wrote.

DDP uses NCCL on GPUs and gloo on CPUs. Every rank streams its own share of the shards (the
reader's exact-once rule), and all ranks write dynamics into the same run directory.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shards import location, read_manifest
from shards.selections import read_selection
from trainer.config import TrainConfig
from trainer.errors import RunError
from trainer.loop import Trainer
from trainer.run_folder import CURATION, claim, read_summary, release_unstarted


def claim_run_directory(config: TrainConfig, resume: bool) -> bool:
    """A fresh run owns its directory (:func:`trainer.run_folder.claim`): of two jobs started on one --out,
    whatever their commands, only the first trains there (under torchrun, rank 0 claims it for all ranks).
    Returns whether this call made the claim."""
    if resume or int(os.environ.get("RANK", "0")) != 0:
        return False
    run = location(config.out)
    if not claim(run, config.to_dict()):
        if run.exists(CURATION):
            raise RunError(f"{config.out} holds an onion curate run; choose another --out")
        raise RunError(f"{config.out} already holds a run; continue it with --resume {config.out} "
                       "or choose another --out")
    return True


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_rank(rank: int, config: TrainConfig, resume: bool, world_size: int, address: str | None,
              until_epoch: int | None = None) -> dict:
    if world_size > 1:
        if address:
            dist.init_process_group(backend(), init_method=address, rank=rank, world_size=world_size)
        else:
            dist.init_process_group(backend())  # torchrun's environment
    try:
        trainer = Trainer(config, rank, world_size, resuming=resume)
        if resume:
            trainer.resume()
        return trainer.train(until_epoch)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def _spawned(rank: int, config: TrainConfig, resume: bool, world_size: int, address: str,
             until_epoch: int | None) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    _run_rank(rank, config, resume, world_size, address, until_epoch)


def train(config: TrainConfig, resume: bool = False) -> dict:
    """Run training to the end and return the summary written to ``RUN/summary.json``.

    The dataset is checked before the run folder is claimed, and a claim whose job failed before
    its first checkpoint is released, so a failed command never locks its output."""
    read_manifest(location(config.dataset))
    if config.selection:
        read_selection(location(config.dataset), config.selection, columns=["kept"])  # a named error first
    from trainer.preflight import check_start  # the device and the model, before the claim and any spawn
    check_start(config)
    claimed = claim_run_directory(config, resume)
    try:
        return run_training(config, resume)
    except BaseException:
        if claimed:
            release_unstarted(location(config.out))
        raise


def run_training(config: TrainConfig, resume: bool, until_epoch: int | None = None) -> dict | None:
    """Train the claimed run ``config.out`` on ``config``'s data up to ``until_epoch`` (default: the end),
    continuing from its last checkpoint with ``resume``: in this process, on ``config.nproc`` local
    processes, on ``config.ray_workers`` workers of the Ray cluster (:mod:`trainer.ray_train`), or as this
    torchrun rank. Returns the summary: this process's, or with ``--nproc`` or Ray Train the run's
    ``summary.json`` (None while the run has epochs left)."""
    if config.ray_workers:
        from trainer.ray_train import train_on_ray

        return train_on_ray(config, resume, until_epoch)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        return _run_rank(int(os.environ["RANK"]), config, resume, int(os.environ["WORLD_SIZE"]), None, until_epoch)
    if config.nproc > 1:
        address = f"tcp://127.0.0.1:{free_port()}"
        try:
            mp.spawn(_spawned, args=(config, resume, config.nproc, address, until_epoch), nprocs=config.nproc,
                     join=True)
        except mp.ProcessExitedException as error:  # one rank died: spawn has stopped the others
            raise RunError(f"{config.out}: training process {error.error_index} of {config.nproc} died "
                           f"({error}); the others were stopped. Continue with --resume {config.out}") from error
        return read_summary(location(config.out))
    return _run_rank(0, config, resume, 1, None, until_epoch)
