"""``onion ingest wds:PATTERN OUT --in-place``: index existing WebDataset shards where they are.

Nothing is copied and the source tars are never written to: OUT gets only onion's ``index.parquet``
and ``manifest.json``. The manifest's ``shard_root`` names the folder the shards are under (the
pattern's fixed folder) and each shard entry its name relative to it, with the whole file's size and
sha256 and its store's mtime/ETag when indexed; index rows point at the image members' data in the
source tars (``shard``, ``image_offset``, ``image_size``) and record the name each image's own tar header
holds (``member_name``), which the reader checks instead of onion's ``<key>.<ext>``.

One Ray task per source shard reads it once, whole and sequentially (:class:`~shards.tar_members.HashedStream`):
it hashes the file, walks its headers (:mod:`shards.tar_members`, nothing extracted), groups members
into samples as the copy source does, hashes each image and reads its header (PIL opens it without
decoding; ``check="decode"`` decodes it too). Tasks are pure; the driver turns their samples into records with
:meth:`WebDatasetSource.records` (the same keys, labels and quarantine reasons as a copy of the same
shards) and writes the index and the manifest at the end, so an interrupted run simply runs again.
A task holds one image member in memory at a time (a member over ``MEMBER_LIMIT`` is never read: its
sample is quarantined), so a shard of any size, or a 64 GiB member in it, takes no more; indexing time
grows with the shards' real size, as each is hashed whole.
"""
from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace

import ray
from PIL import Image, UnidentifiedImageError

from pipeline.fan_out import fan_out
from pipeline.ingest.encode import COLOUR_MODES, GREY_MODES, KEPT_FORMATS
from pipeline.ingest.job import (
    IngestReport,
    base_row,
    check_accounting,
    check_keys,
    check_output,
    claim_output,
    clean_up,
    quarantined_row,
)
from pipeline.ingest.sources import Record, SourceError
from pipeline.ingest.sources.img2dataset import read_sidecars, sidecar_names
from pipeline.ingest.sources.webdataset import (
    IMAGE_EXTENSIONS,
    Sample,
    WebDatasetSource,
    _is_metadata,
    group_samples,
    split_name,
)
from pipeline.ray_runtime import current_node, ensure_ray
from shards import STATUS_OK, DatasetError, location, read_manifest
from shards.decode import DecodeError, decode_pixels
from shards.index import IN_PLACE_SCHEMA, INDEX_LAYOUT, part_name
from shards.manifest import DatasetInfo, SourceShardEntry, file_stamp
from shards.reader import TAR_HEADER, header_name
from shards.tar_members import STREAM_CHUNK, HashedStream, TarMember, compression, walk_tar
from shards.urls import Location
from shards.writer import commit_dataset, write_index_part

CHECKS = ("header", "decode")


@dataclass(frozen=True)
class InPlaceOptions:
    check: str = "header"  # header: tar structure, sha256 and image header; decode: every image decoded too
    max_pixels: int = 40_000_000  # more pixels than this: quarantined as a decompression bomb

    def __post_init__(self) -> None:
        if self.check not in CHECKS:
            raise ValueError(f"check must be one of {CHECKS}, not {self.check!r}")


@dataclass(frozen=True)
class ImageFacts:
    """What the task found of one image member (by its data offset)."""

    sha256: str
    member_name: str  # as its own tar header holds it
    ext: str | None = None
    width: int | None = None
    height: int | None = None
    problem: str | None = None
    cls: tuple[int, int] | None = None  # (offset, size) of the sample's .cls and .json members, if any
    json: tuple[int, int] | None = None


@dataclass
class ShardScan:
    name: str
    size: int
    sha256: str
    stamp: dict
    samples: list[Sample] = field(default_factory=list)
    images: dict[int, ImageFacts] = field(default_factory=dict)
    refused: str | None = None  # a compressed tar: the whole job stops with this
    node: str = ""


def image_facts(data: bytes, options: InPlaceOptions) -> tuple[str | None, int | None, int | None, str | None]:
    """``(ext, width, height, None)`` of an image as stored, or ``(..., why it cannot be an example)``:
    its header only (PIL opens it without decoding), and with ``check="decode"`` its pixels too."""
    if not data:
        return None, None, None, "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height), mode = image.format, image.size, image.mode
    except UnidentifiedImageError:
        return None, None, None, "not an image (no known image format)"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return None, None, None, f"decompression bomb: {error}"
    except (OSError, SyntaxError, ValueError) as error:
        return None, None, None, f"unreadable image header: {error}"
    if width * height > options.max_pixels:
        return None, None, None, (f"decompression bomb: {width}x{height} = {width * height} pixels exceeds "
                                  f"--max-pixels {options.max_pixels}")
    if mode not in GREY_MODES | COLOUR_MODES:
        return None, None, None, f"unsupported image mode {mode}"
    if options.check == "decode":
        try:
            decode_pixels(data)
        except DecodeError as error:
            return None, None, None, f"truncated or corrupt image data: {error}"
    return KEPT_FORMATS.get(fmt, str(fmt).lower()), width, height, None


def scan_shard(folder: Location, name: str, options: InPlaceOptions) -> ShardScan:
    """Read one source shard once, front to back: its stamp, sha256, samples and the facts of each
    sample's image (each image member is looked at as the stream passes it, one at a time: memory stays
    bounded however large the shard or a member it holds)."""
    info = folder.fs.info(folder.path(name))
    scan = ShardScan(name, int(info["size"]), "", file_stamp(info), node=current_node())
    headers: dict[int, str] = {}
    facts: dict[int, ImageFacts] = {}

    def header(start: int, data: bytes) -> None:
        headers[start + TAR_HEADER] = header_name(data)

    def image(offset: int, data: bytes) -> None:
        ext, width, height, problem = image_facts(data, options)
        facts[offset] = ImageFacts(hashlib.sha256(data).hexdigest(), headers.pop(offset, ""), ext, width, height,
                                   problem)

    def keeping_images(members: Iterator[TarMember]) -> Iterator[TarMember]:
        for member in members:  # a sound image member: its header and data, once the stream reads them
            if member.name is not None and member.problem is None and _is_image(member.name):
                stream.keep(member.offset - TAR_HEADER, member.offset, header)
                stream.keep(member.offset, member.offset + member.size, image)
            yield member

    remote = {} if folder.is_local else {"block_size": STREAM_CHUNK, "cache_type": "readahead"}
    with folder.fs.open(folder.path(name), "rb", **remote) as handle:
        stream = HashedStream(handle, scan.size)
        kind = compression(stream.read(8))
        if kind:
            scan.refused = WebDatasetSource._compressed_message(name, f"{kind}-compressed")
            return scan
        scan.samples = list(group_samples(keeping_images(walk_tar(stream, scan.size, read=_is_metadata))))
        scan.sha256 = stream.finish()
    for sample in scan.samples:
        member = next((m for ext, m in sample.members.items() if ext in IMAGE_EXTENSIONS), None)
        if sample.key is None or sample.problem or member is None:
            continue  # the source's records() quarantines it with its reason
        cls, meta = sample.members.get("cls"), sample.members.get("json")
        scan.images[member.offset] = replace(facts[member.offset], cls=(cls.offset, cls.size) if cls else None,
                                             json=(meta.offset, meta.size) if meta else None)
    return scan


def _is_image(name: str) -> bool:
    return (split_name(name) or ("", ""))[1] in IMAGE_EXTENSIONS


scan_shard_task = ray.remote(num_cpus=1, max_retries=3)(scan_shard)


def shard_root(folder: Location) -> str:
    """The URL the manifest records for the source folder: an absolute path on a local disk."""
    return folder.root if folder.is_local else folder.url


def in_place_fingerprint(source: WebDatasetSource, options: InPlaceOptions) -> str:
    """Identity of the output before any shard is read: the source folder, its shards' names and sizes,
    and every setting. (A shard changed in place at the same size is what ``onion verify`` finds.)"""
    return hashlib.sha256(json.dumps({
        "in_place": True, "index": INDEX_LAYOUT, "shard_root": shard_root(source.folder), "shards": source.shards,
        "parameters": source.parameters, "options": asdict(options)}, sort_keys=True).encode()).hexdigest()


def ok_row(record: Record, class_names: list[str], facts: ImageFacts) -> dict:
    shard, offset, size = record.locator
    cls, meta = facts.cls or (None, None), facts.json or (None, None)
    original = record.original_size or (facts.width, facts.height)  # img2dataset's sidecar: before its resize
    return {**base_row(record, class_names), "status": STATUS_OK, "reason": None, "shard": shard,
            "image_ext": facts.ext, "image_offset": offset, "image_size": size, "sha256": facts.sha256,
            "cls_offset": cls[0], "cls_size": cls[1], "json_offset": meta[0], "json_size": meta[1],
            "width": facts.width, "height": facts.height, "original_width": original[0],
            "original_height": original[1], "member_name": facts.member_name}


def shard_split(rows: list[dict]) -> str:
    """The split a source shard's manifest entry names: train when it holds usable train examples (what
    scoring reads), else the split of its usable examples, else ``none``."""
    splits = sorted({row["split"] for row in rows if row["status"] == STATUS_OK})
    return "train" if "train" in splits else (splits[0] if splits else "none")


def ingest_in_place(source: WebDatasetSource, out: str, options: InPlaceOptions, command: list[str], *,
                    progress: bool = True) -> IngestReport:
    dataset = location(out)
    if dataset.url.startswith("memory://"):
        raise DatasetError(f"{dataset.url}: memory:// lives inside one process and Ray workers cannot "
                           "write there; use a local path or an object store URL")
    identity = in_place_fingerprint(source, options)
    # OUT may be the shards' own folder (img2dataset's sidecars beside them): then only onion's files are added
    beside = ({part.split("/", 1)[0] for name, _ in source.shards for part in (name, *sidecar_names(name))}
              if dataset.root == source.folder.root else set())
    if check_output(dataset, identity, source, options, allowed=beside):
        clean_up(dataset)
        return IngestReport(dataset.url, read_manifest(dataset), 0, already_complete=True)
    sidecars = read_sidecars(source.folder, [name for name, _ in source.shards])  # a bad one stops us before the scan
    claim_output(dataset, identity, source, options)
    ensure_ray()
    scans: dict[str, ShardScan] = {}
    for name, scan in fan_out([name for name, _ in source.shards],
                              lambda name: scan_shard_task.remote(source.folder, name, options),
                              desc=f"index {source.spec}", progress=progress):
        if scan.refused:  # leaving the loop cancels the shards still being read
            raise SourceError(scan.refused)
        scans[name] = scan
    records = source.records({name: scan.samples for name, scan in scans.items()}, sidecars)
    check_keys(records)
    rows, by_shard = [], {name: [] for name, _ in source.shards}
    part_rows: dict[str | None, list[dict]] = {name: [] for name, _ in source.shards}  # None: no source shard
    for record in records:
        shard = record.locator[0] if record.locator else None
        facts = None if record.quarantine else scans[shard].images[record.locator[1]]
        if facts is None or facts.problem:
            rows.append(quarantined_row(record, source.class_names, record.quarantine or facts.problem))
        else:
            rows.append(ok_row(record, source.class_names, facts))
            by_shard[shard].append(rows[-1])
        part_rows.setdefault(shard, []).append(rows[-1])
    check_accounting(records, rows)
    entries = [SourceShardEntry(name=name, split=shard_split(by_shard[name]), examples=len(by_shard[name]),
                                bytes=scans[name].size, sha256=scans[name].sha256, **scans[name].stamp)
               for name, _ in source.shards]
    ok = sum(row["status"] == STATUS_OK for row in rows)
    # one index part per source shard (its inputs that no shard holds, if any, in a last part)
    parts = [write_index_part(dataset, part_name(number), part, IN_PLACE_SCHEMA)
             for number, part in enumerate(part_rows.values()) if part]
    manifest = commit_dataset(dataset, parts=parts, shards=entries, info=DatasetInfo(
        class_names=source.class_names, labelled=source.labelled, source=source.spec, fingerprint=identity,
        command=command,
        extra={"accounting": {"inputs": len(records), "ok": ok, "quarantined": len(rows) - ok},
               "ingest": asdict(options), "source_parameters": source.parameters,
               "shard_root": shard_root(source.folder), **source.manifest_extra},
    ))
    clean_up(dataset)
    nodes = Counter(scan.node for scan in scans.values() if scan.node)
    return IngestReport(dataset.url, manifest, 0, already_complete=False, tasks_per_node=nodes)
