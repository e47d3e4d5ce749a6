"""Unlabelled images for semi-supervised training: a seeded labelled fraction, and any folder of images.

``with_unlabelled`` keeps ``label_fraction`` of a datalist's ``train`` items labelled (chosen by a
seed, independent of file order), moves the rest to ``unlabelled`` without their masks, and adds
every image of ``unlabelled_dir``, each read once to check it decodes. Validation and test items
are left as they are, so model selection and evaluation stay labelled. The written
``datalist.json`` then records which images were labelled (``train``) and which were not.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import DatasetError, DatasetNotFoundError
from .pairing import is_stray, require_folder
from .splits import natural_key

__all__ = ["list_unlabelled_images", "pretraining_images", "with_unlabelled"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def list_unlabelled_images(folder: str | os.PathLike) -> list[dict]:
    """``[{"image": path, "id": ..., "source": "unlabelled_dir"}, ...]`` for every readable image of ``folder``.

    Every file is decoded once with the pipeline's readers; the first that fails is named.
    """
    from .readers import read_array  # MONAI-backed: loaded only when unlabelled images are used

    root = require_folder(folder, "unlabelled_dir", "Pass --unlabelled_dir with a folder of images, or null for none.")
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not is_stray(p)),
        key=lambda p: natural_key(str(p.relative_to(root))),
    )
    if not files:
        raise DatasetNotFoundError(
            f"unlabelled_dir {root} holds no images ({', '.join(IMAGE_SUFFIXES)}); pass a folder of images, or null."
        )
    for path in files:
        read_array(path)  # raises UnreadableFileError naming the file
    return [
        {"image": str(p), "id": f"unlabelled/{p.relative_to(root).with_suffix('')}", "source": "unlabelled_dir"}
        for p in files
    ]


def with_unlabelled(
    datalist: dict[str, list[dict]], label_fraction: float, seed: int, unlabelled_dir: str | os.PathLike | None = None
) -> dict[str, list[dict]]:
    """A copy of ``datalist`` whose ``train`` keeps ``label_fraction`` of its items, the rest in ``unlabelled``.

    Args:
        datalist: a dataset adapter's split (``train``, ``validation``, test splits).
        label_fraction: in (0, 1]; ``round(fraction * n_train)`` items keep their labels (at least one).
        seed: chooses which items keep their labels (the items are ordered by ``id`` first).
        unlabelled_dir: a folder of further images without masks, or None.
    """
    if not 0 < float(label_fraction) <= 1:
        raise DatasetError(f"label_fraction must lie in (0, 1], got {label_fraction!r}.")
    train = sorted(datalist["train"], key=lambda item: natural_key(item["id"]))
    n_labelled = round(float(label_fraction) * len(train))
    if n_labelled < 1:
        raise DatasetError(
            f"label_fraction {label_fraction!r} of the {len(train)} training images labels none; "
            f"use at least {1 / max(len(train), 1):.3g}."
        )
    keep = set(np.random.default_rng(seed).permutation(len(train))[:n_labelled].tolist())
    labelled = [item for i, item in enumerate(train) if i in keep]
    unlabelled = [
        {"image": item["image"], "id": item["id"], "source": "train"} for i, item in enumerate(train) if i not in keep
    ]
    if unlabelled_dir not in (None, ""):
        unlabelled += list_unlabelled_images(Path(unlabelled_dir))
    if not unlabelled:
        raise DatasetError(
            "no unlabelled images: label_fraction is 1 and no unlabelled_dir was given; semi-supervised "
            "training needs a label_fraction below 1 or an unlabelled_dir."
        )
    return {**{k: v for k, v in datalist.items() if k != "train"}, "train": labelled, "unlabelled": unlabelled}


def pretraining_images(datalist: dict[str, list[dict]], unlabelled_dir: str | None = None) -> dict[str, list[dict]]:
    """Pretraining data: the training images without their masks, plus every image of ``unlabelled_dir``.

    Validation and test images are left out: pretraining never sees a held-out image.
    """
    train = [{"image": item["image"], "id": item["id"]} for item in datalist["train"]]
    extra = list_unlabelled_images(unlabelled_dir) if unlabelled_dir not in (None, "") else []
    return {"train": train + extra}
