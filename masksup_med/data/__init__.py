"""Dataset adapters: find and pair files, split deterministically, write MONAI datalists.

One module per dataset (``glas``, ``cvc_clinicdb``, ``kvasir_seg``, ``pranet``, and ``kvasir_cvc``: the
PraNet protocol on the two original releases), named by string
through :func:`get_dataset`. The MONAI-backed parts (``readers``, ``checks``) and the synthetic
demo-data generator (``synthetic``) load on first use.
"""

from importlib import import_module

from .cvc_clinicdb import find_cvc_clinicdb_pairs, split_cvc_clinicdb
from .errors import DatasetError, DatasetNotFoundError, UnreadableFileError
from .glas import find_glas_pairs, split_glas
from .kvasir_cvc import split_kvasir_cvc
from .kvasir_seg import find_kvasir_seg_pairs, split_kvasir_seg
from .pairing import Problem, Scan
from .pranet import find_pranet_pairs, split_pranet
from .registry import DatasetSpec, available_datasets, get_dataset
from .splits import carve_validation, read_datalist, split_groups, write_datalist

# loaded on first use: the MONAI-backed parts, and the demo-data generator (never on the training path)
_LAZY = {
    "TiffReader": "readers",
    "loader_reader": "readers",
    "read_array": "readers",
    "check_dataset": "checks",
    "CheckReport": "checks",
    "check_training_data": "preflight",
    "make_glas_demo": "synthetic",
    "make_cvc_clinicdb_demo": "synthetic",
    "make_kvasir_seg_demo": "synthetic",
    "with_unlabelled": "unlabelled",
    "list_unlabelled_images": "unlabelled",
    "pretraining_images": "unlabelled",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CheckReport",
    "DatasetError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "Problem",
    "Scan",
    "TiffReader",
    "UnreadableFileError",
    "available_datasets",
    "carve_validation",
    "check_dataset",
    "check_training_data",
    "find_cvc_clinicdb_pairs",
    "find_glas_pairs",
    "find_kvasir_seg_pairs",
    "find_pranet_pairs",
    "get_dataset",
    "list_unlabelled_images",
    "loader_reader",
    "make_cvc_clinicdb_demo",
    "make_glas_demo",
    "make_kvasir_seg_demo",
    "pretraining_images",
    "read_array",
    "read_datalist",
    "split_cvc_clinicdb",
    "split_glas",
    "split_groups",
    "split_kvasir_cvc",
    "split_kvasir_seg",
    "split_pranet",
    "with_unlabelled",
    "write_datalist",
]
