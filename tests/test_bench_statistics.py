"""The bench's accuracy verdict: paired differences to dense with a t-interval, by hand; the Pareto plot; and the
block-sparse presets' tile counts."""
import math

import pytest

from pipeline.bench.pareto import overlap_area, pareto_front, place_labels, plot, text_extent
from pipeline.bench.train import (
    PRESETS,
    aggregate,
    block_vs_exact,
    markdown,
    paired_interval,
    verdict,
)
from trainer.sparse_vit import kept_count, tile_side

MNIST_SIDE = 28  # the cpu presets' images (mnist5k), trained at their own size


def test_paired_interval_matches_a_hand_computation():
    # differences 1, 2, 3: mean 2, sample sd 1, t(0.975, 2 df) = 4.302653 -> half-width 4.302653 / sqrt(3)
    mean, low, high = paired_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert (low, high) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-6)
    assert math.isnan(paired_interval([0.4])[1])


def test_verdict_needs_the_whole_interval_above_the_margin():
    assert verdict(-0.49, 0.5) == "parity" and verdict(-0.51, 0.5) == "not shown"
    assert verdict(math.nan, 0.5) == "n/a (1 seed)"


def test_aggregate_pairs_each_arm_with_dense_of_the_same_seed():
    def run(arm, seed, top1):
        return {"arm": arm, "seed": seed, "top1": top1, "seconds": 10.0, "images": 100, "flops": 1000,
                "images_per_second": 10.0}

    runs = [run("dense", 0, 80.0), run("dense", 1, 90.0), run("dense", 2, 85.0),
            run("fast", 0, 79.0), run("fast", 1, 90.5), run("fast", 2, 84.0)]
    rows = {r["arm"]: r for r in aggregate(runs, margin=0.5)}
    fast = rows["fast"]
    assert fast["pairs"] == 3 and fast["paired_delta"] == pytest.approx(-0.5)  # (-1 + 0.5 - 1) / 3
    expected = paired_interval([-1.0, 0.5, -1.0])
    assert (fast["paired_low"], fast["paired_high"]) == pytest.approx(expected[1:])
    assert fast["verdict"] == "not shown" and rows["dense"]["verdict"] == "baseline"
    assert rows["dense"]["paired_delta"] == 0.0


def test_the_pareto_front_keeps_only_arms_no_other_arm_beats_on_both_time_and_accuracy():
    def row(arm, time, delta):
        return {"arm": arm, "relative_time": time, "paired_delta": delta, "paired_low": delta - 1,
                "paired_high": delta + 1}

    rows = [row("dense", 1.0, 0.0), row("slow-and-worse", 1.2, -0.5), row("fast", 0.5, -2.0),
            row("faster-than-fast-and-better", 0.45, -1.0), row("middle", 0.7, 0.5), row("tied-slower", 0.8, 0.5),
            row("best", 0.9, 1.5)]
    # fast loses to an arm that is faster and better; tied-slower to middle (as good, faster); dense
    # and slow-and-worse to best
    assert pareto_front(rows) == ["faster-than-fast-and-better", "middle", "best"]
    assert "fastest first: faster-than-fast-and-better, middle, best." in markdown(rows_with_columns(rows), "title")


def rows_with_columns(rows: list[dict]) -> list[dict]:
    """Rows as aggregate writes them, for markdown: the columns these tests do not look at filled in."""
    filler = {"seconds": 1.0, "fixed_seconds": 0.0, "fixed_share_of_dense": 0.0, "images_per_second": 1.0,
              "relative_images": 1.0, "relative_flops": 1.0, "relative_flops_per_image": 1.0,
              "speedup_vs_predicted": 1.0, "top1_mean": 90.0, "top1_std": 0.0, "verdict": "-", "pairs": 3}
    return [{**filler, **r} for r in rows]


def test_the_plot_draws_every_arm_and_the_front(tmp_path):
    rows = [{"arm": "dense", "relative_time": 1.0, "paired_delta": 0.0, "paired_low": math.nan,
             "paired_high": math.nan},
            {"arm": "fast", "relative_time": 0.5, "paired_delta": -1.0, "paired_low": -3.0, "paired_high": 1.0}]
    plot(rows, tmp_path / "results.png", "title")
    from PIL import Image

    with Image.open(tmp_path / "results.png") as image:
        assert image.size == (900, 600)  # 7.5 x 5 inches at 120 dpi


def test_labels_of_arms_at_nearly_the_same_point_do_not_print_over_each_other():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # five arms within a hundredth of dense's time and a tenth of a point: the first place (right, above)
    # is the same spot for all of them
    points = [(0.56 + 0.002 * i, 2.0 + 0.02 * i, f"tri-level-dynamic token 0.{i}") for i in range(5)]
    points.append((0.9, -3.0, "dense"))
    figure, axes = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    axes.plot([x for x, _, _ in points], [y for _, y, _ in points], "o")
    axes.set_xlim(0.3, 1.05)
    axes.set_ylim(-6.0, 8.0)
    labels = place_labels(axes, points)
    renderer = figure.canvas.get_renderer()
    boxes = [text_extent(label, renderer) for label in labels]
    assert [label.get_text() for label in labels] == [text for _, _, text in points]
    assert len(axes.texts) == len(points)  # the places tried and not taken are gone
    plt.close(figure)
    for i, one in enumerate(boxes):
        for other in boxes[i + 1:]:
            assert overlap_area(one, other) == 0.0, (one, other)


def test_block_arms_are_paired_with_their_exact_twins():
    def run(arm, seed, top1):
        return {"arm": arm, "seed": seed, "top1": top1}

    runs = [run("attention", 0, 90.0), run("attention", 1, 91.0), run("attention-block", 0, 89.0),
            run("attention-block", 1, 91.5), run("token+attention-block", 0, 88.0), run("dense", 0, 92.0)]
    rows = block_vs_exact(runs)
    # token+attention-block has no exact twin in these runs, dense and attention are not block arms
    assert [(r["arm"], r["exact_arm"], r["pairs"]) for r in rows] == [("attention-block", "attention", 2)]
    assert rows[0]["paired_delta"] == pytest.approx(-0.25)  # (-1 + 0.5) / 2
    assert (rows[0]["paired_low"], rows[0]["paired_high"]) == pytest.approx(paired_interval([-1.0, 0.5])[1:])
    assert "| attention-block | attention | 2 | -0.25 [" in markdown([], "title", block_rows=rows)


@pytest.mark.parametrize("preset, tiles, kept", [("cpu", 2, 1), ("cpu-tiles", 4, 2)])
def test_cpu_tiles_preset_gives_block_mode_real_tiles(preset, tiles, kept):
    """The cpu preset's 17 tokens make two tiles, where block mode's choice means nothing; cpu-tiles
    (patch 4: 49 patches + class token) makes four, and each query tile keeps two of them."""
    settings = PRESETS[preset]
    tokens = (MNIST_SIDE // settings.train["patch_size"]) ** 2 + 1
    count = math.ceil(tokens / tile_side(tokens))
    assert (count, kept_count(settings.attn_keep, count)) == (tiles, kept)
    assert ("attention-block" in settings.arm_settings()) == (preset == "cpu-tiles")
