"""Bytes on storage: WebDataset tar shards, the Parquet index, the manifest, fsspec locations.

This package imports nothing from ``pipeline`` or ``trainer``.
"""
from shards.decode import decode_image
from shards.index import INDEX_NAME, INDEX_SCHEMA, STATUS_OK, STATUS_QUARANTINED, read_index
from shards.manifest import MANIFEST_NAME, DatasetError, read_manifest
from shards.reader import Example, ShardDataset, read_example
from shards.urls import Location, location

__all__ = [
    "INDEX_NAME", "INDEX_SCHEMA", "MANIFEST_NAME", "STATUS_OK", "STATUS_QUARANTINED",
    "DatasetError", "Example", "Location", "ShardDataset", "decode_image", "location",
    "read_example", "read_index", "read_manifest",
]
