"""Image readers for the dataset formats: MONAI's ``PILReader`` and a ``tifffile``-backed ``TiffReader``.

Both return arrays in MONAI's 2D convention: spatial axes reversed (an H x W image comes back as
(W, H)) and channels last, so ``LoadImaged(..., ensure_channel_first=True)`` treats PNG, BMP, JPEG
and TIFF alike.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
from monai.data import ImageReader, PILReader
from monai.data.utils import is_supported_format
from monai.utils import ensure_tuple

from .errors import UnreadableFileError

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")


class TiffReader(ImageReader):
    """Read 2D TIFF files (grey, RGB, RGBA; contiguous or planar samples) with ``tifffile``.

    Only the first page is read. ``reverse_indexing=True`` (default) swaps the two spatial axes,
    as MONAI's ``PILReader`` does, so the same picture gives the same array from PNG or TIFF.
    """

    def __init__(self, reverse_indexing: bool = True):
        super().__init__()
        self.reverse_indexing = reverse_indexing

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        """True when every file name ends in ``.tif`` or ``.tiff``."""
        return is_supported_format(filename, ["tif", "tiff"])

    def read(self, data, **kwargs):
        """Decode each file into an (H, W[, C]) array; return one array or a list of them."""
        arrays = [_read_tiff(Path(name)) for name in ensure_tuple(data)]
        return arrays if len(arrays) > 1 else arrays[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        """Return (array, metadata) with the same axes and metadata keys as ``PILReader``."""
        arrays, meta = [], {}
        for array in img if isinstance(img, list) else [img]:
            height, width = array.shape[:2]
            if self.reverse_indexing:
                array = np.swapaxes(array, 0, 1)
            arrays.append(array)
            if not meta:
                meta = {
                    "format": "TIFF",
                    "mode": _mode(array),
                    "width": width,
                    "height": height,
                    "spatial_shape": np.asarray((width, height) if self.reverse_indexing else (height, width)),
                    "original_channel_dim": -1 if array.ndim == 3 else float("nan"),
                }
        if len(arrays) == 1:
            return arrays[0], meta
        if array.ndim == 3:
            return np.concatenate(arrays, axis=-1), meta
        meta["original_channel_dim"] = 0
        return np.stack(arrays, axis=0), meta


def _mode(array: np.ndarray) -> str:
    """A Pillow-style mode name for ``array`` (metadata only)."""
    channels = 1 if array.ndim == 2 else array.shape[-1]
    if array.dtype != np.uint8:
        return f"{array.dtype.name}x{channels}"
    return {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}.get(channels, f"uint8x{channels}")


def _read_tiff(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        if len(tif.pages) == 0:
            raise ValueError("no readable image in this TIFF file (truncated?)")
        page = tif.pages.first
        array = page.asarray()
        axes = page.axes
    if axes == "SYX":
        array, axes = np.moveaxis(array, 0, -1), "YXS"
    if axes not in ("YX", "YXS"):
        raise ValueError(f"unsupported TIFF axes {axes!r}; expected a 2D grey or colour image")
    return array


class AnyImageReader(ImageReader):
    """Read any supported image file with the reader its suffix calls for: ``TiffReader`` for TIFF,
    MONAI's ``PILReader`` for PNG, JPEG and BMP.

    For folders of mixed formats. Given a list of readers instead, ``LoadImaged`` tries them in turn,
    and each file the first one cannot decode costs a failed read and an INFO line in the log.
    """

    def __init__(self):
        super().__init__()
        self._tiff, self._pil = TiffReader(), PILReader()

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        """True when every file name ends in a supported suffix."""
        return is_supported_format(filename, [suffix.lstrip(".") for suffix in PIL_SUFFIXES + TIFF_SUFFIXES])

    def read(self, data, **kwargs):
        """Decode with ``TiffReader`` when every file is a TIFF, with ``PILReader`` otherwise."""
        reader = self._tiff if self._tiff.verify_suffix(data) else self._pil
        return reader.read(data, **kwargs)

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        """Return (array, metadata) from whichever reader decoded ``img`` (TIFF pages come as arrays)."""
        first = img[0] if isinstance(img, list) else img
        return (self._tiff if isinstance(first, np.ndarray) else self._pil).get_data(img)


def reader_for(path: str | os.PathLike) -> ImageReader:
    """Return a reader instance for ``path`` chosen by its extension."""
    suffix = Path(path).suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return TiffReader()
    if suffix in PIL_SUFFIXES:
        return PILReader()
    raise UnreadableFileError(path, f"unsupported extension {suffix or '(none)'!r}")


def loader_reader(items: list[dict], keys: Sequence[str] = ("image", "label")):
    """Return the ``reader`` argument of ``LoadImaged`` for the files of a datalist.

    All TIFF: a ``TiffReader``; none: ``"PILReader"``; a mix: an ``AnyImageReader``.
    """
    tiff = {Path(item[k]).suffix.lower() in TIFF_SUFFIXES for item in items for k in keys if k in item}
    if tiff == {True}:
        return TiffReader()
    if True in tiff:
        return AnyImageReader()
    return "PILReader"


def read_array(path: str | os.PathLike) -> np.ndarray:
    """Read one file as the pipeline does (native dtype, MONAI axes); raise ``UnreadableFileError``."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise UnreadableFileError(path, "empty file (0 bytes)")
    reader = reader_for(path)
    image = None
    try:
        image = reader.read(path)
        array, _ = reader.get_data(image)
        return np.array(array)
    except Exception as e:  # every decoder has its own exception types
        raise UnreadableFileError(path, f"cannot be read: corrupt or truncated? ({type(e).__name__}: {e})") from e
    finally:
        if hasattr(image, "close"):
            image.close()
