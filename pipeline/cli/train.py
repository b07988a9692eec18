"""``onion train``: its flags come from :class:`trainer.config.TrainConfig`, one per setting."""
from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

from rich.console import Console

from pipeline.cli.common import add_ray_options, start_ray
from shards import UsageError

if TYPE_CHECKING:
    from trainer.config import TrainConfig

NAME = "train"
HELP = "train a token/attention-sparse timm ViT on an onion dataset"


def add_parser(commands: argparse._SubParsersAction) -> None:
    from trainer.config import TrainConfig

    train = commands.add_parser(
        NAME, help=HELP,
        description="Stream DATASET's train split into a timm ViT that drops tokens and attention "
                    "connections, evaluate on val every epoch, checkpoint atomically, and write "
                    "per-example training dynamics. Settings: defaults < --config YAML < flags.",
    )
    train.add_argument("dataset", nargs="?", help=TrainConfig.help_of()["dataset"])
    train.add_argument("--config", help="YAML file with any of the settings below (flag names with _)")
    train.add_argument("--resume", metavar="RUN",
                       help="continue the run in folder RUN from its last checkpoint, at the same sample (a copied "
                            "run folder resumes into the copy). Options given with it: --epochs (larger: extends "
                            "the run, a new cosine from the current learning rate over the added epochs), "
                            "--device, --eval-every, --compile, --log-every, --progress-seconds and "
                            "--checkpoint-every are applied and recorded in RUN/history.jsonl; any other that "
                            "differs from the run's is refused (--loader-workers too: the example order depends "
                            "on it)")
    add_train_options(train)
    add_ray_options(train)  # used with --ray-workers N: the Ray cluster the workers run on
    train.set_defaults(handler=run)


def add_train_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per training setting, with its help text and default (values are checked by TrainConfig)."""
    from trainer.config import CHOICES, TrainConfig

    group = parser.add_argument_group("training settings")
    types = TrainConfig.field_types()
    for name, text in TrainConfig.options().items():
        if name == "dataset" or name in skip:
            continue
        default = TrainConfig.__dataclass_fields__[name].default
        flag = "--" + name.replace("_", "-")
        shown = "" if default in (None, "") else f" (default {default})"
        if types[name] is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"{text}{shown}")
        elif name in CHOICES:
            group.add_argument(flag, choices=CHOICES[name], default=None, help=f"{text}{shown}")
        elif name in LIST_SETTINGS:
            group.add_argument(flag, type=LIST_SETTINGS[name], default=None, help=text)
        else:
            group.add_argument(flag, type=types[name], default=None, help=f"{text}{shown}")


def train_config(args: argparse.Namespace, **fixed: object) -> TrainConfig:
    from trainer.config import TrainConfig
    from trainer.model import with_published_settings

    given = TrainConfig.given_values(args.config, {**given_options(args), **fixed})
    config = TrainConfig.from_dict(with_published_settings(given))
    if not config.dataset or not config.out:
        raise UsageError(f"{args.command} needs DATASET and --out RUN")
    return config


def given_options(args: argparse.Namespace) -> dict:
    """The training settings on the command line (None: not given)."""
    from trainer.config import TrainConfig

    return {name: getattr(args, name, None) for name in TrainConfig.options()}


def comma_list(kind: type, example: str):  # noqa: ANN201 - an argparse type
    def parse(text: str) -> list:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {example}, not {text!r}") from None
    return parse


LIST_SETTINGS = {"token_blocks": comma_list(int, "block numbers like 3,6,9"),
                 "mean": comma_list(float, "three numbers like 0.485,0.456,0.406"),
                 "std": comma_list(float, "three numbers like 0.229,0.224,0.225")}


def run(args: argparse.Namespace, console: Console) -> None:
    if args.resume:
        summary = resume(args, console)
        if summary is None:
            return
        out = args.resume
    else:
        from trainer.launch import train

        config = train_config(args)
        if config.ray_workers:
            start_ray(args)
        summary, out = train(config), config.out
    val = "no validation" if math.isnan(summary["val_top1"]) else f"val top-1 {summary['val_top1']:.2f}%"
    console.print(f"{out}: {val}  {summary['images_per_second']:.0f} img/s  {summary['train_seconds']:.1f} s training",
                  soft_wrap=True)


def resume(args: argparse.Namespace, console: Console) -> dict | None:
    """Continue the run in folder ``--resume`` under the rule of :mod:`trainer.resume`; the summary, or
    None when the run is already finished."""
    from trainer.config import TrainConfig
    from trainer.launch import train
    from trainer.resume import finished_summary, record_resume, resumed_config

    config, changed = resumed_config(args.resume, TrainConfig.given_values(args.config, given_options(args)))
    finished = finished_summary(config)
    if finished is not None:
        console.print(f"{args.resume} is finished ({finished['epochs']} of {config.epochs} epochs, val top-1 "
                      f"{finished['val_top1']:.2f}%): nothing to resume; a larger --epochs extends it", soft_wrap=True)
        return None
    for name, (before, now) in changed.items():
        console.print(f"{args.resume}: {name} {before!r} -> {now!r}", soft_wrap=True)
    record_resume(config, changed, args.argv)
    if config.ray_workers:
        start_ray(args)
    return train(config, resume=True)
