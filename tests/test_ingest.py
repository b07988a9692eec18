import json
import os
import pickle

import numpy as np
import pytest

from helpers import files_of, png_bytes, random_pixels
from pipeline.ingest.job import IngestOptions, ingest
from pipeline.ingest.sources import SourceError, SourceOptions, open_source
from shards import DatasetError, ShardDataset, location, read_index, read_manifest


def run_ingest(spec, out, *, source_options=None, **options):
    source = open_source(spec, source_options or SourceOptions())
    return ingest(source, str(out), IngestOptions(**options), command=["test"], progress=False)


def test_digits_ingest_accounts_for_every_input(ray_local, tmp_path):
    report = run_ingest("digits", tmp_path / "d", shard_size=300)
    manifest = read_manifest(location(str(tmp_path / "d")))
    assert manifest["accounting"] == {"inputs": 1797, "ok": 1797, "quarantined": 0}
    assert manifest["counts"]["by_split"]["train"] + manifest["counts"]["by_split"]["val"] == 1797
    assert 0.15 < manifest["counts"]["by_split"]["val"] / 1797 < 0.25
    assert sum(s["examples"] for s in manifest["shards"]) == 1797
    assert max(s["examples"] for s in manifest["shards"]) <= 300
    assert not (tmp_path / "d" / "_parts").exists() and not report.already_complete
    train = ShardDataset(str(tmp_path / "d"), "train")
    image, label, key = next(iter(train))
    assert image.shape == (1, 8, 8) and key.startswith("digits-")
    assert len(list(train)) == manifest["counts"]["by_split"]["train"]


def test_same_input_gives_byte_identical_output(ray_local, tmp_path):
    options = dict(shard_size=40, seed=3)
    source = SourceOptions(count=200, image_size=16)
    run_ingest("synthetic", tmp_path / "a", source_options=source, **options)
    run_ingest("synthetic", tmp_path / "b", source_options=source, **options)
    first, second = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    assert len([n for n in first if n.endswith(".tar")]) >= 5
    assert first == second
    again = run_ingest("synthetic", tmp_path / "a", source_options=source, **options)
    assert again.already_complete and files_of(tmp_path / "a") == first


def test_output_holding_a_different_dataset_is_refused(ray_local, tmp_path):
    run_ingest("synthetic", tmp_path / "a", source_options=SourceOptions(count=30), shard_size=10)
    with pytest.raises(DatasetError, match=r"already holds synthetic ingested with other settings "
                                           r"\(source.count 30 -> 31\): it is usable as it is"):
        run_ingest("synthetic", tmp_path / "a", source_options=SourceOptions(count=31), shard_size=10)
    with pytest.raises(DatasetError, match=r"already holds a different dataset \(synthetic\)"):
        run_ingest("digits", tmp_path / "a")
    # written by an earlier onion, whose manifest did not record today's settings: each is named
    manifest_path = tmp_path / "a" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["ingest"]["encode"]["resize_mode"]
    manifest["fingerprint"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"other settings \(encode.resize_mode '\(not recorded\)' -> 'none'\)"):
        run_ingest("synthetic", tmp_path / "a", source_options=SourceOptions(count=30), shard_size=10)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="is not empty and is not an onion dataset"):
        run_ingest("digits", tmp_path / "other")
    with pytest.raises(DatasetError, match="memory:// lives inside one process"):
        run_ingest("digits", "memory://somewhere")


def test_synthetic_plants_marked_redundancy(ray_local, tmp_path):
    planting = SourceOptions(count=600, dup_rate=0.1, near_dup_rate=0.1, flip_rate=0.1)
    run_ingest("synthetic", tmp_path / "s", source_options=planting, shard_size=200)
    index = read_index(location(str(tmp_path / "s")))
    rows = {r["key"]: r for r in index.to_pylist()}
    planted = [r for r in rows.values() if r["planted"]]
    kinds = {kind: [r for r in planted if r["planted"].startswith(kind)]
             for kind in ("dup-of:", "near-dup-of:", "label-flip")}
    assert all(30 <= len(v) <= 80 for v in kinds.values()), {k: len(v) for k, v in kinds.items()}
    assert all(r["split"] == "train" for r in planted)
    for row in kinds["dup-of:"]:
        origin = rows[row["planted"].split(":", 1)[1]]
        assert origin["planted"] is None and origin["split"] == "train"
        assert row["sha256"] == origin["sha256"] and row["label"] == origin["label"]
    for row in kinds["near-dup-of:"]:
        origin = rows[row["planted"].split(":", 1)[1]]
        assert row["sha256"] != origin["sha256"] and row["label"] == origin["label"]
    for row in kinds["label-flip"][:10]:
        shard = location(str(tmp_path / "s"))
        metadata = json.loads(shard.read_range(row["shard"], row["json_offset"], row["json_offset"] + row["json_size"]))
        assert metadata["clean_label"] != row["label"] and metadata["planted"] == "label-flip"


def test_imagefolder_with_split_folders_and_reshard(ray_local, tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 6), ("val", 3)):
        for cls in ("a", "b"):
            (tmp_path / "f" / split / cls).mkdir(parents=True)
            for i in range(n):
                (tmp_path / "f" / split / cls / f"{i}.png").write_bytes(png_bytes(random_pixels(rng, 8)))
    (tmp_path / "f" / "val" / "b" / "broken.png").write_bytes(b"\x89PNG broken")
    run_ingest(f"imagefolder:{tmp_path / 'f'}", tmp_path / "one", shard_size=100)
    first = read_manifest(location(str(tmp_path / "one")))
    assert first["counts"]["by_split_status"] == {"train/ok": 12, "val/ok": 6, "val/quarantined": 1}
    run_ingest(str(tmp_path / "one"), tmp_path / "two", shard_size=5)
    second = read_manifest(location(str(tmp_path / "two")))
    assert second["counts"] == first["counts"] and len(second["shards"]) == 5
    old, new = (read_index(location(str(tmp_path / d))).to_pylist() for d in ("one", "two"))
    keep = ("key", "label", "split", "status", "reason", "sha256", "source_ref")
    assert [{k: r[k] for k in keep} for r in old] == [{k: r[k] for k in keep} for r in new]


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/onion-pwned",))


def test_cifar_python_binary_and_malicious_pickle(ray_local, tmp_path):
    rng = np.random.default_rng(2)
    py = tmp_path / "cifar" / "cifar-10-batches-py"
    py.mkdir(parents=True)
    data = rng.integers(0, 256, size=(7, 3072), dtype=np.uint8)
    (py / "data_batch_1").write_bytes(pickle.dumps({b"data": data, b"labels": [0, 1, 2, 3, 4, 5, 6]}))
    (py / "test_batch").write_bytes(pickle.dumps({b"data": data[:3], b"labels": [9, 8, 7]}))
    (py / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    (py / "data_batch_2").write_bytes(pickle.dumps({b"data": RunsCode(), b"labels": [1]}))
    if os.path.exists("/tmp/onion-pwned"):
        os.remove("/tmp/onion-pwned")
    run_ingest(f"cifar:{tmp_path / 'cifar'}", tmp_path / "out")
    assert not os.path.exists("/tmp/onion-pwned")
    index = read_index(location(str(tmp_path / "out")))
    rows = {r["key"]: r for r in index.to_pylist()}
    refused = rows["cifar-cifar-10-batches-py_data_batch_2"]
    assert refused["status"] == "quarantined" and "refused to load global posix.system" in refused["reason"]
    assert rows["cifar-cifar-10-batches-py_data_batch_1-00003"]["class_name"] == "c3"
    image = ShardDataset(str(tmp_path / "out"), "val", shuffle=False)
    decoded = {key: img for img, _, key in image}
    first_val = decoded["cifar-cifar-10-batches-py_test_batch-00000"]
    assert np.array_equal(first_val.numpy(), data[0].reshape(3, 32, 32))

    binary = tmp_path / "bin" / "cifar-100-binary"
    binary.mkdir(parents=True)
    records = np.concatenate([np.array([[1, 42], [3, 99]], dtype=np.uint8), data[:2]], axis=1)
    (binary / "train.bin").write_bytes(records.tobytes())
    (binary / "test.bin").write_bytes(b"\x00" * 100)  # not a whole record
    run_ingest(f"cifar:{tmp_path / 'bin'}", tmp_path / "out100")
    rows = read_index(location(str(tmp_path / "out100"))).to_pylist()
    assert sorted(r["label"] for r in rows if r["status"] == "ok") == [42, 99]
    assert [r["reason"] for r in rows if r["status"] != "ok"] == [
        "not a usable CIFAR batch: 100 bytes is not a whole number of 3074-byte records"]


def test_unknown_and_missing_sources_are_named():
    with pytest.raises(SourceError, match="unknown source 'nosuch'"):
        open_source("nosuch")
    with pytest.raises(SourceError, match="'/does/not/exist' is not a directory"):
        open_source("imagefolder:/does/not/exist")
    with pytest.raises(SourceError, match="needs a location"):
        open_source("cifar")
