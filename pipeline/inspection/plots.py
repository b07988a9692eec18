"""Pictures of a selection: the score histogram by decision, and thumbnails at both ends."""
from __future__ import annotations

import hashlib
import math
import textwrap
from collections import Counter

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from pipeline.curation.scoring import read_scores  # noqa: E402
from pipeline.inspection.selections import class_names, largest_groups  # noqa: E402
from shards import UsageError, decode_image, location, read_example  # noqa: E402
from shards.selections import read_selection, selection_parameters  # noqa: E402
from shards.urls import Location  # noqa: E402


def score_histogram(url: str, version: str, path: str, bins: int = 40) -> str | None:
    """Draw the histogram to ``path``; returns the note on what it leaves out (also on the figure), or None."""
    figure, note = histogram_figure(url, version, bins)
    figure.savefig(path)
    plt.close(figure)
    return note


def histogram_figure(url: str, version: str, bins: int = 40) -> tuple[plt.Figure, str | None]:
    """The score histogram of kept and dropped examples, with a caption when some have no score."""
    table = read_selection(location(url), version)
    scores = table["score"].to_numpy(zero_copy_only=False).astype(np.float64)
    kept = np.array(table["kept"].to_pylist())
    scored = ~np.isnan(scores)
    if not scored.any():
        raise UsageError(f"{version} has no scores to plot (a random or round-0 selection)")
    never = np.isin(np.array(table["key"].to_pylist(), dtype=object), list(never_learned(location(url), table)))
    edges = np.histogram_bin_edges(scores[scored], bins=bins)
    note = unscored_note(table, version)
    figure, axes = plt.subplots(figsize=(7, 4.6 if note else 4), dpi=120)
    groups = [(scored & kept & ~never, "kept", "tab:blue", None),
              (scored & kept & never, "kept, never learned", "tab:blue", "//"),
              (scored & ~kept, "dropped", "tab:red", None)]
    axes.hist([scores[mask] for mask, *_ in groups], bins=edges, stacked=True, alpha=0.75,
              color=[color for *_, color, _ in groups],
              label=[f"{name} ({mask.sum()})" for mask, name, *_ in groups])
    for patches, (*_, hatch) in zip(axes.containers, groups):
        for patch in patches:
            patch.set_hatch(hatch)
    axes.set_xlabel("score (higher = harder)")
    axes.set_ylabel("examples")
    axes.set_title(f"{version}: scores of kept and dropped examples")
    axes.legend()
    if note:
        figure.text(0.01, 0.01, textwrap.fill(note, 125), fontsize=6.5, va="bottom", ha="left", color="0.25")
        figure.tight_layout(rect=(0, 0.13, 1, 1))
    else:
        figure.tight_layout()
    return figure, note


def unscored_note(table: pa.Table, version: str) -> str | None:
    """Why the histogram's counts are not the selection's: it draws only examples with a score, and a
    round scores only what its parent kept (restored examples and earlier drops have none). None when
    every example has a score."""
    rows = table.select(["kept", "score", "reason"]).to_pylist()
    missing = [r for r in rows if r["score"] is None or math.isnan(r["score"])]
    if not missing:
        return None

    def counted(chosen: list[dict]) -> str:
        reasons = Counter((r["reason"] or "").split(":")[0] or "no reason" for r in chosen)
        return f"{len(chosen)} {'kept' if chosen[0]['kept'] else 'dropped'} (" + ", ".join(
            f"{reason} {count}" for reason, count in reasons.most_common()) + ")"

    kept = sum(r["kept"] for r in rows)
    drawn_kept = kept - sum(r["kept"] for r in missing)
    drawn_dropped = len(rows) - kept - sum(not r["kept"] for r in missing)
    parts = [counted(chosen) for chosen in ([r for r in missing if r["kept"]], [r for r in missing if not r["kept"]])
             if chosen]
    why = (": a round scores only the examples its parent kept, so those restored from the dropped pool and those "
           "dropped in earlier rounds have none" if selection_parameters(table).get("round") else "")
    drawn = drawn_kept + drawn_dropped
    return (f"{version} keeps {kept} and drops {len(rows) - kept}; the plot draws only the {drawn} "
            f"with a score ({drawn_kept} kept, {drawn_dropped} dropped). Not drawn, having no score: "
            f"{' and '.join(parts)}{why}")


def never_learned(dataset: Location, selection: pa.Table) -> set[str]:
    """Keys the selection's forgetting scores found never learned in their window (empty for other scorers)."""
    name = selection_parameters(selection).get("scores")
    if not name:
        return set()
    scores = read_scores(dataset, name)
    if "learned" not in scores.column_names:
        return set()
    return {r["key"] for r in scores.select(["key", "learned", "presentations"]).to_pylist()
            if r["presentations"] and not r["learned"]}


def decision_words(row: dict) -> str:
    """A selection row's decision as a person says it: kept, dropped in round 1 (unforgettable), ..."""
    reason = row["reason"] or ""
    what, _, round_number = reason.partition("@r")
    if row["kept"]:
        return f"restored in round {round_number}" if what == "restored" else "kept"
    return f"dropped in round {round_number} ({what})" if round_number else f"dropped ({reason})"


def evidence_words(row: dict, scores: dict[str, dict]) -> str:
    """What the score means for this example: never learned, forgotten 2x, or the score itself."""
    detail = scores.get(row["key"])
    if detail and "learned" in detail:
        if not detail["presentations"]:
            return "not trained in window"
        return "never learned" if not detail["learned"] else f"forgotten {detail['forgetting_events']}x"
    return f"score {row['score']:.3g}"


def extremes_grid(url: str, version: str, path: str, per_side: int = 16) -> None:
    """Thumbnails of the ``per_side`` hardest (highest score) and easiest examples, titled in words.

    Equal scores are ordered by a hash of the key, so a tie shows a mix of classes rather than
    whichever class sorts first.
    """
    dataset = location(url)
    table = read_selection(dataset, version)
    rows = [r for r in table.to_pylist() if r["score"] is not None]
    if not rows:
        raise UsageError(f"{version} has no scores to rank examples by (a random or round-0 selection)")
    rows.sort(key=lambda r: (r["score"], hashlib.sha256(r["key"].encode()).hexdigest()))
    names = class_names(dataset)
    scores_name = selection_parameters(table).get("scores")
    details = {}
    if scores_name:
        scores = read_scores(dataset, scores_name)
        wanted = [c for c in ("key", "learned", "forgetting_events", "presentations") if c in scores.column_names]
        details = {r["key"]: r for r in scores.select(wanted).to_pylist()}
    columns = min(8, per_side)
    lines = -(-per_side // columns)
    figure = plt.figure(figsize=(columns * 1.9, 2 * lines * 2.0 + 0.8), dpi=110, layout="constrained")
    halves = figure.subfigures(2, 1)
    for half, (title, chosen) in zip(halves, (("hardest: highest scores", rows[::-1][:per_side]),
                                             ("easiest: lowest scores", rows[:per_side]))):
        half.suptitle(f"{version} - {title}", fontsize=10, weight="bold")
        axes = half.subplots(lines, columns, squeeze=False)
        for i, axis in enumerate(axes.flat):
            axis.axis("off")
            if i >= len(chosen):
                continue
            row = chosen[i]
            label = names.get(row["label"], row["label"])
            words = f"label {label} · {evidence_words(row, details)}\n{decision_words(row)}"
            show_example(axis, url, row["key"], words)
    figure.savefig(path)
    plt.close(figure)


def show_example(axis: plt.Axes, url: str, key: str, title: str) -> None:
    """``key``'s image (read by byte range through the index) on ``axis``, titled."""
    image = decode_image(read_example(url, key).image).permute(1, 2, 0).numpy()
    axis.imshow(image.squeeze(), cmap="gray" if image.shape[2] == 1 else None)
    axis.set_title(title, fontsize=6.5)


def groups_grid(url: str, name: str, path: str, groups: int = 8, per_group: int = 8) -> int:
    """The ``groups`` largest groups of ``scores/<name>`` as rows of images: the representative
    first, then members nearest first, each titled with its distance. Returns the rows drawn."""
    chosen = largest_groups(url, name, groups)
    if not chosen:
        raise UsageError(f"scores/{name} has no group of two or more: no copies found to draw")
    columns = max(2, min(per_group, max(group["size"] for group in chosen)))
    figure, axes = plt.subplots(len(chosen), columns, squeeze=False, dpi=110,
                                figsize=(columns * 1.8, len(chosen) * 1.8 + 0.6), layout="constrained")
    figure.suptitle(f"scores/{name}: the {len(chosen)} largest groups\nof copies, representative first",
                    fontsize=9, weight="bold")
    for line, group in zip(axes, chosen):
        for i, axis in enumerate(line):
            axis.axis("off")
            if i >= len(group["members"]):
                continue
            member = group["members"][i]
            distance = f"{member['distance']:.3f}" if group["unit"] == "1 - cosine" else str(member["distance"])
            words = f"group {group['group']}, {group['size']} copies" if i == 0 else f"{group['unit']}: {distance}"
            key = member["key"] if len(member["key"]) <= 24 else "…" + member["key"][-23:]
            show_example(axis, url, member["key"], f"{key}\n{words}")
    figure.savefig(path)
    plt.close(figure)
    return len(chosen)
