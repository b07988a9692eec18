"""The ``onion`` command line: ingest, train, score, select, materialize, curate, inspect."""
from __future__ import annotations

import argparse
import sys

from rich.console import Console

from shards import DatasetError

from pipeline.cli_common import (EXIT_FAILURE, EXIT_USAGE, OnionArgumentParser, UsageError, add_ray_options, fraction,
                                 package_version, positive_int)
from pipeline.cli_bench import add_bench_parser
from pipeline.cli_curation import add_curate_parser, add_curation_parsers
from pipeline.cli_train import add_train_parser
from pipeline.sources import SOURCES, SourceError, SourceOptions
from trainer.errors import RunError


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
    add_bench_parser(commands)

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

    verify = commands.add_parser(
        "verify", help="check every shard against the manifest and index (sizes, checksums, tar members)",
        description="Read each shard whole and parse it in memory (nothing is extracted): size and sha256 "
                    "against the manifest; members regular files with safe names, in the index's order, "
                    "none duplicated, missing or extra; each image's bytes against the index's sha256. "
                    "Exit 0 when all is well, 1 with one line per problem naming the shard and member.",
    )
    verify.add_argument("dataset", help="dataset location (path or fsspec URL)")
    verify.set_defaults(handler=run_verify)
    return parser


def run_ingest(args: argparse.Namespace, console: Console) -> None:
    from pipeline.encode import EncodeOptions
    from pipeline.ingest import IngestOptions, ingest
    from pipeline.ray_runtime import describe_nodes
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
    if report.tasks_per_node:
        console.print(f"shards written on {describe_nodes(report.tasks_per_node)}", soft_wrap=True)
    if accounting["quarantined"]:
        reasons = quarantine_reasons(report.url)
        console.print("quarantined: " + ", ".join(f"{count} {reason}" for reason, count in reasons.items()))
        console.print(f"every row with its reason: onion inspect {report.url}")


def quarantine_reasons(url: str) -> dict[str, int]:
    from pipeline.inspection import dataset_summary

    return dataset_summary(url)["quarantine_reasons"]


def run_verify(args: argparse.Namespace, console: Console) -> None:
    from shards.verify import verify_dataset

    checked, problems = verify_dataset(args.dataset)
    if problems:
        raise DatasetDamaged(f"{args.dataset}: {len(problems)} problem(s) in {checked} shards:\n" +
                             "\n".join(f"  {problem}" for problem in problems))
    console.print(f"{args.dataset}: {checked} shards verified, no problems", soft_wrap=True)


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


class DatasetDamaged(Exception):
    """``onion verify`` found problems (exit 1: the data, not the command line, is at fault)."""


def is_storage_failure(error: BaseException) -> bool:
    """Errors from the filesystem or object store (missing bucket, denied access, no credentials)."""
    return isinstance(error, OSError) or type(error).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        args.handler(args, console)
    except (SourceError, DatasetError, UsageError, RunError) as error:
        sys.stderr.write(f"onion {args.command}: error: {error}\n")
        return EXIT_USAGE
    except DatasetDamaged as error:
        sys.stderr.write(f"onion {args.command}: error: {error}\n")
        return EXIT_FAILURE
    except Exception as error:
        if not is_storage_failure(error):
            raise
        # Retries are spent (or pointless): name the locations involved, never the credentials.
        cause = getattr(error, "cause", None)  # a Ray task's own exception, without Ray's traceback
        error = cause if isinstance(cause, BaseException) else error
        where = ", ".join(str(getattr(args, name)) for name in ("dataset", "out", "run") if getattr(args, name, None))
        sys.stderr.write(f"onion {args.command}: error: {where}: {type(error).__name__}: {error}\n")
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
