"""Bytes on storage: WebDataset tar shards, the Parquet index, the manifest, fsspec locations.

This package imports nothing from ``pipeline`` or ``trainer``. Its names are loaded on first use
(PEP 562), so ``import shards`` (and ``onion --help``) does not pay for torch, pyarrow or fsspec.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from shards.errors import DatasetDamaged, DatasetError, OnionError, UnknownKey, UsageError

_LAZY = {
    "decode_image": "shards.decode",
    "INDEX_NAME": "shards.index", "INDEX_SCHEMA": "shards.index", "STATUS_OK": "shards.index",
    "STATUS_QUARANTINED": "shards.index", "read_index": "shards.index",
    "MANIFEST_NAME": "shards.manifest", "read_manifest": "shards.manifest",
    "Example": "shards.reader", "ShardDataset": "shards.reader", "read_example": "shards.reader",
    "Location": "shards.urls", "location": "shards.urls",
}

if TYPE_CHECKING:
    from shards.decode import decode_image
    from shards.index import INDEX_NAME, INDEX_SCHEMA, STATUS_OK, STATUS_QUARANTINED, read_index
    from shards.manifest import MANIFEST_NAME, read_manifest
    from shards.reader import Example, ShardDataset, read_example
    from shards.urls import Location, location


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'shards' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "INDEX_NAME", "INDEX_SCHEMA", "MANIFEST_NAME", "STATUS_OK", "STATUS_QUARANTINED",
    "DatasetDamaged", "DatasetError", "Example", "Location", "OnionError", "ShardDataset", "UnknownKey",
    "UsageError", "decode_image", "location", "read_example", "read_index", "read_manifest",
]
