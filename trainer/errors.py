"""Errors a user can fix (a run directory in the way, nothing to resume, a bad config file); exit 2."""


class RunError(Exception):
    pass
