"""``onion curate``: the whole example-level method, rounds of train -> score -> select -> survivors."""
from __future__ import annotations

import argparse

from rich.console import Console

from pipeline.cli.common import add_ray_options, keep_share, positive_int, start_ray
from pipeline.cli.train import add_train_options, train_config

NAME = "curate"
HELP = "the whole example-level method: rounds of train -> score -> select, training on each round's survivors"


def add_parser(commands: argparse._SubParsersAction) -> None:
    curate = commands.add_parser(
        NAME, help=HELP,
        description="Round 0 keeps a random --keep share; each later round scores the kept examples by the "
                    "previous phase's training dynamics, swaps the --remove-n easiest out and as many from "
                    "the dropped pool in, and training continues (same model, optimiser, schedule) on "
                    "the new survivors for --round-epochs, read from the source shards through the index. "
                    "Each round's training starts as onion train does (--nproc N: N local processes, DDP), from "
                    "the run's last checkpoint; scoring and selection run on Ray between the rounds. "
                    "Run the same command again to resume.",
    )
    curate.add_argument("dataset", help="source dataset location")
    curate.add_argument("--config", help="YAML file with training settings")
    curate.add_argument("--rounds", type=positive_int, default=5, help="curation rounds (default 5)")
    curate.add_argument("--round-epochs", type=positive_int, default=30,
                        help="training epochs per round (default 30; forgetting needs 2 or more)")
    curate.add_argument("--keep", type=keep_share, default=0.8,
                        help="share of usable train examples kept (default 0.8)")
    curate.add_argument("--remove-n", type=positive_int, help="examples swapped per round (default: 10%% of the kept)")
    curate.add_argument("--scorer", default="forgetting", choices=("forgetting", "loss"),
                        help="dynamics-based score that ranks the kept examples (default forgetting)")
    curate.add_argument("--dedup", metavar="GROUPS",
                        help="before round 0, keep one example per group of copies in scores/GROUPS (made by onion "
                             "score DATASET exact|phash|embed); the others are dropped as duplicate-of:KEY in every "
                             "round and never restored")
    curate.add_argument("--dedup-rule", choices=("lowest-key", "typical"), default="lowest-key",
                        help="which member of a group stays (default lowest-key)")
    curate.add_argument("--survivor-shards", action="store_true",
                        help="also write each round's survivors as compact shards (DATASET/kept/vNNNN) and train "
                             "on those: pays on object stores when a small share is read for many epochs")
    add_ray_options(curate)
    # The rounds choose the examples; --seed also seeds the rounds' random choices.
    # --nproc N: each round's training phase on N local processes (DDP), as onion train --nproc N trains.
    add_train_options(curate, skip=("epochs", "selection", "example_strategy", "prune_ratio", "prune_anneal"))
    curate.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> None:
    from pipeline.curation.rounds import CurationPlan, check_plan, curate

    plan = CurationPlan(args.rounds, args.round_epochs, args.keep, args.remove_n, args.scorer, args.seed or 0,
                        args.survivor_shards, args.dedup, args.dedup_rule)
    check_plan(plan)
    config = train_config(args, dataset=args.dataset, epochs=args.rounds * args.round_epochs)
    from trainer.preflight import check_start

    check_start(config)  # the device and the model, before Ray starts
    start_ray(args)
    result = curate(args.dataset, config, plan)
    console.print(f"{config.out}: {args.rounds} rounds, selections {', '.join(result['selections'])}; "
                  f"val top-1 {result['val_top1']:.2f}%  {result['images_per_second']:.0f} img/s  "
                  f"{result['train_seconds']:.1f} s training", soft_wrap=True)
    for report in result["rounds"]:
        console.print(describe_round(report), soft_wrap=True)


def describe_round(report: dict) -> str:
    """``round 1 (v0002): dropped 300 unforgettable, restored 300; 12 never-learned found, 12 kept``."""
    dropped = ", ".join(f"{count} {reason}" for reason, count in report["dropped"].items()) or "none"
    text = f"round {report['round']} ({report['version']}): kept {report['kept']}, dropped {dropped}"
    if report["round"]:
        text += f", restored {report['restored']} from the dropped pool"
    if "never_learned" in report:
        text += (f"; never-learned in its window: {report['never_learned']}, "
                 f"of which kept {report['never_learned_kept']}")
    return text
