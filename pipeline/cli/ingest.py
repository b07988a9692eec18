"""``onion ingest``: a source to shards, index and manifest."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from rich.console import Console

from pipeline.cli.common import add_ray_options, fraction, name_list, non_negative_int, positive_int, start_ray

if TYPE_CHECKING:
    from pipeline.ingest.sources import Source, SourceOptions

NAME = "ingest"
HELP = "turn a source into WebDataset shards + Parquet index + manifest"


def add_parser(commands: argparse._SubParsersAction) -> None:
    from pipeline.ingest.encode import IMAGE_FORMATS, RESIZE_MODES
    from pipeline.ingest.sources import SOURCES

    sources = ", ".join(f"{n}:DIR" if needs else n for n, (needs, _) in SOURCES.items())
    ingest = commands.add_parser(
        NAME, help=HELP,
        description=f"Read SOURCE ({sources}, or a path/URL of an onion dataset to re-shard) and write "
                    "OUT as tar shards, index.parquet and manifest.json, one Ray task per shard. Bad "
                    "inputs are quarantined with a reason, never dropped. Re-running the same command "
                    "after an interruption finishes the job with byte-identical output.",
    )
    ingest.add_argument("source", help=f"one of: {sources}; or an onion dataset path/URL")
    ingest.add_argument("out", help="output dataset location: a local path or fsspec URL (s3://..., memory://...)")
    layout = ingest.add_argument_group("shards")
    layout.add_argument("--shard-size", type=positive_int, default=2000,
                        help="examples per shard at most (default 2000)")
    layout.add_argument("--shard-bytes", type=positive_int, default=128 << 20,
                        help="planned bytes per shard at most, estimated from input sizes (default 128 MiB)")
    images = ingest.add_argument_group(
        "stored images",
        "By default every PNG, JPEG or WebP file is stored as it came, byte for byte (shards are about the "
        "size of the source files). A file is re-encoded only when it needs a change: a mode other than grey "
        "or RGB (CMYK, palette, alpha...), an EXIF orientation to apply, or a resize; it then keeps its own "
        "format (other formats such as BMP, GIF or TIFF become PNG). Pixel arrays (digits, mnist5k, cifar, "
        "synthetic) are stored as PNG. The index keeps each input's original_width/original_height beside "
        "the stored width/height.")
    images.add_argument("--image-format", choices=IMAGE_FORMATS, default="auto",
                        help="stored image format: auto (default: each file's own format, as above), or png/jpg "
                             "to re-encode every input not already in that format")
    images.add_argument("--max-side", type=positive_int, default=None, metavar="N",
                        help="side in pixels for --resize-mode; alone, it means --resize-mode max-side")
    images.add_argument("--resize-mode", choices=RESIZE_MODES, default=None,
                        help="none (default: images keep their size); max-side: downscale so the longer side is "
                             "N, aspect kept; center-crop: downscale so the shorter side is N, then keep the "
                             "centre N x N. Never upscales: a side already at most N is kept (a 1x4000 strip "
                             "center-cropped to 224 is 1x224). Lanczos resampling; an image already within N is "
                             "stored as it came")
    images.add_argument("--png-level", type=int, choices=range(10), default=None, metavar="0-9",
                        help="zlib level of encoded PNGs (default: 0, uncompressed, for images up to 64x64, "
                             "which decode ~4x faster; 6 for larger ones)")
    images.add_argument("--jpeg-quality", type=int, choices=range(1, 101), default=95, metavar="1-100",
                        help="quality of re-encoded JPEG and lossy WebP images (default 95)")
    layout.add_argument("--max-pixels", type=positive_int, default=40_000_000,
                        help="images with more pixels are quarantined as decompression bombs (default 40M)")
    layout.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the example-to-shard shuffle and of synthetic data (default 0)")
    layout.add_argument("--val-fraction", type=fraction, default=None,
                        help="share of examples put in the val split, by key hash, for sources without their "
                             "own split (imagefolder, wds, parquet, hf 0; synthetic 0.2; digits/mnist5k use a "
                             "fixed 0.2)")
    tables = ingest.add_argument_group(
        "parquet source",
        "parquet:URL_OR_GLOB reads image tables in Parquet (a file, a folder of .parquet files or a glob; local or "
        "any fsspec URL), hf:DIR a local folder that Hugging Face datasets' save_to_disk wrote. A row's image is "
        "the bytes in --image-column (binary, or datasets' {bytes, path} Image struct), stored byte for byte; "
        "the driver reads only the small columns, the Ray tasks read images by row group. Labels: integers, or "
        "strings mapped to their sorted names; datasets' ClassLabel names are used, --class-names overrides. "
        "Splits: a file named for one (train-00000-of-00002.parquet; val, valid, validation and test mean val), "
        "--split-column, else --val-fraction by key hash (default 0). A null image, bytes that are not an image, "
        "a null or unknown label or split are quarantined with their reason.")
    tables.add_argument("--image-column", default="image", metavar="COLUMN",
                        help="column of image bytes (default: image)")
    tables.add_argument("--label-column", default=None, metavar="COLUMN",
                        help="column of labels, integers or strings (default: label, when the tables have it; "
                             "else the data are unlabelled)")
    tables.add_argument("--split-column", default=None, metavar="COLUMN",
                        help="column naming each row's split (train, val, valid, validation, test)")
    tables.add_argument("--key-column", default=None, metavar="COLUMN",
                        help="column of example keys, made key-safe (default: <file path>-<row number>)")
    synthetic = ingest.add_argument_group("synthetic source")
    synthetic.add_argument("--count", type=positive_int, default=10_000, help="number of examples (default 10000)")
    synthetic.add_argument("--image-size", type=positive_int, default=32, help="side in pixels (default 32)")
    synthetic.add_argument("--classes", type=positive_int, default=10, help="number of classes (default 10)")
    synthetic.add_argument("--dup-rate", type=fraction, default=0.05,
                           help="share of exact duplicates planted (default 0.05)")
    synthetic.add_argument("--near-dup-rate", type=fraction, default=0.05,
                           help="share of near-duplicates planted (default 0.05)")
    synthetic.add_argument("--flip-rate", type=fraction, default=0.05,
                           help="share of flipped labels planted (default 0.05)")
    wds = ingest.add_argument_group(
        "wds source",
        "wds:PATTERN copies existing WebDataset shards (img2dataset, webdataset's ShardWriter): a brace pattern "
        "or glob of uncompressed .tar files, local or any fsspec URL, e.g. wds:'shards/{00000..00099}.tar'. "
        "The image is a sample's .jpg/.jpeg/.png/.webp member, stored byte for byte; its .json and .txt go "
        "into the example's JSON member. A sample without an image or (in labelled shards) a label, a duplicate "
        "key, a member that is not an image and every unsafe or cut member are quarantined with their reason. "
        "Shards where no sample has a .cls member are indexed unlabelled (see --unlabelled).")
    wds.add_argument("--label-field", default=None, metavar="NAME",
                     help="take the label from this field of each sample's .json member (default: the .cls member)")
    wds.add_argument("--class-names", type=name_list, default=None, metavar="A,B,...",
                     help="wds:, parquet:, hf: class names in label order (label i is the i-th name); labels "
                          "may then also be written as a name. Default: datasets' ClassLabel names where a table "
                          "has them; else classes 0 .. N for the largest integer label N, or, when no label is an "
                          "integer, the distinct names sorted")
    wds.add_argument("--unlabelled", action="store_true",
                     help="wds:, parquet:, hf: read no labels even where there are some: images (with captions) "
                          "without classes, as LAION or DataComp shards are. Without it, wds: shards where no "
                          "sample has a .cls member (and no --label-field is given), and tables without a label "
                          "column (and no --label-column), are unlabelled too. An unlabelled dataset can be "
                          "scored with exact, phash, embed --model NAME|pixels and random, and selected with "
                          "--dedup; training and the scorers that learn labels refuse it")
    wds.add_argument("--in-place", action="store_true",
                     help="wds: only: index the shards where they are instead of copying them; OUT gets only "
                          "index.parquet and manifest.json (the manifest's shard_root names the shards' folder), "
                          "the tars are never written to. Every shard is read once, whole, in a Ray task. "
                          "Images are used as stored (no resize or re-encode)")
    wds.add_argument("--check", choices=("header", "decode"), default="header",
                     help="with --in-place: header (default) checks the tar structure, each image's sha256 and "
                          "its image header; decode decodes every image too (slower)")
    add_ray_options(ingest)
    ingest.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> None:
    from pipeline.ingest.encode import EncodeOptions
    from pipeline.ingest.job import IngestOptions, ingest
    from pipeline.ingest.sources import open_source
    from pipeline.inspection.dataset import dataset_summary
    from pipeline.ray_runtime import describe_nodes
    from shards.errors import UsageError
    from shards.manifest import is_labelled

    resize_mode, max_side = resize_options(args.resize_mode, args.max_side)
    encode = EncodeOptions(image_format=args.image_format, jpeg_quality=args.jpeg_quality, max_pixels=args.max_pixels,
                           png_level=args.png_level, resize_mode=resize_mode, max_side=max_side)
    if args.in_place and not args.source.startswith("wds:"):
        raise UsageError(f"--in-place indexes WebDataset shards where they are: give wds:PATTERN, not {args.source!r} "
                         "(other sources are copied: drop --in-place)")
    if args.in_place and (resize_mode != "none" or args.image_format != "auto"):
        raise UsageError("--in-place uses images as stored: drop --resize-mode/--max-side/--image-format "
                         "(or copy the shards, without --in-place)")
    source = open_source(args.source, source_options(args))
    options = IngestOptions(shard_size=args.shard_size, shard_bytes=args.shard_bytes, seed=args.seed,
                            encode=encode)
    start_ray(args)
    if args.in_place:
        from pipeline.ingest.in_place import InPlaceOptions, ingest_in_place

        report = ingest_in_place(source, args.out, InPlaceOptions(check=args.check, max_pixels=args.max_pixels),
                                 command=args.argv)
    else:
        report = ingest(source, args.out, options, command=args.argv)
    accounting = report.manifest["accounting"]
    state = "already complete, nothing to do" if report.already_complete else (
        f"resumed {report.resumed_shards} finished shards" if report.resumed_shards else "written")
    console.print(f"{report.url}: {state}. inputs={accounting['inputs']} ok={accounting['ok']} "
                  f"quarantined={accounting['quarantined']} shards={len(report.manifest['shards'])}", soft_wrap=True)
    if not is_labelled(report.manifest):
        console.print(f"unlabelled: {unlabelled_why(source)}; onion train and the scores forgetting, loss and "
                      "el2n need labels, the grouping scores and select --dedup do not", soft_wrap=True)
    if report.tasks_per_node:
        done = "indexed" if args.in_place else "written"
        console.print(f"shards {done} on {describe_nodes(report.tasks_per_node)}", soft_wrap=True)
    if "img2dataset" in report.manifest:  # its own counts beside the inputs: URLs it attempted, failed...
        from pipeline.ingest.sources.img2dataset import describe

        console.print(describe(report.manifest["img2dataset"]), soft_wrap=True)
    if accounting["quarantined"]:
        reasons = dataset_summary(report.url)["quarantine_reasons"]
        console.print("quarantined: " + ", ".join(f"{count} {reason}" for reason, count in reasons.items()),
                      soft_wrap=True)
        console.print(f"every row with its reason: onion inspect {report.url}", soft_wrap=True)


def unlabelled_why(source: Source) -> str:
    """Why a source gave an unlabelled dataset, in the words of its options."""
    if source.parameters.get("unlabelled"):
        return "--unlabelled"
    if source.spec.startswith("dataset:"):
        return "the source dataset is unlabelled"
    if source.spec.startswith("wds:"):
        return "no sample has a .cls member (give --label-field NAME to read labels from each .json)"
    return "the tables have no label column (give --label-column COLUMN)"


def source_options(args: argparse.Namespace) -> SourceOptions:
    """The flags whose names are :class:`SourceOptions` fields (each source takes the ones it needs)."""
    from dataclasses import fields

    from pipeline.ingest.sources import SourceOptions

    return SourceOptions(**{field.name: getattr(args, field.name) for field in fields(SourceOptions)
                            if hasattr(args, field.name)})


def resize_options(mode: str | None, max_side: int | None) -> tuple[str, int | None]:
    """``--resize-mode`` and ``--max-side`` as (resize_mode, max_side); a usage error when they disagree."""
    from shards.errors import UsageError

    if mode is None:
        return ("max-side", max_side) if max_side is not None else ("none", None)
    if mode != "none" and max_side is None:
        raise UsageError(f"--resize-mode {mode} needs --max-side N (the side in pixels)")
    if mode == "none" and max_side is not None:
        raise UsageError("--max-side has no effect with --resize-mode none; drop one of them")
    return mode, max_side
