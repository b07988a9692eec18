"""``onion score``, ``onion select``, ``onion materialize`` and ``onion curate``."""
from __future__ import annotations

import argparse
import sys

from rich.console import Console

from pipeline.cli_common import UsageError, add_ray_options, positive_int
from pipeline.cli_train import add_train_options, train_config


def add_curation_parsers(commands: argparse._SubParsersAction) -> None:
    from pipeline.scoring import SCORERS
    from pipeline.selection import STRATEGIES

    score = commands.add_parser(
        "score", help="score every train example (writes DATASET/scores/NAME.parquet)",
        description="Score how hard each train example is. forgetting and loss read a training run's "
                    "dynamics; el2n runs the run's checkpoints over the shards in a pool of Ray actors; "
                    "random needs nothing. Higher scores are harder.",
    )
    score.add_argument("dataset", help="dataset location")
    score.add_argument("scorer", choices=list(SCORERS), help="which score")
    score.add_argument("--run", help="training run whose dynamics/checkpoints to use")
    score.add_argument("--first-epoch", type=int, help="dynamics window start (0-based epoch, inclusive)")
    score.add_argument("--last-epoch", type=int, help="dynamics window end (inclusive)")
    score.add_argument("--seed", type=int, default=0, help="seed of the random scorer")
    add_ray_options(score)
    score.set_defaults(handler=run_score)

    select = commands.add_parser(
        "select", help="choose the surviving train examples (writes DATASET/selections/vNNNN.parquet)",
        description="One-shot selection by a strategy over scores, or one round of the paper's schedule: "
                    "--round 0 drops a random share; --round R --parent vNNNN drops the --remove-n easiest "
                    "kept examples and restores as many drawn at random from the dropped pool.",
    )
    select.add_argument("dataset", help="dataset location")
    select.add_argument("--scores", help="score name under DATASET/scores/ (not needed for random or round 0)")
    select.add_argument("--keep", type=float, default=0.8, help="share of usable train examples kept (default 0.8)")
    select.add_argument("--strategy", choices=list(STRATEGIES), default="drop-easy",
                        help="drop-easy (lowest scores go; the paper's), drop-hard, random, stratified (CCS)")
    select.add_argument("--class-balanced", action="store_true", help="keep the same share of every class")
    select.add_argument("--hard-cut", type=float, default=0.1, help="stratified: hardest share cut first (default 0.1)")
    select.add_argument("--bins", type=positive_int, default=20, help="stratified: score bins (default 20)")
    select.add_argument("--round", dest="round_number", type=int, help="a curation round instead of a strategy")
    select.add_argument("--parent", help="the previous round's selection version (rounds >= 1)")
    select.add_argument("--remove-n", type=int, help="examples swapped out and in this round (rounds >= 1)")
    select.add_argument("--seed", type=int, default=0, help="seed of random choices")
    select.add_argument("--materialize", action="store_true", help="also write the survivor shards")
    add_ray_options(select)
    select.set_defaults(handler=run_select)

    materialize = commands.add_parser(
        "materialize", help="write a selection's survivors as shards under DATASET/kept/vNNNN",
        description="Repack the kept train examples (and the whole val split) into new balanced, shuffled "
                    "shards with their own index and manifest, one Ray task per shard.",
    )
    materialize.add_argument("dataset", help="dataset location")
    materialize.add_argument("--selection", required=True, help="selection version, e.g. v0001")
    add_ray_options(materialize)
    materialize.set_defaults(handler=run_materialize)


def run_score(args: argparse.Namespace, console: Console) -> None:
    from shards import location

    from pipeline.scoring import ScoreContext, compute_scores, write_scores

    workers = args.workers or 2
    if args.scorer == "el2n":  # the one scorer that runs on Ray: one actor per CPU of the cluster
        import ray

        from pipeline.ray_runtime import init_ray

        init_ray(args.address, args.workers)
        workers = args.workers or max(1, int(ray.cluster_resources().get("CPU", 2)))
    context = ScoreContext(args.dataset, args.run, args.first_epoch, args.last_epoch, args.seed, workers)
    try:
        table = compute_scores(args.scorer, context)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from error
    path = write_scores(location(args.dataset), args.scorer, table)
    console.print(f"{path}: {table.num_rows} examples scored")


def run_select(args: argparse.Namespace, console: Console) -> None:
    from shards import location

    from pipeline.scoring import read_scores
    from pipeline.selection import (SelectOptions, SourceExamples, initial_round, next_round, read_selection,
                                    save_selection, select)

    dataset = location(args.dataset)
    source = SourceExamples.of(dataset)
    try:
        scores = read_scores(dataset, args.scores) if args.scores else None
        if args.round_number is None:
            options = SelectOptions(args.keep, args.strategy, args.class_balanced, args.hard_cut, args.bins, args.seed)
            if scores is None and args.strategy != "random":
                raise UsageError(f"strategy {args.strategy} needs --scores NAME")
            table = select(source, scores, options)
            parameters = {"strategy": vars(options), "scores": args.scores}
        elif args.round_number == 0:
            table = initial_round(source, args.keep, args.seed)
            parameters = {"round": 0, "keep": args.keep, "seed": args.seed}
        else:
            if not (args.parent and args.remove_n and scores is not None):
                raise UsageError("rounds >= 1 need --parent vNNNN, --remove-n N and --scores NAME")
            label = "unforgettable" if args.scores == "forgetting" else "easy"
            table = next_round(source, read_selection(dataset, args.parent), args.parent, scores, args.remove_n,
                               args.round_number, args.seed, label)
            parameters = {"round": args.round_number, "parent": args.parent, "remove_n": args.remove_n,
                          "scores": args.scores, "seed": args.seed}
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from error
    version = save_selection(dataset, table, parameters)
    kept = sum(table["kept"].to_pylist())
    console.print(f"{dataset.url}/selections/{version}.parquet: kept {kept} of {table.num_rows} train examples")
    if args.materialize:
        args.selection = version
        run_materialize(args, console)


def run_materialize(args: argparse.Namespace, console: Console) -> None:
    from pipeline.ingest import IngestOptions
    from pipeline.materialize import materialize

    try:
        report = materialize(args.dataset, args.selection, IngestOptions(), ["onion", *sys.argv[1:]],
                             ray_address=args.address, workers=args.workers)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from error
    accounting = report.manifest["selection"]
    console.print(f"{report.url}: kept {accounting['kept']} + dropped {accounting['dropped']} + quarantined "
                  f"{accounting['quarantined']} = {accounting['source_train_examples']} train examples; "
                  f"{len(report.manifest['shards'])} shards")


def add_curate_parser(commands: argparse._SubParsersAction) -> None:
    curate = commands.add_parser(
        "curate", help="the whole example-level method: rounds of train -> score -> select -> survivor shards",
        description="Round 0 keeps a random --keep share; each later round scores the kept examples by the "
                    "previous phase's training dynamics, swaps the --remove-n easiest out and as many from "
                    "the dropped pool in, writes the survivors as shards, and training continues (same "
                    "model, optimiser, schedule) for --round-epochs. Run the same command again to resume.",
    )
    curate.add_argument("dataset", help="source dataset location")
    curate.add_argument("--config", help="YAML file with training settings")
    curate.add_argument("--rounds", type=positive_int, default=5, help="curation rounds (default 5)")
    curate.add_argument("--round-epochs", type=positive_int, default=30, help="training epochs per round (default 30)")
    curate.add_argument("--keep", type=float, default=0.8, help="share of usable train examples kept (default 0.8)")
    curate.add_argument("--remove-n", type=positive_int, help="examples swapped per round (default 10%% of the kept)")
    curate.add_argument("--scorer", default="forgetting", choices=("forgetting", "loss"),
                        help="dynamics-based score that ranks the kept examples (default forgetting)")
    add_ray_options(curate)
    add_train_options(curate, skip=("epochs", "nproc", "workers"))  # --workers is Ray's here; DataLoader workers: --config
    curate.set_defaults(handler=run_curate)


def run_curate(args: argparse.Namespace, console: Console) -> None:
    from pipeline.curate import CurationPlan, curate

    plan = CurationPlan(args.rounds, args.round_epochs, args.keep, args.remove_n, args.scorer, args.seed or 0)
    config = train_config(args, dataset=args.dataset, epochs=args.rounds * args.round_epochs)
    try:
        result = curate(args.dataset, config, plan, ray_address=args.address, workers=args.workers)
    except ValueError as error:
        raise UsageError(str(error)) from error
    console.print(f"{config.out}: {args.rounds} rounds, selections {', '.join(result['selections'])}; "
                  f"val top-1 {result['val_top1']:.2f}%  {result['train_seconds']:.1f} s training")
