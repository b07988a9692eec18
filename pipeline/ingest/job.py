"""``onion ingest``: a source becomes shards + index + manifest, one Ray task per output shard (or a
few consecutive shards that share one large input unit, see :func:`plan_waves`).

The plan (which example goes in which shard) is fixed before any work starts and depends only on
the source and the options, so the output is byte-identical however often the job is killed and
re-run. Each task writes its shard atomically, then its part of the index (``index/<shard>.parquet``,
every input of the shard, quarantined ones included), then a small ``_parts/<shard>.json`` that
records both; a re-run skips shards whose record exists. The driver never holds index rows, only
each part's counts; the manifest, listing every part, is written last.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import ray

from pipeline.fan_out import fan_out
from pipeline.ingest.encode import EncodeOptions, encode_example
from pipeline.ingest.sources import Quarantine, Record, Source, SourceError
from pipeline.ray_runtime import current_node, ensure_ray
from shards import STATUS_OK, STATUS_QUARANTINED, DatasetError, location, read_manifest
from shards.index import INDEX_FOLDER, INDEX_LAYOUT, IndexPart, index_parts
from shards.manifest import MANIFEST_NAME, DatasetInfo, ShardEntry, foreign_shards, foreign_shards_message
from shards.tarwriter import ShardExample, check_key
from shards.urls import Location
from shards.writer import commit_dataset, write_index_part, write_shard

PARTS = "_parts"
WAVE_BYTES = 512 << 20  # at most this many planned input bytes in one task that writes several shards
PLAN_NAME = "_ingest.json"


@dataclass(frozen=True)
class IngestOptions:
    shard_size: int = 2000
    shard_bytes: int = 128 << 20
    seed: int = 0
    encode: EncodeOptions = EncodeOptions()


@dataclass(frozen=True)
class ShardPlan:
    name: str
    split: str
    records: tuple[Record, ...]


@dataclass
class ShardResult:
    entry: ShardEntry | None  # None when every input of the shard was quarantined (no tar is written)
    part: IndexPart  # its index rows, written by the task
    counts: dict  # the part's row counts (shards.manifest.count_rows)
    node: str = ""  # Ray node that wrote it ("" when a killed run had already finished it)


def plan_shards(records: list[Record], options: IngestOptions,
                locality: Callable[[Record], object | None] | None = None) -> list[ShardPlan]:
    """Shuffle each split with the seed, then cut it into balanced shards.

    A split needs ``k`` shards to respect both the example and the planned-byte limit; examples
    are spread evenly over them (sizes differ by at most one, no tiny tail shard), and a shard
    still closes early when its planned bytes would pass the limit.

    With ``locality`` (:meth:`Source.locality`: a Parquet row group), units are shuffled instead of
    records (records within a unit too) and a shard takes whole units while they fit, so each unit
    is read by one task: a table is read once, where a record shuffle would have every shard read a
    share of almost every row group. A unit larger than a shard is cut over consecutive shards, which
    :func:`plan_waves` gives to one task.
    """
    plans: list[ShardPlan] = []
    for split in sorted({r.split for r in records}):
        members = sorted((r for r in records if r.split == split), key=lambda r: r.key)
        rng = np.random.default_rng([options.seed, 7])
        if locality is None:
            groups = _cut([[members[i]] for i in rng.permutation(len(members))], options)
        else:
            units: dict[object, list[Record]] = {}
            for record in members:  # a record read with nothing else (quarantined: not read) is its own unit
                unit = locality(record)
                units.setdefault(("record", record.key) if unit is None else unit, []).append(record)
            ordered = [units[unit] for unit in sorted(units, key=repr)]  # repr: units of any kind sort
            groups = _cut([[unit[i] for i in rng.permutation(len(unit))]
                           for unit in (ordered[j] for j in rng.permutation(len(ordered)))], options)
        plans += [_shard_plan(split, number, group) for number, group in enumerate(groups)]
    return plans


def _cut(units: list[list[Record]], options: IngestOptions) -> list[list[Record]]:
    """Consecutive units (single records when unplanned) into shards of about equal size: a shard
    closes at the target count, or before a unit that would take it past ``shard_size`` or
    ``shard_bytes``; a unit that alone passes a limit is split."""
    total = sum(len(unit) for unit in units)
    total_bytes = sum(r.est_bytes for unit in units for r in unit)
    shards = max(-(-total // options.shard_size), -(-total_bytes // options.shard_bytes), 1)
    groups: list[list[Record]] = [[]]
    planned_bytes, remaining = 0, total
    target = -(-remaining // shards)
    for unit in units:
        unit_bytes = sum(r.est_bytes for r in unit)
        whole = len(unit) <= options.shard_size and unit_bytes <= options.shard_bytes
        for record in unit:
            full = len(groups[-1]) >= target or planned_bytes + record.est_bytes > options.shard_bytes
            # a whole unit starts a new shard rather than straddle two (unless this one is still empty)
            full = full or (whole and record is unit[0] and groups[-1] and (
                len(groups[-1]) + len(unit) > options.shard_size or planned_bytes + unit_bytes > options.shard_bytes))
            if groups[-1] and full:
                remaining -= len(groups[-1])
                target = -(-remaining // max(1, shards - len(groups)))  # spread what is left evenly
                groups.append([])
                planned_bytes = 0
            groups[-1].append(record)
            planned_bytes += record.est_bytes
    return groups


def plan_waves(plans: list[ShardPlan], locality: Callable[[Record], object | None] | None,
               wave_bytes: int) -> list[list[ShardPlan]]:
    """Plans grouped into the tasks that write them: one plan each, except consecutive plans that share
    a unit (pieces of one large Parquet row group), which one task writes after reading the unit once
    (up to ``wave_bytes`` of planned bytes a task)."""
    waves: list[list[ShardPlan]] = []
    last_units: set = set()
    planned = 0
    for plan in plans:
        units = {locality(r) for r in plan.records} - {None} if locality else set()
        size = sum(r.est_bytes for r in plan.records)
        if waves and units & last_units and planned + size <= wave_bytes:
            waves[-1].append(plan)
            planned += size
        else:
            waves.append([plan])
            planned = size
        last_units = units
    return waves


def _shard_plan(split: str, number: int, records: list[Record]) -> ShardPlan:
    return ShardPlan(f"{split}-{number:06d}.tar", split, tuple(sorted(records, key=lambda r: r.key)))


def fingerprint(source: Source, plans: list[ShardPlan], options: IngestOptions) -> str:
    """Identity of the output: changes whenever any output byte could change.

    The source's location is left out (records carry relative references), so a moved input
    directory, or a copied dataset, still matches its earlier output.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps({"index": INDEX_LAYOUT, "parameters": source.parameters,
                              "classes": source.class_names, "options": asdict(options)}, sort_keys=True).encode())
    for plan in plans:
        for r in plan.records:
            digest.update(f"{plan.name}|{r.key}|{r.split}|{r.label}|{r.source_ref}|{r.est_bytes}|{r.planted}|{r.quarantine}\n".encode())
    return digest.hexdigest()


def base_row(record: Record, class_names: list[str]) -> dict:
    label_ok = record.label is not None and 0 <= record.label < len(class_names)
    return {
        "key": record.key, "label": record.label, "class_name": class_names[record.label] if label_ok else None,
        "split": record.split, "source_ref": record.source_ref, "planted": record.planted,
    }


def quarantined_row(record: Record, class_names: list[str], reason: str) -> dict:
    return {**base_row(record, class_names), "status": STATUS_QUARANTINED, "reason": reason}


def ingest_wave(source: Source, plans: list[ShardPlan], dataset_url: str,
                options: IngestOptions) -> list[ShardResult]:
    """Write the shards of one task (see :func:`plan_waves`): their inputs fetched together, each shard
    then written with its part."""
    source.prefetch([record for plan in plans for record in plan.records if not record.quarantine])
    return [write_planned_shard(source, plan, location(dataset_url), options) for plan in plans]


def write_planned_shard(source: Source, plan: ShardPlan, dataset: Location, options: IngestOptions) -> ShardResult:
    """Load (prefetched), validate and encode every record of one shard, write the shard and its part."""
    rows: list[dict] = []
    examples: list[ShardExample] = []
    encoded_rows: list[dict] = []
    for record in plan.records:
        if record.quarantine:
            rows.append(quarantined_row(record, source.class_names, record.quarantine))
            continue
        try:
            encoded = encode_example(source.load(record), options.encode)
        except Quarantine as problem:
            rows.append(quarantined_row(record, source.class_names, str(problem)))
            continue
        # a re-shard keeps the first ingest's original size, not that of the stored image it reads
        original = record.original_size or (encoded.original_width, encoded.original_height)
        row = {**base_row(record, source.class_names), "status": STATUS_OK, "reason": None, "shard": plan.name,
               "image_ext": encoded.ext, "sha256": hashlib.sha256(encoded.data).hexdigest(),
               "width": encoded.width, "height": encoded.height,
               "original_width": original[0], "original_height": original[1]}
        metadata = {k: row[k] for k in ("key", "label", "class_name", "split", "source_ref", "width", "height",
                                        "original_width", "original_height")}
        metadata.update(record.extra, **({"planted": record.planted} if record.planted else {}))
        examples.append(ShardExample(record.key, encoded.data, encoded.ext, record.label, metadata))
        encoded_rows.append(row)
    entry = None
    if examples:
        entry, spans = write_shard(dataset, plan.name, plan.split, examples)
        for row, span in zip(encoded_rows, spans):
            row.update(image_offset=span.image.offset, image_size=span.image.size,
                       cls_offset=span.cls.offset if span.cls else None, cls_size=span.cls.size if span.cls else None,
                       json_offset=span.json.offset, json_size=span.json.size)
    index_rows = rows + encoded_rows
    check_accounting(list(plan.records), index_rows)
    part, counts = write_index_part(dataset, index_part_name(plan), index_rows)
    dataset.child(PARTS).write_atomic(f"{plan.name}.json", json.dumps(
        {"entry": asdict(entry) if entry else None, "part": part.entry(), "counts": counts}, sort_keys=True).encode())
    return ShardResult(entry, part, counts, current_node())


def index_part_name(plan: ShardPlan) -> str:
    """The index part of a planned shard: ``train-000003.tar``'s rows are ``index/train-000003.parquet``."""
    return plan.name.removesuffix(".tar") + ".parquet"


ingest_wave_task = ray.remote(num_cpus=1, max_retries=3)(ingest_wave)


def finished_part(dataset: Location, plan: ShardPlan) -> ShardResult | None:
    """The result a killed run already committed for this shard, if it is whole."""
    parts = dataset.child(PARTS)
    if not parts.exists(f"{plan.name}.json"):
        return None
    stored = json.loads(parts.read_bytes(f"{plan.name}.json"))
    if "part" not in stored:  # written by an earlier onion, which kept the rows there
        return None
    entry = ShardEntry(**stored["entry"]) if stored["entry"] else None
    part = IndexPart.of_entry(stored["part"])
    if entry and (not dataset.exists(entry.name) or dataset.size(entry.name) != entry.bytes):
        return None
    if not dataset.exists(INDEX_FOLDER, part.name):
        return None
    return ShardResult(entry, part, stored["counts"])


@dataclass(frozen=True)
class IngestReport:
    url: str
    manifest: dict
    resumed_shards: int
    already_complete: bool
    tasks_per_node: Counter = field(default_factory=Counter)


def flat(settings: dict, prefix: str = "") -> dict:
    """Nested settings as ``{"encode.image_format": ...}``."""
    out = {}
    for name, value in settings.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def check_output(dataset: Location, print_fingerprint: str, source: Source, options: object,
                 allowed: frozenset[str] | set[str] = frozenset()) -> bool:
    """True when ``dataset`` already holds this exact dataset; raise when it holds anything else.
    Names in ``allowed`` may be there already (the source's own shards, when they are indexed in place
    and OUT is their folder)."""
    while True:
        found = _judge_output(dataset, print_fingerprint, source, options, allowed)
        if found is not None:
            return found
        # Another job claimed the output (or finished it) after we looked for its plan and manifest and
        # before we listed: what we listed may be its files. Every file a job writes comes after its plan
        # and the plan goes only once the manifest is there, so one of the two now exists: judge that.


def _judge_output(dataset: Location, print_fingerprint: str, source: Source, options: object,
                  allowed: frozenset[str] | set[str]) -> bool | None:
    """:func:`check_output`'s one look; ``None`` when a job claimed the output while we looked."""
    if dataset.exists(MANIFEST_NAME):
        manifest = read_manifest(dataset)
        if manifest.get("fingerprint") == print_fingerprint:
            return True
        if manifest.get("source") != source.spec:
            raise DatasetError(f"{dataset.url} already holds a different dataset ({manifest.get('source')}); "
                               "choose another output or delete it")
        then = flat({"source": manifest.get("source_parameters", {}), **manifest.get("ingest", {})})
        now = flat({"source": source.parameters, **asdict(options)})
        changed = [f"{name} {then.get(name, '(not recorded)')!r} -> {value!r}" for name, value in sorted(now.items())
                   if then.get(name, "(not recorded)") != value]
        why = (f"other settings ({', '.join(changed)})" if changed else
               "the same settings, but its index is an earlier onion's single index.parquet (onion upgrade "
               f"{dataset.url} rewrites it as parts)" if index_parts(manifest) is None else
               "the same settings, but its files differ from the source's now or were written in an earlier "
               "onion's format")
        raise DatasetError(f"{dataset.url} already holds {source.spec} ingested with {why}: it is usable as it "
                           "is (train on it), or choose another output or delete it to write it again")
    if dataset.exists(PLAN_NAME):
        try:
            previous = json.loads(dataset.read_bytes(PLAN_NAME))
        except FileNotFoundError:  # its job has finished and removed it since: judge what it left
            return None
        if previous.get("fingerprint") != print_fingerprint:
            raise DatasetError(f"{dataset.url} holds an unfinished ingest of a different dataset "
                               f"({previous.get('source')}); choose another output or delete it")
        return False
    foreign = [name for name in dataset.list_names() if name != PARTS and name not in allowed]
    if foreign and (dataset.exists(PLAN_NAME) or dataset.exists(MANIFEST_NAME)):
        return None
    tars = foreign_shards(foreign)
    if tars:
        raise DatasetError(foreign_shards_message(dataset.url, sorted(tars), "Choose an empty or new output folder"))
    if foreign:
        raise DatasetError(f"{dataset.url} is not empty and is not an onion dataset (found {foreign[0]!r})")
    return False


def claim_output(dataset: Location, print_fingerprint: str, source: Source, options: object) -> None:
    """Make this job the output's owner, or find that an identical job owns it (a resume, or a twin
    whose bytes will equal ours). A job for a different dataset that got there first wins: this
    one stops before writing anything, so the output is never a mix of two datasets."""
    plan = json.dumps({"fingerprint": print_fingerprint, "source": source.spec}).encode()
    while not dataset.create_exclusive(PLAN_NAME, plan):
        try:
            owner = json.loads(dataset.read_bytes(PLAN_NAME))
        except FileNotFoundError:  # its job has just finished and removed it: claim again
            continue
        if owner.get("fingerprint") != print_fingerprint:
            raise DatasetError(f"{dataset.url} is being written by another ingest of a different dataset "
                               f"({owner.get('source')}); choose another output, or wait for it and delete it")
        return
    # Claimed. A job that claimed, finished and removed its plan after check_output looked has left its
    # manifest: a different dataset's stays, and this job stops before writing anything.
    if dataset.exists(MANIFEST_NAME) and read_manifest(dataset).get("fingerprint") != print_fingerprint:
        dataset.remove(PLAN_NAME)
        _judge_output(dataset, print_fingerprint, source, options, frozenset())  # raises, naming what it holds


def ingest(
    source: Source,
    out: str,
    options: IngestOptions,
    command: list[str],
    *,
    progress: bool = True,
    extra_manifest: dict | None = None,
) -> IngestReport:
    """Run the whole ingest; Ray is started (see :func:`ensure_ray`) only once the output is known to be usable."""
    records = source.records()
    check_keys(records)
    locality = source.locality if type(source).locality is not Source.locality else None
    plans = plan_shards(records, options, locality)
    identity = fingerprint(source, plans, options)
    dataset = location(out)
    if dataset.url.startswith("memory://"):
        raise DatasetError(f"{dataset.url}: memory:// lives inside one process and Ray workers cannot "
                           "write there; use a local path or an object store URL")
    try:
        return _write_dataset(dataset, identity, source, records, plans, locality, options, command, progress,
                              extra_manifest)
    except Exception:
        # A twin job (the same command on the same output) may finish first and remove its bookkeeping (the
        # plan, _parts/) while this one still reads or writes there. Its dataset is the one this job would
        # have written, byte for byte, so that ends this job too; any other failure is this job's own.
        if not holds_dataset(dataset, identity):
            raise
        clean_up(dataset)
        return IngestReport(dataset.url, read_manifest(dataset), 0, already_complete=True)


def holds_dataset(dataset: Location, identity: str) -> bool:
    """Whether ``dataset`` is complete with the dataset whose fingerprint is ``identity``."""
    try:
        return dataset.exists(MANIFEST_NAME) and read_manifest(dataset).get("fingerprint") == identity
    except Exception:  # noqa: BLE001 - asked after a failure: an unreadable output is simply not complete
        return False


def _write_dataset(dataset: Location, identity: str, source: Source, records: list[Record], plans: list[ShardPlan],
                   locality: object, options: IngestOptions, command: list[str], progress: bool,
                   extra_manifest: dict | None) -> IngestReport:
    """Check and claim the output, write the shards not already written, and commit the manifest."""
    if check_output(dataset, identity, source, options):
        clean_up(dataset)
        return IngestReport(dataset.url, read_manifest(dataset), 0, already_complete=True)
    claim_output(dataset, identity, source, options)
    ensure_ray()
    dataset.remove_stale_temporaries()
    results: dict[str, ShardResult] = {}
    for plan in plans:
        done = finished_part(dataset, plan)
        if done is not None:
            results[plan.name] = done
    resumed = len(results)
    source_handle = ray.put(source)
    waves = plan_waves([plan for plan in plans if plan.name not in results],
                       locality if source.reads_whole_units else None, WAVE_BYTES)
    for wave, written in fan_out(
            waves, lambda wave: ingest_wave_task.remote(source_handle, wave, dataset.url, options),
            desc=f"ingest {source.spec}", unit="img", progress=progress,
            weight=lambda wave: sum(len(plan.records) for plan in wave),
            initial=sum(results[name].part.rows for name in results),
            label=lambda wave: ", ".join(plan.name for plan in wave)):
        results.update({plan.name: result for plan, result in zip(wave, written)})
    parts = [(results[plan.name].part, results[plan.name].counts) for plan in plans]
    indexed = sum(part.rows for part, _ in parts)
    if indexed != len(records):
        raise RuntimeError(f"accounting broken: {len(records)} inputs but {indexed} index rows")
    entries = [results[p.name].entry for p in plans if results[p.name].entry is not None]
    ok = sum(counts["by_status"].get(STATUS_OK, 0) for _, counts in parts)
    manifest = commit_dataset(dataset, parts=parts, shards=entries, info=DatasetInfo(
        class_names=source.class_names, labelled=source.labelled, source=source.spec, fingerprint=identity,
        command=command,
        extra={"accounting": {"inputs": len(records), "ok": ok, "quarantined": indexed - ok},
               "ingest": asdict(options), "source_parameters": source.parameters, **source.manifest_extra,
               **(extra_manifest or {})},
    ))
    clean_up(dataset)
    nodes = Counter(result.node for result in results.values() if result.node)
    return IngestReport(dataset.url, manifest, resumed, already_complete=False, tasks_per_node=nodes)


def check_keys(records: list[Record]) -> None:
    seen: set[str] = set()
    for record in records:
        check_key(record.key)
        if record.key in seen:
            raise SourceError(f"two inputs have the key {record.key!r} ({record.source_ref})")
        seen.add(record.key)


def check_accounting(records: list[Record], rows: list[dict]) -> None:
    """Every input has exactly one index row (kept or quarantined): nothing is dropped silently."""
    if sorted(r.key for r in records) != sorted(row["key"] for row in rows):
        raise RuntimeError(f"accounting broken: {len(records)} inputs but {len(rows)} index rows")


def clean_up(dataset: Location) -> None:
    """Remove a finished ingest's bookkeeping. A twin job writing the same dataset may still be adding
    to it (and cleans up after itself when it finishes), so a removal that races with it, a folder
    refilled or a file already gone, is not an error: what is left is bookkeeping no reader opens."""
    for step in (lambda: dataset.remove(PARTS, recursive=True), lambda: dataset.remove(PLAN_NAME),
                 dataset.remove_stale_temporaries):
        with contextlib.suppress(OSError):
            step()
