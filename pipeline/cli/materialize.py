"""``onion materialize``: a selection's survivors as shards under ``DATASET/kept/vNNNN``."""
from __future__ import annotations

import argparse

from rich.console import Console

from pipeline.cli.common import add_ray_options, start_ray

NAME = "materialize"
HELP = "write a selection's survivors as shards under DATASET/kept/vNNNN"


def add_parser(commands: argparse._SubParsersAction) -> None:
    materialize = commands.add_parser(
        NAME, help=HELP,
        description="Repack the kept train examples (and the whole val split) into new balanced, shuffled "
                    "shards with their own index and manifest, one Ray task per shard. Not needed to train on "
                    "a selection (onion train DATASET --selection vNNNN reads the survivors from the source shards "
                    "through the index); it pays when a small share is read for many epochs from an object store.",
    )
    materialize.add_argument("dataset", help="dataset location")
    materialize.add_argument("--selection", required=True, help="selection version, e.g. v0001")
    add_ray_options(materialize)
    materialize.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> None:
    materialize_selection(args, args.selection, console)


def materialize_selection(args: argparse.Namespace, version: str, console: Console) -> None:
    from pipeline.curation.materialize import materialize
    from pipeline.ingest.job import IngestOptions

    start_ray(args)
    report = materialize(args.dataset, version, IngestOptions(), args.argv)
    accounting = report.manifest["selection"]
    console.print(f"{report.url}: kept {accounting['kept']} + dropped {accounting['dropped']} + quarantined "
                  f"{accounting['quarantined']} = {accounting['source_train_examples']} train examples; "
                  f"{len(report.manifest['shards'])} shards", soft_wrap=True)
