"""onion's one error model: every error meant for a person says what is wrong and carries its exit code.

* :class:`UsageError` (exit 2): the command as given cannot run - a value out of range, a path that
  is not what it should be, an output another job owns. Fix the command and run it again.
* :class:`DatasetError` (exit 2): a location that is not a usable dataset (missing, incomplete,
  another dataset); :class:`DatasetDamaged` (exit 1): its bytes do not match its index or manifest.
* Storage that fails after its retries is reported by the CLI as exit 1, naming the location.

Anything else is a bug and keeps its traceback. ``pipeline`` and ``trainer`` subclass these; the
CLI catches only :class:`OnionError` (and storage failures).
"""
from __future__ import annotations

EXIT_USAGE = 2
EXIT_FAILURE = 1


class OnionError(Exception):
    """Base of the errors a person can act on; ``exit_code`` is what the ``onion`` command returns."""

    exit_code = EXIT_FAILURE


class UsageError(OnionError):
    """Arguments or inputs that do not make a runnable command."""

    exit_code = EXIT_USAGE


class DatasetError(OnionError):
    """A dataset location that cannot be used; the message names the file at fault."""

    exit_code = EXIT_USAGE


class DatasetDamaged(DatasetError):
    """A dataset whose shards do not match their index or manifest (the data, not the command, is at fault)."""

    exit_code = EXIT_FAILURE


class UnknownKey(UsageError, KeyError):
    """No example with this key (a ``KeyError`` too, for code that looks examples up like a mapping)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""
