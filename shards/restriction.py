"""``ShardDataset.restrict(keys)``'s flags, shared with persistent DataLoader workers, sized by nothing
until they are used.

A reader must decide before its workers fork how they will learn a later ``restrict(keys)``. A shared
tensor of one flag per example would do it, and did, but it is allocated whether ``restrict(keys)``
is ever called or not: 1 GB per rank at 10^9 examples, in a reader that otherwise holds only its own
shards. Instead the flags (one bit per example) go to a file when ``restrict(keys)`` is called, and
only the file's path travels through a small shared buffer; a process reads the file when it sees a
new path. The file lives in ``/dev/shm`` where there is one (memory, not disk) and is removed by the
process that wrote it, when the flags are replaced or the reader goes away (never by a worker, which
holds a forked copy of the reader).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import weakref

import numpy as np
import torch

PATH_BYTES = 512  # room for the flags file's path in the shared buffer
FOLDER = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # None: the system's temporary folder


class SharedFlags:
    """One bool per example, set in the main process, read by it and by its DataLoader workers."""

    def __init__(self) -> None:
        self._path = torch.zeros(PATH_BYTES, dtype=torch.uint8).share_memory_()
        self._owner = os.getpid()
        self._cache: tuple[str, np.ndarray | None] = ("", None)
        self._finalizer: weakref.finalize | None = None

    def set(self, flags: np.ndarray | None) -> None:
        """Share ``flags`` from now on (None: every example is in); the previous file is removed."""
        previous = self.path()
        path = ""
        if flags is not None:
            handle, path = tempfile.mkstemp(prefix="onion-restrict-", suffix=".bits", dir=FOLDER)
            with os.fdopen(handle, "wb") as file:
                file.write(np.packbits(np.asarray(flags, dtype=bool)).tobytes())
        encoded = path.encode()
        if len(encoded) >= PATH_BYTES:
            raise OSError(f"{path}: a path longer than {PATH_BYTES - 1} bytes (set TMPDIR to a shorter folder)")
        self._path.zero_()
        if encoded:
            self._path[:len(encoded)] = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = weakref.finalize(self, remove_owned, path, self._owner) if path else None
        if previous:
            remove_owned(previous, self._owner)

    def path(self) -> str:
        return bytes(self._path.numpy()).rstrip(b"\0").decode()

    def get(self, count: int) -> np.ndarray | None:
        """The ``count`` flags as this process last read them (read again when they changed); None: all in."""
        path = self.path()
        if path != self._cache[0]:
            flags = np.unpackbits(np.fromfile(path, dtype=np.uint8), count=count).astype(bool) if path else None
            self._cache = (path, flags)
        return self._cache[1]

    def __getstate__(self) -> dict:  # a spawned worker gets the shared buffer, not the owner's clean-up
        return {"_path": self._path, "_owner": self._owner}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _cache=("", None), _finalizer=None)


def remove_owned(path: str, owner: int) -> None:
    """Remove ``path`` if this process wrote it (a forked worker that exits must leave it)."""
    if os.getpid() == owner:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
