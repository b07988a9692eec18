"""``onion verify``: check a dataset's shards against its manifest and index without trusting them.

Each shard is read whole and parsed as a tar *in memory* (nothing is ever extracted, so a member
named ``../x`` or ``/etc/x`` cannot write anywhere). A shard passes when its size and sha256 equal
the manifest's, every member is a regular file with a safe name ``<key>.<ext>``, members come in
the index's order with no duplicates, none missing and none extra, every header's size fits in the
shard, and every member's bytes sit where the index says (image sha256 included).

WebDataset shards indexed in place (the manifest names a ``shard_root``) are someone else's tars: their
captions, ``.txt`` and other members are none of onion's business. Each one is checked for what the
index relies on: its size against the one indexed (an append, a truncation), then its sha256 (with the
store's mtime/ETag then and now, when they differ, to say when it changed), then each indexed image
member: its tar header names the indexed member, of the indexed size, and its bytes hash to the index's.
They are read as a stream, not whole: a source shard may be far larger than memory.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow.compute as pc

from shards.index import STATUS_OK, read_index
from shards.manifest import file_stamp, read_manifest, shard_location
from shards.reader import TAR_HEADER, header_problem
from shards.tar_members import STREAM_CHUNK, HashedStream, member_kind
from shards.urls import Location, location

MEMBER_SUFFIXES = ("image", "cls", "json")


@dataclass(frozen=True)
class Problem:
    shard: str
    member: str | None
    what: str

    def __str__(self) -> str:
        return f"{self.shard}" + (f": member {self.member}" if self.member else "") + f": {self.what}"


def verify_dataset(url: str) -> tuple[int, list[Problem]]:
    """Check every shard; returns (shards checked, problems found)."""
    dataset = location(url)
    manifest = read_manifest(dataset)
    index = read_index(dataset)
    ok = index.filter(pc.equal(index["status"], STATUS_OK)).to_pylist()
    problems: list[Problem] = []
    shards_at = shard_location(dataset, manifest)
    check = verify_source_shard if manifest.get("shard_root") else verify_shard
    for entry in manifest["shards"]:
        rows = sorted((row for row in ok if row["shard"] == entry["name"]), key=lambda row: row["image_offset"])
        problems += list(check(shards_at, entry, rows))
    listed = {entry["name"] for entry in manifest["shards"]}
    problems += [Problem(name, None, "the index points into a shard the manifest does not list")
                 for name in sorted({row["shard"] for row in ok} - listed)]
    return len(manifest["shards"]), problems


def verify_shard(dataset: Location, entry: dict, rows: list[dict]) -> Iterator[Problem]:
    name = entry["name"]
    if not dataset.exists(name):
        yield Problem(name, None, "missing from storage")
        return
    data = dataset.read_bytes(name)
    if len(data) != entry["bytes"]:
        yield Problem(name, None, f"{len(data)} bytes, the manifest says {entry['bytes']} (truncated or replaced)")
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        yield Problem(name, None, f"sha256 {digest[:16]}... does not match the manifest's {entry['sha256'][:16]}...")
    # an unlabelled example has no .cls member (its cls_offset is null)
    expected = [(f"{row['key']}.{ext}", row[f"{part}_offset"], row[f"{part}_size"])
                for row in rows for part, ext in zip(MEMBER_SUFFIXES, (row["image_ext"], "cls", "json"))
                if row[f"{part}_offset"] is not None]
    found = yield from tar_members(name, data)
    yield from compare_members(name, found, expected)
    for row in rows:
        start, size = row["image_offset"], row["image_size"]
        if start + size <= len(data) and hashlib.sha256(data[start:start + size]).hexdigest() != row["sha256"]:
            yield Problem(name, f"{row['key']}.{row['image_ext']}", "bytes do not match the index's sha256")


def verify_source_shard(shards_at: Location, entry: dict, rows: list[dict]) -> Iterator[Problem]:
    """A WebDataset shard indexed in place: unchanged since indexing, and its indexed images where the
    index says. Its other members (captions, metadata) are not checked. The shard is read once, front
    to back, each indexed image checked as the read passes it: memory stays bounded however large it is."""
    name = entry["name"]
    if not shards_at.exists(name):
        yield Problem(name, None, f"missing from {shards_at.url} (the source shard was moved or deleted)")
        return
    info = shards_at.fs.info(shards_at.path(name))
    now, size = file_stamp(info), int(info["size"])
    found: dict[int, str] = {}  # row number -> what is wrong with its member

    def check(number: int) -> Callable[[int, bytes], None]:
        def checked(_: int, data: bytes) -> None:
            row, view = rows[number], memoryview(data)
            problem = header_problem(view[:TAR_HEADER], row["key"], row["image_size"], row.get("member_name"))
            if problem is None and hashlib.sha256(view[TAR_HEADER:]).hexdigest() != row["sha256"]:
                problem = "bytes do not match the index's sha256"
            if problem:
                found[number] = problem
        return checked

    remote = {} if shards_at.is_local else {"block_size": STREAM_CHUNK, "cache_type": "readahead"}
    with shards_at.fs.open(shards_at.path(name), "rb", **remote) as handle:
        stream, passed = HashedStream(handle, size), 0
        for number, row in enumerate(rows):
            start, end = row["image_offset"], row["image_offset"] + row["image_size"]
            if end > size or start < TAR_HEADER:
                found[number] = f"bytes {start}-{end} lie past the shard's end ({size} bytes)" if end > size \
                    else f"bytes {start}-{end} leave no room for a tar header before them"
            elif start - TAR_HEADER < passed:  # overlaps the member before it: a damaged index, read it alone
                check(number)(start, shards_at.read_range(name, start - TAR_HEADER, end))
            else:
                stream.keep(start - TAR_HEADER, end, check(number))
                passed = end
        digest = stream.finish()
    since = "it changed since it was indexed; index it again (onion ingest ... --in-place into a new OUT)"
    if size != entry["bytes"]:
        yield Problem(name, None, f"{size} bytes, {entry['bytes']} when indexed: {since}")
    elif digest != entry["sha256"]:
        stamps = [f"{field} {entry[field]} then, {now[field]} now" for field in ("mtime", "etag")
                  if entry.get(field) is not None and now[field] != entry[field]]
        yield Problem(name, None, f"sha256 {digest[:16]}... is not the {entry['sha256'][:16]}... it had when "
                                  f"indexed{' (' + '; '.join(stamps) + ')' if stamps else ''}: {since}")
    for number in sorted(found):
        row = rows[number]
        yield Problem(name, row.get("member_name") or f"{row['key']}.{row['image_ext']}", found[number])


def tar_members(shard: str, data: bytes) -> Iterator[Problem]:
    """Parse the tar headers; yields problems and returns [(name, data offset, size)] of the members."""
    members: list[tuple[str, int, int]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if info.offset_data + info.size > len(data):
                    yield Problem(shard, info.name, f"header claims {info.size} bytes but only "
                                                    f"{max(0, len(data) - info.offset_data)} remain in the shard")
                    break
                if not info.isreg():
                    yield Problem(shard, info.name, f"not a regular file ({member_kind(info)}); refused")
                elif info.name.startswith("/") or ".." in info.name.split("/") or "/" in info.name:
                    yield Problem(shard, info.name, "unsafe member name (absolute, '..' or a directory); refused")
                members.append((info.name, info.offset_data, info.size))
    except tarfile.TarError as error:
        yield Problem(shard, members[-1][0] if members else None, f"tar structure is broken after this point: {error}")
    return members


def compare_members(shard: str, found: list[tuple[str, int, int]],
                    expected: list[tuple[str, int, int]]) -> Iterator[Problem]:
    names = [member[0] for member in found]
    seen: set[str] = set()
    for member in names:
        if member in seen:
            yield Problem(shard, member, "appears twice in the shard")
        seen.add(member)
    wanted = {member[0] for member in expected}
    for member in sorted(wanted - seen):
        yield Problem(shard, member, "listed in the index but missing from the shard")
    for member in sorted(seen - wanted):
        yield Problem(shard, member, "in the shard but not in the index")
    spans = {member[0]: member[1:] for member in found}
    order = [member for member in names if member in wanted]
    if order != [member[0] for member in expected if member[0] in seen] and len(set(order)) == len(order):
        yield Problem(shard, None, "members are not in the index's order")
    for member, offset, size in expected:
        if member in spans and spans[member] != (offset, size):
            yield Problem(shard, member, f"at byte {spans[member][0]} with {spans[member][1]} bytes; "
                                         f"the index says byte {offset} with {size} bytes")
