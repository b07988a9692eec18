"""Deterministic WebDataset tar shards built in memory.

Each example becomes adjacent members ``<key>.<ext>`` (image), ``<key>.cls`` (not for an
unlabelled example) and ``<key>.json``. Header fields that vary between machines are fixed (mtime 0, uid/gid 0, no
user names, mode 0644, USTAR format), so identical input gives byte-identical shards. The
writer reports where each member's data starts, which lets the index read one example by byte
range without scanning the tar.
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass

MEMBER_MODE = 0o644
MAX_KEY_LENGTH = 90  # USTAR names hold 100 bytes; keep room for the extension


@dataclass(frozen=True)
class ShardExample:
    key: str
    image: bytes
    image_ext: str
    label: int | None  # None: an unlabelled example, written without a .cls member
    metadata: dict


@dataclass(frozen=True)
class MemberSpan:
    offset: int
    size: int


@dataclass(frozen=True)
class WrittenExample:
    key: str
    image: MemberSpan
    cls: MemberSpan | None
    json: MemberSpan


def check_key(key: str) -> None:
    """Keys name tar members and WebDataset splits names at the first dot."""
    if not key or "." in key or "/" in key or len(key) > MAX_KEY_LENGTH or not key.isascii():
        raise ValueError(
            f"invalid example key {key!r}: keys are ASCII, at most {MAX_KEY_LENGTH} characters, "
            "with no '.' or '/'"
        )


def metadata_bytes(metadata: dict) -> bytes:
    return json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode()


def build_shard(examples: list[ShardExample]) -> tuple[bytes, list[WrittenExample]]:
    """Tar bytes for ``examples`` (in the given order) and the span of every member."""
    buffer = io.BytesIO()
    written: list[WrittenExample] = []
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for example in examples:
            check_key(example.key)
            image = _add_member(tar, buffer, f"{example.key}.{example.image_ext}", example.image)
            cls = (None if example.label is None
                   else _add_member(tar, buffer, f"{example.key}.cls", str(int(example.label)).encode()))
            metadata = _add_member(tar, buffer, f"{example.key}.json", metadata_bytes(example.metadata))
            written.append(WrittenExample(example.key, image, cls, metadata))
    return buffer.getvalue(), written


def _add_member(tar: tarfile.TarFile, buffer: io.BytesIO, name: str, payload: bytes) -> MemberSpan:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = MEMBER_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))
    # addfile wrote one 512-byte header, then the payload padded to a block boundary.
    data_end = buffer.tell()
    padded = -(-len(payload) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return MemberSpan(offset=data_end - padded, size=len(payload))
