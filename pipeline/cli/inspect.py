"""``onion inspect``: what a dataset holds, and who a selection kept or dropped and why."""
from __future__ import annotations

import argparse
import sys

from rich.console import Console

from pipeline.cli.common import positive_int
from shards import UsageError

NAME = "inspect"
HELP = "show what a dataset holds, and who a selection kept or dropped and why"


def add_parser(commands: argparse._SubParsersAction) -> None:
    inspect = commands.add_parser(
        NAME, help=HELP,
        description="Without a mode: counts by split, class and status, quarantined examples with their "
                    "reasons, shards with sizes. One mode at a time: --selection (kept/dropped/quarantined per "
                    "class and reason, score quantiles, optional pictures), --key, --diff, --groups (the largest "
                    "groups of copies a grouping scorer found, optionally as pictures) or --sql.",
    )
    inspect.add_argument("dataset", help="dataset location (path or fsspec URL)")
    modes = inspect.add_mutually_exclusive_group()
    modes.add_argument("--selection", metavar="VERSION", help="summarise a selection, e.g. v0001")
    modes.add_argument("--key", help="one example: split, label, status, its scores and its lineage across selections")
    modes.add_argument("--diff", nargs=2, metavar=("OLD", "NEW"), help="what changed between two selections")
    modes.add_argument("--groups", metavar="NAME",
                       help="the largest groups of copies in scores/NAME (exact, phash or embed), nearest first")
    modes.add_argument("--sql", help="DuckDB query over tables index, scores_<name> (group tables included), "
                                     "selections")
    inspect.add_argument("--plot", metavar="FILE.png", help="with --selection: score histogram of kept vs dropped")
    inspect.add_argument("--grid", metavar="FILE.png",
                         help="with --selection: thumbnails of the highest and lowest scored; with --groups: the "
                              "largest groups as rows of images")
    inspect.add_argument("--limit", type=positive_int, default=20,
                         help="with --groups: how many groups to list (default 20)")
    inspect.add_argument("--format", dest="output_format", choices=("table", "json", "csv"), default="table",
                         help="table for people (default), json or csv for scripts")
    inspect.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> None:
    from pipeline.inspection.dataset import emit, inspect_dataset

    if args.plot and not args.selection:
        raise UsageError("--plot draws a selection: add --selection VERSION")
    if args.grid and not (args.selection or args.groups):
        raise UsageError("--grid draws a selection or groups of copies: add --selection VERSION or --groups NAME")
    if args.groups:
        run_groups(args, console)
    elif args.sql:
        from pipeline.inspection.sql import query

        emit(query(args.dataset, args.sql).to_pylist(), args.output_format, console, "query")
    elif args.key:
        from pipeline.inspection.selections import describe_key

        emit(describe_key(args.dataset, args.key), args.output_format, console, f"example {args.key}")
    elif args.diff:
        from pipeline.inspection.selections import selection_diff

        emit(selection_diff(args.dataset, *args.diff), args.output_format, console, f"{args.diff[0]} -> {args.diff[1]}")
    elif args.selection:
        run_selection(args, console)
    else:
        inspect_dataset(args.dataset, args.output_format, console)


def tell(args: argparse.Namespace, console: Console, message: str) -> None:
    """A note for the person: on stdout with tables, on stderr when stdout is JSON or CSV for a script."""
    if args.output_format == "table":
        console.print(message, soft_wrap=True)
    else:
        sys.stderr.write(message + "\n")


def run_selection(args: argparse.Namespace, console: Console) -> None:
    from pipeline.inspection.dataset import emit
    from pipeline.inspection.selections import selection_summary

    summary = selection_summary(args.dataset, args.selection)
    emit(summary, args.output_format, console, f"selection {args.selection}")
    if summary.get("all_scores_tied") and args.output_format == "table":
        console.print(f"[bold]every scored example in {args.selection} has the same score "
                      f"({summary['all_scores_tied']:g}): the scores carried no signal, and the drops were decided "
                      "by the tie-break alone[/bold]", soft_wrap=True)
    if args.plot or args.grid:
        from pipeline.inspection.plots import extremes_grid, score_histogram

        if args.plot:
            note = score_histogram(args.dataset, args.selection, args.plot)
            tell(args, console, f"wrote {args.plot}" + (f" (note: {note})" if note else ""))
        if args.grid:
            extremes_grid(args.dataset, args.selection, args.grid)
            tell(args, console, f"wrote {args.grid}")


def run_groups(args: argparse.Namespace, console: Console) -> None:
    from pipeline.inspection.dataset import emit
    from pipeline.inspection.selections import largest_groups

    groups = largest_groups(args.dataset, args.groups, args.limit)
    if args.output_format == "table":  # one line per group: members abbreviated, the full list is in json/csv
        rows = [{"group": g["group"], "size": g["size"], "representative": g["representative"],
                 "farthest": f"{g['members'][-1]['distance']:.4g} ({g['unit']})",
                 "members": " ".join(m["key"] for m in g["members"][:4]) + (" ..." if g["size"] > 4 else "")}
                for g in groups]
    else:
        rows = [{"group": g["group"], "size": g["size"], "representative": g["representative"], "member": m["key"],
                 "distance": m["distance"], "unit": g["unit"]} for g in groups for m in g["members"]]
    emit(rows, args.output_format, console, f"scores/{args.groups}: largest groups of copies")
    if not groups:
        tell(args, console, f"scores/{args.groups}: no group of two or more examples")
    if args.grid:
        from pipeline.inspection.plots import groups_grid

        drawn = groups_grid(args.dataset, args.groups, args.grid)
        tell(args, console, f"wrote {args.grid} ({drawn} groups)")
