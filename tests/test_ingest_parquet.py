"""``parquet:URL_OR_GLOB`` and ``hf:DIR``: image tables as an ingest source. Image bytes come from a binary
column or datasets' ``{bytes, path}`` struct and are stored byte for byte; labels from integers, strings or
datasets' ClassLabel names; splits from file names or a column; bad rows are quarantined with their reason;
the driver reads no image column; the output is deterministic and trains."""
import hashlib
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import files_of, onion, onion_ok, png_bytes
from photos import crops, photo_bytes, sample_photos
from pipeline.ingest.job import WAVE_BYTES, IngestOptions, ingest, plan_shards, plan_waves
from pipeline.ingest.sources import SourceError, SourceOptions, open_source
from shards import location, read_example, read_index, read_manifest

CLASSES = ["china", "flower"]
TINY = ("--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--epochs", "1", "--batch-size", "64",
        "--loader-workers", "0")


def jpegs(count, seed=0):
    """(label, JPEG bytes) of ``count`` small crops of the two photos, RGB and grey (both stored as they came)."""
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    out = []
    for number, (top, left, height, width) in enumerate(crops(count, rng, 16, 48)):
        label = number % 2
        pixels = photos[CLASSES[label]][top:top + height, left:left + width]
        out.append((label, photo_bytes(pixels, "RGB" if number % 3 else "L", "JPEG")))
    return out


def hf_metadata(features):
    """The schema metadata that Hugging Face datasets writes (to_parquet, save_to_disk)."""
    return {"huggingface": json.dumps({"info": {"features": features}})}


HF_FEATURES = {"image": {"decode": True, "id": None, "_type": "Image"},
               "label": {"names": CLASSES, "id": None, "_type": "ClassLabel"}}


def image_structs(images):
    return pa.array([None if data is None else {"bytes": data, "path": f"photo-{i}.jpg"}
                     for i, data in enumerate(images)],
                    pa.struct([("bytes", pa.binary()), ("path", pa.string())]))


def hf_table(examples):
    table = pa.table({"image": image_structs([data for _, data in examples]),
                      "label": pa.array([label for label, _ in examples], pa.int64())})
    return table.replace_schema_metadata(hf_metadata(HF_FEATURES))


def run(spec, out, shard_size=5, **options):
    return ingest(open_source(spec, SourceOptions(**options)), str(out), IngestOptions(shard_size=shard_size),
                  command=["test"], progress=False)


def index_of(out):
    return {row["source_ref"]: row for row in read_index(location(str(out))).to_pylist()}


def assert_stored_as_given(out, row, data):
    assert row["status"] == "ok", row
    assert row["sha256"] == hashlib.sha256(data).hexdigest() and row["image_ext"] == "jpg"
    assert read_example(str(out), row["key"]).image == data


def test_hf_struct_column_with_classlabel_names_split_by_file_name(ray_local, tmp_path):
    examples = jpegs(23)
    files = {"train-00000-of-00002.parquet": examples[:9], "train-00001-of-00002.parquet": examples[9:17],
             "validation-00000-of-00001.parquet": examples[17:]}
    for name, part in files.items():  # several files, several row groups (of 4 rows; the last one short)
        pq.write_table(hf_table(part), tmp_path / name, row_group_size=4)
    report = run(f"parquet:{tmp_path}", tmp_path / "out")
    assert report.manifest["class_names"] == CLASSES
    assert report.manifest["accounting"] == {"inputs": 23, "ok": 23, "quarantined": 0}
    rows = index_of(tmp_path / "out")
    assert len(rows) == 23  # every row once
    for name, part in files.items():
        for number, (label, data) in enumerate(part):
            row = rows[f"{name}[{number}]"]
            assert row["key"] == f"{name.removesuffix('.parquet')}-{number:06d}"
            assert (row["label"], row["class_name"]) == (label, CLASSES[label])
            assert row["split"] == ("val" if name.startswith("validation") else "train")
            assert_stored_as_given(tmp_path / "out", row, data)


def test_binary_column_string_labels_split_and_key_columns(ray_local, tmp_path):
    examples = jpegs(12, seed=1)
    parts = ["train", "val", "test", "validation"] * 3
    pq.write_table(pa.table({
        "id": [f"img.{i}" for i in range(12)],
        "png": pa.array([data for _, data in examples], pa.large_binary()),
        "kind": pa.array([CLASSES[label] for label, _ in examples]).dictionary_encode(),
        "part": parts,
    }), tmp_path / "photos.parquet", row_group_size=5)
    spec = f"parquet:{tmp_path / '*.parquet'}"
    options = {"image_column": "png", "label_column": "kind", "split_column": "part", "key_column": "id"}
    rows = index_of(run(spec, tmp_path / "sorted", **options).url)
    for number, (label, data) in enumerate(examples):
        row = rows[f"photos.parquet[{number}]"]
        assert row["key"] == f"img_{number}" and row["split"] == ("train" if number % 4 == 0 else "val")
        assert (row["label"], row["class_name"]) == (label, CLASSES[label])  # strings map to their sorted names
        assert_stored_as_given(tmp_path / "sorted", row, data)
    reversed_names = run(spec, tmp_path / "named", class_names=("flower", "china"), **options)
    assert reversed_names.manifest["class_names"] == ["flower", "china"]
    named = index_of(reversed_names.url)
    assert all(named[f"photos.parquet[{n}]"]["label"] == 1 - label for n, (label, _) in enumerate(examples))


def test_bad_rows_are_quarantined_with_their_reasons(ray_local, tmp_path):
    (_, good), (_, other) = jpegs(2, seed=2)
    rows = [  # (image struct or None, label, expected reason)
        ({"bytes": good, "path": "a.jpg"}, 0, None),
        (None, 1, "no image (null in column 'image')"),
        ({"bytes": None, "path": "beside.jpg"}, 1, "no image bytes in column 'image', only a path"),
        ({"bytes": b"these are not image bytes", "path": "b.jpg"}, 0, "not an image (no known image format)"),
        ({"bytes": b"", "path": "c.jpg"}, 0, "empty file (0 bytes)"),
        ({"bytes": good[:len(good) // 2], "path": "d.jpg"}, 0, "truncated or corrupt image data"),
        ({"bytes": other, "path": "e.jpg"}, None, "no label (null in column 'label')"),
        ({"bytes": other, "path": "f.jpg"}, 2, "label 2 outside the 2 classes"),
        ({"bytes": other, "path": "g.jpg"}, -1, "label -1 outside the 2 classes"),
        ({"bytes": other, "path": "h.jpg"}, 1, None),
    ]
    table = pa.table({"image": pa.array([image for image, _, _ in rows],
                                        pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "label": pa.array([label for _, label, _ in rows], pa.int64())})
    pq.write_table(table.replace_schema_metadata(hf_metadata(HF_FEATURES)), tmp_path / "mixed.parquet",
                   row_group_size=3)
    report = run(f"parquet:{tmp_path / 'mixed.parquet'}", tmp_path / "out", shard_size=4)
    accounting = report.manifest["accounting"]
    assert accounting == {"inputs": 10, "ok": 2, "quarantined": 8}
    index = index_of(tmp_path / "out")
    for number, (_, label, reason) in enumerate(rows):
        row = index[f"mixed.parquet[{number}]"]
        assert row["label"] == label
        if reason is None:
            assert row["status"] == "ok" and row["reason"] is None
        else:
            assert row["status"] == "quarantined" and row["reason"].startswith(reason), row


def test_same_command_twice_gives_identical_bytes(ray_local, tmp_path):
    examples = jpegs(15, seed=3)
    pq.write_table(hf_table(examples[:8]), tmp_path / "a.parquet", row_group_size=3)
    pq.write_table(hf_table(examples[8:]), tmp_path / "b.parquet", row_group_size=3)
    for out in ("first", "second"):
        run(f"parquet:{tmp_path / '?.parquet'}", tmp_path / out, shard_size=4, val_fraction=0.3)
    first, second = files_of(tmp_path / "first"), files_of(tmp_path / "second")
    assert first == second and len([name for name in first if name.endswith(".tar")]) >= 3
    assert {row["split"] for row in index_of(tmp_path / "first").values()} == {"train", "val"}


def corrupt_image_chunk(path, group):
    """Overwrite the stored bytes of ``group``'s image column with zeros: only a reader of that column notices."""
    chunks = pq.ParquetFile(path).metadata.row_group(group)
    data = bytearray(path.read_bytes())
    for chunk in map(chunks.column, range(chunks.num_columns)):
        if chunk.path_in_schema.startswith("image"):
            start = chunk.dictionary_page_offset or chunk.data_page_offset
            data[start:start + chunk.total_compressed_size] = bytes(chunk.total_compressed_size)
    path.write_bytes(bytes(data))


def test_the_driver_never_reads_the_image_column(tmp_path):
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(hf_table(jpegs(9, seed=4)), path, row_group_size=3)
    corrupt_image_chunk(path, 1)
    with pytest.raises(OSError, match="thrift"):
        pq.read_table(path)  # any reader of the image column fails
    source = open_source(f"parquet:{path}")
    records = source.records()  # planning reads footers, labels and splits: the damage goes unseen
    assert [r.source_ref for r in records] == [f"{path.name}[{n}]" for n in range(9)]
    assert not any(r.quarantine for r in records) and source.class_names == CLASSES
    assert [r.locator[1] for r in records] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    source.prefetch([r for r in records if r.locator[1] != 1])  # the other row groups read fine
    assert all(source.load(r) for r in records if r.locator[1] != 1)
    with pytest.raises(SourceError, match=r"train-00000-of-00001\.parquet: row group 1 unreadable"):
        source.load(records[4])  # the task's read is where the damage shows, naming file and row group


@pytest.mark.parametrize("setup, args, message", [
    (lambda d: pq.write_table(hf_table(jpegs(2)), d / "t.parquet"), ["--label-column", "target"],
     "t.parquet has no column 'target' (--label-column or --unlabelled; its columns: image, label)"),
    (lambda d: pq.write_table(hf_table(jpegs(2)), d / "t.parquet"), ["--image-column", "img"],
     "t.parquet has no column 'img' (--image-column"),
    (lambda d: pq.write_table(pa.table({"image": ["a.jpg"], "label": [0]}), d / "t.parquet"), [],
     "t.parquet: column 'image' holds string, not image bytes"),
    (lambda d: pq.write_table(pa.table({"image": [b"x"], "label": [0.5]}), d / "t.parquet"), [],
     "t.parquet: column 'label' holds double; labels must be integers or strings"),
    (lambda d: (d / "t.parquet").write_bytes(b"PAR1 cut short"), [],
     "t.parquet: not a readable Parquet file"),
    (lambda d: None, [], "no .parquet file under"),
], ids=["no label column", "no image column", "paths not bytes", "float labels", "truncated", "empty folder"])
def test_unusable_tables_are_one_line_naming_file_and_column(tmp_path, setup, args, message):
    folder = tmp_path / "table"
    folder.mkdir()
    setup(folder)
    result = onion("ingest", f"parquet:{folder}", tmp_path / "out", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert str(folder) in lines[0] and not (tmp_path / "out").exists()


def test_any_fsspec_url(tmp_path):
    """Remote files go through fsspec (here memory://, in-process): globbed, planned and loaded alike."""
    import fsspec

    examples = jpegs(6, seed=6)
    buffer = pa.BufferOutputStream()
    pq.write_table(hf_table(examples), buffer, row_group_size=4)
    fsspec.filesystem("memory").pipe_file("/bucket/table/train-00000-of-00001.parquet", buffer.getvalue().to_pybytes())
    source = open_source("parquet:memory://bucket/table/*.parquet")
    records = source.records()
    assert [(r.key, r.split, r.label) for r in records] == [
        (f"train-00000-of-00001-{n:06d}", "train", label) for n, (label, _) in enumerate(examples)]
    source.prefetch(records)
    assert [source.load(r) for r in records] == [data for _, data in examples]


def write_arrow_stream(path, table, batch_rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.ipc.new_stream(str(path), table.schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)


def save_to_disk(root, splits):
    """What DatasetDict.save_to_disk writes: dataset_dict.json, and per split state.json, dataset_info.json
    and data-NNNNN-of-NNNNN.arrow (Arrow IPC streams whose schema carries datasets' metadata)."""
    root.mkdir()
    (root / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    for split, examples in splits.items():
        name = "data-00000-of-00001.arrow"
        write_arrow_stream(root / split / name, hf_table(examples), batch_rows=4)
        (root / split / "state.json").write_text(json.dumps({
            "_data_files": [{"filename": name}], "_fingerprint": "0123456789abcdef", "_format_columns": None,
            "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": split}))
        (root / split / "dataset_info.json").write_text(json.dumps({"features": HF_FEATURES}))


def test_hf_saved_dataset_folder(ray_local, tmp_path):
    examples = jpegs(14, seed=5)
    save_to_disk(tmp_path / "saved", {"train": examples[:10], "test": examples[10:]})
    report = run(f"hf:{tmp_path / 'saved'}", tmp_path / "out")
    assert report.manifest["class_names"] == CLASSES and report.manifest["accounting"]["ok"] == 14
    rows = index_of(tmp_path / "out")
    for split, part in (("train", examples[:10]), ("test", examples[10:])):
        for number, (label, data) in enumerate(part):
            row = rows[f"{split}/data-00000-of-00001.arrow[{number}]"]
            assert row["key"] == f"{split}_data-00000-of-00001-{number:06d}"
            assert row["split"] == ("train" if split == "train" else "val") and row["label"] == label
            assert_stored_as_given(tmp_path / "out", row, data)
    with pytest.raises(SourceError, match="not a folder that datasets' save_to_disk wrote"):
        open_source(f"hf:{tmp_path}")


@pytest.mark.slow
def test_an_ingested_table_trains(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(digits.images * 16, 0, 255).astype(np.uint8)[:400]
    pq.write_table(pa.table({"image": [png_bytes(p) for p in pixels], "label": digits.target[:400]}),
                   tmp_path / "digits.parquet", row_group_size=100)
    out, run_folder = tmp_path / "data", tmp_path / "run"
    result = onion_ok("ingest", f"parquet:{tmp_path / 'digits.parquet'}", out, "--val-fraction", "0.2",
                      "--shard-size", "100", "--ray-cpus", "2")
    assert "inputs=400 ok=400 quarantined=0" in result.stdout
    manifest = read_manifest(location(str(out)))
    assert manifest["class_names"] == [str(d) for d in range(10)]
    onion_ok("train", out, "--out", run_folder, "--patch-size", "4", *TINY)
    assert list((run_folder / "checkpoints").glob("step-*"))


@pytest.mark.parametrize("shard_size, rows_per_group", [(40, 10), (7, 25)],
                         ids=["row groups smaller than shards", "row groups larger than shards"])
def test_each_row_group_is_read_by_one_task(ray_local, tmp_path, shard_size, rows_per_group):
    """A record shuffle would have every output shard read a share of nearly every row group (the whole
    table once per shard); units are planned whole, and a unit cut over shards is one task's."""
    examples = jpegs(100, seed=3)
    pq.write_table(hf_table(examples), tmp_path / "train.parquet", row_group_size=rows_per_group)
    source = open_source(f"parquet:{tmp_path}/train.parquet")
    records = source.records()
    plans = plan_shards(records, IngestOptions(shard_size=shard_size), source.locality)
    waves = plan_waves(plans, source.locality, WAVE_BYTES)
    readers = Counter(unit for wave in waves for unit in {source.locality(r) for plan in wave for r in plan.records})
    assert set(readers) == {(0, group) for group in range(100 // rows_per_group)}
    assert set(readers.values()) == {1}  # every row group read once, by one task
    assert all(len(plan.records) <= shard_size for plan in plans)
    assert sorted(r.key for plan in plans for r in plan.records) == sorted(r.key for r in records)
    if rows_per_group < shard_size:  # a shard mixes row groups drawn at random, not neighbours
        groups = [sorted({source.locality(r)[1] for r in plan.records}) for plan in plans]
        assert all(len(g) > 1 for g in groups[:-1]) and any(g != list(range(g[0], g[0] + len(g))) for g in groups)
    out = tmp_path / "out"
    report = run(f"parquet:{tmp_path}/train.parquet", out, shard_size=shard_size)
    assert report.manifest["accounting"] == {"inputs": 100, "ok": 100, "quarantined": 0}
    for (label, data), row in zip(examples, sorted(index_of(out).values(), key=lambda r: int(r["source_ref"][14:-1]))):
        assert row["label"] == label
        assert_stored_as_given(out, row, data)
