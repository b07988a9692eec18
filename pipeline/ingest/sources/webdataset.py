"""``wds:PATTERN``: copy existing WebDataset shards (img2dataset, webdataset's ``ShardWriter``, your own
``tar`` runs) into onion shards: for when re-sharding pays (tiny shards, odd member names, a resize at
ingest).

Members are grouped into samples as webdataset groups them: the key is a member's name up to the first
dot of its base name (``dir.v1/000123.jpg`` has key ``dir.v1/000123``), and consecutive members with
one key are one sample. A sample's image is its first ``.jpg``/``.jpeg``/``.png``/``.webp`` (or
``.gif``/``.bmp``/``.tif``) member; its label the ``.cls`` member (an integer, or a class name with
``--class-names``) or, with ``--label-field``, a field of its ``.json``; its ``.json`` and ``.txt`` are
kept in the example's JSON member (``source_json``, ``caption``). Other members are not copied.

The driver lists the shards by walking their tar headers (:mod:`shards.tar_members`: a seek per
member on a local disk, ranged reads on object stores) and reads only the small ``.cls``/``.json``/
``.txt`` members; images are read inside the Ray tasks, as coalesced byte ranges. Nothing is
extracted, nothing is trusted: every sample that cannot become an example is a quarantined record
with its reason (see :meth:`WebDatasetSource.records`), and the unreadable rest of a broken tar is one
quarantined record naming the shard and the byte where it breaks.
"""
from __future__ import annotations

import json
import posixpath
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from pipeline.ingest.sources.base import (
    Quarantine,
    Record,
    Source,
    SourceError,
    hash_split,
    printable,
    safe_key_part,
    short_hash,
)
from pipeline.ingest.sources.dataset import read_members
from pipeline.ingest.sources.img2dataset import Sidecar, SidecarRow, read_sidecars, sidecar_summary
from shards.errors import UsageError
from shards.patterns import expand_pattern
from shards.tar_members import TarMember, compression, walk_tar

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"})
METADATA_EXTENSIONS = frozenset({"cls", "json", "txt"})  # read in the driver: labels and captions
COMPRESSED_SUFFIXES = (".gz", ".tgz", ".bz2", ".xz", ".zst", ".lz4")
MAX_GENERATED_CLASSES = 100_000  # without --class-names, classes 0 .. N are made for the largest label N
REMOTE_READ_AHEAD = 256 << 10  # a header read on an object store fetches this much: small members come along
LISTING_THREADS = 16  # remote shards listed at once
# webdataset's ``base_plus_ext``: key = all up to the first dot of the base name, extension = the rest
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_INTEGER = re.compile(r"[+-]?[0-9]+")


def split_name(name: str) -> tuple[str, str] | None:
    """``(key, lower-case extension)`` of a member name as webdataset splits it; None when the base
    name has no extension (webdataset skips such members)."""
    match = _KEY_AND_EXTENSION.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


@dataclass
class Sample:
    """Consecutive members of one key; ``key`` None stands for the unreadable rest of a tar from ``offset``."""

    key: str | None
    offset: int
    members: dict[str, TarMember] = field(default_factory=dict)  # by extension, in stored order
    problem: str | None = None


def group_samples(members: Iterable[TarMember]) -> Iterator[Sample]:
    """Members as webdataset's ``group_by_keys`` groups them, with every problem kept: a member that is
    unsafe, not a regular file or cut short quarantines its sample; a member name without an extension
    is a sample of its own (webdataset would skip it silently); a break in the tar quarantines the sample
    it cuts (which may have had more members) and becomes one sample for the unreadable rest."""
    current: Sample | None = None
    for member in members:
        if member.name is None:
            if current is not None:  # its members may go on past the break: it cannot be known whole
                current.problem = current.problem or f"cut short: the tar breaks after it (at byte {member.offset})"
                yield current
            yield Sample(None, member.offset, problem=member.problem)
            return
        split = split_name(member.name)
        if split is None:
            yield Sample(member.name, member.offset, {"": member},
                         member.problem and f"member {member.name!r}: {member.problem}"
                         or f"member {member.name!r} has no extension, so it belongs to no sample")
            continue
        key, extension = split
        if current is None or current.key != key:
            if current is not None:
                yield current
            current = Sample(key, member.offset)
        if current.problem is None and member.problem:
            current.problem = f"member {member.name!r}: {member.problem}"
        elif current.problem is None and extension in current.members:
            current.problem = f"member {member.name!r} appears twice in the sample"
        current.members.setdefault(extension, member)
    if current is not None:
        yield current


class WebDatasetSource(Source):
    def __init__(self, pattern: str, *, label_field: str | None = None,
                 class_names: tuple[str, ...] | list[str] | None = None, val_fraction: float = 0.0,
                 unlabelled: bool = False) -> None:
        self.spec, self.pattern = f"wds:{pattern}", pattern
        self.label_field, self.val_fraction = label_field, val_fraction
        self.given_names = list(class_names) if class_names else None
        self.class_names = list(self.given_names or [])  # without --class-names: set by records()
        if unlabelled and (label_field or class_names):
            raise SourceError("wds: --unlabelled reads no labels: drop --label-field/--class-names, or --unlabelled")
        # unlabelled: --unlabelled, or (decided by records()) no sample has a .cls member and no --label-field
        self.forced_unlabelled = unlabelled
        self.parameters = {"label_field": label_field, "class_names": self.given_names, "val_fraction": val_fraction,
                           **({"unlabelled": True} if unlabelled else {})}
        try:
            self.folder, self.shards = expand_pattern(pattern)
        except UsageError as error:
            raise SourceError(f"wds: {error}") from None
        names = [name for name, _ in self.shards]
        compressed = [name for name in names if name.lower().endswith(COMPRESSED_SUFFIXES)]
        if compressed:
            raise SourceError(self._compressed_message(compressed[0], "compressed"))
        other = [name for name in names if not name.lower().endswith(".tar")]
        if other:
            raise SourceError(f"wds: {pattern!r} matches {len(other)} file(s) that are not .tar shards "
                              f"({', '.join(other[:3])}); narrow the pattern, e.g. wds:'DIR/*.tar'")
        self._fetched: dict[str, bytes] = {}

    @staticmethod
    def _compressed_message(shard: str, kind: str) -> str:
        return (f"wds: {shard} is {kind}: onion copies uncompressed .tar shards only (members are read by "
                "byte range; a compressed tar has no member offsets, so it cannot be indexed in place "
                "either); decompress them first (gunzip, zstd -d, ...), then ingest them, copied or --in-place")

    def records(self, scanned: dict[str, list[Sample]] | None = None,
                sidecars: dict[str, Sidecar] | None = None) -> list[Record]:
        """One record per sample, in shard and member order (from ``scanned``, each shard's samples as
        :func:`group_samples` gives them, when the caller walked the shards itself: ``--in-place``).
        Quarantined, with the reason: a member that is unsafe (``..`` or absolute name, link, device) or
        cut short, the rest of a tar after a broken header, a duplicate key (the later one: ``duplicate
        key of <shard>``), a sample without an image or a label, a ``.json`` that is not JSON, a ``.txt``
        that is not UTF-8, a label that is no class.
        img2dataset's sidecars (``sidecars``, else read here) give samples their url, caption and
        original size, and :attr:`manifest_extra` img2dataset's own counts (see :mod:`.img2dataset`)."""
        matched = 0  # tar samples that found their sidecar row
        first_shard: dict[str, str] = {}  # source key -> the shard it was first seen in
        drafts: list[tuple[Record, tuple[int | str, str] | None]] = []  # labels wait for the class names
        pool = ThreadPoolExecutor(1 if self.folder.is_local else LISTING_THREADS)
        try:
            listed = list(pool.map(self._samples, self.shards) if scanned is None
                          else [scanned[shard] for shard, _ in self.shards])
            if sidecars is None:  # after the listing, so that a compressed tar is what is named first
                sidecars = read_sidecars(self.folder, [shard for shard, _ in self.shards])
            # LAION/DataComp-style shards (captions, no classes) are an unlabelled dataset, not all quarantined
            self.labelled = not self.forced_unlabelled and (self.label_field is not None or any(
                "cls" in sample.members for samples in listed for sample in samples))
            for (shard, _), samples in zip(self.shards, listed):
                seen: Counter[str] = Counter()
                sidecar = sidecars.get(shard)
                drafts += [self._record(shard, sample, first_shard, seen, sidecar) for sample in samples]
                matched += sum(sidecar.row(sample.key) is not None for sample in samples) if sidecar else 0
        finally:
            pool.shutdown(cancel_futures=True)  # a refused shard stops the listing of the others
        if not drafts:
            raise SourceError(f"wds: the {len(self.shards)} shard(s) of {self.pattern!r} hold no members")
        self.manifest_extra = {"img2dataset": sidecar_summary(sidecars, matched)} if sidecars else {}
        if self.given_names is None and self.labelled:
            self.class_names = derived_class_names([raw[0] for _, raw in drafts if raw is not None])
        return [self._labelled(record, raw) for record, raw in drafts]

    def _samples(self, shard_and_size: tuple[str, int]) -> list[Sample]:
        shard, size = shard_and_size
        options = {} if self.folder.is_local else {"block_size": REMOTE_READ_AHEAD, "cache_type": "readahead"}
        with self.folder.fs.open(self.folder.path(shard), "rb", **options) as handle:
            kind = compression(handle.read(8))
            if kind:
                raise SourceError(self._compressed_message(shard, f"{kind}-compressed"))
            return list(group_samples(walk_tar(handle, size, read=_is_metadata)))

    def _record(self, shard: str, sample: Sample, first_shard: dict[str, str], seen: Counter[str],
                sidecar: Sidecar | None = None) -> tuple[Record, tuple[int | str, str] | None]:
        """The sample's record, label still unset, and its label as given (with where it came from);
        ``sidecar``: its shard's img2dataset sidecars, if any."""
        stem = safe_key_part(posixpath.basename(shard).removesuffix(".tar"), 20)
        if sample.key is None:  # the rest of a broken tar
            key = f"{stem}-rest-{short_hash(f'{shard}@{sample.offset}')}"
            rest = "; the rest of the shard is unreadable" if sample.offset else ""
            return Record(key=key, split=hash_split(key, self.val_fraction), label=None,
                          source_ref=printable(f"{shard}@{sample.offset}"), est_bytes=0,
                          quarantine=f"{shard}: {sample.problem}{rest}"), None
        repeat = seen[sample.key]
        seen[sample.key] += 1
        # The same source key twice in one shard must still give two onion keys (both are inputs).
        identity = f"{shard}\0{sample.key}" + (f"\0{repeat}" if repeat else "")
        key = f"{stem}-{safe_key_part(posixpath.basename(sample.key))}-{short_hash(identity)}"
        image = next((m for ext, m in sample.members.items() if ext in IMAGE_EXTENSIONS), None)
        first = first_shard.setdefault(sample.key, shard)  # a quarantined sample claims its key too
        problem = (f"{shard}: {sample.problem}" if sample.problem
                   else f"duplicate key of {first}" if repeat or first != shard
                   else f"no image member (found: {', '.join(_names(sample))})" if image is None else None)
        extra: dict = {}
        raw = None
        if problem is None:
            extra, problem = _metadata(sample)
        if problem is None:
            raw, problem = self._raw_label(sample, extra)
        row = sidecar.row(sample.key) if sidecar and problem is None else None  # img2dataset's own record
        sizes = sum(m.size for ext, m in sample.members.items() if ext in METADATA_EXTENSIONS)
        return Record(key=key, split=hash_split(key, self.val_fraction), label=None,
                      source_ref=printable(f"{shard}[{sample.key}]"),
                      est_bytes=(image.size if image and not problem else 0) + sizes + 1024,  # unread if quarantined
                      locator=None if problem else (shard, image.offset, image.size),
                      quarantine=problem, extra={} if problem else _with_sidecar(extra, row),
                      original_size=row.original_size if row else None), raw

    def _raw_label(self, sample: Sample, extra: dict) -> tuple[tuple[int | str, str] | None, str | None]:
        """``((label as given: an int or stripped text, where it came from), None)`` or ``(None, why not)``;
        ``(None, None)`` in an unlabelled dataset."""
        if not self.labelled:
            return None, None
        if self.label_field is not None:
            document = extra.get("source_json")
            if not isinstance(document, dict) or self.label_field not in document:
                return None, f"no label (no field {self.label_field!r} in a .json member)"
            value, where = document[self.label_field], f"field {self.label_field!r}"
        elif "cls" not in sample.members:
            return None, "no label (no .cls member)"
        else:
            try:
                value, where = sample.members["cls"].data.decode("utf-8"), ".cls"
            except UnicodeDecodeError:
                return None, "the .cls member is not UTF-8 text"
        if isinstance(value, str) and value.strip():
            return (value.strip(), where), None
        if isinstance(value, int) and not isinstance(value, bool):
            return (value, where), None
        if value is None or isinstance(value, str):
            return None, f"no label (an empty {where})"
        return None, f"label {str(value)[:40]} ({where}) is neither an integer nor a name"

    def _labelled(self, record: Record, raw: tuple[int | str, str] | None) -> Record:
        if raw is None:
            return record
        label, problem = self._label_value(*raw)
        if problem:
            return replace(record, quarantine=problem, locator=None, extra={})
        return replace(record, label=label)

    def _label_value(self, value: int | str, where: str) -> tuple[int | None, str | None]:
        """A label as given, as an index into :attr:`class_names`: an integer (or integer text) is the
        index; other text is a class name."""
        names, given = self.class_names, self.given_names is not None
        number = as_integer(value)
        if number is None:
            if value in names:
                return names.index(value), None
            why = ("is not one of --class-names" if given else
                   "is a name, but other labels are integers (give --class-names to name the classes)")
            return None, f"label {value[:40]!r} ({where}) {why}"
        shown = str(value)[:40]
        if number < 0:
            return None, f"negative label {shown} ({where})"
        if number >= len(names):
            limit = (f"outside the {len(names)} classes of --class-names" if given else
                     f"over {MAX_GENERATED_CLASSES - 1}, the most classes onion numbers itself (give --class-names)")
            return None, f"label {shown} ({where}) {limit}"
        return number, None

    def locality(self, record: Record) -> str | None:
        """The source shard: a task copying whole source shards reads them as a few long ranges (on an
        object store, a request per 4 MiB (``shards.reader.READ_CHUNK_BYTES``), not one per image as a
        record shuffle needs)."""
        return record.locator[0] if record.locator else None

    def prefetch(self, records: list[Record]) -> None:
        """Read the records' images as a few ranges of neighbouring members, concurrently."""
        self._fetched = read_members(self.folder, [record.locator + (record.key,) for record in records])

    def load(self, record: Record) -> bytes:
        shard, offset, size = record.locator
        data = self._fetched.pop(record.key, None)
        if data is None:
            data = self.folder.read_range(shard, offset, offset + size)
        if len(data) != size:
            raise Quarantine(f"{shard}: the image member is {len(data)} bytes now, {size} when listed "
                             "(the shard changed during ingest)")
        return data


def as_integer(value: int | str) -> int | None:
    """An integer label, or text that holds one (``"3"``, ``"-1"``); None for a name."""
    if isinstance(value, int):
        return value
    if not _INTEGER.fullmatch(value):
        return None
    # int() refuses thousands of digits; a label of more than 18 is out of any class range anyway
    return int(value) if len(value.lstrip("+-")) <= 18 else (-1 if value.startswith("-") else 1) * 10**18


def derived_class_names(labels: list[int | str]) -> list[str]:
    """The class names when ``--class-names`` is not given: ``"0"`` .. ``"N"`` for the largest integer
    label N (as other sources number unnamed classes); when no label is an integer, the distinct names,
    sorted."""
    integers = [number for number in map(as_integer, labels) if number is not None]
    if integers or not labels:
        largest = max((n for n in integers if n < MAX_GENERATED_CLASSES), default=-1)
        return [str(i) for i in range(largest + 1)]
    names = sorted(set(labels))
    if len(names) > MAX_GENERATED_CLASSES:
        raise SourceError(f"wds: the labels hold {len(names)} distinct names, more than {MAX_GENERATED_CLASSES} "
                          "classes: is that field really the label? (--label-field, --class-names)")
    return names


def _is_metadata(name: str) -> bool:
    return (split_name(name) or ("", ""))[1] in METADATA_EXTENSIONS


def _names(sample: Sample) -> list[str]:
    return [f".{ext}" if ext else repr(member.name) for ext, member in sample.members.items()]


def _metadata(sample: Sample) -> tuple[dict, str | None]:
    """What the example's JSON member keeps of the sample (``source_json``, ``caption``), or why not."""
    extra: dict = {}
    if "json" in sample.members:
        try:
            extra["source_json"] = json.loads(sample.members["json"].data.decode("utf-8"),
                                              parse_constant=_not_json)
        except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
            return {}, f"the .json member is not valid JSON ({str(error)[:80]})"
    if "txt" in sample.members:
        try:
            extra["caption"] = sample.members["txt"].data.decode("utf-8")
        except UnicodeDecodeError:
            return {}, "the .txt member is not UTF-8 text"
    return extra, None


def _with_sidecar(extra: dict, row: SidecarRow | None) -> dict:
    """``extra`` with img2dataset's ``url``, and its ``caption`` for a sample without a ``.txt``: the
    member wins, as what the sample itself carries (img2dataset writes the same text to both)."""
    if row is None:
        return extra
    return {**{name: value for name, value in (("url", row.url), ("caption", row.caption)) if value is not None},
            **extra}


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")
