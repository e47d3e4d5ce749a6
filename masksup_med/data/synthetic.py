"""Deterministic synthetic GLaS look-alike: H&E-coloured stroma with non-overlapping glands.

Each gland is an irregular blob (a rotated ellipse whose radius is perturbed by a few random
harmonics): a ring of purple epithelium with dark nuclei around a pale lumen. Annotations are
instance-labelled (0 background, 1..N one id per gland), as in the official GLaS release.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from .errors import DatasetError
from .splits import atomic_path

# Approximate H&E colours (RGB), measured by eye on real GLaS images.
_STROMA_LIGHT = np.array([236.0, 150.0, 214.0])
_STROMA_DARK = np.array([204.0, 98.0, 186.0])
_EPITHELIUM = np.array([152.0, 72.0, 168.0])
_LUMEN = np.array([246.0, 226.0, 244.0])
_NUCLEUS = np.array([74.0, 32.0, 120.0])

_SPLITS = ("train", "testA", "testB")


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed noise rescaled to [0, 1]."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    field -= field.min()
    return field / max(field.max(), 1e-8)


def _blob(rng: np.random.Generator, shape: tuple[int, int], near_border: bool) -> tuple[np.ndarray, ...]:
    """Return (inside mask, normalised radius 0 at centre .. 1 at the edge) of one random gland."""
    h, w = shape
    base = rng.uniform(0.11, 0.22) * min(h, w)
    a, b = base, base * rng.uniform(0.55, 1.0)
    if near_border:  # centre within half a radius of a random edge, so the gland is clipped
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        edge = rng.integers(4)
        offset = rng.uniform(-0.5, 0.5) * b
        cy, cx = [(offset, cx), (h - 1 + offset, cx), (cy, offset), (cy, w - 1 + offset)][edge]
    else:
        cy, cx = rng.uniform(0.1 * h, 0.9 * h), rng.uniform(0.1 * w, 0.9 * w)
    yy, xx = np.mgrid[0:h, 0:w]
    dy, dx = yy - cy, xx - cx
    theta = np.arctan2(dy, dx) - rng.uniform(0, np.pi)
    radius = a * b / np.hypot(b * np.cos(theta), a * np.sin(theta))
    for k in (2, 3, 5):
        radius *= 1 + rng.uniform(0.02, 0.09) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    rho = np.hypot(dy, dx) / radius
    return rho <= 1, rho


def _nuclei_points(rng: np.random.Generator, rho: np.ndarray, inside: np.ndarray, band: tuple, n: int):
    """Pick ``n`` random pixel coordinates of ``inside`` whose rho lies in ``band``."""
    ys, xs = np.nonzero(inside & (rho >= band[0]) & (rho <= band[1]))
    if len(ys) == 0:
        return ys, xs
    pick = rng.choice(len(ys), size=min(n, len(ys)), replace=False)
    return ys[pick], xs[pick]


def render_glas_like(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Render one image (H, W, 3 uint8) and its instance label map (H, W uint8) of ``size`` (W, H)."""
    w, h = size
    shape = (h, w)
    labels = np.zeros(shape, np.uint8)
    epithelium = np.zeros(shape)
    lumen = np.zeros(shape)
    nuclei = np.zeros(shape)
    target = int(rng.integers(2, 7))
    margin = ndimage.generate_binary_structure(2, 1)
    for _ in range(60 * target):
        if labels.max() == target:
            break
        inside, rho = _blob(rng, shape, near_border=rng.random() < 0.35)
        if inside.sum() < 30 or (ndimage.binary_dilation(inside, margin, 2) & (labels > 0)).any():
            continue
        labels[inside] = labels.max() + 1
        inner = rng.uniform(0.45, 0.65)  # lumen radius as a fraction of the gland radius
        lumen[inside & (rho < inner)] = 1
        epithelium[inside & (rho >= inner)] = 1
        count = int(inside.sum() * 0.05)
        ys, xs = _nuclei_points(rng, rho, inside, (inner + 0.3 * (1 - inner), 0.95), count)
        nuclei[ys, xs] = 1
    ys, xs = _nuclei_points(rng, np.zeros(shape), labels == 0, (0, 1), int(0.003 * h * w))
    nuclei[ys, xs] = 1

    stroma_mix = 0.6 * _smooth_noise(rng, shape, 6) + 0.4 * _smooth_noise(rng, shape, 2)
    image = _STROMA_LIGHT + stroma_mix[..., None] * (_STROMA_DARK - _STROMA_LIGHT)
    for layer, colour in ((epithelium, _EPITHELIUM), (lumen, _LUMEN)):
        alpha = ndimage.gaussian_filter(layer, 0.7)[..., None]
        image = image * (1 - alpha) + alpha * colour
    alpha = np.clip(ndimage.gaussian_filter(nuclei, 0.9) * 5, 0, 1)[..., None]
    image = image * (1 - alpha) + alpha * _NUCLEUS
    image *= 1 + 0.08 * (_smooth_noise(rng, shape, 1.5)[..., None] - 0.5)
    image += rng.normal(0, 4, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), labels


def _save(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="BMP")


def make_glas_demo(
    out_dir: str | os.PathLike,
    n_train: int = 24,
    n_test_a: int = 8,
    n_test_b: int = 4,
    size: tuple[int, int] = (160, 120),
    seed: int = 0,
) -> Path:
    """Write a synthetic GLaS look-alike in the official release layout; return ``out_dir``.

    Files are ``train_1.bmp`` / ``train_1_anno.bmp`` ... ``testB_N``: RGB 8-bit images and
    8-bit instance-labelled annotations. Each image depends only on (seed, split, index), so the
    same seed gives byte-identical files. ``size`` is (width, height).
    """
    counts = dict(zip(_SPLITS, (n_train, n_test_a, n_test_b)))
    if any(int(n) != n or n < 0 for n in counts.values()):
        raise ValueError(f"image counts must be non-negative integers, got {counts}")
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"size must be (width, height) with both >= 32, got {size!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"cannot write GLaS demo data: {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    for split_index, (split, n) in enumerate(counts.items()):
        for i in range(1, int(n) + 1):
            rng = np.random.default_rng([seed, split_index, i])
            image, labels = render_glas_like(rng, (int(size[0]), int(size[1])))
            _save(image, out / f"{split}_{i}.bmp")
            _save(labels, out / f"{split}_{i}_anno.bmp")
    return out
