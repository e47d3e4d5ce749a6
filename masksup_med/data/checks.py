"""Integrity check of a dataset folder: read every file as the pipeline does, report all problems.

Images must be 8-bit RGB: grey, RGBA, palette-less 16-bit and other images are refused, not
converted (the message says how to convert). Labels are reduced to foreground as
:func:`~masksup_med.transforms.label.foreground_mask` does; for datasets whose masks are 0/255,
labels with many mid-grey pixels, or 0/1 masks, are refused as ambiguous.

A dataset with ``medical_formats`` (the ``folder`` dataset) takes grey or RGB(A) images of any pixel
type (16-bit CT and MR, float) in any supported format: the report counts the formats, the pixel
spacings (from the affine of NIfTI, DICOM, MetaImage, NRRD) and the intensity ranges by pixel type,
and says which are normalised and how. Its masks must be 0/1 or 0/255, in any pixel type.
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
from .readers import read_image
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
    formats: Counter = field(default_factory=Counter)  # image formats (PNG, NIfTI, DICOM, ...)
    spacings: Counter = field(default_factory=Counter)  # pixel spacing of images with an affine
    intensities: dict[str, list[float]] = field(default_factory=dict)  # pixel kind -> [min, max, count]

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
        if self.formats:
            lines.append(f"image formats: {_counts(self.formats, by_area=False)}")
        if self.spacings:
            lines.append(f"pixel spacing (row x column, mm): {_counts(self.spacings, by_area=False)}")
        for line in _intensity_lines(self.intensities):
            lines.append(line)
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


def _counts(counter: Counter, by_area: bool = True) -> str:
    """``SIZE KIND (n)`` of each distinct value; beyond ``MOST_COMMON`` values, the range and the most common."""
    common = "; ".join(f"{key} ({n})" for key, n in counter.most_common(MOST_COMMON))
    if len(counter) <= MOST_COMMON:
        return common or "none read"
    if not by_area:
        return f"{len(counter)} distinct; most common: {common}"
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


def _check_image(array: np.ndarray, spec: DatasetSpec | None = None) -> str | None:
    if spec is not None and spec.medical_formats:
        if channels_of(array) in (1, 2, 3, 4) and array.dtype.kind in "biuf":
            return None
        return f"image is {kind_of(array)} ({array.dtype}); grey, RGB or RGBA expected"
    if channels_of(array) == 3 and array.dtype == np.uint8:
        return None
    return f"image is {kind_of(array)}, 8-bit RGB expected; {_CONVERT}"


def spacing_of(meta: dict) -> str | None:
    """``row x column`` pixel spacing from the affine of a medical image (None for PNG, JPEG, TIFF...)."""
    affine = meta.get("affine")
    if affine is None or meta.get("format") in (None, "PNG", "JPEG", "BMP", "TIFF"):
        return None
    columns = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :2], axis=0)  # along i (x), along j (y)
    return f"{columns[1]:.3g} x {columns[0]:.3g}"


def _intensity_kind(array: np.ndarray) -> str:
    grey = "grey" if channels_of(array) <= 2 else "colour"
    return f"{grey} {array.dtype}"


def _intensity_lines(intensities: dict[str, list[float]]) -> list[str]:
    """How each pixel kind's intensities reach the network (8-bit as is, the others normalised)."""
    lines = []
    for kind, (low, high, count) in sorted(intensities.items()):
        how = (
            "used as is (0..255 -> 0..1)"
            if kind.endswith("uint8")
            else "normalised to 0..1 by the bundle's `intensity` value (default: percentiles 0.5..99.5 of each "
            "image; or a window, e.g. CT soft tissue {'mode': 'window', 'center': 40, 'width': 400}); grey is "
            "repeated to RGB"
        )
        lines.append(f"intensities, {kind} ({int(count)} images): {low:g}..{high:g}, {how}")
    return lines


def _label_values_problem(array: np.ndarray) -> str | None:
    """Problem of a medical-format mask: values other than 0/1 or 0/255."""
    values = np.unique(array)
    if values.size > 3 or not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if values.size > 6 else "")
        return f"label values are {shown}; a 0/1 or 0/255 mask expected (saved losslessly: PNG, TIFF, NIfTI, ...)"
    return None


def _check_label(array: np.ndarray, spec: DatasetSpec) -> tuple[str | None, float]:
    """(problem or None, foreground fraction) of one label array."""
    if channels_of(array) not in (1, 3):
        return f"label has {channels_of(array)} channels, 1 (grey) or 3 (colour) expected; save it without alpha", 0.0
    first = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    fraction = float(foreground_mask(first, spec.label_threshold).mean())
    if spec.medical_formats:
        return _label_values_problem(first), fraction
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


def _read(path: Path, report: CheckReport) -> tuple[np.ndarray | None, dict]:
    try:
        return read_image(path)
    except UnreadableFileError as e:
        report.problems.append(Problem(Path(e.path), e.reason, "read"))
        return None, {}


def check_image(path: str | os.PathLike, report: CheckReport, spec: DatasetSpec | None = None) -> np.ndarray | None:
    """Read one image, add its size and kind (and any problem) to ``report``; the array, None if unreadable.

    For a ``medical_formats`` ``spec``, also its format, pixel spacing and intensity range.
    """
    return _checked_image(path, report, spec)[0]


def _checked_image(path: str | os.PathLike, report: CheckReport, spec: DatasetSpec | None) -> tuple:
    image, meta = _read(Path(path), report)
    if image is not None:
        report.images[describe(image)] += 1
        problem = _check_image(image, spec)
        if problem:
            report.problems.append(Problem(Path(path), problem, "image"))
        elif spec is not None and spec.medical_formats:
            report.formats[meta.get("format", "?")] += 1
            spacing = spacing_of(meta)
            if spacing:
                report.spacings[spacing] += 1
            low, high, count = report.intensities.get(_intensity_kind(image), [np.inf, -np.inf, 0])
            report.intensities[_intensity_kind(image)] = [
                min(low, float(image.min())),
                max(high, float(image.max())),
                count + 1,
            ]
    return image, meta


def check_pair(item: dict, spec: DatasetSpec, report: CheckReport) -> None:
    """Read one image/label pair and add what is found (sizes, values, problems) to ``report``."""
    image_path, label_path = Path(item["image"]), Path(item["label"])
    image, image_meta = _checked_image(image_path, report, spec)
    label, label_meta = _read(label_path, report)
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
    if spec.medical_formats and image is not None and not _same_grid(image_meta, label_meta):
        report.warnings.append(
            f"{label_path}: its affine (position, orientation, spacing) differs from its image {image_path.name}'s; "
            "it is used voxel by voxel, as if it had the image's"
        )
    problem, fraction = _check_label(label, spec)
    if problem:
        report.problems.append(Problem(label_path, problem, "label"))
        return
    report.foreground.append(fraction)
    if fraction == 0:
        report.warnings.append(f"{label_path}: label is all background (no foreground pixel)")


def _same_grid(image_meta: dict, label_meta: dict) -> bool:
    """True unless both image and label carry an affine (medical formats) and the two differ."""
    if spacing_of(label_meta) is None or spacing_of(image_meta) is None:
        return True
    return bool(np.allclose(image_meta["affine"], label_meta["affine"], atol=1e-3))


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
