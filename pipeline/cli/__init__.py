"""The ``onion`` command line: one module per command, each only parsing and calling the library.

Errors: a command fails with one line and the exit code its :class:`shards.errors.OnionError`
carries (2 usage, 1 data/storage); storage failures after their retries exit 1 naming the
location; anything else is a bug and shows its traceback.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

from rich.console import Console

from pipeline.cli import (
    bench,
    curate,
    ingest,
    inspect,
    materialize,
    report,
    score,
    select,
    train,
    upgrade,
    verify,
)
from pipeline.cli.common import OnionArgumentParser, package_version
from shards import location
from shards.errors import EXIT_FAILURE, OnionError

COMMANDS = (ingest, train, score, select, materialize, curate, inspect, report, verify, upgrade, bench)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``only``, just that command's options are defined (the others are
    listed by name and help), so ``onion --help`` and ``onion inspect --help`` import no torch or Ray."""
    parser = OnionArgumentParser(
        prog="onion",
        description="Tri-level efficient ViT training: prune examples, tokens and attention.",
    )
    parser.add_argument("--version", action="version", version=f"onion {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OnionArgumentParser)
    for command in COMMANDS:
        if only is None or only == command.NAME:
            command.add_parser(commands)
        else:
            commands.add_parser(command.NAME, help=command.HELP)
    return parser


def chosen_command(argv: list[str]) -> str:
    """The subcommand named on the command line: its first word that is not an option ('' if none)."""
    return next((word for word in argv if not word.startswith("-")), "")


def is_storage_failure(error: BaseException) -> bool:
    """Errors from the filesystem or object store (missing bucket, denied access, no credentials)."""
    return isinstance(error, OSError) or type(error).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs")


LOG_WIDTH = 160  # piped or logged output: rich would assume 80 columns and wrap table rows mid-row
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


def how_to_continue(args: argparse.Namespace) -> str:
    """What the user runs next after a Ctrl-C: every command resumes; train through --resume once its
    run has a checkpoint (before one, the run folder was released, so the same command starts it again)."""
    if args.command == "train":
        run = args.resume or getattr(args, "out", None)
        if run and has_checkpoint(run):
            return f"continue with: onion train --resume {run}"
        if args.resume:
            return f"{run} has no checkpoint yet: run the same command again to start its training over"
        return "no checkpoint was written yet: run the same command again to start over"
    return "run the same command again to continue where it stopped"


def has_checkpoint(run: str) -> bool:
    from trainer.checkpoint import latest_position

    try:
        return latest_position(location(run)) is not None
    except Exception:  # noqa: BLE001 - advice after a Ctrl-C must not raise (an unreachable store, a bad URL)
        return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(only=chosen_command(argv)).parse_args(argv)
    args.argv = ["onion", *argv]  # recorded in manifests: this call's command line, not the process's
    console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else LOG_WIDTH)
    try:
        args.handler(args, console)
    except KeyboardInterrupt:
        # Exiting now: a second Ctrl-C (or one still pending) must not turn this clean exit into a traceback
        # or a death by signal while the interpreter shuts down.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if "pipeline.fan_out" in sys.modules:  # a Ray loop may still close: it must leave its calls to shutdown
            sys.modules["pipeline.fan_out"].note_interruption()
        sys.stderr.write(f"onion {args.command}: interrupted; {how_to_continue(args)}\n")
        return EXIT_INTERRUPTED
    except OnionError as error:
        sys.stderr.write(f"onion {args.command}: error: {error}\n")
        return error.exit_code
    except Exception as error:
        cause = getattr(error, "cause", None)  # a Ray task's own exception, without Ray's traceback
        if isinstance(cause, OnionError):
            sys.stderr.write(f"onion {args.command}: error: {cause}\n")
            return cause.exit_code
        if not is_storage_failure(error) and not is_storage_failure(cause or error):
            raise
        # Retries are spent (or pointless): name the locations involved, never the credentials.
        error = cause if isinstance(cause, BaseException) else error
        where = ", ".join(str(getattr(args, name)) for name in ("dataset", "out", "run") if getattr(args, name, None))
        sys.stderr.write(f"onion {args.command}: error: {where}: {type(error).__name__}: {error}\n")
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
