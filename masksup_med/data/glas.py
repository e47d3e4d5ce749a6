"""GLaS (Gland Segmentation in Colon Histology, MICCAI 2015) adapter: pair files and split.

Layout: ``NAME.EXT`` image next to ``NAME_anno.EXT`` annotation, with NAME ``train_N``,
``testA_N`` or ``testB_N`` and EXT ``.bmp`` (official release, instance-labelled masks) or
``.png`` (binary 0/255 masks). Any label value > 0 is gland.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .pairing import Scan, pair_files, require_folder, require_pairs_found
from .splits import carve_validation

SUFFIXES = (".bmp", ".png")
LABEL_THRESHOLD = 0  # instance ids: any value > 0 is gland
_FILE = re.compile(r"^(?P<id>(?P<split>train|testA|testB)_\d+)(?P<anno>_anno)?\.(?P<ext>[^.]+)$")
_OFFICIAL = ("train", "testA", "testB")

_HOW_TO_GET = (
    "GLaS is the Warwick-QU gland segmentation dataset of the MICCAI 2015 GlaS challenge: download "
    "'Warwick QU Dataset (Released 2016_07_08)' from the GlaS challenge page of the University of "
    "Warwick TIA Centre, unzip it and pass the folder that holds train_1.bmp and train_1_anno.bmp. "
    "To make synthetic demo data instead, run: masksup-med data demo glas DIR"
)


def _classify(path: Path):
    match = _FILE.match(path.name)
    if match is None:
        return None
    return ("label" if match["anno"] else "image"), match["id"], f".{match['ext'].lower()}" in SUFFIXES


def scan_glas(dataset_dir: str | os.PathLike) -> Scan:
    """Pair every GLaS image with its annotation, collecting all problems (see :class:`Scan`)."""
    folder = require_folder(dataset_dir, "GLaS dataset", _HOW_TO_GET)
    pairs, problems = pair_files(
        folder.iterdir(), _classify, SUFFIXES, " (expected NAME.bmp|png next to NAME_anno.bmp|png)"
    )
    items = [
        {"image": str(image), "label": str(label), "id": key, "split": _FILE.match(image.name)["split"]}
        for key, image, label in pairs
    ]
    scan = Scan(items, problems, "flat folder: NAME.bmp|png + NAME_anno.bmp|png")
    return require_pairs_found(scan, folder, "GLaS dataset", "e.g. train_1.bmp + train_1_anno.bmp", _HOW_TO_GET)


def find_glas_pairs(dataset_dir: str | os.PathLike) -> list[dict]:
    """List GLaS image/annotation pairs in ``dataset_dir``, in natural ``id`` order.

    Each item is ``{"image", "label", "id", "split"}`` with string paths and ``split`` one of
    ``train``, ``testA``, ``testB``. Files not named like GLaS files are ignored; unpaired or
    duplicated files raise ``DatasetError`` naming the first one.
    """
    return scan_glas(dataset_dir).require_pairs()


def assign_glas(items: list[dict], val_fraction: float = 0.2, seed: int = 0) -> dict[str, list[dict]]:
    """Split GLaS items: official ``testA``/``testB``, ``validation`` carved from ``train`` by ``seed``."""
    by_split = {name: [p for p in items if p["split"] == name] for name in _OFFICIAL}
    train, validation = carve_validation(by_split["train"], val_fraction, seed)
    return {
        "train": train,
        "validation": validation,
        "testA": by_split["testA"],
        "testB": by_split["testB"],
        "test": by_split["testA"] + by_split["testB"],
    }


def split_glas(dataset_dir: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0) -> dict[str, list[dict]]:
    """Split GLaS into ``train``, ``validation``, ``testA``, ``testB`` and ``test``.

    ``validation`` is carved from the official training images by ``seed``; ``test`` is
    ``testA + testB``. Items keep their official ``split`` field.
    """
    return assign_glas(find_glas_pairs(dataset_dir), val_fraction, seed)
