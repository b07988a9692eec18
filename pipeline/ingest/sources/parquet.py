"""Tables of images: ``parquet:URL_OR_GLOB`` (Parquet files, local or any fsspec URL) and ``hf:DIR``
(a folder that Hugging Face ``datasets``' ``save_to_disk`` wrote: Arrow IPC stream files).

Each row is one input: image bytes in a binary column or in the ``{"bytes", "path"}`` struct that
``datasets`` writes for its ``Image`` feature, a label (an integer, or a string mapped through the
sorted class names; ``datasets``' ``ClassLabel`` names are read from the schema metadata; none when
the tables have no ``label`` column and none is named, or with ``--unlabelled``), and a split from the
file's name (``train-00000-of-00002.parquet``), a split column, or the key's hash.

The driver reads only the files' footers and their small columns (label, split, key); the image
column is read inside the Ray tasks, one row group (record batch) at a time, each read once per task.
A row with a null image, no embedded bytes, bytes that are not an image, a null or unknown label, or
an unknown split is quarantined with its reason. A file whose footer or row group cannot be decoded
is an error naming it, not quarantined rows: through pyarrow a damaged page and a failing store both
surface as ``OSError``, and quarantining on a storage failure would make the output depend on luck.

Files are read with ``pyarrow.parquet.ParquetFile`` and ``pre_buffer=False``, not ``pyarrow.dataset``:
a dataset fragment over an fsspec file (which remote URLs need) releases Python-owned buffers on
Arrow's threads and can abort the interpreter at exit ("terminate called without an active
exception", as :func:`shards.index.parquet_bytes_to_table` explains); the synchronous reader cannot.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.ingest.sources.base import Quarantine, Record, Source, SourceError, hash_split, safe_key_part, short_hash
from pipeline.ingest.sources.imagefolder import SPLIT_FOLDERS
from shards import location
from shards.tarwriter import MAX_KEY_LENGTH
from shards.urls import Location

if TYPE_CHECKING:
    from pipeline.ingest.sources import SourceOptions

DEFAULT_LABEL_COLUMN = "label"  # read when --label-column is not given and the tables have it
GLOB_CHARACTERS = "*?["
IGNORED_PREFIXES = (".", "_")  # in a folder walk: Spark's _SUCCESS/_temporary, hidden files (as pyarrow.dataset)
SPLIT_IN_NAME = re.compile(r"(?<![a-z])(train|validation|valid|val|test)(?![a-z])")
BINARY_TYPES = {pa.binary(), pa.large_binary()}
HF_METADATA = b"huggingface"  # datasets' schema metadata key: {"info": {"features": {...}}}


@dataclass(frozen=True)
class TableFile:
    """One file of the table as planned: small enough to ship to every Ray task."""

    name: str  # relative to the source's folder: source_ref and key prefix
    split: str | None  # the split its name (or save_to_disk's state) names, if any
    group_rows: tuple[int, ...]  # rows of each row group (Parquet) or record batch (Arrow IPC)
    group_bytes: tuple[int, ...]  # the image column's stored bytes in each, to plan shard sizes


class ParquetTable:
    """A Parquet file read by row group."""

    group_word = "row group"

    def __init__(self, handle: object) -> None:
        self.file = pq.ParquetFile(handle, pre_buffer=False)
        self.schema = self.file.schema_arrow
        metadata = self.file.metadata
        self.group_rows = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]

    def group_bytes(self, group: int, column: str) -> int:
        chunks = self.file.metadata.row_group(group)
        return sum(chunk.total_compressed_size for chunk in map(chunks.column, range(chunks.num_columns))
                   if chunk.path_in_schema == column or chunk.path_in_schema.startswith(f"{column}."))

    def read(self, columns: list[str], group: int | None = None) -> pa.Table:
        if group is None:
            return self.file.read(columns=columns, use_threads=False)
        return self.file.read_row_group(group, columns=columns, use_threads=False)


class ArrowTable:
    """An Arrow IPC file (stream or file format) read by record batch from a memory map: slicing a
    batch out costs nothing until its buffers are touched, so the driver never pages images in."""

    group_word = "record batch"

    def __init__(self, handle: pa.NativeFile) -> None:
        if handle.read(6) == b"ARROW1":
            reader = pa.ipc.open_file(handle)
            self.batches = [reader.get_batch(b) for b in range(reader.num_record_batches)]
        else:
            handle.seek(0)
            reader = pa.ipc.open_stream(handle)
            self.batches = list(reader)
        self.schema = reader.schema
        self.group_rows = [batch.num_rows for batch in self.batches]

    def group_bytes(self, group: int, column: str) -> int:
        return self.batches[group].column(column).nbytes

    def read(self, columns: list[str], group: int | None = None) -> pa.Table:
        batches = self.batches if group is None else [self.batches[group]]
        schema = pa.schema([self.schema.field(column) for column in columns])
        return pa.Table.from_batches([batch.select(columns) for batch in batches], schema=schema)


def is_damage(error: BaseException) -> bool:
    """A file pyarrow cannot decode (bad magic, thrift, page or IPC message), rather than storage failing."""
    return isinstance(error, (pa.ArrowInvalid, pa.ArrowNotImplementedError)) or type(error) is OSError


def split_named(text: str) -> str | None:
    """The split a path names (the last of train, val, valid, validation, test in it), if any."""
    found = SPLIT_IN_NAME.findall(text.lower())
    return SPLIT_FOLDERS[found[-1]] if found else None


def parse_class_names(names: str | Sequence[str] | None, kind: str) -> list[str] | None:
    """``--class-names a,b,c`` (or a sequence) as a list; blanks and repeats are errors."""
    if names is None:
        return None
    parsed = [name.strip() for name in (names.split(",") if isinstance(names, str) else names)]
    repeated = sorted(name for name, count in Counter(parsed).items() if count > 1)
    if not all(parsed) or repeated:
        problem = f"{repeated[0]!r} twice" if repeated else "an empty name"
        raise SourceError(f"{kind}: --class-names {','.join(parsed)!r} has {problem}")
    return parsed


def class_label_names(schema: pa.Schema, column: str) -> list[str] | None:
    """The names of ``column``'s ClassLabel feature, from the metadata ``datasets`` stores in the schema."""
    try:
        features = json.loads((schema.metadata or {})[HF_METADATA])["info"]["features"]
        feature = features[column]
    except (KeyError, TypeError, ValueError):
        return None
    names = feature.get("names") if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None
    return [str(name) for name in names] if isinstance(names, list) else None


def key_prefixes(names: list[str]) -> list[str]:
    """Readable per-file key prefixes (the path without its extension); a prefix that two files
    would share (cut at 40 characters) gets the hash of the path."""
    prefixes = [safe_key_part(posixpath.splitext(name)[0], 40) for name in names]
    counts = Counter(prefixes)
    return [p if counts[p] == 1 else f"{p}-{short_hash(name)}" for p, name in zip(prefixes, names)]


def _is_binary(data_type: pa.DataType) -> bool:
    return data_type in BINARY_TYPES or pa.types.is_fixed_size_binary(data_type) or str(data_type) == "binary_view"


def _value_type(data_type: pa.DataType) -> pa.DataType:
    return data_type.value_type if pa.types.is_dictionary(data_type) else data_type


def _is_text(data_type: pa.DataType) -> bool:
    data_type = _value_type(data_type)
    return pa.types.is_string(data_type) or pa.types.is_large_string(data_type) or str(data_type) == "string_view"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


class ParquetSource(Source):
    kind = "parquet"
    file_kind = "Parquet"

    def __init__(self, url: str, *, image_column: str = "image", label_column: str | None = None,
                 class_names: str | Sequence[str] | None = None, split_column: str | None = None,
                 key_column: str | None = None, val_fraction: float = 0.0, unlabelled: bool = False) -> None:
        self.spec = f"{self.kind}:{url}"
        if unlabelled and (label_column or class_names):
            raise SourceError(f"{self.kind}: --unlabelled reads no labels: drop --label-column/--class-names, "
                              "or --unlabelled")
        # None until the first file is read: "label" when it has that column, else no labels (an unlabelled table)
        self.image_column, self.label_column = image_column, label_column
        self.guess_label_column = label_column is None and not unlabelled
        self.split_column, self.key_column, self.val_fraction = split_column, key_column, val_fraction
        given = parse_class_names(class_names, self.kind)
        self.parameters = {"image_column": image_column, "label_column": label_column, "class_names": given,
                           "split_column": split_column, "key_column": key_column, "val_fraction": val_fraction,
                           **({"unlabelled": True} if unlabelled else {})}
        self.folder, found = self._find_files(url)
        self._fetched: dict[str, bytes | Quarantine] = {}
        self.files, columns, table_names, label_kind = self._scan(found)
        self.labelled = self.label_column is not None
        self.class_names = (given or self._class_names(columns, table_names, label_kind, url)) if self.labelled else []
        self._records: list[Record] | None = self._build_records(columns)

    @classmethod
    def from_options(cls, url: str, options: SourceOptions) -> ParquetSource:
        return cls(url, image_column=options.image_column, label_column=options.label_column,
                   class_names=options.class_names, split_column=options.split_column,
                   key_column=options.key_column, val_fraction=options.val_fraction or 0.0,
                   unlabelled=options.unlabelled)

    def __getstate__(self) -> dict:
        """Ray ships the source to every task: the records and fetched images stay behind."""
        return {**self.__dict__, "_records": None, "_fetched": {}}

    # --- finding and opening files -------------------------------------------------------------

    def _find_files(self, url: str) -> tuple[Location, list[tuple[str, str | None]]]:
        """(the folder names are relative to, [(name, the split it names)]) for a file, folder or glob."""
        where = location(url)
        fs, path = where.fs, where.root
        globbed = [path.index(c) for c in GLOB_CHARACTERS if c in path]
        if globbed:
            base = path[:min(globbed)].rsplit("/", 1)[0]
            found = [p for p, info in fs.glob(path, detail=True).items() if info["type"] == "file"]
        elif fs.isdir(path):
            base = path
            found = [p for p in fs.find(path) if p.endswith(".parquet")
                     and not any(part.startswith(IGNORED_PREFIXES) for part in p[len(base):].split("/"))]
        elif fs.exists(path):
            base, found = posixpath.dirname(path), [path]
        else:
            raise SourceError(f"{self.kind}: {url!r} does not exist")
        if not found:
            raise SourceError(f"{self.kind}: no .parquet file {'matches' if globbed else 'under'} {url!r}")
        names = sorted(p[len(base):].lstrip("/") for p in found)
        folder = replace(where, root=base, url=base if where.is_local else fs.unstrip_protocol(base))
        return folder, [(name, split_named(name)) for name in names]

    @contextmanager
    def _reader(self, name: str) -> Iterator[ParquetTable]:
        path = self.folder.path(name)
        # local files natively (Arrow-owned memory); remote ones without read-ahead, so the driver's
        # reads of small columns do not pull image bytes in blocks around them
        opened = pa.OSFile(path) if self.folder.is_local else self.folder.fs.open(path, "rb", cache_type="none")
        with opened as handle:
            yield ParquetTable(handle)

    def _where(self, name: str) -> str:
        return f"{self.folder.url.rstrip('/')}/{name}"

    @contextmanager
    def _open(self, name: str) -> Iterator[ParquetTable | ArrowTable]:
        """A file's reader; a file pyarrow cannot decode, here or while reading it, is one error naming it."""
        try:
            with self._reader(name) as table:
                yield table
        except Exception as error:
            if not is_damage(error):
                raise
            raise SourceError(f"{self.kind}: {self._where(name)}: not a readable {self.file_kind} file "
                              f"({_one_line(error)}); a truncated or damaged file must be fetched again") from None

    # --- planning: footers and small columns, in the driver ---------------------------------------

    def _scan(self, found: list[tuple[str, str | None]]) -> tuple[list[TableFile], list[dict], list[str] | None, str]:
        """Every file's row groups and small columns; the ClassLabel names its metadata holds; and
        whether labels are integers or strings."""
        files, columns, kinds = [], [], {}
        table_names: list[str] | None = None
        names_from = ""
        for name, split in found:
            with self._open(name) as table:
                if self.guess_label_column:
                    self.guess_label_column = False
                    self.label_column = DEFAULT_LABEL_COLUMN if DEFAULT_LABEL_COLUMN in table.schema.names else None
                small = list(dict.fromkeys(c for c in (self.label_column, self.split_column, self.key_column) if c))
                kinds[self._check_schema(name, table.schema)] = name
                data = table.read(small)
                columns.append({column: data.column(column).to_pylist() for column in small})
                files.append(TableFile(name, split, tuple(table.group_rows), tuple(
                    table.group_bytes(g, self.image_column) for g in range(len(table.group_rows)))))
                names = class_label_names(table.schema, self.label_column) if self.label_column else None
            if names is not None and table_names is not None and names != table_names:
                raise SourceError(f"{self.kind}: {self._where(name)} and {self._where(names_from)} name different "
                                  f"classes for column {self.label_column!r}; give --class-names")
            if names is not None and table_names is None:
                table_names, names_from = names, name
        if len(kinds) > 1:
            raise SourceError(f"{self.kind}: column {self.label_column!r} holds integers in "
                              f"{self._where(kinds['int'])} but strings in {self._where(kinds['str'])}")
        return files, columns, table_names, next(iter(kinds))

    def _check_schema(self, name: str, schema: pa.Schema) -> str:
        """One clear error for a missing column or one of the wrong type; the labels' kind ('int'/'str')."""
        for flag, column in (("--image-column", self.image_column), ("--label-column", self.label_column),
                             ("--split-column", self.split_column), ("--key-column", self.key_column)):
            if column and column not in schema.names:
                unlabelled = " or --unlabelled" if flag == "--label-column" else ""
                raise SourceError(f"{self.kind}: {self._where(name)} has no column {column!r} ({flag}{unlabelled}; its "
                                  f"columns: {', '.join(schema.names)})")
        image = schema.field(self.image_column).type
        if not (_is_binary(image) or pa.types.is_struct(image) and image.get_field_index("bytes") >= 0
                and _is_binary(image.field("bytes").type)):
            raise SourceError(f"{self.kind}: {self._where(name)}: column {self.image_column!r} holds {image}, not "
                              "image bytes (binary, or the {bytes, path} struct of datasets' Image feature)")
        if self.label_column is None:
            return "none"
        label = _value_type(schema.field(self.label_column).type)
        if not (pa.types.is_integer(label) or _is_text(label)):
            raise SourceError(f"{self.kind}: {self._where(name)}: column {self.label_column!r} holds {label}; labels "
                              "must be integers or strings")
        if self.split_column and not _is_text(schema.field(self.split_column).type):
            raise SourceError(f"{self.kind}: {self._where(name)}: column {self.split_column!r} holds "
                              f"{schema.field(self.split_column).type}; splits must be strings (train, val, test...)")
        return "int" if pa.types.is_integer(label) else "str"

    def _class_names(self, columns: list[dict], table_names: list[str] | None, label_kind: str, url: str) -> list[str]:
        if table_names and label_kind == "int":
            return table_names
        values = {value for file_columns in columns for value in file_columns[self.label_column] if value is not None}
        if label_kind == "str":
            names = sorted(values)
        else:
            names = [str(i) for i in range(max((v for v in values if v >= 0), default=-1) + 1)]
        if not names:
            raise SourceError(f"{self.kind}: {url!r}: column {self.label_column!r} holds no label (all null or "
                              "negative); give --label-column, or --class-names")
        return names

    def _build_records(self, columns: list[dict]) -> list[Record]:
        class_index = {name: i for i, name in enumerate(self.class_names)}
        records = []
        for number, (file, values, prefix) in enumerate(zip(self.files, columns, key_prefixes(
                [file.name for file in self.files]))):
            width = max(6, len(str(sum(file.group_rows))))
            row = 0
            for group, (rows, size) in enumerate(zip(file.group_rows, file.group_bytes)):
                for in_group in range(rows):
                    key, key_problem = self._key(f"{prefix}-{row:0{width}d}", values, row)
                    split, split_problem = self._split(file.split, values, row, key)
                    label, label_problem = (self._label(values[self.label_column][row], class_index)
                                            if self.labelled else (None, None))
                    records.append(Record(
                        key=key, split=split, label=label, source_ref=f"{file.name}[{row}]",
                        est_bytes=size // max(rows, 1) + 1024, locator=(number, group, in_group),
                        quarantine=key_problem or split_problem or label_problem))
                    row += 1
        return records

    def _key(self, default: str, values: dict, row: int) -> tuple[str, str | None]:
        if not self.key_column:
            return default, None
        value = values[self.key_column][row]
        if value is None:
            return default, f"no key (null in column {self.key_column!r})"
        return safe_key_part(str(value), MAX_KEY_LENGTH), None

    def _split(self, named: str | None, values: dict, row: int, key: str) -> tuple[str, str | None]:
        if not self.split_column:
            return named or hash_split(key, self.val_fraction), None
        value = values[self.split_column][row]
        split = SPLIT_FOLDERS.get(value.strip().lower()) if value is not None else None
        if split:
            return split, None
        problem = (f"no split (null in column {self.split_column!r})" if value is None else
                   f"split {value!r} in column {self.split_column!r} is none of train, val, valid, validation, test")
        return hash_split(key, self.val_fraction), problem

    def _label(self, value: int | str | None, class_index: dict[str, int]) -> tuple[int | None, str | None]:
        if value is None:
            return None, f"no label (null in column {self.label_column!r})"
        if isinstance(value, str):
            return (class_index[value], None) if value in class_index else (None, f"label {value!r} is no class name")
        if 0 <= value < len(self.class_names):
            return value, None
        return value, f"label {value} outside the {len(self.class_names)} classes"

    def records(self) -> list[Record]:
        if self._records is None:
            raise RuntimeError("records() is planned in the driver; a shipped source holds none")
        return list(self._records)

    # --- loading: the image column, by row group, in the Ray task ---------------------------------

    reads_whole_units = True

    def locality(self, record: Record) -> tuple[int, int]:
        return record.locator[:2]  # (file, row group): its image column is read whole

    def prefetch(self, records: list[Record]) -> None:
        """Read each row group that ``records`` fall in once (only its image column), keeping their images."""
        by_file: dict[int, dict[int, list[Record]]] = defaultdict(lambda: defaultdict(list))
        for record in records:
            number, group, _ = record.locator
            by_file[number][group].append(record)
        for number, groups in sorted(by_file.items()):
            name = self.files[number].name
            with self._open(name) as table:
                for group, members in sorted(groups.items()):
                    try:
                        column = table.read([self.image_column], group).column(0)
                    except Exception as error:
                        if not is_damage(error):
                            raise
                        raise SourceError(f"{self.kind}: {self._where(name)}: {table.group_word} {group} unreadable "
                                          f"({_one_line(error)}); the file is damaged: fetch it again") from None
                    values = column.take(pa.array([record.locator[2] for record in members])).to_pylist()
                    self._fetched.update((record.key, self._image(value)) for record, value in zip(members, values))

    def _image(self, value: bytes | dict | None) -> bytes | Quarantine:
        if isinstance(value, dict):  # datasets' Image: {"bytes": ..., "path": ...}
            if value.get("bytes") is not None:
                return value["bytes"]
            if value.get("path"):
                return Quarantine(f"no image bytes in column {self.image_column!r}, only a path (images beside "
                                  "the table are not read)")
            value = None
        return Quarantine(f"no image (null in column {self.image_column!r})") if value is None else value

    def load(self, record: Record) -> bytes:
        if record.key not in self._fetched:
            self.prefetch([record])
        image = self._fetched.pop(record.key)
        if isinstance(image, Quarantine):
            raise image
        return image


class HuggingFaceSource(ParquetSource):
    """A local folder that ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` wrote, read with
    pyarrow alone (``datasets`` need not be installed): ``state.json`` lists a split's Arrow files
    and names the split; a DatasetDict holds one such folder per split (``dataset_dict.json``)."""

    kind = "hf"
    file_kind = "Arrow IPC"

    def _find_files(self, url: str) -> tuple[Location, list[tuple[str, str | None]]]:
        if "://" in url:
            raise SourceError(f"hf: {url!r}: only a local folder is read (its Arrow files are memory-mapped); "
                              "copy it here, or write Parquet (Dataset.to_parquet) and use parquet:URL")
        root = os.path.abspath(url)
        if not os.path.isdir(root):
            raise SourceError(f"hf: {url!r} is not a directory")
        if os.path.exists(os.path.join(root, "dataset_dict.json")):
            folders = [str(split) for split in self._json(root, "dataset_dict.json").get("splits", [])]
        elif os.path.exists(os.path.join(root, "state.json")):
            folders = [""]
        else:
            raise SourceError(f"hf: {url!r} holds no state.json or dataset_dict.json: not a folder that datasets' "
                              f"save_to_disk wrote (for Parquet files use parquet:{url})")
        found = []
        for folder in folders:
            state = self._json(root, posixpath.join(folder, "state.json") if folder else "state.json")
            named = split_named(str(state.get("_split") or folder))
            try:
                files = [posixpath.join(folder, entry["filename"]) for entry in state["_data_files"]]
            except (KeyError, TypeError) as error:
                raise SourceError(f"hf: {os.path.join(root, folder, 'state.json')}: no _data_files list") from error
            missing = [name for name in files if not os.path.isfile(os.path.join(root, name))]
            if missing:
                raise SourceError(f"hf: {os.path.join(root, missing[0])} is listed in its state.json but missing")
            found += [(name, named or split_named(name)) for name in files]
        if not found:
            raise SourceError(f"hf: {url!r} lists no data files")
        return location(root), found

    @staticmethod
    def _json(root: str, name: str) -> dict:
        path = os.path.join(root, name)
        try:
            with open(path, encoding="utf-8") as handle:
                value = json.load(handle)
        except (OSError, ValueError) as error:
            raise SourceError(f"hf: {path}: unreadable ({_one_line(error)})") from None
        if not isinstance(value, dict):
            raise SourceError(f"hf: {path}: not a JSON object")
        return value

    @contextmanager
    def _reader(self, name: str) -> Iterator[ArrowTable]:
        with pa.memory_map(self.folder.path(name)) as handle:
            yield ArrowTable(handle)
