"""Stored as the source was, unless asked otherwise (issue 31): a PNG, JPEG or WebP input is stored
byte for byte; a file that needs a change is re-encoded in its own format; ``--resize-mode`` /
``--max-side`` downscale (never upscale) and the index keeps each input's original size."""
import hashlib
import io
import json
import shutil
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from helpers import as_single_file_index, files_of, onion
from photos import KINDS, crops, photo_bytes, photo_folder, sample_photos
from pipeline.ingest.encode import EncodeOptions
from pipeline.ingest.job import IngestOptions, ingest
from pipeline.ingest.sources import SourceOptions, open_source
from shards import DatasetError, location, read_example, read_index, read_manifest
from shards.decode import decode_pixels

SIDE = 96
KEPT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
STRIPS = {"train/china/strip-wide.png": (400, 1), "train/flower/strip-tall.jpg": (3, 400)}  # (width, height)


def run_ingest(folder, out, **encode):
    return ingest(open_source(f"imagefolder:{folder}", SourceOptions()), str(out),
                  IngestOptions(shard_size=8, encode=EncodeOptions(**encode)), command=["test"], progress=False)


def kind_of(name):
    """(mode, kind) photos.photo_folder saved ``<class>-<number>.<ext>`` as."""
    return KINDS[int(name.rsplit("-", 1)[1].split(".")[0]) % len(KINDS)]


def upright_size(data):
    with Image.open(io.BytesIO(data)) as image:
        turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
        return image.size[::-1] if turned else image.size


def stored(out, row):
    data = read_example(str(out), row["key"]).image
    assert hashlib.sha256(data).hexdigest() == row["sha256"]
    image = Image.open(io.BytesIO(data))
    assert image.size == (row["width"], row["height"]) and image.mode in ("L", "RGB")
    return data, image


def looks_like(image, data, mode):
    """Whether ``image`` is the source file ``data`` upright and resized by ``mode`` with plain Pillow
    (a full-size decode, no JPEG draft), give or take re-encoding (mean difference under 6 grey levels)."""
    with Image.open(io.BytesIO(data)) as source:
        upright = ImageOps.exif_transpose(source)
        upright = (upright.convert("RGBA") if upright.mode == "P" else upright).convert("RGB")
    if mode == "center-crop":  # the centre square, or the centre of the long side when the short one is <= SIDE
        cut = (min(upright.size),) * 2 if min(upright.size) > SIDE else image.size
        left, top = (upright.width - cut[0]) // 2, (upright.height - cut[1]) // 2
        upright = upright.crop((left, top, left + cut[0], top + cut[1]))
    reference = np.asarray(upright.resize(image.size, Image.Resampling.LANCZOS), dtype=np.float32)
    return np.abs(np.asarray(image.convert("RGB"), dtype=np.float32) - reference).mean() < 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Real photo crops of every kind (tests/photos.py) plus two thin strips; {relative path: bytes}."""
    root = tmp_path_factory.mktemp("formats") / "folder"
    files = photo_folder(root, {"train": 9, "val": 2}, min_side=40)
    pixels = sample_photos()["china"]
    for name, (width, height) in STRIPS.items():
        data = photo_bytes(pixels[:height, :width], "RGB", "PNG" if name.endswith("png") else "JPEG")
        (root / name).write_bytes(data)
        files[name] = data
    return root, files


@pytest.fixture(scope="module")
def default_ingest(ray_local, folder, tmp_path_factory):
    root, _ = folder
    out = tmp_path_factory.mktemp("default") / "data"
    run_ingest(root, out)
    return out, {row["source_ref"]: row for row in read_index(location(str(out))).to_pylist()}


def test_plain_png_jpeg_and_webp_are_stored_byte_for_byte(folder, default_ingest):
    _, files = folder
    out, rows = default_ingest
    kept = 0
    for name, data in files.items():
        row = rows[name]
        assert row["status"] == "ok", row
        assert (row["original_width"], row["original_height"]) == (row["width"], row["height"]) == upright_size(data)
        if name in STRIPS:
            continue
        mode, kind = kind_of(name)
        if mode in ("RGB", "L") and kind in KEPT_EXT:
            assert row["image_ext"] == KEPT_EXT[kind] and row["sha256"] == hashlib.sha256(data).hexdigest(), name
            assert stored(out, row)[0] == data
            kept += 1
    assert kept >= 10


def test_files_that_need_a_change_are_re_encoded_in_their_own_format(folder, default_ingest):
    _, files = folder
    out, rows = default_ingest
    seen = set()
    for name, data in files.items():
        if name in STRIPS:
            continue
        mode, kind = kind_of(name)
        if mode in ("RGB", "L") and kind in KEPT_EXT:
            continue
        row = rows[name]
        _, image = stored(out, row)
        assert row["sha256"] != hashlib.sha256(data).hexdigest(), name
        expected = {"CMYK": ("jpg", "JPEG"), "RGB": ("jpg", "JPEG"), "RGBA": ("png", "PNG"), "P": ("png", "PNG")}
        assert (row["image_ext"], image.format) == expected[mode], name
        assert image.mode == "RGB"
        seen.add((mode, kind))
        if kind == "JPEG-rotated":  # upright: close to the photo as it was cropped, far from it lying on its side
            with Image.open(io.BytesIO(data)) as sideways:
                raw = np.asarray(sideways.convert("RGB"), dtype=np.float32)
            upright = np.rot90(raw, k=-1)  # orientation 6: turn clockwise to display
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
            assert pixels.shape == upright.shape != raw.shape
            assert np.abs(pixels - upright).mean() < 6, name
    assert seen == {("CMYK", "JPEG"), ("RGB", "JPEG-rotated"), ("RGBA", "PNG"), ("P", "PNG")}


def test_shards_of_plain_jpegs_are_no_larger_than_the_files(ray_local, tmp_path):
    rng = np.random.default_rng(5)
    total, count = 0, 0
    for name, photo in sample_photos().items():
        (tmp_path / "jpegs" / name).mkdir(parents=True)
        for number, (top, left, height, width) in enumerate(crops(12, rng, 64, 427)):
            data = photo_bytes(photo[top:top + height, left:left + width], "RGB", "JPEG")
            (tmp_path / "jpegs" / name / f"{number:02d}.jpg").write_bytes(data)
            total, count = total + len(data), count + 1
    run_ingest(tmp_path / "jpegs", tmp_path / "out")
    manifest = read_manifest(location(str(tmp_path / "out")))
    shard_bytes = sum(shard["bytes"] for shard in manifest["shards"])
    # tar overhead: per example 3 headers of 512 bytes, the image padded to 512, cls and json members
    # (each under 512 bytes) padded to 512; per shard the end blocks padded to tar's 10240-byte record
    overhead = count * (3 * 512 + 511 + 2 * 512) + len(manifest["shards"]) * tarfile.RECORDSIZE
    assert total < shard_bytes <= total + overhead, (total, shard_bytes, overhead)
    index = read_index(location(str(tmp_path / "out")))
    assert set(index["image_ext"].to_pylist()) == {"jpg"}


@pytest.mark.parametrize("mode", ["max-side", "center-crop"])
def test_resize_modes_sizes_aspect_and_original_columns(ray_local, folder, tmp_path, mode):
    root, files = folder
    run_ingest(root, tmp_path / "a", resize_mode=mode, max_side=SIDE)
    run_ingest(root, tmp_path / "b", resize_mode=mode, max_side=SIDE)
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")  # byte-identical reruns
    manifest = read_manifest(location(str(tmp_path / "a")))
    assert manifest["ingest"]["encode"]["resize_mode"] == mode and manifest["ingest"]["encode"]["max_side"] == SIDE
    rows = {row["source_ref"]: row for row in read_index(location(str(tmp_path / "a"))).to_pylist()}
    assert len(rows) == len(files) and all(row["status"] == "ok" for row in rows.values())
    resized = untouched = 0
    for name, data in files.items():
        row = rows[name]
        width, height = upright_size(data)
        assert (row["original_width"], row["original_height"]) == (width, height), name
        stored(tmp_path / "a", row)
        out_w, out_h = row["width"], row["height"]
        assert out_w <= width and out_h <= height, name  # never upscaled
        if mode == "max-side":
            longer = max(width, height)
            if longer <= SIDE:
                assert (out_w, out_h) == (width, height), name
            else:
                assert max(out_w, out_h) == SIDE, name
                assert abs(out_w - width * SIDE / longer) <= 1 and abs(out_h - height * SIDE / longer) <= 1, name
        else:
            shorter = min(width, height)
            expected = (SIDE, SIDE) if shorter > SIDE else (min(width, SIDE), min(height, SIDE))
            assert (out_w, out_h) == expected, name
        if (out_w, out_h) == (width, height):
            untouched += 1
            plain = name in STRIPS or (kind_of(name)[0] in ("RGB", "L") and kind_of(name)[1] in KEPT_EXT)
            if plain:  # within the limit: stored as it came
                assert row["sha256"] == hashlib.sha256(data).hexdigest(), name
        else:
            resized += 1
            assert row["image_ext"] == name.rsplit(".", 1)[1], name  # re-encoded in its own format
            assert looks_like(stored(tmp_path / "a", row)[1], data, mode), name
    assert resized >= 10 and untouched >= 1
    wide, tall = rows["train/china/strip-wide.png"], rows["train/flower/strip-tall.jpg"]
    # thin strips are stored, never quarantined: max-side keeps at least one pixel across (3 * 96 / 400
    # rounds to 1); center-crop does not upscale the short side and keeps the centre SIDE of the long one
    assert (wide["width"], wide["height"]) == (SIDE, 1)
    assert (tall["width"], tall["height"]) == ((1, SIDE) if mode == "max-side" else (3, SIDE))

    with pytest.raises(DatasetError, match=rf"ingested with other settings \(encode.max_side {SIDE} -> {SIDE + 1}\)"):
        run_ingest(root, tmp_path / "a", resize_mode=mode, max_side=SIDE + 1)


def test_reshard_keeps_original_sizes_and_old_indexes_read(ray_local, folder, tmp_path):
    root, _ = folder
    run_ingest(root, tmp_path / "small", resize_mode="max-side", max_side=SIDE)
    ingest(open_source(str(tmp_path / "small")), str(tmp_path / "again"), IngestOptions(shard_size=5),
           command=["test"], progress=False)
    columns = ["key", "sha256", "width", "height", "original_width", "original_height"]
    first, second = (read_index(location(str(tmp_path / d)), columns=columns).to_pylist() for d in ("small", "again"))
    assert first == second  # bytes kept, and the original size is the first ingest's, not the stored one

    old = tmp_path / "old"
    shutil.copytree(tmp_path / "small", old)
    as_single_file_index(str(old))  # an earlier onion's layout, without the columns added since
    table = pq.read_table(old / "index.parquet").drop_columns(["original_width", "original_height"])
    pq.write_table(table, old / "index.parquet")
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["index"]["sha256"] = hashlib.sha256((old / "index.parquet").read_bytes()).hexdigest()
    (old / "manifest.json").write_text(json.dumps(manifest))
    index = read_index(location(str(old)), columns=["key", "original_width"])
    assert index.column_names == ["key", "original_width"] and index["original_width"].null_count == len(index)
    whole = read_index(location(str(old)))
    assert whole.column_names == read_index(location(str(tmp_path / "small"))).column_names
    ingest(open_source(str(old)), str(tmp_path / "from-old"), IngestOptions(), command=["test"], progress=False)
    rows = read_index(location(str(tmp_path / "from-old")), columns=columns).to_pylist()
    assert [(r["width"], r["height"]) for r in rows] == [(r["original_width"], r["original_height"]) for r in rows]


def test_pixel_arrays_resize_too(ray_local, tmp_path):
    ingest(open_source("synthetic", SourceOptions(count=20, image_size=32)), str(tmp_path / "s"),
           IngestOptions(encode=EncodeOptions(resize_mode="center-crop", max_side=16)), command=["test"],
           progress=False)
    rows = read_index(location(str(tmp_path / "s"))).to_pylist()
    assert {(r["image_ext"], r["width"], r["height"], r["original_width"], r["original_height"]) for r in rows} == {
        ("png", 16, 16, 32, 32)}
    metadata = json.loads(location(str(tmp_path / "s")).read_range(
        rows[0]["shard"], rows[0]["json_offset"], rows[0]["json_offset"] + rows[0]["json_size"]))
    assert (metadata["width"], metadata["original_width"]) == (16, 32)
    assert decode_pixels(read_example(str(tmp_path / "s"), rows[0]["key"]).image).shape[:2] == (16, 16)


@pytest.mark.parametrize("args, message", [
    (["--resize-mode", "center-crop"], "--resize-mode center-crop needs --max-side"),
    (["--resize-mode", "max-side"], "--resize-mode max-side needs --max-side"),
    (["--max-side", "0"], "argument --max-side: must be at least 1, not 0"),
    (["--resize-mode", "none", "--max-side", "64"], "--max-side has no effect with --resize-mode none"),
    (["--image-format", "webp"], "argument --image-format: invalid choice"),
])
def test_resize_usage_errors_exit_2_naming_the_option(tmp_path, args, message):
    (tmp_path / "in" / "a").mkdir(parents=True)
    result = onion("ingest", f"imagefolder:{tmp_path / 'in'}", tmp_path / "out", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_help_explains_formats_and_resizing():
    result = onion("ingest", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for words in ("--image-format {auto,png,jpg}", "--resize-mode {none,max-side,center-crop}", "--max-side N",
                  "byte for byte", "Never upscales", "original_width"):
        assert words in text, words
