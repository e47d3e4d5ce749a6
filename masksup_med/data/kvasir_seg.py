"""Kvasir-SEG (1000 polyp images, Simula) adapter: ``images/NAME.jpg`` + ``masks/NAME.jpg``.

Masks are JPEG (grey or 3-channel, with compression noise): foreground is > 127. The images are
independent, so the split is a seeded random one.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import DatasetNotFoundError
from .pairing import Scan, find_subfolder, require_folder, scan_image_mask_folders
from .splits import split_images

SUFFIXES = (".jpg", ".jpeg", ".png")
LABEL_THRESHOLD = 127
MIN_IMAGES = 3  # one each for train, validation and test

_HOW_TO_GET = (
    "Kvasir-SEG is distributed by Simula Research Laboratory (Kvasir-SEG page of the Simula datasets site) "
    "as kvasir-seg.zip; unzip it and pass the Kvasir-SEG folder that holds images/ and masks/. "
    "To make synthetic demo data instead, run: masksup-med data demo kvasir-seg DIR"
)


def _locate(folder: Path) -> tuple[Path, Path]:
    for base in (folder, find_subfolder(folder, "Kvasir-SEG")):
        images, labels = (find_subfolder(base, "images"), find_subfolder(base, "masks")) if base else (None, None)
        if images and labels:
            return images, labels
    raise DatasetNotFoundError(f"Kvasir-SEG folder {folder} has no images/ and masks/ folders. {_HOW_TO_GET}")


def scan_kvasir_seg(dataset_dir: str | os.PathLike) -> Scan:
    """Pair every Kvasir-SEG image with its mask, collecting all problems."""
    folder = require_folder(dataset_dir, "Kvasir-SEG dataset", _HOW_TO_GET)
    images, labels = _locate(folder)
    return scan_image_mask_folders(
        folder, images, labels, SUFFIXES, "Kvasir-SEG dataset", "e.g. images/NAME.jpg + masks/NAME.jpg", _HOW_TO_GET
    )


def find_kvasir_seg_pairs(dataset_dir: str | os.PathLike) -> list[dict]:
    """List Kvasir-SEG items ``{"image", "label", "id"}``; raise on the first pairing problem."""
    return scan_kvasir_seg(dataset_dir).require_pairs()


assign_kvasir_seg = split_images  # independent images: a seeded random split


def split_kvasir_seg(
    dataset_dir: str | os.PathLike, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
) -> dict[str, list[dict]]:
    """Find the pairs in ``dataset_dir`` and split them (see :func:`assign_kvasir_seg`)."""
    return assign_kvasir_seg(find_kvasir_seg_pairs(dataset_dir), val_fraction, test_fraction, seed)
