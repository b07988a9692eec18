"""``onion inspect``: what a dataset holds, as tables for people or JSON for scripts."""
from __future__ import annotations

import csv
import json
from collections import Counter

from rich.console import Console
from rich.table import Table

from shards import STATUS_QUARANTINED, location, read_index, read_manifest
from shards.manifest import is_labelled

QUARANTINE_ROWS_SHOWN = 20


def dataset_summary(url: str) -> dict:
    dataset = location(url)
    manifest = read_manifest(dataset)
    index = read_index(dataset, columns=["key", "split", "status", "class_name", "reason", "source_ref"])
    rows = index.to_pylist()
    per_class: dict[str, Counter] = {}
    for row in rows:
        if row["status"] != STATUS_QUARANTINED and row["class_name"] is not None:  # None: unlabelled
            per_class.setdefault(row["split"], Counter())[row["class_name"]] += 1
    quarantined = [{k: r[k] for k in ("key", "split", "source_ref", "reason")}
                   for r in rows if r["status"] == STATUS_QUARANTINED]
    return {
        "dataset": dataset.url,
        "source": manifest["source"],
        "format_version": manifest["format_version"],
        "counts": manifest["counts"],
        "accounting": manifest.get("accounting"),
        "labelled": is_labelled(manifest),
        "classes_by_split": {split: dict(sorted(c.items())) for split, c in sorted(per_class.items())},
        "quarantine_reasons": dict(Counter(_reason_kind(q["reason"]) for q in quarantined).most_common()),
        "quarantined": quarantined,
        "shards": manifest["shards"],
    }


def _reason_kind(reason: str) -> str:
    """The reason without its details, for grouping ('truncated or corrupt image data: ...')."""
    return reason.split(":", 1)[0]


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def titled_table(title: str) -> Table:
    """A table at least as wide as its title, so short tables do not wrap their title."""
    return Table(title=title, min_width=len(title) + 2)


def render_summary(summary: dict, console: Console) -> None:
    counts = summary["counts"]
    console.print(f"[bold]{summary['dataset']}[/bold]  source={summary['source']}  "
                  f"examples={counts['total']}  format v{summary['format_version']}")
    splits = titled_table("Examples by split and status")
    statuses = sorted(counts["by_status"])
    splits.add_column("split")
    for status in statuses:
        splits.add_column(status, justify="right")
    for split in sorted(counts["by_split"]):
        splits.add_row(split, *(str(counts["by_split_status"].get(f"{split}/{s}", 0)) for s in statuses))
    console.print(splits)
    if not summary["labelled"]:
        console.print("Unlabelled: the examples carry no class (the index's label column is null)")
    classes = titled_table("Examples by class (status ok)")
    classes.add_column("class")
    split_names = list(summary["classes_by_split"])
    for split in split_names:
        classes.add_column(split, justify="right")
    class_names = sorted({c for per in summary["classes_by_split"].values() for c in per}, key=str)
    for name in class_names:
        classes.add_row(str(name), *(str(summary["classes_by_split"][s].get(name, 0)) for s in split_names))
    if summary["labelled"]:
        console.print(classes)
    quarantined = summary["quarantined"]
    if quarantined:
        table = titled_table(f"Quarantined: {len(quarantined)} "
                             f"({', '.join(f'{k}: {v}' for k, v in summary['quarantine_reasons'].items())})")
        for column in ("key", "source_ref", "reason"):
            table.add_column(column, overflow="fold")
        for row in quarantined[:QUARANTINE_ROWS_SHOWN]:
            table.add_row(row["key"], row["source_ref"], row["reason"])
        console.print(table)
        if len(quarantined) > QUARANTINE_ROWS_SHOWN:
            console.print(f"... and {len(quarantined) - QUARANTINE_ROWS_SHOWN} more (use --format json for all)")
    shards = titled_table(f"Shards: {len(summary['shards'])}, "
                          f"{human_bytes(sum(s['bytes'] for s in summary['shards']))}")
    for column, justify in (("shard", "left"), ("split", "left"), ("examples", "right"), ("size", "right"),
                            ("sha256", "left")):
        shards.add_column(column, justify=justify)
    for shard in summary["shards"]:
        shards.add_row(shard["name"], shard["split"], str(shard["examples"]), human_bytes(shard["bytes"]),
                       shard["sha256"][:16])
    console.print(shards)


def inspect_dataset(url: str, output_format: str, console: Console) -> None:
    summary = dataset_summary(url)
    if output_format == "json":
        console.file.write(json.dumps(summary, indent=2) + "\n")
    else:
        render_summary(summary, console)


def emit(data: dict | list[dict], output_format: str, console: Console, title: str, extra: dict | None = None) -> None:
    """Rows or a summary as tables for people, or JSON / CSV for scripts."""
    if extra:
        data = {"rows": data, **extra} if isinstance(data, list) else {**data, **extra}
    if output_format == "json":
        console.file.write(json.dumps(data, indent=2, default=str) + "\n")
        return
    for name, rows in sections(data, title).items():
        if output_format == "csv":
            console.file.write(f"# {name}\n")
            write_csv(rows, console)
        else:
            render_rows(rows, name, console)


def sections(data: dict | list[dict], title: str) -> dict[str, list[dict]]:
    """A summary as named lists of rows: its plain values in one, each nested value in its own."""
    if isinstance(data, list):
        return {title: data}
    result = {title: [{"name": k, "value": v} for k, v in data.items() if not isinstance(v, (list, dict))]}
    for key, value in data.items():
        if isinstance(value, list):
            result[key] = value
        elif isinstance(value, dict):
            result[key] = [{"name": k, **v} if isinstance(v, dict) else {"name": k, "value": v}
                           for k, v in value.items()]
    return result


def write_csv(rows: list[dict], console: Console) -> None:
    columns = list(dict.fromkeys(c for row in rows for c in row))
    writer = csv.DictWriter(console.file, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


def render_rows(rows: list[dict], title: str, console: Console, limit: int = 50) -> None:
    columns = list(dict.fromkeys(c for row in rows for c in row))
    table = titled_table(f"{title} ({len(rows)} rows)" if len(rows) > limit else title)
    for column in columns:
        table.add_column(str(column), overflow="fold")
    for row in rows[:limit]:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    console.print(table)
    if len(rows) > limit:
        console.print(f"... and {len(rows) - limit} more (use --format json or csv for all)")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
