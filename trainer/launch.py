"""Starting training: one process, ``--nproc N`` local processes, or under ``torchrun``.

DDP uses NCCL on GPUs and gloo on CPUs. Every rank streams its own share of the shards (the
reader's exact-once rule), and all ranks write dynamics into the same run directory.
"""
from __future__ import annotations

import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shards import location, read_manifest
from shards.selections import read_selection
from trainer.checkpoint import latest_position
from trainer.config import TrainConfig
from trainer.errors import RunError
from trainer.loop import CONFIG_NAME, SUMMARY_NAME, Trainer


def claim_run_directory(config: TrainConfig, resume: bool) -> bool:
    """A fresh run owns its directory: its config.json is created exclusively, so of two jobs started
    on one --out only the first trains there (under torchrun, rank 0 claims it for all ranks).
    Returns whether this call made the claim."""
    if resume or int(os.environ.get("RANK", "0")) != 0:
        return False
    if not location(config.out).create_exclusive(CONFIG_NAME, json.dumps(config.to_dict(), indent=2).encode()):
        raise RunError(f"{config.out} already holds a run; continue it with --resume {config.out} "
                       "or choose another --out")
    return True


def release_unstarted_claim(config: TrainConfig) -> None:
    """A job that fails before its first checkpoint leaves nothing to continue: free the folder, so
    the corrected command can run there. (Once a checkpoint exists the claim stays: --resume.)"""
    run = location(config.out)
    if latest_position(run) is None:
        run.remove(CONFIG_NAME)


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_rank(rank: int, config: TrainConfig, resume: bool, world_size: int, address: str | None) -> dict:
    if world_size > 1:
        if address:
            dist.init_process_group(backend(), init_method=address, rank=rank, world_size=world_size)
        else:
            dist.init_process_group(backend())  # torchrun's environment
    try:
        trainer = Trainer(config, rank, world_size, resuming=resume)
        if resume:
            trainer.resume()
        return trainer.train()
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def _spawned(rank: int, config: TrainConfig, resume: bool, world_size: int, address: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    _run_rank(rank, config, resume, world_size, address)


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
        return _train(config, resume)
    except BaseException:
        if claimed:
            release_unstarted_claim(config)
        raise


def _train(config: TrainConfig, resume: bool) -> dict:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        return _run_rank(int(os.environ["RANK"]), config, resume, int(os.environ["WORLD_SIZE"]), None)
    if config.nproc > 1:
        address = f"tcp://127.0.0.1:{free_port()}"
        try:
            mp.spawn(_spawned, args=(config, resume, config.nproc, address), nprocs=config.nproc, join=True)
        except mp.ProcessExitedException as error:  # one rank died: spawn has stopped the others
            raise RunError(f"{config.out}: training process {error.error_index} of {config.nproc} died "
                           f"({error}); the others were stopped. Continue with --resume {config.out}") from error
        return json.loads(location(config.out).read_bytes(SUMMARY_NAME))
    return _run_rank(0, config, resume, 1, None)
