"""Shard patterns as WebDataset users write them: ``shards/{00000..00099}.tar``, ``shards/*.tar``, on a
local disk or any fsspec URL (``s3://bucket/laion/{00000..41455}.tar``).

Braces are expanded with ``braceexpand`` (webdataset's own dependency, so the same pattern names the
same files as ``webdataset.WebDataset(pattern)``), then each part with a glob character is globbed.
Files are named relative to the pattern's fixed folder (the part before any brace or glob character),
so names stay the same when the whole folder moves. Existence and sizes come from one listing per
folder, not one request per file.
"""
from __future__ import annotations

import posixpath
import re

from braceexpand import braceexpand

from shards.errors import UsageError
from shards.urls import Location, location

_MAGIC = re.compile(r"[{*?\[]")
_GLOB = re.compile(r"[*?\[]")


def pattern_folder(pattern: str) -> tuple[str, str]:
    """``(fixed folder, the rest)``: the folder before the first brace or glob character, and the
    pattern relative to it."""
    magic = _MAGIC.search(pattern)
    cut = pattern.rfind("/", 0, magic.start() if magic else len(pattern))
    if cut < 0:
        return ".", pattern
    folder = pattern[:cut] or "/"
    return folder + "/" if folder.endswith("://") else folder, pattern[cut + 1:]  # file:///x.tar: the root


def expand_pattern(pattern: str) -> tuple[Location, list[tuple[str, int]]]:
    """The files ``pattern`` names: its fixed folder and ``[(name relative to it, size in bytes)]`` in
    pattern order (braces in their order, each glob's matches sorted), each file once. Every file the
    braces name must exist; a pattern that names nothing is an error."""
    folder_url, rest = pattern_folder(pattern)
    try:
        parts = list(braceexpand(rest))
    except ValueError as error:  # unbalanced braces
        raise UsageError(f"{pattern!r}: {error}") from None
    folder = location(folder_url)
    if not _MAGIC.search(pattern) and folder.fs.isdir(folder.path(rest)):
        raise UsageError(f"{pattern!r} is a folder: name its shards, e.g. '{pattern.rstrip('/')}/*.tar'")
    order: dict[str, int | None] = {}  # name -> size (None: named literally, size from the listing)
    for part in parts:
        if _GLOB.search(part):
            matches = folder.fs.glob(folder.path(part), detail=True)
            for path in sorted(matches):
                if matches[path].get("type") == "file":
                    order.setdefault(_relative(folder, path), int(matches[path]["size"]))
        else:
            order.setdefault(posixpath.normpath(part), None)
    sizes = _listed_sizes(folder, [name for name, size in order.items() if size is None])
    missing = [name for name, size in order.items() if size is None and name not in sizes]
    if missing:
        raise UsageError(f"{pattern!r} names {len(missing)} file{'s' if len(missing) > 1 else ''} that "
                         f"do{'es' if len(missing) == 1 else ''} not exist under {folder.url}: "
                         f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")
    if not order:
        raise UsageError(f"{pattern!r} matches no files (under {folder.url})")
    return folder, [(name, sizes[name] if size is None else size) for name, size in order.items()]


def _listed_sizes(folder: Location, names: list[str]) -> dict[str, int]:
    """Sizes of those ``names`` (relative to ``folder``) that exist as files: one listing per folder."""
    sizes: dict[str, int] = {}
    for parent in sorted({posixpath.dirname(name) for name in names}):
        path = folder.path(parent) if parent else folder.root
        try:
            entries = folder.fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.get("type") == "file":
                sizes[_relative(folder, entry["name"])] = int(entry["size"])
    return sizes


def _relative(folder: Location, path: str) -> str:
    root = folder.root.rstrip("/") + "/"
    path = path.rstrip("/")
    return path[len(root):] if path.startswith(root) else path
