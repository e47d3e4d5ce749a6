"""Errors a user can fix: a path, a value, a server to start, a folder in use.

Their messages say what is wrong and what to do. :mod:`masksup_med.run.error_report` prints them as the
last lines of a failed run instead of a traceback.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "MissingInputError",
    "OutputDirError",
    "ServerUnreachableError",
    "UnreadableFileError",
    "UserError",
]


class UserError(Exception):
    """Something the user can fix; the message names the file or value and says what to do."""


class ConfigError(UserError, ValueError):
    """A config value or command-line override that cannot work (unknown id, impossible size, ...)."""


class OutputDirError(UserError, OSError):
    """The output folder cannot be used: not writable, in use by another run, or holding an earlier model."""


class ServerUnreachableError(UserError, ConnectionError):
    """A server the run needs (the MLflow tracking server) does not answer."""


class MissingInputError(UserError, FileNotFoundError):
    """A file the run was pointed at (pretrained weights, a checkpoint to resume) does not exist."""


class UnreadableFileError(UserError, ValueError):
    """A file the run was pointed at exists but does not load (cut short by a kill, corrupt, or another format)."""
