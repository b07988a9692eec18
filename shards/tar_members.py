"""Walk the members of one tar without trusting it: each member's name, where its data lies, and what
is wrong with it.

For tars onion did not write (``wds:`` ingest now, an index over shards in place later). Nothing is
ever extracted: a member is a byte range of the tar, so a member named ``../x`` or ``/etc/x`` cannot
write anywhere; it is reported, as are links, devices and a header whose size runs past the end of
the file. Reads are bounded by the file's real size, never by what a header claims: a PAX or GNU
long-name header "of 8 GiB" in a 10 KB file makes tarfile allocate at most 10 KB. Member data is
skipped with a seek (on object stores, a ranged read) unless the caller asks for it. Directory
members hold no data and are left out.
"""
from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

# The first bytes of a compressed file: a compressed tar has no member offsets to read by range.
COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd",
                    b"\x04\x22\x4d\x18": "lz4"}
READ_LIMIT = 1 << 20  # a member read whole (metadata) may be at most this large
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class TarMember:
    """One member as found; ``name`` None means the tar's structure breaks at ``offset`` (nothing after
    it can be read). ``data`` is filled only for members the caller asked to read, when they are sound."""

    name: str | None
    offset: int  # where the member's data starts
    size: int
    problem: str | None = None
    data: bytes | None = None


class BoundedReader:
    """A binary file whose reads never ask for more than what remains of its real ``size``."""

    def __init__(self, handle: BinaryIO, size: int) -> None:
        self.handle, self.size = handle, size

    def read(self, count: int | None = -1) -> bytes:
        remaining = max(0, self.size - self.handle.tell())
        return self.handle.read(remaining if count is None or count < 0 else min(count, remaining))

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()


def compression(head: bytes) -> str | None:
    """The compression a file's first bytes show (``gzip``, ``zstd``...), or None."""
    return next((name for magic, name in COMPRESSED_MAGIC.items() if head.startswith(magic)), None)


def member_kind(info: tarfile.TarInfo) -> str:
    """What a member that is not a regular file is, in words."""
    if info.issym():
        return f"symbolic link to {info.linkname}"
    if info.islnk():
        return f"hard link to {info.linkname}"
    if info.isdir():
        return "directory"
    if info.issparse():
        return "GNU sparse file"
    return {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
            tarfile.FIFOTYPE: "fifo"}.get(info.type, "device or fifo")


def name_problem(name: str) -> str | None:
    """Why a member name is unsafe to use as a path (absolute, '..', control characters), or None."""
    if not name:
        return "empty member name"
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:[\\/]", name):
        return "unsafe member name (an absolute path)"
    if ".." in re.split(r"[\\/]", name):
        return "unsafe member name ('..' leaves the archive's folder)"
    if _CONTROL.search(name):
        return "unsafe member name (control characters)"
    return None


def walk_tar(handle: BinaryIO, size: int, *, read: Callable[[str], bool] | None = None,
             read_limit: int = READ_LIMIT) -> Iterator[TarMember]:
    """Every member of the tar in ``handle`` (``size`` bytes, seekable), in stored order. A member
    for which ``read(name)`` is true comes with its data when it is sound and at most ``read_limit``
    bytes. The walk stops at the first member whose data runs past the end of the file (a truncated
    or lying tar: that member carries the problem) or with a ``name=None`` member where the headers
    stop making sense; a tar that ends cleanly ends with its last member."""
    reader = BoundedReader(handle, size)
    reader.seek(0)
    try:
        tar = tarfile.open(fileobj=reader, mode="r:")  # type: ignore[call-overload]
    except (tarfile.TarError, ValueError, UnicodeError) as error:
        yield TarMember(None, 0, 0, f"not a tar file ({error})")
        return
    while True:
        try:
            info = tar.next()
        except (tarfile.TarError, ValueError, UnicodeError) as error:
            yield TarMember(None, tar.offset, 0, f"tar headers broken at byte {tar.offset} ({error})")
            return
        tar.members = []  # tarfile keeps every header it read; a shard may hold millions
        if info is None:
            break
        data_size = info.size if info.isreg() or info.type not in tarfile.SUPPORTED_TYPES else 0
        if info.offset_data + data_size > size:
            yield TarMember(info.name, info.offset_data, info.size,
                            f"truncated: the tar header says {info.size} bytes but only "
                            f"{max(0, size - info.offset_data)} remain in the file")
            return
        if info.isdir():
            continue
        problem = (None if info.isreg() and not info.issparse() else f"not a regular file ({member_kind(info)})")
        problem = problem or name_problem(info.name)
        data = None
        if problem is None and read is not None and read(info.name):
            if info.size > read_limit:
                problem = f"{info.size} bytes, over the {read_limit}-byte limit of a member read whole"
            else:
                reader.seek(info.offset_data)
                data = reader.read(info.size)
        yield TarMember(info.name, info.offset_data, info.size, problem, data)
    end = _trailing_garbage(reader, tar.offset, size)
    if end:
        yield TarMember(None, tar.offset, 0, end)


def _trailing_garbage(reader: BoundedReader, offset: int, size: int) -> str | None:
    """Why the bytes where tarfile stopped are not an end of archive (zero blocks, or the file's end).
    tarfile stops quietly at a cut or corrupt header; a sound tar has only zeros there."""
    reader.seek(offset)
    block = reader.read(tarfile.BLOCKSIZE)
    if not block.strip(b"\0"):
        return None
    why = "a truncated header" if len(block) < tarfile.BLOCKSIZE else "not a tar header (bad checksum or format)"
    return f"tar headers broken at byte {offset} of {size} ({why})"
