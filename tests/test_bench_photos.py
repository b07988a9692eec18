"""``onion bench data --photos`` at a tiny size: every arm makes the same 224x224 uint8 images from the
same JPEG bytes, and the report and its table have the promised shape."""
import json

import pytest
from PIL import Image

from pipeline.bench.photos import (
    IMAGEFOLDER,
    IMAGEFOLDER_DRAFT,
    MAX_SIDE,
    MIN_SIDE,
    ONION,
    bench_photos,
    render,
    write_photos,
)
from pipeline.cli import build_parser

COUNT = 40
ARMS = [ONION, IMAGEFOLDER, IMAGEFOLDER_DRAFT]


def test_photos_are_mixed_size_jpegs_and_always_the_same(tmp_path):
    write_photos(tmp_path / "a", 6)
    write_photos(tmp_path / "b", 6)
    files = sorted(path.relative_to(tmp_path / "a") for path in (tmp_path / "a").glob("*/*.jpg"))
    assert len(files) == 6 and {path.parent.name for path in files} == {"china", "flower"}
    sizes = set()
    for path in files:
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()
        with Image.open(tmp_path / "a" / path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert MIN_SIDE <= max(image.size) <= MAX_SIDE and 2 * min(image.size) >= max(image.size) - 1
            sizes.add(image.size)
    assert len(sizes) == 6
    assert not (tmp_path / "a.partial").exists()


def test_photo_mode_every_arm_makes_the_same_224px_batches(ray_local, tmp_path):
    report = bench_photos(tmp_path, count=COUNT, repeats=1, workers=(1,))
    assert report["mode"] == "photos" and report["images"] == COUNT and report["size"] == 224
    assert MIN_SIDE <= report["photos"]["min_long_side"] <= report["photos"]["max_long_side"] <= MAX_SIDE
    rows = report["speed"]
    assert [(row["reader"], row["workers"]) for row in rows] == [(arm, 1) for arm in ARMS]
    for row in rows:
        assert row["images_per_epoch"] == [COUNT], row["reader"]  # every image, once, in every arm
        assert row["image_shapes"] == [(3, 224, 224, "uint8")], row["reader"]
        assert row["images_per_s"] > 0 and row["images_per_s_per_core"] == row["images_per_s"]
        assert row["images_per_cpu_s"] > 0 and 0 <= row["main_process_cpu_share"] <= 1.5
    by_reader = {row["reader"]: row for row in rows}
    assert by_reader[IMAGEFOLDER]["vs_imagefolder"] == 1.0
    assert by_reader[IMAGEFOLDER_DRAFT]["vs_imagefolder_draft"] == 1.0
    assert by_reader[ONION]["vs_imagefolder"] == pytest.approx(
        by_reader[ONION]["images_per_s"] / by_reader[IMAGEFOLDER]["images_per_s"])
    assert set(report["peak_rss_mib"]) == {ONION, IMAGEFOLDER}
    for rss in report["peak_rss_mib"].values():
        assert 0 < rss["after_imports"] <= rss["peak"]
    json.dumps(report)  # what the CLI writes as results.json

    text = render(report)
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| reader | DataLoader workers | images/s | images/s per core |")
    assert [line.split("|")[1].strip() for line in table[1:4]] == ARMS
    assert "31,278 images/s on 96 vCPUs" in text and "326 images/s per vCPU" in text


def test_cli_names_the_photo_mode_and_parses_its_options(capsys):
    parser = build_parser(only="bench")
    args = parser.parse_args(["bench", "data", "--photos", "--count", "200", "--workers", "1,2,4"])
    assert args.photos and args.count == 200 and args.workers == (1, 2, 4) and args.out is None
    default = parser.parse_args(["bench", "data"])  # the 32x32 mode stays the default, as it was
    assert not default.photos and default.workers == (1, 2) and default.repeats == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "data", "--help"])
    assert "--photos" in capsys.readouterr().out
