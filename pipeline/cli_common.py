"""What every ``onion`` command shares: the usage error, argument types, Ray options."""
from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2
EXIT_FAILURE = 1  # the job could not finish (storage failed after its retries)


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
