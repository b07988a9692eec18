"""``benchmarks/in_place.py --quick``: every arm of the in-place vs copy benchmark runs end to end and
reports positive figures, and the two datasets it reads keep the very same examples."""
from pathlib import Path

import pytest

from helpers import run_quick_benchmark
from shards import STATUS_OK, location, read_index

INDEXING_ARMS = {"local": ["read once (cat)", "in place", "copy", "in place, --check decode"],
                 "s3": ["read once (s3fs)", "in place", "copy"]}
READING = ["in place", "copy"]


def kept_keys(path: Path) -> set[str]:
    index = read_index(location(str(path))).to_pylist()
    return {row["key"] for row in index if row["status"] == STATUS_OK}


@pytest.mark.slow  # about 40 s on 2 cores: a moto server, Ray, two training runs
def test_quick_run_measures_every_arm_on_the_same_examples(tmp_path):
    out = tmp_path / "bench"
    report = run_quick_benchmark("in_place.py", out, timeout=300)
    assert report["quick"] and report["data"] == {"tars": 4, "examples": 32, "bytes": report["data"]["bytes"]}
    for store, arms in INDEXING_ARMS.items():
        assert list(report["indexing"][store]) == arms
        for arm in arms:
            assert all(seconds > 0 for seconds in report["indexing"][store][arm]), (store, arm)
            figures = report["medians"][store][arm]
            assert figures["seconds"] > 0 and figures["mb_per_s"] > 0 and figures["vs_read_once"] > 0
    for part in ("loader", "training"):
        assert set(report[part]) == set(READING)
        for arm in READING:
            assert report[part][arm]["images_per_s"] and all(rate > 0 for rate in report[part][arm]["images_per_s"])
        assert all(m["ratio"] > 0 for m in report[part + "_medians"].values())
    assert report["indexing"]["ray_startup_s"] > 0
    cost = report["indexing"]["cost"]
    assert cost["images"] == 32 and all(seconds > 0 for seconds in cost["seconds"].values())
    assert all(value > 0 for value in report["index_bytes"].values())
    assert all(value > 0 for value in report["goals"].values())
    # the two datasets read: every sample kept, the same keys, splits, labels and image bytes
    in_place, copy = kept_keys(out / "data" / "in-place"), kept_keys(out / "data" / "copy")
    assert len(in_place) == 32 and in_place == copy
    assert report["same_examples"] == {"kept": 32, "same_keys": True, "same_rows": True}
    table = (out / "results.md").read_text()
    for arm in INDEXING_ARMS["local"] + INDEXING_ARMS["s3"]:
        assert f"| {arm} |" in table
