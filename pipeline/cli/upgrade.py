"""``onion upgrade``: bring a dataset an earlier onion wrote to this onion's format."""
from __future__ import annotations

import argparse

from rich.console import Console

NAME = "upgrade"
HELP = "rewrite a dataset written by an earlier onion in this onion's format (a single index.parquet into parts)"


def add_parser(commands: argparse._SubParsersAction) -> None:
    upgrade = commands.add_parser(
        NAME, help=HELP,
        description="Datasets written before the index was partitioned hold one index.parquet, which every "
                    "reader rank reads whole. This writes it as index/part-NNNNNN.parquet, one part per shard, "
                    "lists the parts in manifest.json and removes index.parquet. Shards, scores and selections "
                    "are not touched. Every command still reads the old layout; only the new one lets a reader "
                    "hold nothing sized by the dataset. Running it again does nothing.",
    )
    upgrade.add_argument("dataset", help="dataset location (path or fsspec URL)")
    upgrade.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> None:
    from shards.upgrade import upgrade_dataset

    done = upgrade_dataset(args.dataset)
    what = "rewrote its index as" if done.changed else "already in this onion's format:"
    console.print(f"{done.url}: {what} {done.parts} index parts, {done.rows} rows", soft_wrap=True)
