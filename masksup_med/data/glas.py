"""GLaS (Gland Segmentation in Colon Histology, MICCAI 2015) adapter: pair files and split.

Layout: ``NAME.EXT`` image next to ``NAME_anno.EXT`` annotation, with NAME ``train_N``,
``testA_N`` or ``testB_N`` and EXT ``.bmp`` (official release, instance-labelled masks) or
``.png`` (binary 0/255 masks). Label values are not interpreted here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import DatasetError, DatasetNotFoundError
from .splits import carve_validation, natural_key

_FILE = re.compile(r"^(?P<id>(?P<split>train|testA|testB)_\d+)(?P<anno>_anno)?\.(?i:bmp|png)$")

_HOW_TO_GET = (
    "GLaS is the Warwick-QU gland segmentation dataset of the MICCAI 2015 GlaS challenge: download "
    "'Warwick QU Dataset (Released 2016_07_08)' from the GlaS challenge page of the University of "
    "Warwick TIA Centre, unzip it and pass the folder that holds train_1.bmp and train_1_anno.bmp. "
    "To make synthetic demo data instead, run: masksup-med data demo glas DIR"
)


def _not_found(folder: Path, why: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(f"GLaS dataset folder {folder} {why}. {_HOW_TO_GET}")


def _scan(folder: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Map id -> image path and id -> annotation path, refusing duplicate ids."""
    images: dict[str, Path] = {}
    annos: dict[str, Path] = {}
    for path in folder.iterdir():
        match = _FILE.match(path.name)
        if match is None or not path.is_file():
            continue
        table = annos if match["anno"] else images
        other = table.setdefault(match["id"], path)
        if other != path:
            raise DatasetError(f"{folder}: both {other.name} and {path.name} found; keep only one")
    return images, annos


def find_glas_pairs(dataset_dir: str | os.PathLike) -> list[dict]:
    """List GLaS image/annotation pairs in ``dataset_dir``, in natural ``id`` order.

    Each item is ``{"image", "label", "id", "split"}`` with string paths and ``split`` one of
    ``train``, ``testA``, ``testB``. Files not named like GLaS files are ignored.
    """
    folder = Path(dataset_dir)
    if not folder.exists():
        raise _not_found(folder, "does not exist")
    if not folder.is_dir():
        raise _not_found(folder, "is not a folder")
    images, annos = _scan(folder)
    unpaired = [(images[i], "has no annotation") for i in images.keys() - annos.keys()]
    unpaired += [(annos[i], "has no image") for i in annos.keys() - images.keys()]
    if unpaired:
        path, why = min(unpaired, key=lambda u: natural_key(u[0].name))
        raise DatasetError(
            f"GLaS file {path} {why} (expected NAME.bmp|png next to NAME_anno.bmp|png); "
            f"{len(unpaired)} unpaired file(s) in {folder}"
        )
    if not images:
        raise _not_found(folder, "holds no image/annotation pairs (e.g. train_1.bmp + train_1_anno.bmp)")
    return [
        {
            "image": str(images[i]),
            "label": str(annos[i]),
            "id": i,
            "split": _FILE.match(images[i].name)["split"],
        }
        for i in sorted(images, key=natural_key)
    ]


def split_glas(
    dataset_dir: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0
) -> dict[str, list[dict]]:
    """Split GLaS into ``train``, ``validation``, ``testA``, ``testB`` and ``test``.

    ``validation`` is carved from the official training images by ``seed``; ``test`` is
    ``testA + testB``. Items keep their official ``split`` field.
    """
    pairs = find_glas_pairs(dataset_dir)
    by_split = {name: [p for p in pairs if p["split"] == name] for name in ("train", "testA", "testB")}
    train, validation = carve_validation(by_split["train"], val_fraction, seed)
    return {
        "train": train,
        "validation": validation,
        "testA": by_split["testA"],
        "testB": by_split["testB"],
        "test": by_split["testA"] + by_split["testB"],
    }
