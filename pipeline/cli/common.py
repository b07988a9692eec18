"""What every ``onion`` command shares: the parser, argument types, Ray options."""
from __future__ import annotations

import argparse
import math
import sys

from shards.errors import EXIT_USAGE


class OnionArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line naming the (sub)command, with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onion")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _number(text: str, kind: type) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {'whole ' if kind is int else ''}number, not {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def positive_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {value}")
    return value


def fraction(text: str) -> float:
    """A share that may be 0 but not 1 (dup rates, val fraction, hard cut)."""
    value = _number(text, float)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), not {value:g}")
    return value


def keep_share(text: str) -> float:
    """A share of examples kept: more than nothing, less than everything."""
    value = _number(text, float)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), not {value:g}")
    return value


def name_list(text: str) -> tuple[str, ...]:
    """A comma-separated list of distinct, non-empty names (``--class-names cat,dog``)."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected names separated by commas, not {text!r}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"names must be distinct; {', '.join(map(repr, repeated))} repeated")
    return names


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Ray")
    group.add_argument("--address", default=None,
                       help="Ray cluster to join (e.g. ray://head:10001 or auto); default: RAY_ADDRESS, "
                            "else an embedded local Ray")
    group.add_argument("--ray-cpus", type=positive_int, default=None,
                       help="CPUs the embedded local Ray may use (default: all)")


def start_ray(args: argparse.Namespace) -> None:
    """Start or join Ray as the command line says, before any library function needs it."""
    from pipeline.ray_runtime import init_ray

    init_ray(args.address, args.ray_cpus)
