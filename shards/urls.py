"""Paths and URLs: one place that turns a dataset location into an fsspec filesystem.

Every location in onion may be a local path or any fsspec URL (``s3://``, ``memory://``,
``file://``). Writes are atomic: on a local disk a file is written under a temporary name and
renamed; on object stores it is uploaded whole in one request, which is atomic there.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

TEMP_MARKER = ".tmp-"


@dataclass(frozen=True)
class Location:
    """A directory-like location: a filesystem plus the root path inside it."""

    fs: fsspec.AbstractFileSystem
    root: str
    url: str

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts]) if parts else self.root

    def child(self, *parts: str) -> "Location":
        return Location(self.fs, self.path(*parts), join_url(self.url, *parts))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a file: one ranged read, no scan."""
        return self.fs.cat_file(self.path(name), start=start, end=end)

    def size(self, *parts: str) -> int:
        return int(self.fs.size(self.path(*parts)))

    def list_names(self) -> list[str]:
        """Names directly under this location (empty when it does not exist)."""
        if not self.fs.exists(self.root):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))

    def write_atomic(self, name: str, data: bytes) -> None:
        """Write a whole file so that readers see either nothing or all of it."""
        target = self.path(name)
        if self.is_local:
            parent = os.path.dirname(target)
            os.makedirs(parent, exist_ok=True)
            temp = f"{target}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            with open(temp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        else:
            # Object stores and memory:// commit a single PUT whole, never partly.
            self.fs.pipe_file(target, data)

    def remove(self, *parts: str, recursive: bool = False) -> None:
        path = self.path(*parts)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=recursive)

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files left by a killed writer; returns how many."""
        stale = [name for name in self.list_names() if TEMP_MARKER in name]
        for name in stale:
            self.remove(name)
        return len(stale)


def join_url(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def location(url: str | os.PathLike[str]) -> Location:
    """Resolve a local path or fsspec URL to a :class:`Location`."""
    text = os.fspath(url)
    fs, root = fsspec.core.url_to_fs(text)
    if isinstance(fs, LocalFileSystem):
        root = os.path.abspath(root)
    return Location(fs=fs, root=root.rstrip("/") or "/", url=text.rstrip("/") or text)
