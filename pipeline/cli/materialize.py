"""``onion materialize``: a selection's survivors as shards under ``DATASET/kept/vNNNN``, or with
``--keys PREFIX`` only the kept keys per shard, for a user's own WebDataset or wids loader."""
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
                    "through the index); it pays when a small share is read for many epochs from an object store. "
                    "With --keys, nothing is copied: the kept train examples' keys per shard are written for a "
                    "loader of your own (webdataset, wids) to filter the shards by, and no Ray is started.",
    )
    materialize.add_argument("dataset", help="dataset location")
    materialize.add_argument("--selection", required=True, help="selection version, e.g. v0001")
    materialize.add_argument("--keys", metavar="PREFIX", default=None,
                             help="instead of survivor shards, write PREFIX.parquet (shard, wds_key, key: one row per "
                                  "kept train example) and PREFIX.json ({shard: [keys]}): shard as webdataset's "
                                  "__url__ (the source shards' paths for a dataset indexed --in-place), wds_key as "
                                  "its __key__")
    add_ray_options(materialize)
    materialize.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> None:
    if args.keys is not None:
        from pipeline.curation.materialize import write_kept_keys

        files, table, by_shard = write_kept_keys(args.dataset, args.selection, args.keys)
        console.print(f"{' and '.join(files)}: {table.num_rows} kept keys of {args.selection} in "
                      f"{sum(bool(keys) for keys in by_shard.values())} of {len(by_shard)} shards", soft_wrap=True)
        return
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
