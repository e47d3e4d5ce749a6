"""CVC-ClinicDB (colonoscopy polyps, 612 frames of 29 video sequences) adapter: pair, sequence, split.

Layouts: the official ``Original/N.tif`` + ``Ground Truth/N.tif``, and re-releases that put the
same folders under ``TIF/`` or ``PNG/`` (``PNG/Original/N.png`` + ``PNG/Ground Truth/N.png``).
Masks are 0/255 with soft edges: foreground is > 127. Frames of one sequence are near-duplicates,
so the split is by sequence unless ``by="frame"`` is asked for explicitly.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from .errors import DatasetError, DatasetNotFoundError
from .pairing import Scan, find_subfolder, pair_folders, require_folder, require_pairs_found
from .splits import split_groups

SUFFIXES = (".tif", ".tiff", ".png")
LABEL_THRESHOLD = 127

# First frame of sequences 1..29 and the last frame, from the release's README.txt.
_SEQUENCE_STARTS = (
    1,
    26,
    51,
    68,
    79,
    104,
    127,
    152,
    178,
    200,
    206,
    228,
    253,
    278,
    298,
    318,
    343,
    364,
    384,
    409,
    429,
    448,
    467,
    479,
    504,
    529,
    547,
    572,
    592,
)
_LAST_FRAME = 612
_ROW = re.compile(r"(\d+)\s+to\s+(\d+)\s*\|\s*(\d+)")
_LAYOUTS = ((None, "official layout"), ("TIF", "TIF re-release layout"), ("PNG", "PNG re-release layout"))

_HOW_TO_GET = (
    "CVC-ClinicDB is distributed by the Computer Vision Center (Barcelona) through the ISBI 2015 polyp "
    "detection challenge pages, and re-released with PNG copies on public dataset hubs; unzip it and pass "
    "the folder that holds Original/ and Ground Truth/ (or PNG/Original/ and PNG/Ground Truth/). "
    "To make synthetic demo data instead, run: masksup-med data demo cvc-clinicdb DIR"
)


def builtin_sequence_table() -> list[tuple[int, int, int]]:
    """(first frame, last frame, sequence) rows of the release's README.txt, embedded as a fallback."""
    ends = [s - 1 for s in _SEQUENCE_STARTS[1:]] + [_LAST_FRAME]
    return [(first, last, seq) for seq, (first, last) in enumerate(zip(_SEQUENCE_STARTS, ends), start=1)]


def parse_sequence_table(text: str) -> list[tuple[int, int, int]]:
    """Parse the ``N to M | S`` rows of the release's README.txt; ``[]`` when there are none."""
    return sorted((int(a), int(b), int(s)) for a, b, s in _ROW.findall(text))


def _readme_table(folders: list[Path]) -> tuple[list[tuple[int, int, int]], str]:
    """Sequence table from the first README.txt found in ``folders``, else the built-in one."""
    for folder in folders:
        for path in sorted(folder.glob("*")):
            if path.name.lower() == "readme.txt" and path.is_file():
                rows = parse_sequence_table(path.read_text(encoding="latin-1"))
                if rows:
                    return rows, str(path)
                warnings.warn(f"{path}: no 'N to M | sequence' table found; using the built-in one", stacklevel=3)
    return builtin_sequence_table(), "built-in table (from the release README.txt)"


def sequence_of(frame_id: str, table: list[tuple[int, int, int]]) -> int | None:
    """Video sequence of frame ``frame_id`` (its file stem), or None when not in ``table``."""
    if not frame_id.isdigit():
        return None
    frame = int(frame_id)
    return next((seq for first, last, seq in table if first <= frame <= last), None)


def _locate(folder: Path) -> tuple[Path, Path, Path, str]:
    for sub, description in _LAYOUTS:
        base = folder if sub is None else find_subfolder(folder, sub)
        images = find_subfolder(base, "Original") if base else None
        labels = find_subfolder(base, "Ground Truth", "GroundTruth", "Ground_Truth") if base else None
        if images and labels:
            return base, images, labels, description
    raise DatasetNotFoundError(
        f"CVC-ClinicDB folder {folder} has neither Original/ + Ground Truth/ nor PNG/Original/ + "
        f"PNG/Ground Truth/. {_HOW_TO_GET}"
    )


def scan_cvc_clinicdb(dataset_dir: str | os.PathLike) -> Scan:
    """Pair every CVC-ClinicDB frame with its mask and tag it with its video ``sequence``."""
    folder = require_folder(dataset_dir, "CVC-ClinicDB dataset", _HOW_TO_GET)
    base, images, labels, description = _locate(folder)
    table, source = _readme_table([base, folder] if base != folder else [folder])
    pairs, problems = pair_folders(images, labels, SUFFIXES)
    items = [
        {"image": str(image), "label": str(label), "id": key, "sequence": sequence_of(key, table)}
        for key, image, label in pairs
    ]
    layout = f"{description}: {images.relative_to(folder)}/ + {labels.relative_to(folder)}/; sequences from {source}"
    return require_pairs_found(
        Scan(items, problems, layout),
        folder,
        "CVC-ClinicDB dataset",
        "e.g. Original/1.tif + Ground Truth/1.tif",
        _HOW_TO_GET,
    )


def find_cvc_clinicdb_pairs(dataset_dir: str | os.PathLike) -> list[dict]:
    """List CVC-ClinicDB items ``{"image", "label", "id", "sequence"}``; raise on the first pairing problem."""
    return scan_cvc_clinicdb(dataset_dir).require_pairs()


def assign_cvc_clinicdb(
    items: list[dict],
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    by: str = "sequence",
) -> dict[str, list[dict]]:
    """Split into train / validation / test by video sequence (default) or, leaking, by frame.

    Fractions count sequences (``by="sequence"``) or frames (``by="frame"``), drawn by ``seed``.
    """
    if by == "frame":
        warnings.warn(
            "CVC-ClinicDB split by frame: frames of one video sequence are near-duplicates, so train and "
            "test share polyps and test scores are optimistic (leakage); split by sequence to avoid it",
            UserWarning,
            stacklevel=2,
        )
        return split_groups(items, "id", test_fraction, val_fraction, seed, what="frame")
    if by != "sequence":
        raise ValueError(f"by must be 'sequence' or 'frame', got {by!r}")
    unknown = [it for it in items if it["sequence"] is None]
    if unknown:
        names = ", ".join(Path(it["image"]).name for it in unknown[:5])
        raise DatasetError(
            f"{unknown[0]['image']}: frame not in the sequence table (frames 1..{_LAST_FRAME} named by number); "
            f"{len(unknown)} such frame(s): {names}{' ...' if len(unknown) > 5 else ''}. Restore the original "
            "names, or split by frame (leaks across sequences)"
        )
    return split_groups(items, "sequence", test_fraction, val_fraction, seed, what="sequence")


def split_cvc_clinicdb(
    dataset_dir: str | os.PathLike,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    by: str = "sequence",
) -> dict[str, list[dict]]:
    """Find the pairs in ``dataset_dir`` and split them (see :func:`assign_cvc_clinicdb`)."""
    return assign_cvc_clinicdb(find_cvc_clinicdb_pairs(dataset_dir), val_fraction, test_fraction, seed, by)
