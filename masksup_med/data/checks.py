"""Integrity check of a dataset folder: read every file as the pipeline does, report all problems.

Images must be 8-bit RGB: grey, RGBA, palette-less 16-bit and other images are refused, not
converted (the message says how to convert). Labels are reduced to foreground as
:func:`~masksup_med.transforms.label.foreground_mask` does; for datasets whose masks are 0/255,
labels with many mid-grey pixels, or 0/1 masks, are refused as ambiguous.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from masksup_med.transforms.label import foreground_mask

from .errors import DatasetError, UnreadableFileError
from .pairing import LEFT_OUT, Problem
from .readers import read_array
from .registry import DatasetSpec, get_dataset
from .splits import natural_key

MID_GREY = (64, 191)  # values this far from both 0 and 255 are neither background nor foreground
MAX_MID_GREY_FRACTION = 0.05
MOST_COMMON = 5  # distinct image sizes listed by name in the summary
_CONVERT = "refused, not converted: save it as 8-bit RGB (e.g. Pillow: Image.open(f).convert('RGB'))"


@dataclass
class CheckReport:
    """Everything ``masksup-med data check`` prints; ``ok`` when there is no problem."""

    dataset: str
    folder: Path
    layout: str = ""
    pairs: int = 0
    official: Counter = field(default_factory=Counter)
    images: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)
    label_values: set = field(default_factory=set)
    foreground: list[float] = field(default_factory=list)
    splits: dict[str, int] = field(default_factory=dict)
    split_groups: dict[str, int] = field(default_factory=dict)  # video sequences per split, where known
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self, threshold: float) -> list[str]:
        """Human-readable summary lines (problems and warnings excluded)."""
        lines = [f"{self.dataset}: {self.folder}" + (f" ({self.layout})" if self.layout else "")]
        order = sorted(self.official, key=lambda k: (k != "train", natural_key(k)))
        official = ", ".join(f"{k} {self.official[k]}" for k in order)
        lines.append(f"pairs: {self.pairs}" + (f" ({official})" if official else ""))
        lines.append(f"images (H x W): {_counts(self.images)}")
        lines.append(f"labels (H x W): {_counts(self.labels)}")
        lines.append(f"label values: {_values(self.label_values)}; foreground = max over channels > {threshold:g}")
        if self.foreground:
            fg = np.asarray(self.foreground)
            lines.append(f"foreground fraction: mean {fg.mean():.3f}, min {fg.min():.3f}, max {fg.max():.3f}")
        if self.splits:
            lines.append("splits: " + ", ".join(f"{k} {v}" for k, v in self.splits.items()))
        if self.split_groups:
            lines.append(
                "split by video sequence, no sequence in two splits; sequences: "
                + ", ".join(f"{k} {v}" for k, v in self.split_groups.items())
            )
        return lines


def _pixels(size_and_kind: str) -> int:
    height, width = size_and_kind.split()[0].split("x")
    return int(height) * int(width)


def _counts(counter: Counter) -> str:
    """``SIZE KIND (n)`` of each distinct value; beyond ``MOST_COMMON`` values, the range and the most common."""
    common = "; ".join(f"{key} ({n})" for key, n in counter.most_common(MOST_COMMON))
    if len(counter) <= MOST_COMMON:
        return common or "none read"
    by_area = sorted(counter, key=_pixels)
    return f"{len(counter)} distinct, from {by_area[0]} to {by_area[-1]}; most common: {common}"


def _values(values: set) -> str:
    ordered = sorted(values)
    if len(ordered) <= 6:
        return ", ".join(str(v) for v in ordered) or "none read"
    return f"{ordered[0]}..{ordered[-1]} ({len(ordered)} distinct)"


def channels_of(array: np.ndarray) -> int:
    """Channel count of an array in reader layout (spatial, spatial[, channels])."""
    return 1 if array.ndim == 2 else array.shape[-1]


def kind_of(array: np.ndarray) -> str:
    """Channels and depth, e.g. ``RGB 8-bit``, ``grey 16-bit``, ``RGBA 8-bit``."""
    kind = {1: "grey", 2: "grey+alpha", 3: "RGB", 4: "RGBA"}.get(channels_of(array), f"{channels_of(array)}-channel")
    depth = "1-bit" if array.dtype == bool else f"{array.dtype.itemsize * 8}-bit"
    return f"{kind} {depth}"


def describe(array: np.ndarray) -> str:
    """Size (height x width; reader arrays are width-first) and kind, e.g. ``288x384 RGB 8-bit``."""
    return f"{array.shape[1]}x{array.shape[0]} {kind_of(array)}"


def _check_image(array: np.ndarray) -> str | None:
    if channels_of(array) == 3 and array.dtype == np.uint8:
        return None
    return f"image is {kind_of(array)}, 8-bit RGB expected; {_CONVERT}"


def _check_label(array: np.ndarray, spec: DatasetSpec) -> tuple[str | None, float]:
    """(problem or None, foreground fraction) of one label array."""
    if channels_of(array) not in (1, 3):
        return f"label has {channels_of(array)} channels, 1 (grey) or 3 (colour) expected; save it without alpha", 0.0
    first = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    fraction = float(foreground_mask(first, spec.label_threshold).mean())
    if not spec.binary_labels:
        return None, fraction
    grey = first.max(axis=0)
    if array.dtype != np.uint8:
        return f"label is {kind_of(array)}, an 8-bit 0/255 mask expected", fraction
    if grey.max() == 1:
        return (
            f"label values are 0/1, but this dataset's masks are 0/255 (foreground > {spec.label_threshold:g}): "
            "it would read as all background; save it as 0/255"
        ), fraction
    mid = float(((grey >= MID_GREY[0]) & (grey <= MID_GREY[1])).mean())
    if mid > MAX_MID_GREY_FRACTION:
        return (
            f"label is ambiguous: {mid:.1%} of its pixels are mid-grey ({MID_GREY[0]}..{MID_GREY[1]}), more than "
            f"{MAX_MID_GREY_FRACTION:.0%}; a 0/255 mask (soft edges allowed) is expected"
        ), fraction
    return None, fraction


def _read(path: Path, report: CheckReport) -> np.ndarray | None:
    try:
        return read_array(path)
    except UnreadableFileError as e:
        report.problems.append(Problem(Path(e.path), e.reason, "read"))
        return None


def check_image(path: str | os.PathLike, report: CheckReport) -> np.ndarray | None:
    """Read one image, add its size and kind (and any problem) to ``report``; the array, None if unreadable."""
    image = _read(Path(path), report)
    if image is not None:
        report.images[describe(image)] += 1
        problem = _check_image(image)
        if problem:
            report.problems.append(Problem(Path(path), problem, "image"))
    return image


def check_pair(item: dict, spec: DatasetSpec, report: CheckReport) -> None:
    """Read one image/label pair and add what is found (sizes, values, problems) to ``report``."""
    image_path, label_path = Path(item["image"]), Path(item["label"])
    image, label = check_image(image_path, report), _read(label_path, report)
    if label is None:
        return
    report.labels[describe(label)] += 1
    if label.dtype.kind in "biu" and len(report.label_values) <= 1024:
        report.label_values.update(np.unique(label).tolist())
    if image is not None and image.shape[:2] != label.shape[:2]:
        report.problems.append(
            Problem(
                label_path,
                f"label is {label.shape[1]}x{label.shape[0]} but its image {image_path.name} is "
                f"{image.shape[1]}x{image.shape[0]} (H x W)",
                "size",
            )
        )
    problem, fraction = _check_label(label, spec)
    if problem:
        report.problems.append(Problem(label_path, problem, "label"))
        return
    report.foreground.append(fraction)
    if fraction == 0:
        report.warnings.append(f"{label_path}: label is all background (no foreground pixel)")


def check_dataset(name: str, dataset_dir: str | os.PathLike, **split_options) -> CheckReport:
    """Scan ``dataset_dir`` as dataset ``name``, read every file, split it; collect every problem."""
    spec = get_dataset(name)
    report = CheckReport(spec.name, Path(dataset_dir))
    try:
        scan = spec.scan(dataset_dir)
    except DatasetError as e:
        report.problems.append(Problem(Path(dataset_dir), str(e), "folder"))
        return report
    report.layout, report.pairs = scan.layout, len(scan.items)
    report.problems += [p for p in scan.problems if p.kind != LEFT_OUT]
    report.warnings += [str(p) for p in scan.problems if p.kind == LEFT_OUT]
    report.official.update(it["split"] for it in scan.items if "split" in it)
    for item in scan.items:
        check_pair(item, spec, report)
    if scan.items:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                splits = spec.assign(scan.items, **split_options)
            report.warnings += [str(w.message) for w in caught]
            report.splits = {k: len(v) for k, v in splits.items()}
            by_sequence = "by" in spec.split_options and split_options.get("by", "sequence") == "sequence"
            if by_sequence and all("sequence" in it for it in scan.items):
                report.split_groups = {k: len({it["sequence"] for it in v}) for k, v in splits.items()}
        except DatasetError as e:
            report.problems.append(Problem(Path(dataset_dir), f"cannot split: {e}", "split"))
    report.problems.sort(key=lambda p: (natural_key(str(p.path)), p.message))
    return report
