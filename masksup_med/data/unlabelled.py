"""Unlabelled images for semi-supervised training: a seeded labelled fraction, and any folder of images.

``with_unlabelled`` keeps ``label_fraction`` of a datalist's ``train`` items labelled (chosen by a
seed, independent of file order), moves the rest to ``unlabelled`` without their masks, and adds
every image of ``unlabelled_dir``, each read once to check it decodes. Validation and test items
are left as they are, so model selection and evaluation stay labelled. The written
``datalist.json`` then records which images were labelled (``train``) and which were not.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .errors import DatasetError, DatasetNotFoundError
from .pairing import is_stray, require_folder
from .splits import natural_key

__all__ = ["dataset_images", "list_unlabelled_images", "pretraining_images", "with_unlabelled"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
TRAINING_SPLITS = ("train", "unlabelled")  # every other split of a datalist is held out


def list_unlabelled_images(
    folder: str | os.PathLike, source: str = "unlabelled_dir", prefix: str = "unlabelled"
) -> list[dict]:
    """``[{"image": path, "id": "<prefix>/...", "source": source}, ...]`` for every readable image of ``folder``.

    Every file is decoded once with the pipeline's readers; the first that fails is named.

    Args:
        folder: searched recursively for images.
        source: the config key that named the folder (in messages and in each item).
        prefix: the start of each item's id (ids must not collide with the dataset's).
    """
    from .readers import read_array  # MONAI-backed: loaded only when unlabelled images are used

    root = require_folder(folder, source, f"Pass --{source} with a folder of images, or null for none.")
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not is_stray(p)),
        key=lambda p: natural_key(str(p.relative_to(root))),
    )
    if not files:
        raise DatasetNotFoundError(
            f"{source} {root} holds no images ({', '.join(IMAGE_SUFFIXES)}); pass a folder of images, or null."
        )
    for path in files:
        read_array(path)  # raises UnreadableFileError naming the file
    return [{"image": str(p), "id": f"{prefix}/{p.relative_to(root).with_suffix('')}", "source": source} for p in files]


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


def _content_hash(path: str | os.PathLike) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def dataset_images(name: str, folder: str | os.PathLike) -> list[dict]:
    """Every image of another dataset (all its splits, masks dropped), read by its adapter: ``[{"image", "id"}]``."""
    from .registry import get_dataset

    split = get_dataset(name).split(folder)
    return [{"image": item["image"], "id": f"{name}/{item['id']}"} for items in split.values() for item in items]


def pretraining_images(
    datalist: dict[str, list[dict]],
    unlabelled_dir: str | os.PathLike | None = None,
    pretrain_dirs: Sequence[str | os.PathLike] | None = None,
    pretrain_datasets: Mapping[str, str | os.PathLike] | None = None,
) -> dict[str, list[dict]]:
    """Pretraining data: every image without its mask that is not held out.

    The training images (``train``, and ``unlabelled`` when the split has one), every image of
    ``unlabelled_dir``, every image of each folder of ``pretrain_dirs``, and every image of each
    other dataset of ``pretrain_datasets`` (read by its adapter, so its masks are not taken for
    images). Validation and test images are left out, and so is any other image whose path or
    content (SHA-1 of the file) is that of a held-out image: pretraining never sees one, even when
    another folder holds a copy of it. An image found twice is kept once.

    Args:
        datalist: a dataset adapter's split.
        unlabelled_dir: a folder of images without masks, or None.
        pretrain_dirs: further folders of images (nothing but images), or None.
        pretrain_datasets: other datasets, ``{adapter name: folder}`` (e.g. ``{"kvasir-seg": ...}``), or None.
    """
    held_out = [item["image"] for name, items in datalist.items() if name not in TRAINING_SPLITS for item in items]
    held_out_paths = {str(Path(p).resolve()) for p in held_out}
    held_out_hashes = {_content_hash(p) for p in held_out if Path(p).is_file()}
    items = [{"image": item["image"], "id": item["id"]} for name in TRAINING_SPLITS for item in datalist.get(name, [])]
    folders = ([("unlabelled_dir", "unlabelled", unlabelled_dir)] if unlabelled_dir not in (None, "") else []) + [
        ("pretrain_dirs", f"pretrain{i}", folder) for i, folder in enumerate(pretrain_dirs or [])
    ]
    found = [item for source, prefix, folder in folders for item in list_unlabelled_images(folder, source, prefix)]
    found += [item for name, folder in (pretrain_datasets or {}).items() for item in dataset_images(name, folder)]
    items += [
        {"image": item["image"], "id": item["id"]}
        for item in found
        if str(Path(item["image"]).resolve()) not in held_out_paths
        and _content_hash(item["image"]) not in held_out_hashes
    ]
    seen: set[str] = set()
    unique = []
    for item in items:
        key = str(Path(item["image"]).resolve())
        if key not in seen and key not in held_out_paths:
            seen.add(key)
            unique.append(item)
    return {"train": unique}
