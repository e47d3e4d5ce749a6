"""Exceptions raised by the dataset adapters."""

from masksup_med.errors import UserError


class DatasetError(UserError, ValueError):
    """A dataset is present but malformed (unpaired files, unreadable datalist, ...)."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset folder or file is missing, or holds none of the expected files."""


class UnreadableFileError(DatasetError):
    """One file cannot be decoded (empty, truncated, corrupt, unsupported); names the file."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
