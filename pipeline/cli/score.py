"""``onion score``: score every train example (``DATASET/scores/NAME.parquet``)."""
from __future__ import annotations

import argparse

from rich.console import Console

from pipeline.cli.common import add_ray_options, non_negative_int, start_ray

NAME = "score"
HELP = "score every train example (writes DATASET/scores/NAME.parquet)"


def add_parser(commands: argparse._SubParsersAction) -> None:
    from pipeline.curation.scoring import SCORERS

    score = commands.add_parser(
        NAME, help=HELP,
        description="Score how hard each train example is. forgetting and loss read a training run's "
                    "dynamics (forgetting needs at least 2 presentations per example in the window); random is "
                    "each key's seeded hash; these three run on Ray actors that each score and write some index "
                    "parts; el2n runs the run's checkpoints over the shards in a pool of Ray actors; "
                    "exact (identical decoded pixels) groups copies on Ray actors that each hash some index "
                    "parts and exchange digests by bucket, so no process holds them all; phash (256-bit "
                    "perceptual hash within --radius bits) groups near copies the same way (pairs of bit blocks "
                    "exchanged by bucket; the driver holds the near pairs only); embed "
                    "groups semantic copies from embeddings (the class "
                    "token of --run's checkpoint, a timm --model with local --weights, or --model pixels), "
                    "k-means then cosine >= --threshold inside clusters (faiss), in a pool of Ray actors. "
                    "Grouping scores feed onion select --dedup. Higher scores are harder.",
    )
    score.add_argument("dataset", help="dataset location")
    score.add_argument("scorer", choices=list(SCORERS), help="which score")
    score.add_argument("--run", help="training run whose dynamics/checkpoints to use (embed: its class-token features)")
    score.add_argument("--first-epoch", type=non_negative_int, help="dynamics window start (0-based epoch, inclusive)")
    score.add_argument("--last-epoch", type=non_negative_int, help="dynamics window end (inclusive)")
    score.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random scorer (default 0)")
    score.add_argument("--radius", type=non_negative_int,
                       help="phash: most differing bits of 256 for two images to be copies (default 16)")
    score.add_argument("--model", help="embed: a timm model name (with --weights), or 'pixels' for shift-normalised "
                                       "pixels (no network)")
    score.add_argument("--weights", help="embed: weights of --model, a path or fsspec URL (safetensors or torch, read "
                                         "as --pretrained reads them: a file whose unpickling would run code is "
                                         "refused; nothing is fetched from a model hub)")
    score.add_argument("--threshold", type=float,
                       help="embed: cosine similarity at or above which two examples are copies (default 0.98)")
    add_ray_options(score)
    score.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> None:
    from pipeline.curation.scoring import ScoreContext, scored_on_ray, store_scores
    from shards import UsageError

    if args.first_epoch is not None and args.last_epoch is not None and args.first_epoch > args.last_epoch:
        raise UsageError(f"--first-epoch {args.first_epoch} is after --last-epoch {args.last_epoch}")
    if args.scorer != "embed" and (args.model or args.weights):  # silently ignored, it would mislead
        uses = ("scores with the model --run trained (its checkpoints)" if args.scorer == "el2n"
                else "uses no model")
        raise UsageError(f"--model and --weights choose embed's features; {args.scorer} {uses}")
    if scored_on_ray(args.scorer, args.dataset):
        start_ray(args)
    context = ScoreContext(args.dataset, args.run, args.first_epoch, args.last_epoch, args.seed, radius=args.radius,
                           model=args.model, weights=args.weights, threshold=args.threshold)
    path, rows = store_scores(args.scorer, context)
    console.print(f"{path}: {rows} examples scored", soft_wrap=True)
