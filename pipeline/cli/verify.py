"""``onion verify``: fsck for datasets."""
from __future__ import annotations

import argparse

from rich.console import Console

from shards import DatasetDamaged

NAME = "verify"
HELP = "check every shard against the manifest and index (sizes, checksums, tar members)"


def add_parser(commands: argparse._SubParsersAction) -> None:
    verify = commands.add_parser(
        NAME, help=HELP,
        description="Read each shard whole and parse it in memory (nothing is extracted): size and sha256 "
                    "against the manifest; members regular files with safe names, in the index's order, "
                    "none duplicated, missing or extra; each image's bytes against the index's sha256. "
                    "Exit 0 when all is well, 1 with one line per problem naming the shard and member. "
                    "Also names selection parts folders that no version lists (an interrupted select's).",
    )
    verify.add_argument("dataset", help="dataset location (path or fsspec URL)")
    verify.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> None:
    from shards.selections import unlisted_part_folders
    from shards.urls import location
    from shards.verify import verify_dataset

    checked, problems = verify_dataset(args.dataset)
    unlisted = unlisted_part_folders(location(args.dataset))
    if unlisted:  # garbage, not damage: said, not counted as a problem
        console.print(f"{args.dataset}: {len(unlisted)} selection parts folder(s) that no version lists (left by an "
                      "interrupted select or pruned epoch; nothing reads them, safe to delete): "
                      + ", ".join(unlisted), soft_wrap=True)
    if problems:
        raise DatasetDamaged(f"{args.dataset}: {len(problems)} problem(s) in {checked} shards:\n" +
                             "\n".join(f"  {problem}" for problem in problems))
    console.print(f"{args.dataset}: {checked} shards verified, no problems", soft_wrap=True)
