"""Source registry: a spec string (``digits``, ``imagefolder:DIR``, ...) to a :class:`Source`."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.ingest.sources.base import Quarantine, Raw, Record, Source, SourceError


@dataclass(frozen=True)
class SourceOptions:
    """Options that some sources use; each source takes the ones it needs."""

    val_fraction: float | None = None  # None: the source's own default
    image_column: str = "image"  # parquet:, hf: the column of image bytes
    label_column: str | None = None  # None: "label" when the tables have that column, else unlabelled
    split_column: str | None = None
    key_column: str | None = None
    seed: int = 0
    count: int = 10_000
    image_size: int = 32
    classes: int = 10
    dup_rate: float = 0.05
    near_dup_rate: float = 0.05
    flip_rate: float = 0.05
    label_field: str | None = None  # wds: the .json field holding the label (default: the .cls member)
    class_names: tuple[str, ...] | None = None  # label i is class_names[i]; a label may also be given by name
    unlabelled: bool = False  # wds:, parquet:, hf: read no labels (images with captions, no classes)


def _digits(argument: str, options: SourceOptions) -> Source:
    from pipeline.ingest.sources.arrays import digits_source

    return digits_source()


def _mnist5k(argument: str, options: SourceOptions) -> Source:
    from pipeline.ingest.sources.arrays import mnist5k_source

    return mnist5k_source()


def _synthetic(argument: str, options: SourceOptions) -> Source:
    from pipeline.ingest.sources.synthetic import SyntheticSource

    return SyntheticSource(
        count=options.count, image_size=options.image_size, classes=options.classes,
        dup_rate=options.dup_rate, near_dup_rate=options.near_dup_rate, flip_rate=options.flip_rate,
        val_fraction=0.2 if options.val_fraction is None else options.val_fraction, seed=options.seed,
    )


def _imagefolder(argument: str, options: SourceOptions) -> Source:
    from pipeline.ingest.sources.imagefolder import ImageFolderSource

    return ImageFolderSource(argument, val_fraction=options.val_fraction or 0.0)


def _cifar(argument: str, options: SourceOptions) -> Source:
    from pipeline.ingest.sources.cifar import CifarSource

    return CifarSource(argument)


def _parquet(argument: str, options: SourceOptions) -> Source:
    from pipeline.ingest.sources.parquet import ParquetSource

    return ParquetSource.from_options(argument, options)


def _hf(argument: str, options: SourceOptions) -> Source:
    from pipeline.ingest.sources.parquet import HuggingFaceSource

    return HuggingFaceSource.from_options(argument, options)


def _dataset(argument: str, options: SourceOptions) -> Source:
    from pipeline.ingest.sources.dataset import DatasetSource

    return DatasetSource(argument)


def _wds(argument: str, options: SourceOptions) -> Source:
    from pipeline.ingest.sources.webdataset import WebDatasetSource

    return WebDatasetSource(argument, label_field=options.label_field, class_names=options.class_names,
                            val_fraction=options.val_fraction or 0.0, unlabelled=options.unlabelled)


# name -> (needs an argument after ':', factory)
SOURCES: dict[str, tuple[bool, Callable[[str, SourceOptions], Source]]] = {
    "digits": (False, _digits),
    "mnist5k": (False, _mnist5k),
    "synthetic": (False, _synthetic),
    "imagefolder": (True, _imagefolder),
    "cifar": (True, _cifar),
    "parquet": (True, _parquet),
    "hf": (True, _hf),
    "dataset": (True, _dataset),
    "wds": (True, _wds),
}

UNLABELLED_SOURCES = ("wds", "parquet", "hf")  # the ones that can read images without classes


def open_source(spec: str, options: SourceOptions | None = None) -> Source:
    """``name`` or ``name:ARGUMENT``; a path or URL holding ``manifest.json`` means ``dataset:``."""
    options = options or SourceOptions()
    name, _, argument = spec.partition(":")
    if name not in SOURCES and ("://" in spec or _is_dataset(spec)):
        name, argument = "dataset", spec
    if name not in SOURCES:
        tars = _foreign_shards(spec)
        if tars:
            from shards.manifest import foreign_shards_message

            raise SourceError(foreign_shards_message(spec, tars))
        known = ", ".join(f"{n}:DIR" if needs else n for n, (needs, _) in SOURCES.items())
        raise SourceError(f"unknown source {spec!r} (known: {known}, or a path to an onion dataset)")
    if options.unlabelled and name not in UNLABELLED_SOURCES:
        raise SourceError(f"--unlabelled works with the sources {', '.join(f'{n}:' for n in UNLABELLED_SOURCES)}, "
                          f"not {name}")
    needs_argument, factory = SOURCES[name]
    if needs_argument and not argument:
        raise SourceError(f"source {name!r} needs a location: {name}:DIR")
    if not needs_argument and argument:
        raise SourceError(f"source {name!r} takes no argument (got {argument!r})")
    return factory(argument, options)


def _foreign_shards(spec: str) -> list[str]:
    """The .tar files of a folder of shards that onion did not write (empty for anything else)."""
    from shards import location
    from shards.manifest import foreign_shards

    if spec.rstrip("/").endswith(".tar"):  # one file, not a folder of them
        return []
    try:
        folder = location(spec)
        return sorted(foreign_shards(folder.list_names())) if folder.exists() else []
    except (OSError, ValueError):
        return []


def _is_dataset(spec: str) -> bool:
    from shards import MANIFEST_NAME, location

    try:
        return location(spec).exists(MANIFEST_NAME)
    except (OSError, ValueError):
        return False


__all__ = ["SOURCES", "Quarantine", "Raw", "Record", "Source", "SourceError", "SourceOptions", "open_source"]
