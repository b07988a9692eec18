"""Training on N workers of a Ray cluster with Ray Train (``--ray-workers N``).

Ray Train's ``TorchTrainer`` starts one worker per GPU (CPU workers where the cluster has no GPUs),
sets up their process group (NCCL or gloo), and runs :func:`worker_loop` on each: the same
:class:`~trainer.loop.Trainer` that ``onion train --nproc`` runs on each rank, with the same exact-once
reader (each rank streams its share of the shards). onion's checkpoints in the run folder are the
source of truth: Ray Train's own checkpointing is not used (no worker reports a checkpoint), and its
run records go to a scratch folder under the system's temporary directory. When a worker dies, Ray
Train's failure handling (:data:`RESTARTS`) starts the worker group again, and each worker continues
from the run's last onion checkpoint: exact resume, as ``onion train --resume`` resumes.
"""
from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import replace

import ray
import torch

from shards import location
from trainer.config import TrainConfig
from trainer.errors import RunError
from trainer.run_folder import has_checkpoint, read_summary

RESTARTS = 2  # a worker group that failed is started again this many times, from the last checkpoint


def absolute(url: str) -> str:
    """A local path made absolute (a URL such as ``s3://...`` as it is)."""
    return url if "://" in url else os.path.abspath(url)


def worker_threads(workers: int) -> int:
    """Torch threads per worker: the node's CPUs shared among the workers, as --nproc shares them."""
    return max(1, (os.cpu_count() or 1) // workers)


def worker_loop(payload: dict) -> None:
    """One Ray Train worker: a rank of the run (Ray Train has set up the process group)."""
    from trainer.loop import Trainer

    context = ray.train.get_context()
    torch.set_num_threads(payload["threads"])
    config = TrainConfig.from_dict(payload["config"])
    rank, world_size = context.get_world_rank(), context.get_world_size()
    print(f"{config.out}: Ray Train worker {rank} of {world_size} on node {ray.get_runtime_context().get_node_id()[:8]}"
          f" ({payload['threads']} threads)", file=sys.stderr, flush=True)
    # a restarted worker group continues from the run's last checkpoint, whatever it was started with
    resume = payload["resume"] or has_checkpoint(location(config.out))
    trainer = Trainer(config, rank, world_size, resuming=resume)
    if resume:
        trainer.resume()
    try:
        trainer.train(payload["until_epoch"])
    finally:
        trainer.loaders.clear()


def train_on_ray(config: TrainConfig, resume: bool, until_epoch: int | None) -> dict | None:
    """Train ``config``'s run on ``config.ray_workers`` Ray Train workers up to ``until_epoch``; the run's
    summary (None while it has epochs left)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.ray_runtime import ensure_ray

    ensure_ray()
    workers = config.ray_workers
    # a worker runs in a folder of Ray's: local paths are given to it absolute
    config = replace(config, **{name: absolute(getattr(config, name)) for name in ("dataset", "out", "pretrained")
                                if getattr(config, name)})
    # --device cuda asks Ray for a GPU per worker (an autoscaled cluster starts GPU nodes for them); auto
    # takes them where the cluster has enough now
    use_gpu = config.device == "cuda" or (config.device == "auto" and ray.cluster_resources().get("GPU", 0) >= workers)
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"config": config.to_dict(), "resume": resume, "until_epoch": until_epoch,
                           "threads": worker_threads(workers)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(name=f"onion-{os.path.basename(config.out.rstrip('/')) or 'run'}",
                             storage_path=tempfile.mkdtemp(prefix="onion-ray-train-"),
                             failure_config=FailureConfig(max_failures=RESTARTS)))
    try:
        trainer.fit()
    except Exception as error:  # Ray Train's error once the restarts are spent: the workers' own cause in it
        raise RunError(f"{config.out}: training on {workers} Ray Train workers failed after {RESTARTS} restarts "
                       f"({error}); continue with --resume {config.out}") from error
    return read_summary(location(config.out))
