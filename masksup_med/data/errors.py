"""Exceptions raised by the dataset adapters."""


class DatasetError(ValueError):
    """A dataset is present but malformed (unpaired files, unreadable datalist, ...)."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset folder or file is missing, or holds none of the expected files."""
