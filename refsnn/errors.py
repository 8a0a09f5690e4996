"""Errors a user can cause. Each message says what was wrong and how to fix it.

The CLI prints a RefsnnError as one line ``Error: <message>`` and exits with status 2; any other
exception is a bug and keeps its traceback.
"""


class RefsnnError(Exception):
    """Base class of every user-facing error of refsnn."""


class ConfigError(RefsnnError, ValueError):
    """A bad method, parameter, preset, architecture or training option."""


class ShapeError(RefsnnError, ValueError):
    """Arrays whose shapes do not fit the network or each other."""


class DataError(RefsnnError):
    """A dataset or file that is missing, truncated, corrupt or holds values out of range."""


class CheckpointError(DataError):
    """A checkpoint or oracle file that cannot be read or does not match the request."""
