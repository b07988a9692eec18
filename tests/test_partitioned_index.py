"""The partitioned index: a reader opens only the index parts of the shards it reads, exact-once and
mid-epoch resume hold over ranks and workers, a missing or changed part is named, and a dataset an
earlier onion wrote (one ``index.parquet``) still reads and is upgraded by ``onion upgrade``."""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from torch.utils.data import DataLoader

import shards.index
import shards.reader
from helpers import as_single_file_index, files_of, onion, png_bytes, random_pixels, write_direct_dataset
from pipeline.ingest.job import IngestOptions, ingest
from pipeline.ingest.sources import SourceOptions, open_source
from shards import DatasetDamaged, DatasetError, ShardDataset, location, read_index, read_manifest
from shards.index import index_parts
from shards.manifest import count_rows
from shards.selections import read_selection

SHARDS = [7, 5, 9, 6, 8, 4, 7, 5]  # uneven, so pieces start and stop inside shards
RANKS, WORKERS = 2, 2


@pytest.fixture
def opened(tmp_path, monkeypatch) -> Path:
    """A log of every index part read, by any process (DataLoader workers are forked after the patch)."""
    log = tmp_path / "opened.log"
    log.touch()
    original = shards.index.read_part_bytes

    def logged(dataset, part):
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()} {part.name}\n")
        return original(dataset, part)

    monkeypatch.setattr(shards.index, "read_part_bytes", logged)
    selection_part = shards.reader.read_selection_part

    def logged_selection(dataset, version, entry, layout, columns=None):
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()} selections/{entry['name']}\n")
        return selection_part(dataset, version, entry, layout, columns)

    monkeypatch.setattr(shards.reader, "read_selection_part", logged_selection)
    return log


def part_of_shard(url: str) -> dict[str, str]:
    return {shard: part.name for part in index_parts(read_manifest(location(url))) for shard in part.shards}


def test_each_reader_opens_only_the_parts_of_the_shards_it_reads(tmp_path, opened):
    url = str(tmp_path / "ds")
    truth = write_direct_dataset(url, SHARDS)
    part_of = part_of_shard(url)
    assert len(part_of) == len(SHARDS) and len(set(part_of.values())) == len(SHARDS)
    changed = False
    for epoch in (0, 1):
        keys: list[str] = []
        for rank in range(RANKS):
            opened.write_text("")
            dataset = ShardDataset(url, seed=5, rank=rank, world_size=RANKS)
            assert opened.read_text() == ""  # the counts come from the manifest: nothing read yet
            dataset.set_epoch(epoch)
            keys += [key for _, _, key in DataLoader(dataset, batch_size=None, num_workers=WORKERS)]
            expected = {part_of[segment.shard] for worker in range(WORKERS)
                        for segment in dataset.segments(worker, WORKERS)}
            reads = Counter(opened.read_text().split("\n")[:-1])
            assert {line.split()[1] for line in reads} == expected
            assert len(expected) < len(SHARDS) and max(reads.values()) == 1  # each worker reads a part once
            first = {part_of[segment.shard] for segment in ShardDataset(url, seed=5, rank=rank, world_size=RANKS)
                     .segments(0, WORKERS)}
            changed |= epoch == 1 and first != {part_of[s.shard] for s in dataset.segments(0, WORKERS)}
        assert sorted(keys) == sorted(truth)  # exactly once over 2 ranks x 2 workers
    assert changed  # the shard order reshuffles per epoch, and the parts a worker opens with it


def random_half(url: str, seed: int = 0, workers: int = 2) -> tuple[str, list[str]]:
    """A partitioned selection version of half the examples at random (as ``onion select`` writes it on a
    partitioned index), and its kept keys, sorted."""
    from pipeline.curation.selection import SelectOptions, SelectRequest, make_selection

    version = make_selection(location(url), SelectRequest(options=SelectOptions(keep=0.5, strategy="random",
                                                                                seed=seed)), workers=workers).version
    chosen = read_selection(location(url), version)
    return version, sorted(chosen.filter(chosen["kept"])["key"].to_pylist())


def test_a_reader_of_a_partitioned_selection_opens_only_its_shards_parts_of_both(ray_local, tmp_path, opened):
    url = str(tmp_path / "ds")
    write_direct_dataset(url, SHARDS)
    version, kept = random_half(url)
    part_of = part_of_shard(url)
    keys: list[str] = []
    for rank in range(RANKS):
        opened.write_text("")
        dataset = ShardDataset(url, seed=5, rank=rank, world_size=RANKS, selection=version)
        assert opened.read_text() == ""  # counts from the selection's JSON: no part read yet
        keys += [key for _, _, key in DataLoader(dataset, batch_size=None, num_workers=WORKERS)]
        expected = {part_of[segment.shard] for worker in range(WORKERS)
                    for segment in dataset.segments(worker, WORKERS)}
        reads = Counter(line.split()[1] for line in opened.read_text().split("\n")[:-1])
        assert set(reads) == expected | {f"selections/{name}" for name in expected}
        assert len(expected) < len(SHARDS)
    assert sorted(keys) == kept  # the kept examples, each exactly once over 2 ranks x 2 workers
    assert len(kept) == round(0.5 * sum(SHARDS))


def test_restricting_to_a_partitioned_version_reads_it_per_shard_in_persistent_workers(ray_local, tmp_path,
                                                                                        opened):
    """restrict(version) of a partitioned version, as per-epoch pruning hands it over: running DataLoader
    workers switch to it, read only their shards' parts of it, and give exactly the order of a reader
    made with that selection; restrict(None) goes back to every example."""
    url = str(tmp_path / "ds")
    truth = write_direct_dataset(url, SHARDS)
    version, kept = random_half(url)
    part_of = part_of_shard(url)
    restricted: list[str] = []
    unrestricted: list[str] = []
    for rank in range(RANKS):
        dataset = ShardDataset(url, seed=5, rank=rank, world_size=RANKS)
        loader = DataLoader(dataset, batch_size=None, num_workers=WORKERS, persistent_workers=True)
        dataset.set_epoch(0)
        assert len([key for _, _, key in loader]) == len(dataset)  # the workers run, unrestricted
        opened.write_text("")
        dataset.restrict(version)
        dataset.set_epoch(1)
        got = [key for _, _, key in loader]
        expected = {part_of[segment.shard] for worker in range(WORKERS)
                    for segment in dataset.segments(worker, WORKERS)}
        reads = {line.split()[1] for line in opened.read_text().split("\n")[:-1]}
        assert reads == expected | {f"selections/{name}" for name in expected} and len(expected) < len(SHARDS)
        made_with = ShardDataset(url, seed=5, rank=rank, world_size=RANKS, selection=version)
        made_with.set_epoch(1)
        assert got == [key for _, _, key in DataLoader(made_with, batch_size=None, num_workers=WORKERS)]
        assert len(got) == len(dataset) == len(made_with)
        restricted += got
        dataset.restrict(None)
        dataset.set_epoch(2)
        unrestricted += [key for _, _, key in loader]
    assert sorted(restricted) == kept and sorted(unrestricted) == sorted(truth)  # each exactly once


def test_restricting_to_a_version_beyond_the_readers_own_selection_is_an_error(ray_local, tmp_path):
    url = str(tmp_path / "ds")
    write_direct_dataset(url, SHARDS)
    first, other = (random_half(url, seed, workers=1)[0] for seed in (1, 2))
    dataset = ShardDataset(url, seed=5, selection=first)
    dataset.restrict(first)  # a version within its own selection (here: the same one) reads as that
    assert sorted(key for _, _, key in dataset) == sorted(key for _, _, key in ShardDataset(url, selection=first))
    dataset.restrict(other)
    with pytest.raises(DatasetError, match="not usable examples"):
        list(dataset)


def test_resume_mid_epoch_over_ranks_and_workers(tmp_path):
    url = str(tmp_path / "ds")
    write_direct_dataset(url, SHARDS)
    for rank in range(RANKS):
        dataset = ShardDataset(url, seed=1, rank=rank, world_size=RANKS, batch_size=4)
        dataset.set_epoch(2)
        whole = [list(keys) for *_, keys in DataLoader(dataset, batch_size=None, num_workers=WORKERS)]
        dataset.set_epoch(2, start_batch=3)
        resumed = [list(keys) for *_, keys in DataLoader(dataset, batch_size=None, num_workers=WORKERS)]
        assert resumed == whole[3:] and len(whole) > 4


def test_a_missing_or_changed_part_is_named(tmp_path):
    url = str(tmp_path / "ds")
    write_direct_dataset(url, SHARDS)
    dataset = ShardDataset(url, shuffle=False)
    first = part_of_shard(url)[dataset.segments()[0].shard]
    path = tmp_path / "ds" / "index" / first
    data = path.read_bytes()
    path.unlink()
    with pytest.raises(DatasetDamaged, match=rf"ds/index/{first}: missing \(the manifest lists it"):
        next(iter(ShardDataset(url, shuffle=False)))
    path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with pytest.raises(DatasetDamaged, match=rf"ds/index/{first}: sha256 .* does not match the manifest"):
        next(iter(ShardDataset(url, shuffle=False)))
    with pytest.raises(DatasetDamaged, match=rf"index/{first}"):
        read_index(location(url))


def samples(url: str) -> list[tuple]:
    out = []
    for rank in range(RANKS):
        dataset = ShardDataset(url, seed=2, rank=rank, world_size=RANKS)
        dataset.set_epoch(1)
        out += [(key, label, image.sum().item()) for image, label, key in dataset]
    return out


def test_an_earlier_single_file_index_reads_and_is_upgraded(tmp_path):
    url, old = str(tmp_path / "ds"), tmp_path / "old"
    write_direct_dataset(url, SHARDS)
    shutil.copytree(url, old)
    as_single_file_index(str(old))
    assert not (old / "index").exists() and (old / "index.parquet").exists()
    assert samples(str(old)) == samples(url)
    assert read_index(location(str(old))).equals(read_index(location(url)))
    assert onion("inspect", old).returncode == 0

    result = onion("upgrade", old)
    assert result.returncode == 0, result.stderr
    assert f"rewrote its index as {len(SHARDS)} index parts, {sum(SHARDS)} rows" in result.stdout
    assert not (old / "index.parquet").exists()
    manifest = json.loads((old / "manifest.json").read_text())
    assert manifest["index"]["layout"] == "parts" and manifest["upgraded_from"]["index"]["name"] == "index.parquet"
    assert {name: data for name, data in files_of(old).items() if name.startswith("index/")} == {
        name: data for name, data in files_of(Path(url)).items() if name.startswith("index/")}
    assert samples(str(old)) == samples(url)
    again = onion("upgrade", old)
    assert again.returncode == 0 and "already in this onion's format" in again.stdout


def test_ingest_tasks_write_one_part_per_planned_shard_and_the_manifest_sums_them(ray_local, tmp_path):
    rng = np.random.default_rng(3)
    for cls in ("a", "b"):
        (tmp_path / "f" / cls).mkdir(parents=True)
        for i in range(7):
            (tmp_path / "f" / cls / f"{i}.png").write_bytes(png_bytes(random_pixels(rng, 8)))
    (tmp_path / "f" / "b" / "broken.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "f" / "b" / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    ingest(open_source(f"imagefolder:{tmp_path / 'f'}", SourceOptions(val_fraction=0.25)), str(out),
           IngestOptions(shard_size=3), command=["test"], progress=False)
    manifest = read_manifest(location(str(out)))
    parts = index_parts(manifest)
    shards_written = {entry["name"] for entry in manifest["shards"]}
    # a part for every planned shard, named after it, even one whose inputs were all quarantined
    assert [part.name for part in parts] == sorted(p.name for p in (out / "index").iterdir())
    assert {shard for part in parts for shard in part.shards} == shards_written
    assert all(part.name == f"{shard.removesuffix('.tar')}.parquet" for part in parts for shard in part.shards)
    whole = read_index(location(str(out)))
    assert manifest["counts"] == count_rows(whole)  # the driver summed the parts' counts, never read the rows
    assert sum(part.rows for part in parts) == manifest["index"]["rows"] == len(whole) == 16
    assert manifest["accounting"] == {"inputs": 16, "ok": 14, "quarantined": 2}
    for part in parts:  # each part's usable examples per shard and split, as the reader cuts epochs by
        rows = pq.read_table(out / "index" / part.name).to_pylist()
        usable = Counter((row["shard"], row["split"]) for row in rows if row["status"] == "ok")
        assert {(shard, split): n for shard, splits in part.examples.items() for split, n in splits.items()} == usable
    assert whole["key"].to_pylist() == sorted(whole["key"].to_pylist())


def test_ingesting_again_onto_an_earlier_single_file_index_says_to_upgrade(ray_local, tmp_path):
    out = tmp_path / "d"
    options = IngestOptions(shard_size=600)
    ingest(open_source("digits"), str(out), options, command=["test"], progress=False)
    as_single_file_index(str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["fingerprint"] = "an earlier onion's"  # its fingerprint did not cover the index layout
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"its index is an earlier onion's single index.parquet \(onion upgrade"):
        ingest(open_source("digits"), str(out), options, command=["test"], progress=False)
