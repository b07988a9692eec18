"""The hostile-input catalogue: every kind of bad or odd file a user's ImageFolder may hold goes
through a real ingest, and each is either ingested correctly or quarantined with its reason.
Nothing crashes, nothing is lost (one index row per input), nothing runs code (the CIFAR pickle
that tries is in ``test_ingest.py::test_cifar_python_binary_and_malicious_pickle``)."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from helpers import png_bytes, png_header_only, random_pixels
from pipeline.ingest.encode import EncodeOptions
from pipeline.ingest.job import IngestOptions, ingest
from pipeline.ingest.sources import SourceOptions, open_source
from shards import location, read_example, read_index, read_manifest
from shards.decode import decode_pixels

RUNNING_AS_ROOT = os.geteuid() == 0  # root reads a chmod 000 file, so it is then ingested, not quarantined
LONG_NAME = "n" * 240 + ".png"
NON_UTF8_NAME = b"caf\xe9-\xff.png"  # Latin-1 bytes, not UTF-8


def encoded(image: Image.Image, format: str, **options) -> bytes:  # noqa: A002 - PIL's word
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def build_folder(root):
    """Write the catalogue; returns the good inputs' pixels that must come back unchanged."""
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog", "bird"):
        (root / cls).mkdir(parents=True)  # bird stays empty: an empty class folder
    plain = {f"{cls}/img {i}.png": random_pixels(rng, 12) for cls in ("cat", "dog") for i in range(3)}
    plain["cat/same.png"] = random_pixels(rng, 12)  # the same file name in two classes
    plain["dog/same.png"] = random_pixels(rng, 12)
    plain["cat/tiny.png"] = random_pixels(rng, 1)  # 1x1
    for name, pixels in plain.items():
        (root / name).write_bytes(png_bytes(pixels))
    (root / "cat" / LONG_NAME).write_bytes(png_bytes(random_pixels(rng, 12)))
    with open(os.path.join(os.fsencode(root / "cat"), NON_UTF8_NAME), "wb") as handle:
        handle.write(png_bytes(random_pixels(rng, 12)))

    rgb = Image.fromarray(random_pixels(rng, 12))
    (root / "dog" / "cmyk.jpg").write_bytes(encoded(rgb.convert("CMYK"), "JPEG"))
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    (root / "cat" / "palette-alpha.png").write_bytes(encoded(palette, "PNG"))
    (root / "cat" / "grey-alpha.png").write_bytes(encoded(rgb.convert("LA"), "PNG"))
    frames = [Image.fromarray(random_pixels(rng, 12)) for _ in range(3)]
    (root / "dog" / "animated.gif").write_bytes(encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    rotated = Image.fromarray(random_pixels(rng, 12)[:, :8])
    (root / "dog" / "rotated.jpg").write_bytes(encoded(rotated, "JPEG", exif=exif))
    (root / "dog" / "photo.bmp").write_bytes(encoded(rgb, "BMP"))
    (root / "cat" / "locked.png").write_bytes(png_bytes(random_pixels(rng, 12)))
    os.chmod(root / "cat" / "locked.png", 0)

    (root / "cat" / "truncated.png").write_bytes(png_bytes(random_pixels(rng, 64))[:300])
    (root / "cat" / "empty.png").write_bytes(b"")
    (root / "dog" / "readme.jpg").write_bytes(b"this is text, not a picture")
    (root / "dog" / "bomb.png").write_bytes(png_header_only(30000, 30000))
    (root / "dog" / "big.png").write_bytes(png_bytes(random_pixels(rng, 120)))
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(root / "cat" / "sixteen.png")
    Image.fromarray(rng.random((8, 8), dtype=np.float32)).save(root / "cat" / "float.tiff")
    (root / "loose.png").write_bytes(png_bytes(random_pixels(rng, 12)))
    (root / "cat" / "gone.png").symlink_to(root / "nowhere.png")
    (root / "cat" / "loop-a.png").symlink_to(root / "cat" / "loop-b.png")
    (root / "cat" / "loop-b.png").symlink_to(root / "cat" / "loop-a.png")
    (root / "dog" / "up").symlink_to(root)  # a directory link back to the top: a walk that follows it never ends
    return plain


QUARANTINED = {
    "cat/truncated.png": "truncated or corrupt image data",
    "cat/empty.png": "empty file (0 bytes)",
    "dog/readme.jpg": "not an image",
    "dog/bomb.png": "decompression bomb",
    "dog/big.png": "decompression bomb: 120x120 = 14400 pixels exceeds --max-pixels 10000",
    "cat/sixteen.png": "unsupported image mode I;16",
    "cat/float.tiff": "unsupported image mode F",
    "loose.png": "not inside a class folder",
    "cat/gone.png": "unreadable file: No such file or directory",
    "cat/loop-a.png": "unreadable file: Too many levels of symbolic links",
    "cat/loop-b.png": "unreadable file: Too many levels of symbolic links",
    "dog/up": "symbolic link to a directory (not followed)",
    **({} if RUNNING_AS_ROOT else {"cat/locked.png": "unreadable file: Permission denied"}),
}


@pytest.fixture(scope="module")
def catalogue(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile") / "folder"
    plain = build_folder(root)
    out = root.parent / "out"
    ingest(open_source(f"imagefolder:{root}", SourceOptions(val_fraction=0.0)), str(out),
           IngestOptions(shard_size=5, encode=EncodeOptions(max_pixels=10_000)), command=["test"], progress=False)
    rows = {row["source_ref"]: row for row in read_index(location(str(out))).to_pylist()}
    return root, out, plain, rows


def test_every_input_has_one_row_and_the_accounting_adds_up(catalogue):
    root, out, _, rows = catalogue
    inputs = [p for p in root.rglob("*") if p.is_file() or p.is_symlink()]
    assert len(rows) == len(inputs) >= 30
    manifest = read_manifest(location(str(out)))
    ok = sum(row["status"] == "ok" for row in rows.values())
    assert manifest["accounting"] == {"inputs": len(inputs), "ok": ok, "quarantined": len(rows) - ok}
    assert manifest["class_names"] == ["bird", "cat", "dog"]  # the empty class folder is a class with no examples


@pytest.mark.parametrize("name", sorted(QUARANTINED))
def test_bad_input_is_quarantined_with_its_reason(catalogue, name):
    row = catalogue[3][name]
    assert row["status"] == "quarantined" and row["reason"].startswith(QUARANTINED[name]), row


def test_plain_images_come_back_pixel_for_pixel(catalogue):
    _, out, plain, rows = catalogue
    for name, pixels in plain.items():
        row = rows[name]
        assert row["status"] == "ok" and row["class_name"] == name.split("/")[0], row
        stored = decode_pixels(read_example(str(out), row["key"]).image, 3)
        assert np.array_equal(stored, pixels), name
    assert rows["cat/same.png"]["key"] != rows["dog/same.png"]["key"]


# A JPEG that needs a change (CMYK, EXIF rotation) stays JPEG; the others become PNG.
@pytest.mark.parametrize("name, size, mode, stored_format", [
    ("dog/cmyk.jpg", (12, 12), "RGB", "JPEG"),           # CMYK converted to RGB
    ("cat/palette-alpha.png", (12, 12), "RGB", "PNG"),   # palette with transparency: colours kept, alpha dropped
    ("cat/grey-alpha.png", (12, 12), "L", "PNG"),        # grey + alpha stays grey
    ("dog/animated.gif", (12, 12), "RGB", "PNG"),        # the first frame
    ("dog/rotated.jpg", (12, 8), "RGB", "JPEG"),         # EXIF orientation applied: 8x12 stored upright as 12x8
    ("dog/photo.bmp", (12, 12), "RGB", "PNG"),
    ("cat/" + LONG_NAME, (12, 12), "RGB", "PNG"),
    ("cat/caf\\xe9-\\xff.png", (12, 12), "RGB", "PNG"),  # a non-UTF-8 name, kept readable in the index
    *([("cat/locked.png", (12, 12), "RGB", "PNG")] if RUNNING_AS_ROOT else []),
])
def test_odd_but_valid_images_are_ingested_correctly(catalogue, name, size, mode, stored_format):
    _, out, _, rows = catalogue
    row = rows[name]
    assert row["status"] == "ok", row
    assert len(row["key"]) <= 80
    with Image.open(io.BytesIO(read_example(str(out), row["key"]).image)) as image:
        assert image.size == size and image.mode == mode and image.format == stored_format
    assert (row["width"], row["height"]) == size
