"""``onion train``: its flags come from :class:`trainer.config.TrainConfig`, one per setting."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from rich.console import Console

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
    train.add_argument("--resume", metavar="RUN", help="continue RUN from its last checkpoint, at the same sample")
    add_train_options(train)
    train.set_defaults(handler=run)


def add_train_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per training setting, with its help text and default (values are checked by TrainConfig)."""
    from trainer.config import CHOICES, TrainConfig

    group = parser.add_argument_group("training settings")
    types = TrainConfig.field_types()
    for name, text in TrainConfig.help_of().items():
        if name == "dataset" or name in skip:
            continue
        default = TrainConfig.__dataclass_fields__[name].default
        flag = "--" + name.replace("_", "-")
        shown = "" if default in (None, "") else f" (default {default})"
        if types[name] is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"{text}{shown}")
        elif name in CHOICES:
            group.add_argument(flag, choices=CHOICES[name], default=None, help=f"{text}{shown}")
        elif name == "token_blocks":
            group.add_argument(flag, type=block_list, default=None, help=text)
        else:
            group.add_argument(flag, type=types[name], default=None, help=f"{text}{shown}")


def train_config(args: argparse.Namespace, **fixed: object) -> TrainConfig:
    from trainer.config import TrainConfig

    overrides = {name: getattr(args, name, None) for name in TrainConfig.help_of()}
    config = TrainConfig.from_sources(args.config, {**overrides, **fixed})
    if not config.dataset or not config.out:
        raise UsageError(f"{args.command} needs DATASET and --out RUN")
    return config


def block_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block numbers like 3,6,9, not {text!r}") from None


def run(args: argparse.Namespace, console: Console) -> None:
    from trainer.launch import finished_summary, saved_config, train

    config = saved_config(args.resume) if args.resume else train_config(args)
    summary = finished_summary(args.resume) if args.resume else None
    if summary is not None:
        console.print(f"{config.out} is finished ({summary['epochs']} of {config.epochs} epochs): nothing to resume",
                      soft_wrap=True)
    else:
        summary = train(config, resume=bool(args.resume))
    console.print(f"{config.out}: val top-1 {summary['val_top1']:.2f}%  {summary['images_per_second']:.0f} img/s  "
                  f"{summary['train_seconds']:.1f} s training", soft_wrap=True)
