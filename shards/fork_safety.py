"""Keeps a forked child's hands off its parent's object-store connections.

Async fsspec filesystems (s3fs, gcsfs, ...) hold an event loop and a pool of open keep-alive
connections. At a fork (DataLoader workers are forked), fsspec drops its cached instances in the
child, which then garbage-collects its copies of them whenever its collector next runs. s3fs's
finalizer closes the copies' pooled connections, and when that runs inside the child's own event
loop (the thread where a child's reads allocate most), closing a connection removes its socket from
the *parent's* event loop's epoll instance, which the child shares with the parent. The parent's
sockets are deregistered there: its next request on one of them never sees the answer (seen as the
parent of a DataLoader worker waiting forever on a PUT; the maintainers' word on fork and async
fsspec: https://github.com/fsspec/s3fs/issues/914).

So a child keeps a reference to every async filesystem its parent had made, for its whole life: no
finalizer of theirs ever runs there. The child makes its own instances as usual (fsspec's cache is
per process); the inherited ones cost it nothing but memory it already has.
"""
from __future__ import annotations

import os
import weakref

import fsspec

# Async filesystems this process has handed out, by id (equal tokens would collide in a set).
_made: weakref.WeakValueDictionary[int, fsspec.AbstractFileSystem] = weakref.WeakValueDictionary()
# Strong references taken just before a fork: the child's copy of this list keeps them alive.
_at_fork: list[fsspec.AbstractFileSystem] = []
# In a child: what its parents made, kept (never emptied) so it is never finalized here.
_inherited: list[fsspec.AbstractFileSystem] = []


def track(fs: fsspec.AbstractFileSystem) -> fsspec.AbstractFileSystem:
    """Record ``fs`` if it is an async filesystem, so processes forked later leave it alone; returns ``fs``."""
    if getattr(fs, "async_impl", False) and _made.get(id(fs)) is not fs:
        _made[id(fs)] = fs
    return fs


def _before_fork() -> None:
    _at_fork[:] = list(_made.values())


def _after_fork_in_child() -> None:
    _inherited.extend(_at_fork)
    _at_fork.clear()


if hasattr(os, "register_at_fork"):  # POSIX; spawned processes share nothing to protect
    os.register_at_fork(before=_before_fork, after_in_parent=_at_fork.clear, after_in_child=_after_fork_in_child)
