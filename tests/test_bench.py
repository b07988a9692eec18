"""``onion bench train --preset smoke``: every arm end to end, a table, a plot, results.json."""
import json

import pyarrow.compute as pc
import pytest
from PIL import Image

from pipeline.bench.train import bench_train
from shards import location, read_index

pytestmark = pytest.mark.slow  # a system test: ./run.sh test -m "not slow" leaves it out

ARMS = ["dense", "example", "example-dynamic", "token", "attention", "token+attention", "tri-level",
        "tri-level-dynamic"]
EPOCHS = 4  # the smoke preset's


def smoke_vit_forward_flops(tokens: list[tuple[int, int]]) -> int:
    """Matrix-product FLOPs (2 per multiply-add) of the smoke preset's ViT on one image, by hand:
    width 64, MLP 256, 16x16 RGB images in 4x4 patches (16 patches of 48 values), 10 classes;
    ``tokens`` is (tokens into attention, tokens into the MLP) for each block."""
    d, mlp, patches, patch_values, classes = 64, 256, 16, 48, 10
    flops = 2 * patches * patch_values * d + 2 * d * classes  # patch embedding, classifier head
    for n, m in tokens:
        flops += 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d  # qkv; q.k and weights.v; projection
        flops += 2 * 2 * m * d * mlp  # fc1 and fc2
    return flops


# Class token + 16 patches in every block of 4; the token arm keeps 8 of the 16 patches (keep 0.5) in
# block 1, whose attention still sees all 17.
DENSE_TOKENS = [(17, 17)] * 4
PRUNED_TOKENS = [(17, 17), (17, 9), (9, 9), (9, 9)]


def test_smoke_preset_runs_every_arm_and_writes_table_plot_and_json(ray_local, tmp_path):
    rows = bench_train("smoke", tmp_path)
    assert [r["arm"] for r in rows] == ARMS
    results = json.loads((tmp_path / "results.json").read_text())["arms"]
    runs = {r["arm"]: r for r in json.loads((tmp_path / "runs.json").read_text())}
    assert sorted(runs) == sorted(ARMS)  # one seed: one run per arm
    dense = runs["dense"]

    # The reported ratios are the raw per-run measurements divided by dense's.
    for arm in ARMS:
        raw, reported = runs[arm], results[arm]
        assert raw["seconds"] > 0 and raw["images"] > 0 and raw["flops"] > 0
        assert reported["relative_time"] == pytest.approx(raw["seconds"] / dense["seconds"])
        assert reported["relative_flops"] == pytest.approx(raw["flops"] / dense["flops"])
        assert reported["relative_flops_per_image"] == pytest.approx(
            (raw["flops"] / raw["images"]) / (dense["flops"] / dense["images"]))
        assert reported["speedup_vs_predicted"] == pytest.approx(reported["relative_flops"] / reported["relative_time"])
        assert reported["top1_mean"] == raw["top1"] and reported["top1_std"] == 0.0
        assert reported["delta_top1"] == pytest.approx(raw["top1"] - dense["top1"])
        assert reported["top1_mean"] > 20.0  # learns something (chance is 10%)

    # Work: every full-data arm sees each training example once per epoch; curation keeps 0.8 of them.
    index = read_index(location(str(tmp_path / "data" / "digits")), columns=["split", "status"])
    train_examples = len(index.filter(pc.and_(pc.equal(index["split"], "train"), pc.equal(index["status"], "ok"))))
    for arm in ("dense", "token", "attention", "token+attention"):
        assert runs[arm]["images"] == EPOCHS * train_examples, arm
    for arm in ("example", "tri-level"):
        assert runs[arm]["images"] / (EPOCHS * train_examples) == pytest.approx(0.8, abs=0.02), arm
    for arm in ("example-dynamic", "tri-level-dynamic"):  # epochs 1-3 leave out some well-learned examples
        assert EPOCHS * train_examples * 0.5 < runs[arm]["images"] < EPOCHS * train_examples, arm
        assert results[arm]["relative_images"] == pytest.approx(runs[arm]["images"] / dense["images"])
    # The FLOPs per image follow the token counts the steps ran with, by hand from the model's shape.
    per_image = {arm: runs[arm]["flops"] / runs[arm]["images"] for arm in ARMS}
    assert per_image["dense"] == 3 * smoke_vit_forward_flops(DENSE_TOKENS)  # a training step is 3 forwards
    token_ratio = smoke_vit_forward_flops(PRUNED_TOKENS) / smoke_vit_forward_flops(DENSE_TOKENS)  # 0.689
    for arm in ("token", "token+attention", "tri-level", "tri-level-dynamic"):
        assert results[arm]["relative_flops_per_image"] == pytest.approx(token_ratio, rel=1e-9), arm
    for arm in ("example", "example-dynamic", "attention"):  # fewer examples, or a mask: same products per image
        assert results[arm]["relative_flops_per_image"] == pytest.approx(1.0, rel=1e-9), arm
    assert results["tri-level"]["relative_flops"] < results["token"]["relative_flops"] < 1.0
    assert results["example"]["relative_flops"] < 1.0

    top1 = {arm: run["top1"] for arm, run in runs.items()}
    assert top1["token"] != top1["dense"] and top1["token+attention"] != top1["token"]  # each level changes the model

    # results.md: one row per arm, in order, with the figures of results.json.
    table = [line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert table[0].startswith("| arm |") and len(table) == 1 + len(ARMS)
    for line, arm in zip(table[1:], ARMS, strict=True):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        reported = results[arm]
        assert reported["fixed_seconds"] == pytest.approx(runs[arm]["seconds"] - runs[arm]["train_seconds"])
        assert reported["fixed_seconds"] > 0
        assert cells[:9] == [arm, "1", f"{reported['seconds']:.1f}", f"{reported['relative_time']:.2f}x",
                             f"{reported['fixed_seconds']:.1f} ({100 * reported['fixed_share_of_dense']:.1f}%)",
                             f"{reported['images_per_second']:.0f}", f"{reported['relative_images']:.2f}x",
                             f"{reported['relative_flops']:.2f}x", f"{reported['relative_flops_per_image']:.2f}x"], line
        assert cells[-1] == ("baseline" if arm == "dense" else "n/a (1 seed)"), line
    with Image.open(tmp_path / "results.png") as image:
        image.verify()
        assert image.format == "PNG"
