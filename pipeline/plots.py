"""Pictures of a selection: the score histogram by decision, and thumbnails at both ends."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from shards import decode_image, location, read_example  # noqa: E402

from pipeline.selection import read_selection  # noqa: E402
from pipeline.selection_report import class_names  # noqa: E402


def score_histogram(url: str, version: str, path: str, bins: int = 40) -> None:
    table = read_selection(location(url), version)
    scores = table["score"].to_numpy(zero_copy_only=False).astype(np.float64)
    kept = np.array(table["kept"].to_pylist())
    scored = ~np.isnan(scores)
    if not scored.any():
        raise ValueError(f"{version} has no scores to plot (a random or round-0 selection)")
    edges = np.histogram_bin_edges(scores[scored], bins=bins)
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    axes.hist(scores[scored & kept], bins=edges, alpha=0.7, label=f"kept ({(scored & kept).sum()})", color="tab:blue")
    axes.hist(scores[scored & ~kept], bins=edges, alpha=0.7, label=f"dropped ({(scored & ~kept).sum()})", color="tab:red")
    axes.set_xlabel("score (higher = harder)")
    axes.set_ylabel("examples")
    axes.set_title(f"{version}: scores of kept and dropped examples")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def extremes_grid(url: str, version: str, path: str, per_side: int = 16) -> None:
    """Thumbnails of the ``per_side`` hardest (highest score) and easiest examples, with decisions."""
    dataset = location(url)
    table = read_selection(dataset, version)
    rows = [r for r in table.to_pylist() if r["score"] is not None]
    if not rows:
        raise ValueError(f"{version} has no scores to rank examples by")
    rows.sort(key=lambda r: (r["score"], r["key"]))
    names = class_names(dataset)
    columns = min(8, per_side)
    lines = -(-per_side // columns)
    figure = plt.figure(figsize=(columns * 1.4, 2 * lines * 1.7 + 0.8), dpi=110, layout="constrained")
    halves = figure.subfigures(2, 1)
    for half, (title, chosen) in zip(halves, (("hardest: highest scores", rows[::-1][:per_side]),
                                             ("easiest: lowest scores", rows[:per_side]))):
        half.suptitle(f"{version} - {title} (label, score, decision)", fontsize=10, weight="bold")
        axes = half.subplots(lines, columns, squeeze=False)
        for i, axis in enumerate(axes.flat):
            axis.axis("off")
            if i >= len(chosen):
                continue
            row = chosen[i]
            image = decode_image(read_example(url, row["key"]).image).permute(1, 2, 0).numpy()
            axis.imshow(image.squeeze(), cmap="gray" if image.shape[2] == 1 else None)
            axis.set_title(f"{names.get(row['label'], row['label'])} {row['score']:.3g} {'kept' if row['kept'] else 'drop'}",
                           fontsize=7)
    figure.savefig(path)
    plt.close(figure)
