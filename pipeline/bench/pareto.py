"""The bench's answer to "what should I turn on?" as a picture: each arm's paired top-1 delta to dense
against its wall clock, with the Pareto front (the arms no other arm beats on both counts)."""

from __future__ import annotations

import math
from pathlib import Path

# Where a label may sit relative to its point, in points (x, y, horizontal alignment), tried in this order:
# right above first (the natural reading), then the other sides, then further out.
LABEL_OFFSETS = [(5, 4, "left"), (5, -11, "left"), (-5, 4, "right"), (-5, -11, "right"),
                 (5, 14, "left"), (5, -21, "left"), (-5, 14, "right"), (-5, -21, "right"),
                 (5, 24, "left"), (5, -31, "left"), (-5, 24, "right"), (-5, -31, "right")]
NEAR_OFFSET = 11  # points: offsets up to this sit next to their point, further ones are joined by a line
MARKER_HALF_SIDE = 4.0  # pixels kept free around each point so that no label covers a marker


def pareto_front(rows: list[dict]) -> list[str]:
    """The arms that no other arm beats on both counts (less wall clock and a higher paired top-1 delta
    to dense), fastest first: the trade-offs worth choosing between; every other arm is dominated."""
    front, best = [], -math.inf
    for row in sorted(rows, key=lambda r: (r["relative_time"], -r["paired_delta"])):
        if row["paired_delta"] > best:
            front.append(row["arm"])
            best = row["paired_delta"]
    return front


def place_labels(axes, points: list[tuple[float, float, str]], fontsize: float = 7) -> list:
    """Annotate each (x, y, text) point where its label overlaps no other label, no marker, not the legend
    and stays inside the axes: arms at near-equal time and accuracy otherwise print over each other.
    Greedy, in the order given, so the picture is the same for the same rows; a label with no free place
    takes the place that overlaps least. Call after the axes' limits are final (placement is in pixels)."""

    from matplotlib.transforms import Bbox

    figure = axes.figure
    renderer = figure.canvas.get_renderer()
    inside = axes.get_window_extent(renderer)
    taken = []
    for x, y, _ in points:
        cx, cy = axes.transData.transform((x, y))
        taken.append(Bbox.from_extents(cx - MARKER_HALF_SIDE, cy - MARKER_HALF_SIDE,
                                       cx + MARKER_HALF_SIDE, cy + MARKER_HALF_SIDE))
    if axes.get_legend() is not None:
        taken.append(axes.get_legend().get_window_extent(renderer))
    labels = []
    for x, y, text in points:
        best = None
        for dx, dy, align in LABEL_OFFSETS:
            away = abs(dy) > NEAR_OFFSET  # a label off the first ring gets a line back to its point
            label = axes.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=align,
                                  va="center" if away else "baseline", fontsize=fontsize,
                                  arrowprops=dict(arrowstyle="-", lw=0.4, color="grey") if away else None)
            box = text_extent(label, renderer)
            cost = sum(overlap_area(box, other) for other in taken) + outside_area(box, inside)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, label, box)
            else:
                label.remove()
            if cost == 0:
                break
        taken.append(best[2])
        labels.append(best[1])
    return labels


def text_extent(label, renderer):
    """The label's text alone in pixels: an annotation's own extent adds its leader line, which may cross
    other labels and is placed only when the figure is drawn."""
    from matplotlib.text import Text

    label.update_positions(renderer)  # from its offset to pixels, as drawing does
    return Text.get_window_extent(label, renderer)


def overlap_area(one, other) -> float:
    width = min(one.x1, other.x1) - max(one.x0, other.x0)
    height = min(one.y1, other.y1) - max(one.y0, other.y0)
    return width * height if width > 0 and height > 0 else 0.0


def outside_area(box, frame) -> float:
    return box.width * box.height - overlap_area(box, frame)


def plot(rows: list[dict], path: Path, title: str, margin: float = 0.5) -> None:
    """Each arm's paired top-1 delta to dense (95% interval) against its wall clock relative to dense,
    the Pareto front drawn through the arms no other arm beats on both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    colours = plt.get_cmap("tab20")  # twenty distinct colours: the default cycle repeats after ten arms
    for number, row in enumerate(rows):
        low, high = row["paired_low"], row["paired_high"]
        spread = None if math.isnan(low) else [[row["paired_delta"] - low], [high - row["paired_delta"]]]
        axes.errorbar(row["relative_time"], row["paired_delta"], yerr=spread, fmt="o", capsize=3, alpha=0.85,
                      color=colours(number % colours.N))
    by_arm = {row["arm"]: row for row in rows}
    front = [by_arm[arm] for arm in pareto_front(rows)]
    axes.step([r["relative_time"] for r in front], [r["paired_delta"] for r in front], where="post", color="black",
              lw=1.0, ls=":", label="Pareto front")
    deltas = [row["paired_delta"] for row in rows]
    axes.set_ylim(min(deltas + [-margin]) - 2.5, max(deltas) + 2.5)  # intervals wider than this run off the edge
    axes.axhline(0.0, color="grey", lw=0.8)
    axes.axhline(-margin, color="grey", lw=0.8, ls="--", label=f"parity margin (-{margin} points)")
    axes.axvline(1.0, color="grey", lw=0.8, ls="--")
    axes.set_xlabel("training wall clock relative to dense")
    axes.set_ylabel("top-1 minus dense's, same seed (points, 95% interval)")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    axes.set_xlim(*axes.get_xlim())  # freeze the limits before placing labels in pixels
    place_labels(axes, [(row["relative_time"], row["paired_delta"], row["arm"]) for row in rows])
    figure.savefig(path)
    plt.close(figure)
