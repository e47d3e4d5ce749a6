"""The PraNet polyp protocol on the original releases: Kvasir-SEG + CVC-ClinicDB, split by a list of files.

PraNet (and the MaskSup paper after it) trains on 900 Kvasir-SEG + 550 CVC-ClinicDB images and tests on
the other 100 + 62. The protocol is a list of file names, not a rule: this adapter takes the list
(``train_list``) and the two releases, unchanged, as subfolders of one folder (``Kvasir-SEG/`` and
``CVC-ClinicDB/``, any folder whose name starts with ``kvasir`` or ``cvc``, case and punctuation aside).
The listed images are the training set (``validation`` is carved from it by ``seed``), every other
image is the test set, also per dataset (``test_kvasir-seg``, ``test_cvc-clinicdb``).

The lists do not ship with this project. ``train_list`` is a text file naming one training image per
line (its file name or stem; ``kvasir-seg/NAME`` or ``cvc-clinicdb/NAME`` where a name would be
ambiguous; ``#`` comments), or a folder whose image files are the training images, such as the
``TrainDataset/image/`` folder of PraNet's own download, when its names are the releases' names. A
listed name found in neither dataset is an error naming it. With only one of the two releases present,
the split says so (a warning at start): the run then is not the PraNet protocol.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from . import cvc_clinicdb, kvasir_seg
from .errors import DatasetError, DatasetNotFoundError
from .pairing import Scan, is_stray, require_folder
from .splits import carve_validation, natural_key

LABEL_THRESHOLD = 127
NAME = "kvasir-cvc"
# (dataset, folder name prefix, scanner) of the two releases the protocol combines
SOURCES = (
    ("kvasir-seg", "kvasir", kvasir_seg.scan_kvasir_seg),
    ("cvc-clinicdb", "cvc", cvc_clinicdb.scan_cvc_clinicdb),
)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})

_HOW_TO_GET = (
    "Put the Kvasir-SEG release (images/ + masks/) and the CVC-ClinicDB release (Original/ + Ground Truth/) "
    "side by side in one folder, e.g. DIR/Kvasir-SEG and DIR/CVC-ClinicDB, and pass DIR."
)
_NO_LIST = (
    "the PraNet protocol needs train_list: the training images' names (900 Kvasir-SEG + 550 CVC-ClinicDB in PraNet). "
    "This project does not ship PraNet's lists; pass a text file with one name per line, or a folder whose images "
    "are the training images (e.g. TrainDataset/image of PraNet's download), as split option train_list"
)


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _release_folders(folder: Path) -> dict[str, Path]:
    """``{dataset: its release folder}`` for the releases found among ``folder``'s subfolders."""
    found: dict[str, Path] = {}
    for child in sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)):
        for dataset, prefix, _ in SOURCES:
            if _key(child.name).startswith(prefix):
                if dataset in found:
                    raise DatasetError(
                        f"{folder} holds two {dataset} folders, {found[dataset].name}/ and {child.name}/; keep one"
                    )
                found[dataset] = child
    return found


def _sequence(item: dict) -> str:
    """The CVC-ClinicDB video sequence as text, ``""`` for none: every item has the same keys, so a batch
    may mix the two datasets (MONAI's collation needs the same keys, and cannot batch ``None``)."""
    return "" if item.get("sequence") is None else str(item["sequence"])


def scan_kvasir_cvc(dataset_dir: str | os.PathLike) -> Scan:
    """Pair the images of each release found under ``dataset_dir``; items carry ``source`` (their dataset)
    and ``sequence`` (:func:`_sequence`)."""
    folder = require_folder(dataset_dir, "Kvasir-SEG + CVC-ClinicDB folder", _HOW_TO_GET)
    releases = _release_folders(folder)
    if not releases:
        raise DatasetNotFoundError(f"{folder} holds neither a Kvasir-SEG nor a CVC-ClinicDB folder. {_HOW_TO_GET}")
    items, problems, layouts = [], [], []
    for dataset, _, scan in SOURCES:
        if dataset in releases:
            found = scan(releases[dataset])
            items += [
                {**item, "id": f"{dataset}/{item['id']}", "source": dataset, "sequence": _sequence(item)}
                for item in found.items
            ]
            problems += found.problems
            layouts.append(f"{releases[dataset].name}/: {found.layout}")
    return Scan(items, problems, "; ".join(layouts))


def read_train_list(train_list: str | os.PathLike) -> list[str]:
    """The names a training list gives: lines of a text file (``#`` comments), or the image files of a folder."""
    path = Path(train_list)
    if path.is_dir():
        return sorted(
            (p.name for p in path.iterdir() if p.is_file() and not is_stray(p) and p.suffix.lower() in IMAGE_SUFFIXES),
            key=natural_key,
        )
    if not path.is_file():
        raise DatasetNotFoundError(f"train_list {path} does not exist; {_NO_LIST}")
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def _listed(names: list[str], items: list[dict], train_list) -> set[str]:
    """Ids of ``items`` that ``names`` name; an unknown or ambiguous name is an error naming it."""
    by_stem: dict[str, list[str]] = {}
    for item in items:
        by_stem.setdefault(item["id"].split("/", 1)[1], []).append(item["id"])
    present = {item["source"] for item in items}
    chosen: set[str] = set()
    unknown = []
    for name in names:
        parts = name.replace("\\", "/").split("/")
        stem = Path(parts[-1]).stem
        dataset = next((d for d, *_ in SOURCES if len(parts) > 1 and _key(parts[-2]).startswith(_key(d))), None)
        ids = [i for i in by_stem.get(stem, []) if dataset is None or i.startswith(f"{dataset}/")]
        if len(ids) > 1:
            raise DatasetError(
                f"train_list {train_list}: {name!r} names an image of both datasets; write "
                f"{ids[0].split('/')[0]}/{stem} or {ids[1].split('/')[0]}/{stem}"
            )
        if ids:
            chosen.add(ids[0])
        elif dataset is None or dataset in present:
            unknown.append(name)
    if unknown and len(present) == len(SOURCES):
        raise DatasetError(
            f"train_list {train_list}: {len(unknown)} name(s) match no image of Kvasir-SEG or "
            f"CVC-ClinicDB, e.g. {unknown[0]!r}"
        )
    return chosen


def assign_kvasir_cvc(
    items: list[dict], train_list: str | os.PathLike | None = None, val_fraction: float = 0.1, seed: int = 0
) -> dict[str, list[dict]]:
    """``train`` (the listed images) and ``validation`` carved from it by ``seed``; ``test`` (every other image)
    and ``test_<dataset>`` for each release. Warns when only one of the two releases is there."""
    if train_list is None:
        raise DatasetError(_NO_LIST)
    present = [d for d, *_ in SOURCES if any(item["source"] == d for item in items)]
    if len(present) < len(SOURCES):
        missing = [d for d, *_ in SOURCES if d not in present]
        warnings.warn(
            f"only {', '.join(present)} found, no {', '.join(missing)}: the PraNet protocol trains and tests "
            f"on both, so this split ({', '.join(present)} alone) is not comparable with its results",
            UserWarning,
            stacklevel=2,
        )
    chosen = _listed(read_train_list(train_list), items, train_list)
    if not chosen:
        raise DatasetError(f"train_list {train_list} names none of the images found")
    train, validation = carve_validation([it for it in items if it["id"] in chosen], val_fraction, seed)
    test = [
        {**it, "split": f"test_{it['source']}"}
        for it in sorted(items, key=lambda it: natural_key(it["id"]))
        if it["id"] not in chosen
    ]
    per_dataset = {f"test_{d}": [it for it in test if it["source"] == d] for d in present}
    return {"train": train, "validation": validation, "test": test, **per_dataset}


def split_kvasir_cvc(
    dataset_dir: str | os.PathLike,
    train_list: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """Find both releases in ``dataset_dir`` and split them by ``train_list`` (see :func:`assign_kvasir_cvc`)."""
    return assign_kvasir_cvc(scan_kvasir_cvc(dataset_dir).require_pairs(), train_list, val_fraction, seed)
