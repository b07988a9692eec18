"""``onion select``: choose the surviving train examples (``DATASET/selections/vNNNN.parquet``)."""
from __future__ import annotations

import argparse

from rich.console import Console

from pipeline.cli.common import add_ray_options, fraction, keep_share, non_negative_int, positive_int, start_ray

NAME = "select"
HELP = "choose the surviving train examples (writes DATASET/selections/vNNNN.parquet)"


def add_parser(commands: argparse._SubParsersAction) -> None:
    from pipeline.curation.selection import DEDUP_RULES, STRATEGIES

    select = commands.add_parser(
        NAME, help=HELP,
        description="One-shot selection by a strategy over scores, or one round of the paper's schedule: "
                    "--round 0 drops a random share; --round R --parent vNNNN drops the --remove-n easiest "
                    "kept examples and restores as many drawn at random from the dropped pool.",
    )
    select.add_argument("dataset", help="dataset location")
    select.add_argument("--scores", help="score name under DATASET/scores/ (not needed for random or round 0)")
    select.add_argument("--dedup", metavar="GROUPS",
                        help="first keep one example per duplicate group of these grouping scores (exact, phash or "
                             "embed; drops read duplicate-of:KEY); then --strategy, if --scores (or random) is "
                             "given, until --keep of all usable examples remain. With --round 0 the duplicates "
                             "stay dropped in every later round")
    select.add_argument("--dedup-rule", choices=list(DEDUP_RULES), default="lowest-key",
                        help="which member of a group stays: " + "; ".join(f"{k}: {v}" for k, v in
                                                                          DEDUP_RULES.items()))
    select.add_argument("--keep", type=keep_share, default=0.8,
                        help="share of usable train examples kept (default 0.8)")
    select.add_argument("--strategy", choices=list(STRATEGIES), default="drop-easy",
                        help="drop-easy (lowest scores go; the paper's), drop-hard, random, stratified (CCS)")
    select.add_argument("--class-balanced", action="store_true", help="keep the same share of every class")
    select.add_argument("--hard-cut", type=fraction, default=0.1,
                        help="stratified: hardest share cut first (default 0.1)")
    select.add_argument("--bins", type=positive_int, default=20, help="stratified: score bins (default 20)")
    select.add_argument("--round", dest="round_number", type=non_negative_int,
                        help="a curation round instead of a strategy")
    select.add_argument("--parent", help="the previous round's selection version (rounds >= 1)")
    select.add_argument("--remove-n", type=positive_int, help="examples swapped out and in this round (rounds >= 1)")
    select.add_argument("--seed", type=non_negative_int, default=0, help="seed of random choices (default 0)")
    select.add_argument("--materialize", action="store_true",
                        help="also write the survivor shards (not needed to train: onion train DATASET "
                             "--selection vNNNN reads the survivors through the index)")
    add_ray_options(select)
    select.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> None:
    from pipeline.cli.materialize import materialize_selection
    from pipeline.curation.selection import SelectOptions, SelectRequest, make_selection
    from shards import location, read_manifest
    from shards.index import index_parts
    from shards.manifest import is_labelled, require_labels

    dataset = location(args.dataset)
    manifest = read_manifest(dataset)
    if args.class_balanced:
        require_labels(manifest, dataset.url, "--class-balanced (the same share of every class)")
    options = SelectOptions(args.keep, args.strategy, args.class_balanced, args.hard_cut, args.bins, args.seed,
                            args.dedup_rule)
    if index_parts(manifest) is not None:  # decided on Ray actors (see pipeline.curation.partitioned_selection)
        start_ray(args)
    made = make_selection(dataset, SelectRequest(args.scores, options, args.dedup, args.round_number,
                                                 args.parent, args.remove_n))
    version = made.version
    use = (f"train on them with: onion train {dataset.url} --selection {version} --out RUN"
           if is_labelled(manifest) else
           f"their keys for your own loader: onion materialize {dataset.url} --selection {version} --keys PREFIX")
    console.print(f"{dataset.url}/selections/{made.file}: kept {made.kept} of {made.rows} train examples; "
                  f"{use}", soft_wrap=True)
    if args.materialize:
        materialize_selection(args, version, console)
