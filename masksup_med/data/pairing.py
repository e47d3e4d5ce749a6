"""Find image and label files and pair them by name, collecting every problem instead of stopping.

Adapters describe *which* files are images or labels and under which pairing key; this module
does the rest (stray files, unsupported extensions, duplicates, unpaired files) once for all.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DatasetError, DatasetNotFoundError
from .formats import file_stem, file_suffix
from .splits import natural_key

STRAY_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "ehthumbs.db"})

# Problems that make a datalist wrong (training must refuse); others only make ``check`` fail.
PAIRING_KINDS = frozenset({"unpaired", "duplicate", "empty", "broken link", "unsupported, paired"})
LEFT_OUT = "left out"  # a file that looks like data but is not used: reported as a warning
_BROKEN_LINK = "a symbolic link whose target is missing or loops back to itself; replace it with the file it meant"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file or folder: ``str()`` gives ``PATH: MESSAGE``.

    Kind ``folder`` (the dataset folder itself is missing or unusable) carries a full message.
    """

    path: Path
    message: str
    kind: str = "data"

    def __str__(self) -> str:
        return self.message if self.kind == "folder" else f"{self.path}: {self.message}"


@dataclass
class Scan:
    """Result of scanning a dataset folder: datalist items, problems found, layout description."""

    items: list[dict]
    problems: list[Problem] = field(default_factory=list)
    layout: str = ""

    def require_pairs(self) -> list[dict]:
        """Return ``items``, or raise ``DatasetError`` on the first pairing problem."""
        fatal = [p for p in self.problems if p.kind in PAIRING_KINDS]
        if fatal:
            raise DatasetError(
                f"{fatal[0]}; {len(fatal)} pairing problem(s) in total "
                "(run `masksup-med data check DATASET DIR` to list them all)"
            )
        return self.items


def is_stray(path: Path) -> bool:
    """True for operating-system litter and hidden files (``.DS_Store``, ``Thumbs.db``, ``._x``)."""
    return path.name.lower() in STRAY_NAMES or path.name.startswith(".")


def require_folder(folder: str | os.PathLike, what: str, how_to_get: str) -> Path:
    """Return ``folder`` as a Path, or raise ``DatasetNotFoundError`` saying what was expected."""
    folder = Path(folder)
    if not folder.exists():
        raise DatasetNotFoundError(f"{what} folder {folder} does not exist. {how_to_get}")
    if not folder.is_dir():
        raise DatasetNotFoundError(f"{what} folder {folder} is not a folder. {how_to_get}")
    return folder


def find_subfolder(parent: Path, *names: str) -> Path | None:
    """Return the first child folder of ``parent`` named like one of ``names`` (case-insensitive)."""
    if not parent.is_dir():
        return None
    children = {p.name.lower(): p for p in parent.iterdir() if p.is_dir()}
    for name in names:
        if name.lower() in children:
            return children[name.lower()]
    return None


# A classifier maps a file to (role, key, supported) or None when the file is not part of the
# dataset: role is "image" or "label", key pairs an image with its label, supported says whether
# the extension can be read.
Classifier = Callable[[Path], "tuple[str, str, bool] | None"]


def in_folder(role: str, suffixes: Iterable[str]) -> Classifier:
    """Classifier for a folder holding only ``role`` files, paired by file stem (``case1.nii.gz``: ``case1``)."""
    allowed = frozenset(s.lower() for s in suffixes)

    def classify(path: Path):
        return role, file_stem(path), file_suffix(path) in allowed

    return classify


def pair_files(
    files: Iterable[Path], classify: Classifier, suffixes: Iterable[str], hint: str = ""
) -> tuple[list, list]:
    """Pair ``files`` by key; return ([(key, image, label)] in natural key order, [Problem]).

    Stray files are skipped; a symbolic link that leads nowhere (missing target, or a loop) and a file
    with an unsupported extension are problems of their own, and their partner is not reported
    unpaired; an image file (one of ``suffixes``)
    that the classifier rejects is left out, recorded as a ``left out`` problem (a warning, not an
    error); a file with an unsupported extension, two files for one key and role, or an unpaired file
    is a problem; ``hint`` (the expected naming) is added to the messages about unpaired and left-out
    files.
    """
    allowed = frozenset(s.lower() for s in suffixes)
    expected = "|".join(sorted(s.lstrip(".") for s in allowed))
    tables: dict[str, dict[str, Path]] = {"image": {}, "label": {}}
    problems: list[Problem] = []
    named: dict[str, set[str]] = {"image": set(), "label": set()}  # keys whose file is a problem of its own
    unsupported: list[tuple[str, str, Path]] = []
    for path in sorted(files, key=lambda p: natural_key(p.name)):
        if is_stray(path):
            continue
        if path.is_symlink() and not path.exists():
            found = classify(path)
            if found is not None:
                named[found[0]].add(found[1])
                problems.append(Problem(path, _BROKEN_LINK, "broken link"))
            continue
        if not path.is_file():
            continue
        found = classify(path)
        if found is None:
            if file_suffix(path) in allowed:
                problems.append(
                    Problem(path, f"left out: its name does not follow the dataset's naming{hint}", LEFT_OUT)
                )
            continue
        role, key, supported = found
        if not supported:
            named[role].add(key)
            unsupported.append((role, key, path))
            continue
        other = tables[role].setdefault(key, path)
        if other != path:
            problems.append(
                Problem(path, f"both {other.name} and {path.name} found for {role} {key!r}; keep only one", "duplicate")
            )
    images, labels = tables["image"], tables["label"]
    for role, key, path in unsupported:  # with a partner, it would leave the partner out: training stops
        partner = (labels if role == "image" else images).get(key)
        message = f"unsupported extension {file_suffix(path)!r} (expected {expected})"
        if partner is not None:
            message += f", so its {'label' if role == 'image' else 'image'} {partner.name} is left without a pair"
        problems.append(Problem(path, message, "unsupported, paired" if partner is not None else "unsupported"))
    for key in images.keys() - labels.keys() - named["label"]:
        problems.append(Problem(images[key], f"image has no label{hint}", "unpaired"))
    for key in labels.keys() - images.keys() - named["image"]:
        problems.append(Problem(labels[key], f"label has no image{hint}", "unpaired"))
    keys = sorted(images.keys() & labels.keys(), key=natural_key)
    problems.sort(key=lambda p: natural_key(str(p.path)))
    return [(k, images[k], labels[k]) for k in keys], problems


def pair_folders(image_dir: Path, label_dir: Path, suffixes: Iterable[str]) -> tuple[list, list]:
    """Pair ``image_dir/NAME.ext`` with ``label_dir/NAME.ext'`` (see :func:`pair_files`)."""
    hint = f" (expected NAME.ext in both {image_dir.name}/ and {label_dir.name}/)"
    suffixes = tuple(suffixes)
    image_of, label_of = in_folder("image", suffixes), in_folder("label", suffixes)
    images = {p: image_of(p) for p in image_dir.iterdir()}
    labels = {p: label_of(p) for p in label_dir.iterdir()}
    table = images | labels
    return pair_files(table, table.__getitem__, suffixes, hint)


def require_pairs_found(scan: Scan, folder: Path, what: str, example: str, how_to_get: str) -> Scan:
    """Raise ``DatasetNotFoundError`` when ``folder`` held nothing of the dataset at all; when it held
    only broken files, record that as one more problem. Return ``scan``."""
    if not scan.items:
        if not scan.problems:
            raise DatasetNotFoundError(f"{what} folder {folder} holds no image/label pairs ({example}). {how_to_get}")
        scan.problems.append(Problem(folder, f"holds no usable image/label pairs ({example})", "empty"))
    return scan


def scan_image_mask_folders(
    folder: Path, images: Path, labels: Path, suffixes: Iterable[str], what: str, example: str, how_to_get: str
) -> Scan:
    """Pair every image of ``images`` with its mask in ``labels`` (same name), collecting all problems.

    ``what`` names the dataset in messages and ``example`` shows the expected naming.
    """
    pairs, problems = pair_folders(images, labels, suffixes)
    items = [{"image": str(image), "label": str(label), "id": key} for key, image, label in pairs]
    layout = f"{images.relative_to(folder)}/ + {labels.relative_to(folder)}/"
    return require_pairs_found(Scan(items, problems, layout), folder, what, example, how_to_get)
