"""torchvision's ImageFolder layout: ``DIR/<class>/<image>``, optionally under ``train/`` and ``val/``.

Unlike torchvision, no file is skipped silently: a file that is not an image, one outside any
class folder, or a symbolic link to a directory (never followed: it could loop or leave the tree)
becomes a quarantined record with its reason.
"""
from __future__ import annotations

import os

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

SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "val"}


class ImageFolderSource(Source):
    def __init__(self, root: str, *, val_fraction: float = 0.0) -> None:
        if not os.path.isdir(root):
            raise SourceError(f"imagefolder: {root!r} is not a directory")
        self.spec = f"imagefolder:{root}"
        self.root = os.path.abspath(root)
        self.val_fraction = val_fraction
        self.split_roots = self._split_roots()
        self.class_names = sorted({
            printable(entry.name) for split_root in self.split_roots.values()
            for entry in os.scandir(split_root) if entry.is_dir()
        })
        if not self.class_names:
            raise SourceError(f"imagefolder: {root!r} has no class sub-directories")

    def _split_roots(self) -> dict[str, str]:
        """``{split: folder}``: split folders when the root holds only those, else the root itself."""
        folders = [e.name for e in os.scandir(self.root) if e.is_dir()]
        if folders and "train" in folders and all(name.lower() in SPLIT_FOLDERS for name in folders):
            return {SPLIT_FOLDERS[name.lower()]: os.path.join(self.root, name) for name in sorted(folders)}
        return {"": self.root}

    def records(self) -> list[Record]:
        records = []
        for split_name, split_root in sorted(self.split_roots.items()):
            for dirpath, dirnames, filenames in os.walk(split_root):  # does not follow directory links
                dirnames.sort()
                linked = [name for name in dirnames if os.path.islink(os.path.join(dirpath, name))]
                for name in sorted(filenames + linked):
                    quarantine = "symbolic link to a directory (not followed)" if name in linked else None
                    records.append(self._record(split_name, split_root, os.path.join(dirpath, name), quarantine))
        return records

    def _record(self, split_name: str, split_root: str, path: str, quarantine: str | None = None) -> Record:
        relative = os.path.relpath(path, self.root)
        within_split = os.path.relpath(path, split_root)
        class_name = printable(within_split.split(os.sep)[0]) if os.sep in within_split else None
        stem = os.path.splitext(os.path.basename(path))[0]
        key = f"{safe_key_part(class_name or 'noclass', 20)}-{safe_key_part(stem)}-{short_hash(relative)}"
        split = split_name or hash_split(key, self.val_fraction)
        try:
            size = os.lstat(path).st_size
        except OSError:
            size = 0
        quarantine = quarantine or (None if class_name else "not inside a class folder")
        label = self.class_names.index(class_name) if class_name in self.class_names else None
        return Record(key=key, split=split, label=label, source_ref=printable(relative), est_bytes=size + 1024,
                      locator=path, quarantine=quarantine)

    def load(self, record: Record) -> bytes:
        try:
            with open(record.locator, "rb") as handle:
                return handle.read()
        except OSError as error:
            raise Quarantine(f"unreadable file: {error.strerror or error}") from error
