"""Starting or joining Ray: embedded local Ray by default, a cluster with ``--address``/RAY_ADDRESS."""
from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

import ray

T = TypeVar("T")


def init_ray(address: str | None = None, cpus: int | None = None) -> None:
    """Join ``address`` (or RAY_ADDRESS) when given, else start Ray inside this process.

    ``cpus`` caps the local CPUs Ray schedules on (ignored on a cluster). The CLI calls this with the
    user's options before any work; library functions call :func:`ensure_ray`, which keeps what is
    running. (Ray's own auto-init would *join* a cluster that ``ray start`` runs on this machine.)
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    # Local and private to this process: keep Ray's start-up notices (auth tokens...) quiet.
    # address="local": a new Ray of our own even when `ray start` runs a cluster on this machine
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.ERROR)


def ensure_ray() -> None:
    """Ray as the caller started it, else an embedded local one (RAY_ADDRESS is honoured)."""
    init_ray()


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def default_workers(parts: int) -> int:
    """Actors for work split by index part: one per CPU of the Ray cluster, at most one per part (what
    they compute never depends on how many there are)."""
    ensure_ray()
    return max(1, min(parts, cluster_cpus()))


def current_node() -> str:
    """Short id of the Ray node running the caller (inside a task or actor)."""
    return ray.get_runtime_context().get_node_id()[:8]


def describe_nodes(tasks_per_node: Counter) -> str:
    """``2 Ray nodes (1a2b3c4d: 4 tasks, 5e6f7a8b: 3 tasks)``: where the work ran."""
    detail = ", ".join(f"{node}: {count} tasks" for node, count in sorted(tasks_per_node.items()))
    return f"{len(tasks_per_node)} Ray node{'s' if len(tasks_per_node) != 1 else ''} ({detail})"


ACTOR_ATTEMPTS = 3  # a computation whose actor died is started again with fresh actors, this many times in all


def actor_died(error: BaseException) -> bool:
    """Whether ``error`` (or, from :func:`~pipeline.fan_out.fan_out`, its cause) is an actor's death."""
    return isinstance(error, ray.exceptions.RayActorError) or \
        isinstance(getattr(error, "cause", None), ray.exceptions.RayActorError)


def on_fresh_actors(what: str, compute: Callable[[], T]) -> T:
    """``compute()``, started again from the beginning on fresh actors when one of its actors dies (a node
    lost, a process killed): actors that hold a computation's state cannot be retried call by call, as
    tasks are. Its results must not depend on the attempt (every onion computation on actors is
    deterministic, and what it writes before committing is named by its content)."""
    for attempt in range(1, ACTOR_ATTEMPTS + 1):
        try:
            return compute()
        except Exception as error:
            if not actor_died(error) or attempt == ACTOR_ATTEMPTS:
                raise
            print(f"{what}: an actor died ({type(error).__name__}); starting again on fresh actors (attempt "
                  f"{attempt + 1} of {ACTOR_ATTEMPTS})", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")
