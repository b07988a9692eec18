"""Paths and URLs: one place that turns a dataset location into an fsspec filesystem.

Every location in onion may be a local path or any fsspec URL (``s3://``, ``memory://``,
``file://``). Writes are atomic: on a local disk a file is written under a temporary name and
renamed; on object stores it is uploaded whole in one request, which is atomic there.

Object stores are configured the standard way: ``s3://`` takes its endpoint, region and credentials
from the AWS environment and config files (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ...), so MinIO,
Ceph or any S3-compatible store works; onion never prints them. Transient faults (5xx, throttling,
dropped connections, timeouts) are retried with exponential backoff by botocore's ``standard`` retry
mode, ``S3_MAX_ATTEMPTS`` attempts unless ``AWS_MAX_ATTEMPTS`` says otherwise.
"""
from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from dataclasses import dataclass, field

import fsspec
from fsspec.implementations.local import LocalFileSystem

from shards.faults import boundary
from shards.fork_safety import track

TEMP_MARKER = ".tmp-"
TEMPORARY = re.compile(re.escape(TEMP_MARKER) + r"([0-9]+)-[0-9a-f]{8}$")  # what temporary_name() appends
# A temporary lives for the moment between writing and renaming; one whose writer still runs is
# left alone (a twin job may be writing it), unless it is this old (the pid was reused).
STALE_AFTER_SECONDS = 3600
S3_MAX_ATTEMPTS = 10


@dataclass(frozen=True)
class Location:
    """A directory-like location: a filesystem plus the root path inside it.

    The filesystem object is looked up on use, not stored: fsspec caches one instance per process
    and makes a fresh one after a fork, so a Location can travel to DataLoader workers and Ray tasks
    (async filesystems such as s3fs must not be shared across a fork; :mod:`shards.fork_safety`
    keeps a forked child from closing its parent's connections).
    """

    root: str
    url: str
    protocol: str
    options: tuple = field(default=(), repr=False)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return track(fsspec.filesystem(self.protocol, **dict(self.options)))

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts]) if parts else self.root

    def child(self, *parts: str) -> Location:
        return Location(self.path(*parts), join_url(self.url, *parts), self.protocol, self.options)

    @property
    def is_local(self) -> bool:
        return self.protocol in LocalFileSystem.protocol

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a file: one ranged read, no scan."""
        return self.fs.cat_file(self.path(name), start=start, end=end)

    def read_ranges(self, ranges: list[tuple[str, int, int]]) -> list[bytes]:
        """Several ``(name, start, end)`` ranges, fetched concurrently where the filesystem can."""
        if not ranges:
            return []
        names, starts, ends = zip(*ranges)
        return self.fs.cat_ranges([self.path(name) for name in names], list(starts), list(ends))

    def size(self, *parts: str) -> int:
        return int(self.fs.size(self.path(*parts)))

    def list_names(self) -> list[str]:
        """Names directly under this location (empty when it does not exist), without our own
        temporaries: a file being written is not there until it is renamed into place. (A writer
        killed before its rename leaves one; a re-run must not take it for someone else's file.)"""
        return [name for name in self._all_names() if not is_temporary(name)]

    def _all_names(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))

    def write_atomic(self, name: str, data: bytes) -> None:
        """Write a whole file so that readers see either nothing or all of it."""
        target = self.path(name)
        if self.is_local:
            parent = os.path.dirname(target)
            os.makedirs(parent, exist_ok=True)
            temp = temporary_name(target)
            try:
                with open(temp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                boundary("temp", temp)  # fault injection (see shards.faults); nothing when unset
                os.replace(temp, target)
                boundary("rename", target)
            except BaseException:
                if os.path.exists(temp):  # a full disk, say: leave no half-written temporary behind
                    os.remove(temp)
                raise
        else:
            # Object stores and memory:// commit a single PUT whole, never partly.
            self.fs.pipe_file(target, data)
            boundary("put", target)

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Write a whole file only if none exists: True when this call created it, False when another
        writer got there first. Two jobs racing for one output use it to agree on a single owner."""
        target = self.path(name)
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            temp = temporary_name(target)
            with open(temp, "wb") as handle:
                handle.write(data)
            boundary("temp", temp)
            try:
                os.link(temp, target)  # atomic, fails if the target exists, and never shows a partial file
                boundary("link", target)
                return True
            except FileExistsError:
                return False
            finally:
                os.remove(temp)
                boundary("drop-temp", temp)
        if self.protocol in ("s3", "s3a"):
            try:
                self.fs.pipe_file(target, data, mode="create")  # a conditional PUT (If-None-Match: *)
                boundary("put", target)
                return True
            except FileExistsError:
                return False
        if self.fs.exists(target):  # other stores: best effort
            return False
        self.fs.pipe_file(target, data)
        boundary("put", target)
        return True

    def remove(self, *parts: str, recursive: bool = False) -> None:
        path = self.path(*parts)
        if self.fs.exists(path):
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile by a twin job: gone either way
                self.fs.rm(path, recursive=recursive)
            boundary("remove", path)

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files left by killed writers; returns how many. A temporary whose writer
        (the process id in its name) is alive on this machine is being written right now, by a twin
        job writing the same output say, and is left alone."""
        stale = [name for name in self._all_names() if TEMP_MARKER in name and not self._writer_alive(name)]
        for name in stale:
            self.remove(name)
        return len(stale)

    def _writer_alive(self, name: str) -> bool:
        match = TEMPORARY.search(name)
        if not (self.is_local and match):
            return False
        try:
            os.kill(int(match.group(1)), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # it exists, run by another user
        try:
            return time.time() - os.path.getmtime(self.path(name)) < STALE_AFTER_SECONDS
        except FileNotFoundError:
            return True  # renamed into place meanwhile: nothing to remove


def temporary_name(target: str) -> str:
    return f"{target}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one of the temporaries :meth:`Location.write_atomic` and
    :meth:`Location.create_exclusive` write before renaming or linking into place."""
    return TEMPORARY.search(name) is not None


def join_url(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def storage_options(protocol: str) -> dict:
    """onion's defaults for a protocol; the user's environment and config files still apply."""
    if protocol not in ("s3", "s3a"):
        return {}
    # Other processes (Ray tasks, ranks) write the same prefixes: never answer from a stale listing.
    options: dict = {"use_listings_cache": False}
    if not os.environ.get("AWS_MAX_ATTEMPTS"):
        options["config_kwargs"] = {"retries": {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"}}
    return options


def location(url: str | os.PathLike[str]) -> Location:
    """Resolve a local path or fsspec URL to a :class:`Location`."""
    text = os.fspath(url)
    protocol = fsspec.core.split_protocol(text)[0] or "file"
    options = storage_options(protocol)
    fs, root = fsspec.core.url_to_fs(text, **options)
    track(fs)
    if isinstance(fs, LocalFileSystem):
        root = os.path.abspath(root)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return Location(root=root.rstrip("/") or "/", url=text.rstrip("/") or text, protocol=protocol,
                    options=tuple(sorted(options.items())))
