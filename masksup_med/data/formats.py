"""File formats by suffix: which files the readers take, what each is called, which format a mask is written in.

No decoder is imported here (pairing and the command line use it). A suffix may have two parts
(``.nii.gz``): :func:`file_suffix` and :func:`file_stem` know them, where ``Path.suffix`` gives ``.gz``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "DICOM_SUFFIXES",
    "ITK_SUFFIXES",
    "MEDICAL_SUFFIXES",
    "NIFTI_SUFFIXES",
    "PIL_SUFFIXES",
    "SUPPORTED_SUFFIXES",
    "TIFF_SUFFIXES",
    "file_stem",
    "file_suffix",
    "format_name",
    "mask_suffix_for",
]

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")  # MetaImage and NRRD, read with SimpleITK
MEDICAL_SUFFIXES = NIFTI_SUFFIXES + DICOM_SUFFIXES + ITK_SUFFIXES
SUPPORTED_SUFFIXES = PIL_SUFFIXES + TIFF_SUFFIXES + MEDICAL_SUFFIXES
_DOUBLE = (".nii.gz",)

_NAMES = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".bmp": "BMP",
    **dict.fromkeys(TIFF_SUFFIXES, "TIFF"),
    **dict.fromkeys(NIFTI_SUFFIXES, "NIfTI"),
    **dict.fromkeys(DICOM_SUFFIXES, "DICOM"),
    ".mha": "MetaImage",
    ".mhd": "MetaImage",
    ".nrrd": "NRRD",
    ".nhdr": "NRRD",
}


def file_suffix(path: str | os.PathLike) -> str:
    """Lower-case suffix of ``path``, two parts for ``.nii.gz`` (``''`` when it has none)."""
    name = Path(path).name.lower()
    for double in _DOUBLE:
        if name.endswith(double) and len(name) > len(double):
            return double
    return Path(name).suffix


def file_stem(path: str | os.PathLike) -> str:
    """File name without :func:`file_suffix` (``case1.nii.gz`` -> ``case1``)."""
    name = Path(path).name
    return name[: len(name) - len(file_suffix(path))]


def format_name(path: str | os.PathLike) -> str:
    """``PNG``, ``JPEG``, ``BMP``, ``TIFF``, ``NIfTI``, ``DICOM``, ``MetaImage`` or ``NRRD``; the suffix otherwise."""
    suffix = file_suffix(path)
    return _NAMES.get(suffix) or suffix or "(no suffix)"


def mask_suffix_for(paths: Iterable[str | os.PathLike | dict]) -> str:
    """The suffix ``predict`` writes masks with, by default: the input's format (``paths``: files or datalist items).

    NIfTI when any input is a medical image (NIfTI, DICOM, MetaImage, NRRD): the mask keeps the
    image's voxel grid and affine, so it lies on the image in ITK-SNAP or 3D Slicer (PNG would lose
    the geometry; DICOM SEG writing is not supported). PNG (0/255) otherwise.
    """
    files = [p["image"] if isinstance(p, dict) else p for p in paths]
    return ".nii.gz" if any(file_suffix(p) in MEDICAL_SUFFIXES for p in files) else ".png"
