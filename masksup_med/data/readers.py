"""Image readers for the dataset formats, chosen by suffix in :class:`AnyImageReader`.

- PNG, JPEG, BMP: MONAI's ``PILReader``; TIFF: ``TiffReader`` (``tifffile``);
- NIfTI (``.nii``, ``.nii.gz``): MONAI's ``NibabelReader``;
- DICOM (``.dcm``, ``.dicom``, one file, one frame): MONAI's ``PydicomReader``;
- MetaImage (``.mha``, ``.mhd``) and NRRD (``.nrrd``, ``.nhdr``): ``SimpleITKReader`` (MONAI's own
  ``ITKReader`` needs the ``itk`` package; this one reads with SimpleITK, a dependency already, and
  gives the same arrays and affine).

All return arrays in MONAI's 2D convention, channels last: the first spatial axis is the image's x
(columns), the second its y (rows). A PNG of H x W pixels comes back as (W, H); a NIfTI, DICOM or
MetaImage slice comes back in its own voxel order (i, j), which is the same convention (i runs
along a row, j down the columns), so a picture stored as PNG or as NIfTI gives the network the same
input. Medical images are not reoriented (no ``Orientation`` to RAS): the network sees the voxel
grid as stored, and the mask written for it keeps that grid and the image's affine (in RAS, as
MONAI's readers give it), so it lies on the image in ITK-SNAP or 3D Slicer.

The models are 2D: a medical file whose third (or later) spatial axis has one voxel is read as 2D
(``X x Y x 1``); a volume (more than one slice, or a time series) is refused, naming the file and
its shape (:class:`FormatError`). Slicing volumes is not supported.

:class:`AnyImageReader` records the source pixel type in the metadata (``source_dtype``), so that
:class:`~masksup_med.transforms.NormaliseIntensityd` can leave 8-bit images as they are and scale
16-bit or float intensities (CT, MR) to the 0..255 range the bundles' preprocessing expects.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
from monai.data import ImageReader, NibabelReader, PILReader, PydicomReader
from monai.data.utils import is_supported_format
from monai.utils import ensure_tuple

from .errors import UnreadableFileError
from .formats import (
    DICOM_SUFFIXES,
    ITK_SUFFIXES,
    MEDICAL_SUFFIXES,
    NIFTI_SUFFIXES,
    PIL_SUFFIXES,
    SUPPORTED_SUFFIXES,
    TIFF_SUFFIXES,
    file_suffix,
    format_name,
)

__all__ = [
    "PIL_SUFFIXES",
    "SUPPORTED_SUFFIXES",
    "TIFF_SUFFIXES",
    "AnyImageReader",
    "FormatError",
    "SimpleITKReader",
    "TiffReader",
    "loader_reader",
    "read_array",
    "read_image",
    "reader_for",
]


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


class FormatError(ValueError):
    """A file that decodes but is not a 2D image the models take (a volume, a DICOM without pixels)."""


class SimpleITKReader(ImageReader):
    """Read MetaImage (``.mha``, ``.mhd``) and NRRD (``.nrrd``, ``.nhdr``) files with SimpleITK.

    Returns the array in voxel index order (i, j[, k]), channels (vector pixels) last, and the
    affine in RAS (ITK's LPS direction, spacing and origin, first two axes negated), as MONAI's
    ``ITKReader`` does with its defaults; a 2D image's affine is given as 4 x 4, like NIfTI's.
    """

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        """True when every file name ends in a MetaImage or NRRD suffix."""
        return is_supported_format(filename, [s.lstrip(".") for s in ITK_SUFFIXES])

    def read(self, data, **kwargs):
        """Read each file as a ``SimpleITK.Image``; one image or a list of them."""
        import SimpleITK as sitk

        images = [sitk.ReadImage(str(name)) for name in ensure_tuple(data)]
        return images if len(images) > 1 else images[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        """Return (array, metadata) of one image (``affine``, ``spatial_shape``, ``original_channel_dim``)."""
        import SimpleITK as sitk

        if isinstance(img, list):
            if len(img) != 1:
                raise FormatError("SimpleITKReader reads one file at a time")
            img = img[0]
        dims = img.GetDimension()
        array = sitk.GetArrayFromImage(img)  # (k, j, i[, c])
        channels = img.GetNumberOfComponentsPerPixel() > 1
        spatial = list(range(dims))[::-1]
        array = np.transpose(array, spatial + ([dims] if channels else []))
        direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dims, dims)
        affine = np.eye(4)
        n = min(dims, 3)
        affine[:n, :n] = (direction * np.asarray(img.GetSpacing()))[:n, :n]
        affine[:n, 3] = np.asarray(img.GetOrigin())[:n]
        affine[:2] *= -1  # LPS -> RAS
        affine += 0.0  # no negative zeros
        meta = {
            "affine": affine,
            "original_affine": affine.copy(),
            "spatial_shape": np.asarray(array.shape[:dims]),
            "original_channel_dim": -1 if channels else float("nan"),
            "spacing": np.asarray(img.GetSpacing()),
            "space": "RAS",
        }
        return array, meta


def as_2d(array: np.ndarray, meta: dict) -> tuple[np.ndarray, dict]:
    """Drop singleton spatial axes after the first two (``X x Y x 1`` -> ``X x Y``); refuse anything else.

    Raises :class:`FormatError` with the shape for a volume (several slices, frames or time points).
    """
    channel_dim = meta.get("original_channel_dim", float("nan"))
    has_channels = isinstance(channel_dim, (int, np.integer))
    spatial = array.shape[:-1] if has_channels and channel_dim == -1 else array.shape
    if has_channels and channel_dim not in (-1, array.ndim - 1):
        raise FormatError(f"unsupported layout: shape {tuple(array.shape)} with channels on axis {channel_dim}")
    extra = spatial[2:]
    if len(spatial) < 2 or any(n != 1 for n in extra):
        raise FormatError(
            f"is a volume of shape {' x '.join(str(n) for n in array.shape)} (voxels, in file order); the models "
            "are 2D and take one slice (X x Y, or X x Y x 1): save each slice as its own file"
        )
    if extra:
        array = array.reshape(spatial[:2] + array.shape[len(spatial) :])
    meta = dict(meta)
    meta["spatial_shape"] = np.asarray(spatial[:2])
    return array, meta


class _Decoded:
    """What :meth:`AnyImageReader.read` returns: the decoded object and the reader that decoded it."""

    def __init__(self, reader: ImageReader, image, path: str):
        self.reader, self.image, self.path = reader, image, path

    def close(self) -> None:
        if hasattr(self.image, "close"):
            self.image.close()


class AnyImageReader(ImageReader):
    """Read any supported image file with the reader its suffix calls for (see the module's list).

    For folders of mixed formats. Given a list of readers instead, ``LoadImaged`` tries them in turn,
    and each file the first one cannot decode costs a failed read and an INFO line in the log.
    Medical images are made 2D (:func:`as_2d`; a volume raises :class:`FormatError`); every image's
    metadata gets ``source_dtype`` (the pixel type in the file) and ``format`` (``PNG``, ``NIfTI``, ...).
    """

    def __init__(self):
        super().__init__()
        self._readers: dict[str, ImageReader] = {}

    def verify_suffix(self, filename: Sequence[os.PathLike | str] | os.PathLike | str) -> bool:
        """True when every file name ends in a supported suffix."""
        return all(file_suffix(name) in SUPPORTED_SUFFIXES for name in ensure_tuple(filename))

    def _reader(self, suffix: str) -> ImageReader:
        if suffix not in self._readers:
            self._readers[suffix] = reader_for(f"image{suffix}")
        return self._readers[suffix]

    def read(self, data, **kwargs):
        """Decode one file with the reader its suffix calls for (several files: all of one suffix)."""
        names = [str(name) for name in ensure_tuple(data)]
        suffixes = {file_suffix(name) for name in names}
        if len(suffixes) != 1:
            raise ValueError(f"files of different formats cannot be read as one image: {names}")
        suffix = suffixes.pop()
        reader = self._reader(suffix)
        image = reader.read(names if len(names) > 1 else names[0], **kwargs)
        if suffix in DICOM_SUFFIXES:
            _require_pixels(image, names[0])
        return _Decoded(reader, image, names[0])

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        """Return (array, metadata) from the reader that decoded ``img``."""
        array, meta = img.reader.get_data(img.image)
        array = np.asarray(array)
        if file_suffix(img.path) in MEDICAL_SUFFIXES:
            array, meta = as_2d(array, meta)
        meta = dict(meta)
        meta["source_dtype"] = array.dtype.name  # int16, not >i2
        meta["format"] = format_name(img.path)
        return array, meta


def _require_pixels(dataset, path: str) -> None:
    for ds in dataset if isinstance(dataset, list) else [dataset]:
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            modality = getattr(ds, "Modality", "") or "unknown"
            raise FormatError(f"DICOM file has no pixel data (modality {modality}): it is not an image")


def reader_for(path: str | os.PathLike) -> ImageReader:
    """Return a reader instance for ``path`` chosen by its extension."""
    suffix = file_suffix(path)
    if suffix in TIFF_SUFFIXES:
        return TiffReader()
    if suffix in PIL_SUFFIXES:
        return PILReader()
    if suffix in NIFTI_SUFFIXES:
        return NibabelReader()
    if suffix in DICOM_SUFFIXES:
        return PydicomReader()
    if suffix in ITK_SUFFIXES:
        return SimpleITKReader()
    raise UnreadableFileError(path, f"unsupported extension {suffix or '(none)'!r}")


def loader_reader(items: list[dict], keys: Sequence[str] = ("image", "label")):
    """Return the ``reader`` argument of ``LoadImaged`` for the files of a datalist.

    All TIFF: a ``TiffReader``; all PNG, JPEG or BMP: ``"PILReader"``; a mix, or any medical format:
    an ``AnyImageReader``.
    """
    suffixes = {file_suffix(item[k]) for item in items for k in keys if k in item}
    if suffixes and suffixes <= set(TIFF_SUFFIXES):
        return TiffReader()
    if suffixes <= set(PIL_SUFFIXES):
        return "PILReader"
    return AnyImageReader()


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read one file as the pipeline does: (array in native dtype and MONAI axes, metadata).

    Raises ``UnreadableFileError`` naming the file: empty, unsupported, corrupt, a volume, no pixels.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise UnreadableFileError(path, "empty file (0 bytes)")
    if file_suffix(path) not in SUPPORTED_SUFFIXES:
        raise UnreadableFileError(path, f"unsupported extension {file_suffix(path) or '(none)'!r}")
    reader = AnyImageReader()
    decoded = None
    try:
        decoded = reader.read(path)
        array, meta = reader.get_data(decoded)
        return np.array(array), meta
    except FormatError as e:
        raise UnreadableFileError(path, f"{format_name(path)} file {e}" if str(e).startswith("is ") else str(e)) from e
    except Exception as e:  # every decoder has its own exception types
        raise UnreadableFileError(path, f"cannot be read: corrupt or truncated? ({type(e).__name__}: {e})") from e
    finally:
        if decoded is not None:
            decoded.close()


def read_array(path: str | os.PathLike) -> np.ndarray:
    """Read one file as the pipeline does (native dtype, MONAI axes); raise ``UnreadableFileError``."""
    return read_image(path)[0]
