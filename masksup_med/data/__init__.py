"""Dataset adapters: find and pair files, split deterministically, write MONAI datalists."""

from .errors import DatasetError, DatasetNotFoundError
from .glas import find_glas_pairs, split_glas
from .splits import carve_validation, read_datalist, write_datalist
from .synthetic import make_glas_demo

__all__ = [
    "DatasetError",
    "DatasetNotFoundError",
    "carve_validation",
    "find_glas_pairs",
    "make_glas_demo",
    "read_datalist",
    "split_glas",
    "write_datalist",
]
