"""Datasets by name: ``get_dataset("cvc-clinicdb")`` gives everything a bundle or the CLI needs."""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from . import cvc_clinicdb, folder, glas, kvasir_cvc, kvasir_seg, pranet
from .pairing import Scan

# MONAI-backed modules (readers, transforms) are imported where used: naming and scanning
# datasets stays fast and light (``masksup-med --help``, ``data demo``).


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset adapter: how to scan a folder, split its items, read and binarise its files.

    ``binary_labels``: masks are meant to be 0/255, so many mid-grey values make them ambiguous;
    when False (GLaS instance ids) any value > ``label_threshold`` is foreground.
    ``medical_formats``: images may be grey, 16-bit or float, in any supported format (NIfTI, DICOM,
    MetaImage, ...), their intensities normalised by the bundle's ``intensity`` value; masks are 0/1
    or 0/255 in any pixel type. Otherwise images must be 8-bit RGB.
    """

    name: str
    title: str
    scan: Callable[[str | os.PathLike], Scan]
    assign: Callable[..., dict[str, list[dict]]]
    label_threshold: float
    binary_labels: bool
    medical_formats: bool = False

    @property
    def split_options(self) -> tuple[str, ...]:
        """Keyword options of :meth:`split` (``seed``, ``val_fraction``, and dataset-specific ones)."""
        return tuple(inspect.signature(self.assign).parameters)[1:]

    def applicable(self, options: dict) -> dict:
        """The ``options`` this dataset's split takes; the others are left out with a warning naming them.

        A bundle's split options belong to its own dataset (CVC-ClinicDB's ``by="sequence"``): a model
        evaluated on another dataset (``--dataset kvasir-seg``) splits that one with what applies to it.
        """
        ignored = sorted(set(options) - set(self.split_options))
        if ignored:
            warnings.warn(
                f"split option(s) {', '.join(ignored)} do not apply to dataset {self.name} and are ignored "
                f"(it takes: {', '.join(self.split_options)})",
                UserWarning,
                stacklevel=3,
            )
        return {k: v for k, v in options.items() if k in self.split_options}

    def split(self, dataset_dir: str | os.PathLike, **options) -> dict[str, list[dict]]:
        """Scan ``dataset_dir`` (raising on pairing problems) and split it with the ``options`` that apply."""
        return self.assign(self.scan(dataset_dir).require_pairs(), **self.applicable(options))

    def reader(self, items: list[dict]):
        """``reader`` argument for ``LoadImaged`` on these datalist ``items``."""
        from .readers import AnyImageReader, loader_reader

        return AnyImageReader() if self.medical_formats else loader_reader(items)

    def label_transform(self, keys="label"):
        """``ForegroundMaskd`` with this dataset's threshold."""
        from masksup_med.transforms.label import ForegroundMaskd

        return ForegroundMaskd(keys=keys, threshold=self.label_threshold)


_DATASETS = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "glas",
            "GLaS (gland segmentation, H&E histology)",
            glas.scan_glas,
            glas.assign_glas,
            glas.LABEL_THRESHOLD,
            binary_labels=False,
        ),
        DatasetSpec(
            "cvc-clinicdb",
            "CVC-ClinicDB (colonoscopy polyps)",
            cvc_clinicdb.scan_cvc_clinicdb,
            cvc_clinicdb.assign_cvc_clinicdb,
            cvc_clinicdb.LABEL_THRESHOLD,
            binary_labels=True,
        ),
        DatasetSpec(
            "kvasir-seg",
            "Kvasir-SEG (colonoscopy polyps)",
            kvasir_seg.scan_kvasir_seg,
            kvasir_seg.assign_kvasir_seg,
            kvasir_seg.LABEL_THRESHOLD,
            binary_labels=True,
        ),
        DatasetSpec(
            "pranet",
            "PraNet polyp benchmark layout",
            pranet.scan_pranet,
            pranet.assign_pranet,
            pranet.LABEL_THRESHOLD,
            binary_labels=True,
        ),
        DatasetSpec(
            kvasir_cvc.NAME,
            "Kvasir-SEG + CVC-ClinicDB releases, split by a list of training images (the PraNet protocol)",
            kvasir_cvc.scan_kvasir_cvc,
            kvasir_cvc.assign_kvasir_cvc,
            kvasir_cvc.LABEL_THRESHOLD,
            binary_labels=True,
        ),
        DatasetSpec(
            folder.NAME,
            "Your own images/ + masks/ folder: PNG, JPEG, TIFF, NIfTI, DICOM, MetaImage or NRRD",
            folder.scan_folder,
            folder.assign_folder,
            folder.LABEL_THRESHOLD,
            binary_labels=False,
            medical_formats=True,
        ),
    )
}


def available_datasets() -> list[str]:
    """Names accepted by :func:`get_dataset`."""
    return sorted(_DATASETS)


def get_dataset(name: str) -> DatasetSpec:
    """The adapter registered as ``name`` (e.g. ``"glas"``, ``"cvc-clinicdb"``)."""
    try:
        return _DATASETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}") from None
