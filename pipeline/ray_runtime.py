"""Starting or joining Ray: embedded local Ray by default, a cluster with ``--address``/RAY_ADDRESS."""
from __future__ import annotations

import logging
import os

import ray


def init_ray(address: str | None = None, workers: int | None = None) -> None:
    """Join ``address`` (or RAY_ADDRESS) when given, else start Ray inside this process.

    ``workers`` caps the local CPUs Ray schedules on (ignored on a cluster).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    # Local and private to this process: keep Ray's start-up notices (auth tokens...) quiet.
    ray.init(num_cpus=workers, include_dashboard=False, logging_level=logging.ERROR)
