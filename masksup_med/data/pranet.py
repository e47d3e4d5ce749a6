"""PraNet polyp benchmark layout: one training set, five named test sets.

``TrainDataset/{image,mask}/NAME.png`` (Kvasir-SEG + CVC-ClinicDB training images) and
``TestDataset/<name>/{images,masks}/NAME.png`` (CVC-300, CVC-ClinicDB, CVC-ColonDB,
ETIS-LaribPolypDB, Kvasir). Singular and plural folder names are both accepted. Masks: > 127.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import DatasetNotFoundError
from .pairing import Scan, find_subfolder, pair_folders, require_folder, require_pairs_found
from .splits import carve_validation, natural_key

SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
LABEL_THRESHOLD = 127
TRAIN_NAME = "TrainDataset"

_HOW_TO_GET = (
    "The PraNet benchmark data (TrainDataset.zip and TestDataset.zip) are linked from the README of the "
    "PraNet repository (DengPingFan/PraNet on GitHub); unzip both into one folder and pass that folder, "
    "which then holds TrainDataset/ and TestDataset/."
)


def _image_mask_folders(base: Path) -> tuple[Path, Path] | None:
    images, masks = find_subfolder(base, "images", "image"), find_subfolder(base, "masks", "mask")
    return (images, masks) if images and masks else None


def _groups(folder: Path) -> list[tuple[str, Path, Path]]:
    """(name, images, masks) of the training set and of each test set, training first."""
    train, test = find_subfolder(folder, TRAIN_NAME), find_subfolder(folder, "TestDataset")
    if train is None or test is None:
        missing = " and ".join(n for n, p in ((TRAIN_NAME, train), ("TestDataset", test)) if p is None)
        raise DatasetNotFoundError(f"PraNet-layout folder {folder} has no {missing}/ folder. {_HOW_TO_GET}")
    groups = []
    for name, base in [(TRAIN_NAME, train)] + sorted(
        ((p.name, p) for p in test.iterdir() if p.is_dir()), key=lambda t: natural_key(t[0])
    ):
        found = _image_mask_folders(base)
        if found is None:
            raise DatasetNotFoundError(f"PraNet-layout folder {base} has no images/ and masks/ folders. {_HOW_TO_GET}")
        groups.append((name, *found))
    return groups


def scan_pranet(dataset_dir: str | os.PathLike) -> Scan:
    """Pair the images of TrainDataset and of every TestDataset/<name>, collecting all problems."""
    folder = require_folder(dataset_dir, "PraNet-layout dataset", _HOW_TO_GET)
    items, problems = [], []
    groups = _groups(folder)
    for name, images, masks in groups:
        pairs, found = pair_folders(images, masks, SUFFIXES)
        problems += found
        for key, image, label in pairs:
            item = {"image": str(image), "label": str(label), "id": f"{name}/{key}"}
            item |= {"split": "train"} if name == TRAIN_NAME else {"split": "test", "test_set": name}
            items.append(item)
    layout = f"{TRAIN_NAME}/ + TestDataset/{{{', '.join(name for name, *_ in groups[1:])}}}/"
    return require_pairs_found(
        Scan(items, problems, layout),
        folder,
        "PraNet-layout dataset",
        "e.g. TrainDataset/image/1.png + TrainDataset/mask/1.png",
        _HOW_TO_GET,
    )


def find_pranet_pairs(dataset_dir: str | os.PathLike) -> list[dict]:
    """List items ``{"image", "label", "id", "split"[, "test_set"]}``; raise on the first pairing problem."""
    return scan_pranet(dataset_dir).require_pairs()


def assign_pranet(items: list[dict], val_fraction: float = 0.1, seed: int = 0) -> dict[str, list[dict]]:
    """``train``/``validation`` from TrainDataset (carved by ``seed``), ``test`` and ``test_<name>`` per test set."""
    train, validation = carve_validation([it for it in items if it["split"] == "train"], val_fraction, seed)
    tests = [it for it in items if it["split"] == "test"]
    names = sorted({it["test_set"] for it in tests}, key=natural_key)
    per_set = {f"test_{name}": [it for it in tests if it["test_set"] == name] for name in names}
    return {"train": train, "validation": validation, "test": tests, **per_set}


def split_pranet(dataset_dir: str | os.PathLike, val_fraction: float = 0.1, seed: int = 0) -> dict[str, list[dict]]:
    """Find the pairs in ``dataset_dir`` and split them (see :func:`assign_pranet`)."""
    return assign_pranet(find_pranet_pairs(dataset_dir), val_fraction, seed)
