"""``onion bench train`` and ``onion bench data``."""
from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from pipeline.cli.common import non_negative_int, positive_int
from shards import UsageError

NAME = "bench"
HELP = "side-by-side benchmarks: training arms, data loaders"


def add_parser(commands: argparse._SubParsersAction) -> None:
    from pipeline.bench.train import PRESETS
    from trainer.config import COMPILE_MODES

    bench = commands.add_parser(NAME, help=HELP)
    kinds = bench.add_subparsers(dest="bench", required=True, parser_class=type(bench))
    trained = kinds.add_parser(
        "train", help="dense vs each level alone vs all three, same data, seeds and settings",
        description="Train the arms dense, example (the paper's rounds), example-dynamic (per-epoch soft "
                    "pruning, InfoBatch), token, attention, token+attention, tri-level and tri-level-dynamic "
                    "(the cpu presets add token-merge, patch-dropout, curriculum, each with example-dynamic, and "
                    "tri-level-dynamic+curriculum; plus any "
                    "from --arms YAML) on a preset's data, interleaved over seeds, and write "
                    "results.md (table with each arm's paired top-1 difference to dense and its 95%% interval), "
                    "results.png (each arm's paired top-1 difference against its time relative to dense, with "
                    "the Pareto front of the arms no other arm beats on both) and results.json.",
    )
    trained.add_argument("--preset", choices=list(PRESETS), default="smoke",
                         help="smoke: CI-sized (< 3 min); cpu: mnist5k, a small ViT trained to convergence "
                              "(15 arms x 5 seeds, about 75 min on 2 cores); cpu-tiles: the same at patch 4 (49 "
                              "patches + the class token), with block-attention arms; cpu-deit-tiny: the earlier "
                              "DeiT-Tiny-shaped preset (8 epochs, not converged; 8 arms x 3 seeds in 45 min); "
                              "gpu: one CUDA card, DeiT-Tiny at 224 px in bf16, with block-sparse attention arms "
                              "(<= 6 min)")
    trained.add_argument("--seeds", type=positive_int, help="seeds per arm (default: the preset's)")
    trained.add_argument("--first-seed", type=non_negative_int, default=0,
                         help="the first seed (default 0): a bench run in pieces gives each piece its own seeds")
    trained.add_argument("--arms", help="YAML mapping of extra arm name -> training settings (curate: true for rounds, "
                                        "keep: share of examples kept), e.g. for a trade-off curve")
    trained.add_argument("--only", type=lambda text: text.split(","),
                         help="comma-separated arms to run besides dense (default: all)")
    trained.add_argument("--compile", choices=COMPILE_MODES, default="off",
                         help="torch.compile every arm (compile time counts in its wall clock; default off)")
    trained.add_argument("--out", help="results folder (default runs/bench-<preset>, outside the source tree). "
                                       "Run again, the same command keeps the runs its runs.json records as finished "
                                       "with the same settings and runs the rest")
    trained.add_argument("--merge", nargs="+", metavar="FOLDER",
                         help="train nothing: one table in --out from these bench folders of the preset (each ran "
                              "dense and its own seeds); each arm is paired with dense of the same seed and folder")
    trained.set_defaults(handler=run_bench_train)
    data = kinds.add_parser(
        "data", help="our shard reader vs torchvision ImageFolder on the same images (--photos: JPEG photos)",
        description="Ingest synthetic 32x32 images, write the same PNGs as an ImageFolder, and measure decoded "
                    "images/s with 1 and 2 DataLoader workers (interleaved, medians) and each reader's peak RSS. "
                    "--photos: the training loader on JPEG photos of mixed sizes (long side 300-1000 px, made "
                    "from scikit-learn's sample photos and ingested byte for byte), 224x224 crops with `basic` "
                    "augmentation, against torchvision ImageFolder with the same transforms and workers, run "
                    "both without and with onion's draft decode; images/s, per core, peak RSS.",
    )
    data.add_argument("--photos", action="store_true",
                      help="photo mode: JPEG photos, 224 px `basic` augmentation (default: 32x32 PNGs)")
    data.add_argument("--count", type=positive_int, help="images (default 20000; with --photos 2000)")
    data.add_argument("--repeats", type=positive_int, default=3, help="timed repeats per reader (default 3)")
    data.add_argument("--workers", type=worker_counts, default=(1, 2),
                      help="comma-separated DataLoader worker counts to measure (default 1,2)")
    data.add_argument("--out", help="results and data folder (default runs/bench-data; with --photos "
                                    "runs/bench-data-photos)")
    data.set_defaults(handler=run_bench_data)


def worker_counts(text: str) -> tuple[int, ...]:
    return tuple(positive_int(part) for part in text.split(","))


def run_bench_train(args: argparse.Namespace, console: Console) -> None:
    from pipeline.bench.train import bench_merge, bench_train

    out = Path(args.out or f"runs/bench-{args.preset}")
    if args.merge:
        given = [flag for flag, value in (("--seeds", args.seeds), ("--first-seed", args.first_seed),
                                          ("--only", args.only), ("--compile", args.compile != "off")) if value]
        if given:
            raise UsageError(f"--merge trains nothing: {', '.join(given)} do not apply to it")
        bench_merge(args.preset, [Path(folder) for folder in args.merge], out, args.arms)
    else:
        bench_train(args.preset, out, args.seeds, args.arms, args.only, args.compile, args.first_seed)
    console.print((out / "results.md").read_text(encoding="utf-8"))  # the table(s) just written
    console.print(f"wrote {out}/results.md, results.png, results.json")


def run_bench_data(args: argparse.Namespace, console: Console) -> None:
    import json

    if args.photos:
        from pipeline.bench.photos import DEFAULT_COUNT, bench_photos, render

        out = Path(args.out or "runs/bench-data-photos")
        report = bench_photos(out, args.count or DEFAULT_COUNT, args.repeats, args.workers)
    else:
        from pipeline.bench.data import bench_data, render

        out = Path(args.out or "runs/bench-data")
        report = bench_data(out, args.count or 20_000, args.repeats, args.workers)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(render(report))
    console.print(render(report))
