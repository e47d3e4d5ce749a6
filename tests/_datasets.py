"""Tiny real image files in each dataset layout, for the adapter and data-check tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

H, W = 24, 32


def rgb(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def mask(h: int = H, w: int = W, high: int = 255) -> np.ndarray:
    out = np.zeros((h, w), np.uint8)
    out[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = high
    return out


def save(array: np.ndarray, path: Path) -> Path:
    """Write ``array`` (H, W[, C]) to ``path`` in the format of its extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".tif", ".tiff"):
        photometric = "rgb" if array.ndim == 3 and array.shape[-1] in (3, 4) else "minisblack"
        tifffile.imwrite(path, array, photometric=photometric)
    elif path.suffix.lower() in (".jpg", ".jpeg"):
        Image.fromarray(array).save(path, quality=95)
    else:
        Image.fromarray(array).save(path)
    return path


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def make_cvc(root: Path, frames=(1, 30, 60, 100, 150, 200), png: bool = False, readme: bool = True) -> Path:
    base = root / "PNG" if png else root
    ext = ".png" if png else ".tif"
    for i, frame in enumerate(frames):
        save(rgb(seed=i), base / "Original" / f"{frame}{ext}")
        save(mask(), base / "Ground Truth" / f"{frame}{ext}")
    if readme:
        rows = [
            (1, 25, 1),
            (26, 50, 2),
            (51, 67, 3),
            (68, 78, 4),
            (79, 103, 5),
            (104, 126, 6),
            (127, 151, 7),
            (152, 177, 8),
            (178, 199, 9),
            (200, 205, 10),
            (206, 612, 11),
        ]
        table = "\n".join(f"       |    {a} to  {b}    |\t {s}\t|" for a, b, s in rows)
        (root / "README.txt").write_text(f"CVC-ClinicDB\n\n{table}\n", encoding="latin-1")
    return root


def make_kvasir(root: Path, names=("cju0a", "cju0b", "cju0c", "cju0d", "cju0e")) -> Path:
    for i, name in enumerate(names):
        save(rgb(seed=i), root / "images" / f"{name}.jpg")
        save(np.repeat(mask()[..., None], 3, axis=-1), root / "masks" / f"{name}.jpg")
    return root


def make_pranet(root: Path, tests=("CVC-300", "Kvasir"), singular_train: bool = True) -> Path:
    image_dir, mask_dir = ("image", "mask") if singular_train else ("images", "masks")
    for i in range(1, 6):
        save(rgb(seed=i), root / "TrainDataset" / image_dir / f"{i}.png")
        save(mask(), root / "TrainDataset" / mask_dir / f"{i}.png")
    for name in tests:
        for i in range(1, 3):
            save(rgb(seed=10 + i), root / "TestDataset" / name / "images" / f"{i}.png")
            save(mask(), root / "TestDataset" / name / "masks" / f"{i}.png")
    return root


def make_glas(root: Path, ext: str = ".bmp", n: int = 3) -> Path:
    for split in ("train", "testA", "testB"):
        for i in range(1, n + 1):
            save(rgb(seed=i), root / f"{split}_{i}{ext}")
            save(mask(high=i), root / f"{split}_{i}_anno{ext}")  # instance-like ids
    return root
