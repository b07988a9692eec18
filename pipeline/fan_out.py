"""One Ray call per item (a shard, a wave of shards), results streamed back as they finish.

Every partitioned step runs the same loop: submit work for each item, wait for whatever finishes
first, advance one progress bar, hand the result to the caller. :func:`fan_out` runs it with Ray
tasks, :func:`fan_out_to_actors` with a pool of actors (models loaded once, many shards each)::

    for shard, (keys, hashes, node) in fan_out(shards, lambda s: hash_shard.remote(url, s), desc="phash"):
        ...

* Results come in completion order: callers that write them sort first (by key), as before.
* At most ``max_in_flight`` calls are pending at a time (one per actor for a pool), so 10^5 shards
  never mean 10^5 object refs at once, nor an O(n) ``ray.wait`` over all of them for each result.
* Retries are the remote function's or actor's own (``max_retries``, ``max_restarts``); a call that
  still fails raises :class:`TaskFailed` naming the item, and the calls still running are cancelled.
  Leaving the loop early (``break``, an exception in its body) cancels them too, once the iterator
  is closed (CPython closes it as the loop is left).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import ray
from ray.actor import ActorHandle
from tqdm import tqdm

from pipeline.ray_runtime import cluster_cpus, ensure_ray
from shards.errors import OnionError

Item = TypeVar("Item")
Slot = TypeVar("Slot")

IN_FLIGHT_PER_CPU = 4  # enough queued that no worker idles while the driver takes a result in
_END: Any = object()  # no item left


class TaskFailed(Exception):
    """The call for ``item`` failed after its retries. ``cause`` is what it raised (without Ray's wrapper).

    The error raised is also an instance of the cause's class, as Ray's own task errors are, so
    ``except DatasetDamaged`` or ``except OSError`` around a fan-out, and the CLI's exit codes (an
    :class:`~shards.errors.OnionError` cause keeps its ``exit_code``), work as before; its message
    names the item instead of carrying Ray's remote traceback (that stays in ``__cause__``).
    """

    def __init__(self, message: str, item: object, cause: BaseException) -> None:
        Exception.__init__(self, message)  # not the cause class's own __init__: its arguments are not ours
        self.item = item
        self.cause = cause  # where the CLI looks for a Ray task's own exception

    def __str__(self) -> str:  # not the cause class's __str__ (KeyError would quote the message)
        return str(self.args[0])


@functools.cache
def _failure_class(cause_type: type[BaseException]) -> type[TaskFailed]:
    if not issubclass(cause_type, Exception) or issubclass(cause_type, (StopIteration, StopAsyncIteration)):
        return TaskFailed  # raised from a generator, a StopIteration would turn into a RuntimeError
    try:
        return type(f"TaskFailed({cause_type.__name__})", (TaskFailed, cause_type), {})
    except TypeError:  # a class that cannot be subclassed, or whose layout cannot be combined
        return TaskFailed


def _task_failed(desc: str, label: str, item: object, error: ray.exceptions.RayError) -> TaskFailed:
    """The error for ``item``'s failed call: Ray's error unwrapped to the task's own exception."""
    cause = error.cause if isinstance(getattr(error, "cause", None), BaseException) else error
    # An OnionError's message is written for a person; other errors need their type to make sense.
    detail = str(cause) if isinstance(cause, OnionError) else f"{type(cause).__name__}: {cause}"
    message = f"{desc}: {label}: {detail}"
    try:
        return _failure_class(type(cause))(message, item, cause)
    except Exception:  # noqa: BLE001 - a cause class whose __new__ wants other arguments: the plain error
        return TaskFailed(message, item, cause)


_interrupted = False
SETTLE_SECONDS = 60  # the most a failure's report waits for the cancelled tasks to end


def note_interruption() -> None:
    """The process is ending on a Ctrl-C: calls still running are left to Ray's shutdown, not cancelled.

    The Ctrl-C reached the workers too, so their calls are ending on their own; cancelling one while its
    reply arrives is a race inside Ray in which the core worker aborts the whole process (``Check failed:
    ... Tried to complete task that was not pending``, ray-project/ray#54527), turning the clean exit 130
    into a crash. The CLI calls this when a Ctrl-C reaches it, since a loop left by the interruption may
    only be closed (and reach its cancelling ``finally``) afterwards.
    """
    global _interrupted
    _interrupted = True


def fan_out(items: Sequence[Item], submit: Callable[[Item], ray.ObjectRef], *, desc: str, unit: str = "shard",
            progress: bool = True, weight: Callable[[Item], int] | None = None, initial: int = 0,
            label: Callable[[Item], str] = str, max_in_flight: int | None = None) -> Iterator[tuple[Item, Any]]:
    """``(item, result)`` for every item, in completion order; ``submit(item)`` starts its Ray task.

    ``desc``/``unit``: the progress bar's (shown when ``progress``); it counts ``weight(item)`` per
    finished item (default 1: a bar in shards; the images of a wave for a bar in images), from
    ``initial`` (work a resumed job finished before) to ``initial`` + the sum of the weights.
    ``label(item)``: how an error names the item. ``max_in_flight``: calls pending at once (default:
    ``IN_FLIGHT_PER_CPU`` per CPU of the Ray cluster).
    """
    ensure_ray()
    limit = max(1, max_in_flight or IN_FLIGHT_PER_CPU * cluster_cpus())
    yield from _stream(items, [None] * limit, lambda _, item: submit(item), desc=desc, unit=unit, progress=progress,
                       weight=weight, initial=initial, label=label, settle=True)


def fan_out_to_actors(items: Sequence[Item], new_actor: Callable[[], ActorHandle],
                      call: Callable[[ActorHandle, Item], ray.ObjectRef], *, actors: int | None = None, desc: str,
                      unit: str = "shard", progress: bool = True, weight: Callable[[Item], int] | None = None,
                      initial: int = 0, label: Callable[[Item], str] = str) -> Iterator[tuple[Item, Any]]:
    """As :func:`fan_out`, with ``call(actor, item)`` on a pool of ``actors`` actors from ``new_actor()``
    (default: one per CPU of the Ray cluster, never more than there are items), one call per actor at
    a time. The actors live as long as the iterator: they are released when it finishes or is closed.
    """
    ensure_ray()
    count = min(actors or cluster_cpus(), len(items))
    yield from _stream(items, [new_actor() for _ in range(count)], call, desc=desc, unit=unit, progress=progress,
                       weight=weight, initial=initial, label=label)


def _stream(items: Sequence[Item], slots: list[Slot], call: Callable[[Slot, Item], ray.ObjectRef], *, desc: str,
            unit: str, progress: bool, weight: Callable[[Item], int] | None, initial: int,
            label: Callable[[Item], str], settle: bool = False) -> Iterator[tuple[Item, Any]]:
    """The loop: each slot (an actor, or a place in the in-flight window) runs one call at a time.
    ``settle``: on leaving early, wait (up to :data:`SETTLE_SECONDS`) for the cancelled calls to end."""
    weigh = weight or (lambda _: 1)
    todo = iter(items)
    free = list(reversed(slots))  # popped from the end: the first slots are used first
    running: dict[ray.ObjectRef, tuple[Slot, Item]] = {}

    def submit_more() -> None:
        while free:
            item = next(todo, _END)
            if item is _END:
                return
            slot = free.pop()
            running[call(slot, item)] = (slot, item)

    total = initial + sum(weigh(item) for item in items)
    with tqdm(total=total, initial=initial, unit=unit, desc=desc, disable=not progress) as bar:
        try:
            submit_more()
            while running:
                [ready], _ = ray.wait(list(running), num_returns=1)
                slot, item = running.pop(ready)
                free.append(slot)
                try:
                    result = ray.get(ready)
                except ray.exceptions.RayError as error:
                    raise _task_failed(desc, label(item), item, error) from error
                submit_more()  # before handing the result over: the cluster works while the caller does
                bar.update(weigh(item))
                yield item, result
        except KeyboardInterrupt:
            note_interruption()
            raise
        finally:  # a failure, or a caller that stopped early: no one will take what still runs
            if not _interrupted:
                for ref in running:
                    ray.cancel(ref)
                if settle and running:
                    # A task already running ends at its next Python line (Ray raises KeyboardInterrupt
                    # in it), not at once: the caller, cleaning up after this failure (an ingest finding
                    # its twin's finished dataset removes its bookkeeping), must not race a call of ours
                    # that still writes. (Actors' running calls are not interrupted: not waited for.)
                    ray.wait(list(running), num_returns=len(running), timeout=SETTLE_SECONDS)
