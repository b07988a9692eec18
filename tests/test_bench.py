"""``onion bench train --preset smoke``: every arm end to end, a table, a plot, results.json."""
import json

from PIL import Image

from pipeline.bench_train import bench_train

ARMS = ["dense", "example", "token", "attention", "token+attention", "tri-level"]


def test_smoke_preset_runs_every_arm_and_writes_table_plot_and_json(ray_local, tmp_path):
    rows = bench_train("smoke", tmp_path)
    assert [r["arm"] for r in rows] == ARMS
    results = json.loads((tmp_path / "results.json").read_text())["arms"]
    for arm in ARMS:
        assert {"relative_time", "top1_mean", "top1_std", "images_per_second", "relative_flops"} <= set(results[arm])
        assert results[arm]["top1_mean"] > 20.0  # learns something (chance is 10%)
    assert results["dense"]["relative_flops"] == 1.0 and results["dense"]["relative_time"] == 1.0
    assert results["token"]["relative_flops_per_image"] < 0.95  # fewer tokens per image
    assert results["attention"]["relative_flops_per_image"] == 1.0  # the mask saves no matrix products
    assert abs(results["example"]["relative_flops"] - 0.8) < 0.02  # keep 0.8 of the examples
    assert results["tri-level"]["relative_flops"] < results["token"]["relative_flops"] < 1.0
    runs = json.loads((tmp_path / "runs.json").read_text())
    top1 = {r["arm"]: r["top1"] for r in runs}
    assert top1["token"] != top1["dense"] and top1["token+attention"] != top1["token"]  # each level changes the model
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {arm} |" in table for arm in ARMS)
    with Image.open(tmp_path / "results.png") as image:
        image.verify()
        assert image.format == "PNG"
