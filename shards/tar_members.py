"""Walk the members of one tar without trusting it: each member's name, where its data lies, and what
is wrong with it.

For tars onion did not write (``wds:`` ingest now, an index over shards in place later). Nothing is
ever extracted: a member is a byte range of the tar, so a member named ``../x`` or ``/etc/x`` cannot
write anywhere; it is reported, as are links, devices, a member larger than any image onion reads
(``MEMBER_LIMIT``) and a header whose size runs past the end of the file. Reads are bounded by the
file's real size and by ``HEADER_LIMIT``, never by what a header claims: a PAX or GNU long-name header
"of 8 GiB" makes tarfile allocate at most 16 MiB, whether the file holds 10 KB or is a 64 GiB sparse
file. Member data is skipped with a seek (on object stores, a ranged read) unless the caller asks for
it. Directory members hold no data and are left out. The common member (a regular file or directory
under a valid USTAR/GNU header, optionally behind a PAX header of path, size and times) is parsed here,
exactly as tarfile parses it, because tarfile's parse was most of a walk's time; anything else goes to
tarfile (``tests/test_ingest_wds.py`` checks both give the same walk on every shape of tar).

:class:`HashedStream` reads a whole file once, front to back in large reads, for a caller that must
hash all of it anyway (indexing shards in place, verifying them): the walk's seeks read through, and
the byte ranges asked for (images) are handed over one at a time, so memory stays bounded however
large the file or its members.
"""
from __future__ import annotations

import hashlib
import re
import tarfile
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

# The first bytes of a compressed file: a compressed tar has no member offsets to read by range.
COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd",
                    b"\x04\x22\x4d\x18": "lz4"}
READ_LIMIT = 1 << 20  # a member read whole (metadata) may be at most this large
# A member larger than this is refused (its sample quarantined) without being read: no image onion
# accepts comes near it (--max-pixels 40 M is 160 MB even as raw RGBA), and images are read whole.
MEMBER_LIMIT = 1 << 30
HEADER_LIMIT = 16 << 20  # tarfile reads a PAX or GNU long-name header whole: at most this many bytes
STREAM_CHUNK = 8 << 20  # HashedStream's reads
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
    """A binary file whose reads never ask for more than what remains of its real ``size``, nor for
    more than ``limit`` bytes at once (a tarfile error instead: a header claiming gigabytes)."""

    def __init__(self, handle: BinaryIO, size: int, limit: int | None = None) -> None:
        self.handle, self.size, self.limit = handle, size, limit

    def read(self, count: int | None = -1) -> bytes:
        remaining = max(0, self.size - self.handle.tell())
        wanted = remaining if count is None or count < 0 else min(count, remaining)
        if self.limit is not None and wanted > self.limit:
            raise tarfile.ReadError(f"a header asks for {wanted} bytes of extended data, over the "
                                    f"{self.limit}-byte limit")
        return self.handle.read(wanted)

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


# tarfile's errors on hostile headers; IndexError: a GNU sparse header cut at the end of the file
TAR_ERRORS = (tarfile.TarError, ValueError, UnicodeError, IndexError)


def walk_tar(handle: BinaryIO, size: int, *, read: Callable[[str], bool] | None = None,
             read_limit: int = READ_LIMIT, size_limit: int = MEMBER_LIMIT,
             parse_plain: bool = True) -> Iterator[TarMember]:
    """Every member of the tar in ``handle`` (``size`` bytes, seekable), in stored order. A member
    for which ``read(name)`` is true comes with its data when it is sound and at most ``read_limit``
    bytes; a member of more than ``size_limit`` bytes carries a problem (it is never read). The walk
    stops at the first member whose data runs past the end of the file (a truncated or lying tar:
    that member carries the problem) or with a ``name=None`` member where the headers stop making
    sense; a tar that ends cleanly ends with its last member. ``parse_plain`` False leaves every
    header to tarfile (the tests compare both ways)."""
    reader = BoundedReader(handle, size, max(read_limit, HEADER_LIMIT))
    reader.seek(0)
    try:
        tar = tarfile.open(fileobj=reader, mode="r:")  # type: ignore[call-overload]
    except TAR_ERRORS as error:
        yield TarMember(None, 0, 0, f"not a tar file ({error})")
        return
    while True:
        plain = (_plain_member(reader, tar.offset) if parse_plain and tar.firstmember is None and not tar.pax_headers
                 else None)
        if plain is not None:  # the common member, parsed here: tarfile's own parse is most of a walk's time
            name, data_offset, data_size, is_dir, next_offset = plain
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
            info.size, info.offset_data = data_size, data_offset
            tar.offset = next_offset
        else:
            try:
                info = tar.next()
            except TAR_ERRORS as error:
                yield TarMember(None, tar.offset, 0, f"tar headers broken at byte {tar.offset} ({error})")
                return
        tar.members = []  # tarfile keeps every header it read; a shard may hold millions
        if info is None:
            break
        # what the member's data takes in the tar: a GNU sparse member stores only its data blocks
        # (info.size is the size it expands to), and tarfile has already moved past them
        stored = (tar.offset - info.offset_data if info.issparse()
                  else info.size if info.isreg() or info.type not in tarfile.SUPPORTED_TYPES else 0)
        if info.offset_data + stored > size:
            yield TarMember(info.name, info.offset_data, info.size,
                            f"truncated: the tar header says {stored} bytes but only "
                            f"{max(0, size - info.offset_data)} remain in the file")
            return
        if info.isdir():
            continue
        problem = (None if info.isreg() and not info.issparse() else f"not a regular file ({member_kind(info)})")
        problem = problem or name_problem(info.name)
        if problem is None and info.size > size_limit:
            problem = f"{info.size} bytes, over the {size_limit}-byte limit of a member onion reads"
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


PAX_SIMPLE_KEYS = frozenset({"path", "size", "mtime", "atime", "ctime", "uid", "gid", "uname", "gname", "comment"})
_PAX_RECORD = re.compile(rb"([1-9][0-9]*) ([^=\n]+)=")


def _plain_member(reader: BoundedReader, offset: int) -> tuple[str, int, int, bool, int] | None:
    """``(name, data offset, size, is a directory, next header's offset)`` of the member whose header
    starts at ``offset``, parsed as tarfile parses it, when it is the common kind: a regular file or a
    directory under a valid USTAR/GNU header, optionally after a PAX header that sets only its path,
    size and times. None for anything else (links, devices, sparse and GNU long-name members, global
    PAX headers, odd PAX records, a bad checksum, base-256 numbers, the end of the archive, a cut
    header): tarfile reads those, so a hostile header meets the same checks as before."""
    reader.seek(offset)
    block = reader.read(tarfile.BLOCKSIZE)
    pax: dict[str, str] = {}
    if len(block) == tarfile.BLOCKSIZE and block[156:157] == tarfile.XHDTYPE:
        size = _header_number(block, 124, 136)
        if size is None or not _checksum_ok(block) or size > READ_LIMIT:
            return None
        records = reader.read(size)
        pax = _pax_records(records) if len(records) == size else None
        if pax is None:
            return None
        offset += tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        reader.seek(offset)
        block = reader.read(tarfile.BLOCKSIZE)
    kind = block[156:157] if len(block) == tarfile.BLOCKSIZE else b"?"
    if kind not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE) or not _checksum_ok(block):
        return None
    size = _header_number(block, 124, 136)
    if size is None:
        return None
    name, prefix = _text(block[0:100]), _text(block[345:500])
    is_dir = kind == tarfile.DIRTYPE or (kind == tarfile.AREGTYPE and name.endswith("/"))
    if is_dir:
        name = name.rstrip("/")
    if prefix:
        name = f"{prefix}/{name}"
    if "path" in pax:
        name = pax["path"].rstrip("/")
    if "size" in pax:
        size = int(pax["size"])
    data_offset = offset + tarfile.BLOCKSIZE
    stored = 0 if is_dir else -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return name, data_offset, size, is_dir, data_offset + stored


def _checksum_ok(block: bytes) -> bool:
    """tarfile's test: the stored checksum is the byte sum with the checksum field as spaces, of
    unsigned bytes (or, as some old tars wrote it, signed ones)."""
    stored = _header_number(block, 148, 156)
    rest = block[:148] + block[156:]
    unsigned = 256 + sum(rest)
    return stored is not None and (stored == unsigned or stored == unsigned - 256 * sum(b > 127 for b in rest))


def _header_number(block: bytes, start: int, end: int) -> int | None:
    """An octal number field; None for base-256 and anything odd (tarfile decides those)."""
    field = block[start:end]
    if field[:1] in (b"\x80", b"\xff"):
        return None
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8) if text.isascii() else None
    except ValueError:
        return None


def _text(field: bytes) -> str:
    """A name field as tarfile decodes it (UTF-8, undecodable bytes kept as surrogates)."""
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str] | None:
    """A PAX header's records when each is well formed, a simple key and valid UTF-8; else None."""
    records: dict[str, str] = {}
    position = 0
    while position < len(data):
        match = _PAX_RECORD.match(data, position)
        if match is None:
            return None if data[position:].strip(b"\0") else records
        length, key = int(match.group(1)), match.group(2)
        end = position + length
        if end > len(data) or data[end - 1:end] != b"\n" or match.end() > end:
            return None
        try:
            keyword, value = key.decode("ascii"), data[match.end():end - 1].decode("utf-8")
        except UnicodeDecodeError:
            return None
        if keyword not in PAX_SIMPLE_KEYS or (keyword == "size" and not value.isdigit()):
            return None
        records[keyword] = value
        position = end
    return records


def _trailing_garbage(reader: BoundedReader, offset: int, size: int) -> str | None:
    """Why the bytes where tarfile stopped are not an end of archive (zero blocks, or the file's end).
    tarfile stops quietly at a cut or corrupt header; a sound tar has only zeros there."""
    reader.seek(offset)
    block = reader.read(tarfile.BLOCKSIZE)
    if not block.strip(b"\0"):
        return None
    why = "a truncated header" if len(block) < tarfile.BLOCKSIZE else "not a tar header (bad checksum or format)"
    return f"tar headers broken at byte {offset} of {size} ({why})"


class HashedStream:
    """A file read once, front to back, in ``STREAM_CHUNK`` reads, as a seekable binary file for
    :func:`walk_tar`: every byte passes through :attr:`digest` once (a seek forward reads through the
    bytes it skips, a seek back re-reads without hashing), and the byte ranges given to :meth:`keep`
    are handed to its callback whole, one at a time, as the stream passes them. :meth:`finish` reads
    the rest. Memory: one chunk and the range being kept."""

    def __init__(self, handle: BinaryIO, size: int) -> None:
        self.handle, self.size = handle, size
        self.digest = hashlib.sha256()
        self.hashed = 0  # bytes [0, hashed) went through the digest; the handle reads on from there
        self.position = 0
        self._kept: deque[tuple[int, int, Callable[[int, bytes], None]]] = deque()  # ranges not yet passed, by start
        self._parts: list[bytes] = []  # what has been read of the first of them

    def keep(self, start: int, end: int, done: Callable[[int, bytes], None]) -> None:
        """Call ``done(start, bytes [start, end))`` once the stream has read them (now, if it has).
        Ranges must be given in order of their starts, and must not overlap."""
        end = min(end, self.size)
        if start < self.hashed:  # already passed (a header just read): read that part again
            self.handle.seek(start)
            self._parts = [self.handle.read(min(end, self.hashed) - start)]
            self.handle.seek(self.hashed)
            if end <= self.hashed:
                done(start, self._parts.pop())
                return
        self._kept.append((start, end, done))

    def _advance(self, target: int) -> None:
        """Read through to ``target`` (not past it: what comes next is read by whoever asked)."""
        target = min(target, self.size)
        while self.hashed < target:
            chunk = self.handle.read(min(STREAM_CHUNK, target - self.hashed))
            if not chunk:
                break
            self._consume(chunk)

    def _consume(self, chunk: bytes) -> None:
        start, self.hashed = self.hashed, self.hashed + len(chunk)
        self.digest.update(chunk)
        while self._kept and self._kept[0][0] < self.hashed:
            lo, hi, done = self._kept[0]
            self._parts.append(chunk[max(lo - start, 0):hi - start])
            if hi > self.hashed:
                return
            self._kept.popleft()
            data, self._parts = b"".join(self._parts), []
            done(lo, data)

    def read(self, count: int | None = -1) -> bytes:
        count = max(0, self.size - self.position) if count is None or count < 0 else count
        parts = []
        if self.position < self.hashed:  # behind the stream (tarfile's look back): read again, unhashed
            self.handle.seek(self.position)
            parts.append(self.handle.read(min(count, self.hashed - self.position)))
            self.handle.seek(self.hashed)
            self.position += len(parts[0])
            count -= len(parts[0])
        if count > 0 and self.position >= self.hashed:
            self._advance(self.position)
            if self.position == self.hashed:
                parts.append(self.handle.read(min(count, self.size - self.hashed)))
                self._consume(parts[-1])
                self.position = self.hashed
        return b"".join(parts)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = {0: 0, 1: self.position, 2: self.size}[whence] + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def finish(self) -> str:
        """Read what is left of the file; the sha256 of all of it. A range to keep that the file
        ended in is handed over as far as it was read."""
        self._advance(self.size)
        for lo, _, done in self._kept:
            data, self._parts = b"".join(self._parts), []
            done(lo, data)
        self._kept.clear()
        return self.digest.hexdigest()
