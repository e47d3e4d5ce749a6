"""A plain folder of your own images and masks: ``images/NAME.ext`` + ``masks/NAME.ext``.

Any supported format, mixed freely: PNG, JPEG, BMP, TIFF, NIfTI (``.nii``, ``.nii.gz``), DICOM
(``.dcm``, one 2D frame per file), MetaImage (``.mha``, ``.mhd``) and NRRD (``.nrrd``). An image
and its mask share the name without suffix (``images/case1.dcm`` + ``masks/case1.nii.gz`` pair).
Images may be grey or RGB, 8-bit, 16-bit or float (CT, MR): the bundles normalise intensities as their
``intensity`` value says (:class:`~masksup_med.transforms.NormaliseIntensityd`). Masks are 0/1 or
0/255 (foreground is > 0.5), in a lossless format, the same size as their image. The split is a seeded
random one, as Kvasir-SEG's.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import DatasetNotFoundError
from .formats import SUPPORTED_SUFFIXES
from .pairing import Scan, find_subfolder, require_folder, scan_image_mask_folders
from .splits import split_images

NAME = "folder"
SUFFIXES = SUPPORTED_SUFFIXES
LABEL_THRESHOLD = 0.5  # 0/1 and 0/255 masks alike

_HOW_TO_GET = (
    "Put your images in DIR/images/ and their masks in DIR/masks/, each mask named as its image "
    "(any of: " + ", ".join(s.lstrip(".") for s in SUFFIXES) + "); see data/README.md"
)


def _locate(folder: Path) -> tuple[Path, Path]:
    images, labels = find_subfolder(folder, "images"), find_subfolder(folder, "masks", "labels")
    if images and labels:
        return images, labels
    raise DatasetNotFoundError(f"folder {folder} has no images/ and masks/ folders. {_HOW_TO_GET}")


def scan_folder(dataset_dir: str | os.PathLike) -> Scan:
    """Pair every image of ``images/`` with its mask in ``masks/``, collecting all problems."""
    folder = require_folder(dataset_dir, "image folder dataset", _HOW_TO_GET)
    images, labels = _locate(folder)
    return scan_image_mask_folders(
        folder,
        images,
        labels,
        SUFFIXES,
        "image folder dataset",
        "e.g. images/NAME.nii.gz + masks/NAME.nii.gz",
        _HOW_TO_GET,
    )


assign_folder = split_images  # independent images: a seeded random split
