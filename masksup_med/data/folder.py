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
from .pairing import Scan, find_subfolder, pair_folders, require_folder, require_pairs_found
from .splits import split_groups

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
    pairs, problems = pair_folders(images, labels, SUFFIXES)
    items = [{"image": str(image), "label": str(label), "id": key} for key, image, label in pairs]
    layout = f"{images.relative_to(folder)}/ + {labels.relative_to(folder)}/"
    return require_pairs_found(
        Scan(items, problems, layout),
        folder,
        "image folder dataset",
        "e.g. images/NAME.nii.gz + masks/NAME.nii.gz",
        _HOW_TO_GET,
    )


def assign_folder(
    items: list[dict], val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
) -> dict[str, list[dict]]:
    """Seeded random train / validation / test split; fractions count images."""
    return split_groups(items, "id", test_fraction, val_fraction, seed, what="image")
