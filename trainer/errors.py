"""Errors a user can fix (a run directory in the way, nothing to resume, a bad config file); exit 2."""
from shards.errors import UsageError


class RunError(UsageError):
    """A training run that cannot start or continue as asked; the message names the run folder."""
