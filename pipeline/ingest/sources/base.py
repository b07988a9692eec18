"""What every source gives ingest: a list of lightweight records, and a way to load one.

Records are planned in the driver (cheap, picklable) and loaded inside Ray tasks, so a source
must pickle small: it holds paths or arrays, never open files.
"""
from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from shards.errors import UsageError


class SourceError(UsageError):
    """A source that cannot be used at all (missing directory, unknown name); exit code 2."""


class Quarantine(Exception):
    """One input that cannot become an example; its message is the quarantine reason."""


@dataclass(frozen=True)
class Record:
    """One input as planned: enough to name it, place it in a split and load it later."""

    key: str
    split: str
    label: int | None
    source_ref: str
    est_bytes: int
    locator: object = None
    planted: str | None = None
    quarantine: str | None = None  # known to be bad before loading
    extra: dict = field(default_factory=dict)  # goes into the example's JSON member
    original_size: tuple[int, int] | None = None  # (width, height) before an earlier resize (re-shards)


Raw = bytes | np.ndarray


class Source(ABC):
    """A named origin of examples."""

    spec: str
    class_names: list[str]
    parameters: dict = {}  # what else shapes the output (recorded in the manifest)
    manifest_extra: dict = {}  # what records() found worth recording in the manifest (img2dataset's counts)
    # False: the data carry no classes (LAION-style captions): every record's label is None, class_names is
    # empty, and the dataset is written as unlabelled (see shards.manifest.is_labelled)
    labelled: bool = True

    @abstractmethod
    def records(self) -> list[Record]:
        """Every input, good or bad, in a stable order."""

    @abstractmethod
    def load(self, record: Record) -> Raw:
        """Encoded file bytes or a uint8 pixel array (HxW or HxWx3); may raise :class:`Quarantine`."""

    # True: a unit of :meth:`locality` is read whole even for one of its records (a Parquet row group), so
    # the shards that share a unit are written by one task; False: records are read by exact byte range
    reads_whole_units: bool = False

    def locality(self, record: Record) -> object | None:
        """What ``record`` is best read with: the records of one unit (a Parquet row group, a source tar)
        are planned into as few shards as possible, whole units shuffled instead of single records, so
        each task reads a few units sequentially (a row group once, not once per output shard; a tar
        as long ranges, not a request per image). None (the default): the record is its own unit."""
        return None

    def prefetch(self, records: list[Record]) -> None:  # noqa: B027 - an optional hook, empty unless a source needs it
        """Called (in the Ray task) before ``records`` are loaded, so a remote source can fetch them in
        a few large reads instead of one request each. Default: nothing to do."""


def hash_split(key: str, val_fraction: float) -> str:
    """A stable split from the key alone: the same key always lands in the same split."""
    bucket = int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big") / 2**32
    return "val" if bucket < val_fraction else "train"


_UNSAFE_KEY_CHARACTERS = re.compile(r"[^A-Za-z0-9_-]+")


def safe_key_part(text: str, limit: int = 40) -> str:
    """Text reduced to what keys allow (letters, digits, '_' and '-')."""
    return _UNSAFE_KEY_CHARACTERS.sub("_", text).strip("_")[:limit] or "x"


def printable(path: str) -> str:
    """A file name as valid UTF-8 text: bytes that are not UTF-8 (kept by Python as surrogates) become
    ``\\xNN`` escapes, so the index can store any name the filesystem allows."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:10]
