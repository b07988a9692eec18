"""The ``onion`` command line."""
from __future__ import annotations

import argparse
import sys

from rich.console import Console

from shards import DatasetError

from pipeline.sources import SOURCES, SourceError, SourceOptions
from trainer.errors import RunError

EXIT_USAGE = 2


class UsageError(Exception):
    """Arguments that do not make a runnable command; exit code 2."""


class OnionArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line, with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(EXIT_USAGE)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onion")
    except PackageNotFoundError:
        return "unknown (not installed)"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), not {value}")
    return value


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Ray")
    group.add_argument("--address", default=None,
                       help="Ray cluster to join (e.g. ray://head:10001 or auto); default: RAY_ADDRESS, "
                            "else an embedded local Ray")
    group.add_argument("--workers", type=positive_int, default=None,
                       help="CPUs the embedded local Ray may use (default: all)")


def build_parser() -> argparse.ArgumentParser:
    parser = OnionArgumentParser(
        prog="onion",
        description="Tri-level efficient ViT training: prune examples, tokens and attention.",
    )
    parser.add_argument("--version", action="version", version=f"onion {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OnionArgumentParser)

    sources = ", ".join(f"{n}:DIR" if needs else n for n, (needs, _) in SOURCES.items())
    ingest = commands.add_parser(
        "ingest", help="turn a source into WebDataset shards + Parquet index + manifest",
        description=f"Read SOURCE ({sources}, or a path/URL of an onion dataset to re-shard) and write "
                    "OUT as tar shards, index.parquet and manifest.json, one Ray task per shard. Bad "
                    "inputs are quarantined with a reason, never dropped. Re-running the same command "
                    "after an interruption finishes the job with byte-identical output.",
    )
    ingest.add_argument("source", help=f"one of: {sources}; or an onion dataset path/URL")
    ingest.add_argument("out", help="output dataset location: a local path or fsspec URL (s3://..., memory://...)")
    layout = ingest.add_argument_group("shards")
    layout.add_argument("--shard-size", type=positive_int, default=2000, help="examples per shard at most (default 2000)")
    layout.add_argument("--shard-bytes", type=positive_int, default=128 << 20,
                        help="planned bytes per shard at most, estimated from input sizes (default 128 MiB)")
    layout.add_argument("--format", dest="image_format", choices=("png", "jpg"), default="png",
                        help="stored image format (default png; inputs already in it are kept byte for byte)")
    layout.add_argument("--png-level", type=int, choices=range(10), default=None, metavar="0-9",
                        help="zlib level of encoded PNGs (default: 0, uncompressed, for images up to 64x64, "
                             "which decode ~4x faster; 6 for larger ones)")
    layout.add_argument("--jpeg-quality", type=positive_int, default=95, help="JPEG quality when encoding jpg (default 95)")
    layout.add_argument("--max-pixels", type=positive_int, default=40_000_000,
                        help="images with more pixels are quarantined as decompression bombs (default 40M)")
    layout.add_argument("--seed", type=int, default=0, help="seed of the example-to-shard shuffle and of synthetic data")
    layout.add_argument("--val-fraction", type=fraction, default=None,
                        help="share of examples put in the val split, by key hash, for sources without their "
                             "own split (default: imagefolder 0, synthetic 0.2; digits/mnist5k use a fixed 0.2)")
    synthetic = ingest.add_argument_group("synthetic source")
    synthetic.add_argument("--count", type=positive_int, default=10_000, help="number of examples (default 10000)")
    synthetic.add_argument("--image-size", type=positive_int, default=32, help="side in pixels (default 32)")
    synthetic.add_argument("--classes", type=positive_int, default=10, help="number of classes (default 10)")
    synthetic.add_argument("--dup-rate", type=fraction, default=0.05, help="share of exact duplicates planted (default 0.05)")
    synthetic.add_argument("--near-dup-rate", type=fraction, default=0.05, help="share of near-duplicates planted (default 0.05)")
    synthetic.add_argument("--flip-rate", type=fraction, default=0.05, help="share of flipped labels planted (default 0.05)")
    add_ray_options(ingest)
    ingest.set_defaults(handler=run_ingest)

    add_train_parser(commands)
    add_curation_parsers(commands)
    add_curate_parser(commands)

    inspect = commands.add_parser(
        "inspect", help="show what a dataset holds, and who a selection kept or dropped and why",
        description="Without options: counts by split, class and status, quarantined examples with their "
                    "reasons, shards with sizes. With --selection: kept/dropped/quarantined per class and "
                    "reason, score quantiles, and optional pictures. --key, --diff and --sql answer the rest.",
    )
    inspect.add_argument("dataset", help="dataset location (path or fsspec URL)")
    inspect.add_argument("--selection", metavar="VERSION", help="summarise a selection, e.g. v0001")
    inspect.add_argument("--key", help="lineage of one example across all selections, with its scores")
    inspect.add_argument("--diff", nargs=2, metavar=("OLD", "NEW"), help="what changed between two selections")
    inspect.add_argument("--plot", metavar="FILE.png", help="with --selection: score histogram of kept vs dropped")
    inspect.add_argument("--grid", metavar="FILE.png", help="with --selection: thumbnails of the highest and lowest scored")
    inspect.add_argument("--sql", help="DuckDB query over tables index, scores_<name>, selections")
    inspect.add_argument("--format", dest="output_format", choices=("table", "json", "csv"), default="table",
                         help="table for people (default), json or csv for scripts")
    inspect.set_defaults(handler=run_inspect)
    return parser


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

    if args.address:
        from pipeline.ray_runtime import init_ray

        init_ray(args.address, args.workers)
    context = ScoreContext(args.dataset, args.run, args.first_epoch, args.last_epoch, args.seed, args.workers or 2)
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


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    from trainer.config import TrainConfig

    train = commands.add_parser(
        "train", help="train a token/attention-sparse timm ViT on an onion dataset",
        description="Stream DATASET's train split into a timm ViT that drops tokens and attention "
                    "connections, evaluate on val every epoch, checkpoint atomically, and write "
                    "per-example training dynamics. Settings: defaults < --config YAML < flags.",
    )
    train.add_argument("dataset", nargs="?", help=TrainConfig.help_of()["dataset"])
    train.add_argument("--config", help="YAML file with any of the settings below (flag names with _)")
    train.add_argument("--resume", metavar="RUN", help="continue RUN from its last checkpoint, at the same sample")
    add_train_options(train)
    train.set_defaults(handler=run_train)


def add_train_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per training setting, with its help text and default."""
    from trainer.config import TrainConfig

    group = parser.add_argument_group("training settings")
    for name, text in TrainConfig.help_of().items():
        if name == "dataset" or name in skip:
            continue
        default = TrainConfig.__dataclass_fields__[name].default
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"{text} (default {default})")
        elif name == "token_blocks":
            group.add_argument(flag, type=block_list, default=None, help=text)
        else:
            kind = float if isinstance(default, float) else int if name in INT_KNOBS else str
            group.add_argument(flag, type=kind, default=None, help=f"{text} (default {default})")


def train_config(args: argparse.Namespace, **fixed: object) -> "TrainConfig":  # noqa: F821 - imported lazily
    from trainer.config import TrainConfig

    overrides = {name: getattr(args, name, None) for name in TrainConfig.help_of()}
    config = TrainConfig.from_sources(args.config, {**overrides, **fixed})
    if not config.dataset or not config.out:
        raise UsageError(f"{args.command} needs DATASET and --out RUN")
    return config


INT_KNOBS = {"img_size", "patch_size", "depth", "embed_dim", "num_heads", "epochs", "batch_size", "seed",
             "workers", "checkpoint_every", "nproc"}


def block_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block numbers like 3,6,9, not {text!r}") from None


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


def run_train(args: argparse.Namespace, console: Console) -> None:
    from trainer.launch import saved_config, train

    config = saved_config(args.resume) if args.resume else train_config(args)
    summary = train(config, resume=bool(args.resume))
    console.print(f"{config.out}: val top-1 {summary['val_top1']:.2f}%  {summary['images_per_second']:.0f} img/s  "
                  f"{summary['train_seconds']:.1f} s training")


def run_ingest(args: argparse.Namespace, console: Console) -> None:
    from pipeline.encode import EncodeOptions
    from pipeline.ingest import IngestOptions, ingest
    from pipeline.sources import open_source

    source = open_source(args.source, SourceOptions(
        val_fraction=args.val_fraction, seed=args.seed, count=args.count, image_size=args.image_size,
        classes=args.classes, dup_rate=args.dup_rate, near_dup_rate=args.near_dup_rate, flip_rate=args.flip_rate,
    ))
    options = IngestOptions(shard_size=args.shard_size, shard_bytes=args.shard_bytes, seed=args.seed,
                            encode=EncodeOptions(args.image_format, args.jpeg_quality, args.max_pixels, args.png_level))
    report = ingest(source, args.out, options, command=["onion", *sys.argv[1:]],
                    ray_address=args.address, workers=args.workers)
    accounting = report.manifest["accounting"]
    state = "already complete, nothing to do" if report.already_complete else (
        f"resumed {report.resumed_shards} finished shards" if report.resumed_shards else "written")
    console.print(f"{report.url}: {state}. inputs={accounting['inputs']} ok={accounting['ok']} "
                  f"quarantined={accounting['quarantined']} shards={len(report.manifest['shards'])}")
    if accounting["quarantined"]:
        reasons = quarantine_reasons(report.url)
        console.print("quarantined: " + ", ".join(f"{count} {reason}" for reason, count in reasons.items()))
        console.print(f"every row with its reason: onion inspect {report.url}")


def quarantine_reasons(url: str) -> dict[str, int]:
    from pipeline.inspection import dataset_summary

    return dataset_summary(url)["quarantine_reasons"]


def run_inspect(args: argparse.Namespace, console: Console) -> None:
    from pipeline.inspection import emit, inspect_dataset

    if (args.plot or args.grid) and not args.selection:
        raise UsageError("--plot and --grid draw a selection: add --selection VERSION")
    try:
        if args.sql:
            from pipeline.sql import query

            emit(query(args.dataset, args.sql).to_pylist(), args.output_format, console, "query")
        elif args.key:
            from pipeline.selection_report import key_lineage, key_scores

            emit(key_lineage(args.dataset, args.key), args.output_format, console, f"lineage of {args.key}",
                 extra={"scores": key_scores(args.dataset, args.key)})
        elif args.diff:
            from pipeline.selection_report import selection_diff

            emit(selection_diff(args.dataset, *args.diff), args.output_format, console, f"{args.diff[0]} -> {args.diff[1]}")
        elif args.selection:
            run_selection_report(args, console)
        else:
            inspect_dataset(args.dataset, args.output_format, console)
    except (KeyError, ValueError, FileNotFoundError) as error:
        raise UsageError(str(error).strip("'\"")) from error


def run_selection_report(args: argparse.Namespace, console: Console) -> None:
    from pipeline.inspection import emit
    from pipeline.selection_report import selection_summary

    emit(selection_summary(args.dataset, args.selection), args.output_format, console, f"selection {args.selection}")
    if args.plot or args.grid:
        from pipeline.plots import extremes_grid, score_histogram

        if args.plot:
            score_histogram(args.dataset, args.selection, args.plot)
            console.print(f"wrote {args.plot}")
        if args.grid:
            extremes_grid(args.dataset, args.selection, args.grid)
            console.print(f"wrote {args.grid}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        args.handler(args, console)
    except (SourceError, DatasetError, UsageError, RunError) as error:
        sys.stderr.write(f"onion {args.command}: error: {error}\n")
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
