"""Input limits, one set for ``serve``, ``predict``, the inference config and the evaluate config.

An image's size is read from its header (PNG, JPEG and BMP through Pillow's format plugins, which
decode nothing; TIFF through ``tifffile``'s page header; NIfTI-1 through ``nibabel``'s header, only its
first 348 bytes decompressed; DICOM through ``pydicom`` stopping before the pixels; MetaImage and NRRD
files through SimpleITK's header reader) and checked against :class:`InputLimits` before any pixel is
decoded, so a 100 KB file declaring 12000 x 12000 pixels costs nothing:

- ``serve`` checks every image of a request (413 when over) and the request itself (body bytes,
  images per request);
- ``predict`` and the inference config skip an input over the limits, naming it in the closing summary;
- the evaluate config refuses to start when an image or label of the evaluated split is over them.

The defaults live here only; the configs read them from :class:`InputLimits` and the commands'
options (``--max-pixels``, ``--max-image-bytes``, ``--max-body-bytes``, ``--max-images``) change them.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import struct
from collections.abc import Iterable, Mapping
from typing import Any, BinaryIO

from masksup_med.errors import UserError

from .errors import DatasetError
from .formats import ITK_SUFFIXES, file_suffix

__all__ = [
    "ImageHeader",
    "ImageRejected",
    "InputLimits",
    "check_headers",
    "file_header",
    "image_header",
    "sniff_medical_suffix",
    "sniff_suffix",
    "use_in_pillow",
]

MiB = 1 << 20
MAX_LISTED = 15

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"\xff\xd8\xff", ".jpg"),
    (b"BM", ".bmp"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
    (b"II+\x00", ".tif"),  # BigTIFF
    (b"MM\x00+", ".tif"),
)
_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP", ".tif": "TIFF"}
_EIGHT_BIT_MODES = ("L", "LA", "RGB", "RGBA")
_MODE_NAMES = {
    "1": "1-bit black-and-white",
    "P": "palette-indexed",
    "PA": "palette-indexed",
    "I;16": "16-bit grey",
    "I;16B": "16-bit grey",
    "I;16L": "16-bit grey",
    "I": "32-bit integer",
    "F": "32-bit float",
    "CMYK": "CMYK",
    "YCbCr": "YCbCr",
    "LAB": "LAB",
    "HSV": "HSV",
}
_MAX_REASON_CHARS = 200  # a decoder's own message, as quoted in a refusal


@dataclasses.dataclass(frozen=True)
class InputLimits:
    """What one input may be. The same defaults hold for ``serve``, ``predict``, inference and evaluation.

    Args:
        max_body_bytes: a ``serve`` request body (the JSON with the base64 images); ``serve --max-body-bytes``.
        max_pixels: width x height of one image, read from its header; ``--max-pixels`` (serve, predict),
            ``--max_pixels`` (bundle override of the inference and evaluate configs).
        max_image_bytes: one image decoded (width x height x channels x bytes per sample); ``--max-image-bytes``,
            ``--max_image_bytes``.
        max_images: images in one ``serve`` request; ``serve --max-images``.
    """

    max_body_bytes: int = 32 * MiB
    max_pixels: int = 25_000_000
    max_image_bytes: int = 256 * MiB
    max_images: int = 16

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"input limit {field.name} must be a positive integer, got {value!r}")

    def as_config(self) -> dict[str, int]:
        """The limits as plain values (a pyfunc model config)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> InputLimits:
        """The limits in a model config; defaults for those it lacks."""
        config = config or {}
        return cls(**{f.name: int(config[f.name]) for f in dataclasses.fields(cls) if config.get(f.name) is not None})


class ImageRejected(UserError, ValueError):
    """An image refused from its header: over the limits (``status`` 413) or unreadable / not 8-bit (400).

    ``reason`` says what is wrong with the image and never quotes its bytes; the caller adds which file
    or which image of a request it was. ``limit`` names the :class:`InputLimits` field it is over, if any.
    """

    def __init__(self, reason: str, status: int = 400, limit: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.limit = limit

    def naming_option(self, command: str = "") -> str:
        """``reason``, plus the option that changes the limit it is over: ``(serve --max-pixels)``."""
        if self.limit is None:
            return self.reason
        return f"{self.reason} ({command + ' ' if command else ''}--{self.limit.replace('_', '-')})"


@dataclasses.dataclass(frozen=True)
class ImageHeader:
    """An encoded image's format (file suffix), size, decoded size and samples, from its header.

    ``samples`` describes the pixel format (``8-bit RGB``, ``16-bit grey``, …); ``eight_bit`` says
    whether it is one the bundles' preprocessing reads right (grey, grey + alpha, RGB, RGBA, 0..255).
    """

    suffix: str
    width: int
    height: int
    decoded_bytes: int
    samples: str = "8-bit"
    eight_bit: bool = True

    def check_size(self, limits: InputLimits) -> ImageHeader:
        """Raise :class:`ImageRejected` (413) when the image is over ``limits``; return self."""
        pixels = self.width * self.height
        if pixels > limits.max_pixels:
            raise ImageRejected(
                f"the image is {self.width} x {self.height} = {pixels:,} pixels; the limit is "
                f"{limits.max_pixels:,} pixels",
                413,
                "max_pixels",
            )
        if self.decoded_bytes > limits.max_image_bytes:
            raise ImageRejected(
                f"the image is {self.decoded_bytes:,} bytes decoded ({self.width} x {self.height}); the limit is "
                f"{limits.max_image_bytes:,} bytes",
                413,
                "max_image_bytes",
            )
        return self

    def check(self, limits: InputLimits) -> ImageHeader:
        """:meth:`check_size`, then :class:`ImageRejected` (400) when the image is not 8-bit; return self."""
        self.check_size(limits)
        if not self.eight_bit:
            raise ImageRejected(
                f"{_FORMATS[self.suffix]} image with {self.samples} samples: the model reads 8-bit grey or RGB(A) "
                "images (values 0..255) and would see this one wrongly; convert it to 8-bit RGB"
            )
        return self


def sniff_suffix(data: bytes) -> str:
    """The file suffix of an encoded image from its first bytes (PNG, JPEG, BMP, TIFF, NIfTI-1, DICOM)."""
    medical = sniff_medical_suffix(data)  # first: a DICOM's 128-byte preamble may look like a TIFF
    if medical:
        return medical
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    raise ImageRejected("not a PNG, JPEG, BMP, TIFF, NIfTI or DICOM file; send the image file's bytes, base64-encoded")


# --- medical formats: NIfTI-1 (.nii, .nii.gz) and DICOM (.dcm), one 2D image each ---------------------------

_NIFTI_HEADER = 348
_SNIFF_BYTES = _NIFTI_HEADER  # enough of a file's start to tell every format apart
_GZIP = b"\x1f\x8b"


def _gunzip_head(data: bytes | BinaryIO, size: int) -> bytes:
    """The first ``size`` bytes of gzip ``data`` (bytes or a stream), decompressing no more (b'' if not gzip)."""
    import gzip

    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data) if isinstance(data, bytes) else data) as f:
            return f.read(size)
    except (OSError, EOFError):
        return b""


def sniff_medical_suffix(data: bytes) -> str | None:
    """``.nii``, ``.nii.gz`` or ``.dcm`` from the first bytes of ``data``; None for other files."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return ".dcm"
    if len(data) >= _NIFTI_HEADER and data[344:348] == b"n+1\x00":
        return ".nii"
    if data.startswith(_GZIP) and _gunzip_head(data, _NIFTI_HEADER)[344:348] == b"n+1\x00":
        return ".nii.gz"
    return None


def _slice_header(suffix: str, name: str, shape: tuple[int, ...], channels: int, sample: int) -> ImageHeader:
    """The header of a 2D medical image of ``shape`` (a volume is refused: the models are 2D)."""
    if len(shape) < 2 or any(n != 1 for n in shape[2:]):
        raise ImageRejected(
            f"the {name} image is a volume of shape {' x '.join(map(str, shape))}; the model is 2D: use one slice"
        )
    width, height = shape[0], shape[1]
    # any pixel type: intensities are normalised (NormaliseIntensity), so the bundles read it right
    return ImageHeader(suffix, width, height, width * height * channels * sample, f"{name} {sample * 8}-bit")


def _medical_header(stream: BinaryIO, suffix: str) -> ImageHeader:
    """Size of a NIfTI-1 or DICOM image from its header (nothing decoded)."""
    import numpy as np

    try:
        if suffix == ".dcm":
            import pydicom

            ds = pydicom.dcmread(stream, stop_before_pixels=True)
            if "Rows" not in ds or "Columns" not in ds:
                raise ImageRejected("DICOM file has no image (no Rows / Columns): it holds no pixel data")
            shape = (int(ds.Columns), int(ds.Rows), int(getattr(ds, "NumberOfFrames", 1) or 1))
            channels, sample = int(getattr(ds, "SamplesPerPixel", 1)), max(int(getattr(ds, "BitsAllocated", 8)) // 8, 1)
            return _slice_header(suffix, "DICOM", shape, channels, sample)
        import nibabel as nib

        head = stream.read(_NIFTI_HEADER) if suffix == ".nii" else _gunzip_head(stream, _NIFTI_HEADER)
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(head))
        shape, channels = tuple(int(n) for n in header.get_data_shape()), 1
        if len(shape) == 5 and shape[2:4] == (1, 1):  # X x Y x 1 x 1 x components (RGB)
            shape, channels = shape[:2], shape[4]
        return _slice_header(suffix, "NIfTI", shape, channels, np.dtype(header.get_data_dtype()).itemsize)
    except ImageRejected:
        raise
    except Exception as e:  # noqa: BLE001 - pydicom and nibabel raise many types for a broken header
        raise ImageRejected(f"not a readable {suffix} image ({_quote(e)})") from None


def _itk_file_header(path: str | os.PathLike) -> ImageHeader:
    """Size of a MetaImage or NRRD file from SimpleITK's header reader (no pixel is read)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ImageRejected(f"not a readable {file_suffix(path)} image ({_quote(e)})") from None
    bits = re.search(r"(\d+)-bit", sitk.GetPixelIDValueAsString(reader.GetPixelIDValue()))  # "16-bit signed integer"
    sample = int(bits.group(1)) // 8 if bits else 8
    name = "NRRD" if file_suffix(path) in (".nrrd", ".nhdr") else "MetaImage"
    return _slice_header(file_suffix(path), name, tuple(reader.GetSize()), reader.GetNumberOfComponents(), sample)


def _quote(error: BaseException) -> str:
    """A decoder's exception, short and on one line."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= _MAX_REASON_CHARS else text[:_MAX_REASON_CHARS] + " …"


def _pil_header(stream: BinaryIO, suffix: str) -> ImageHeader:
    """Size of a PNG, JPEG or BMP from Pillow's format plugin, which parses the header and decodes nothing.

    The plugin class is used rather than ``Image.open`` so that an image far over Pillow's own
    ``MAX_IMAGE_PIXELS`` still gets its size (and this module's message) instead of Pillow's error.
    """
    import numpy as np
    from PIL import BmpImagePlugin, ImageMode, JpegImagePlugin, PngImagePlugin

    plugin = {
        ".png": PngImagePlugin.PngImageFile,
        ".jpg": JpegImagePlugin.JpegImageFile,
        ".bmp": BmpImagePlugin.BmpImageFile,
    }[suffix]
    try:
        with plugin(stream) as image:
            mode = ImageMode.getmode(image.mode)
            width, height = image.size
    except (OSError, ValueError, SyntaxError, KeyError, struct.error) as e:
        raise ImageRejected(f"not a readable {_FORMATS[suffix]} image ({_quote(e)})") from None
    sample = np.dtype(mode.typestr).itemsize
    eight_bit = mode.mode in _EIGHT_BIT_MODES
    samples = f"8-bit {mode.mode}" if eight_bit else _MODE_NAMES.get(mode.mode, f"Pillow mode {mode.mode}")
    return ImageHeader(suffix, width, height, width * height * len(mode.bands) * sample, samples, eight_bit)


def _tiff_header(stream: BinaryIO) -> ImageHeader:
    import tifffile

    try:
        with tifffile.TiffFile(stream) as tif:
            if len(tif.pages) == 0:
                raise ValueError("no image in the file")
            page = tif.pages.first
            width, height = int(page.imagewidth), int(page.imagelength)
            channels, dtype = int(page.samplesperpixel), page.dtype
            per_pixel = channels * dtype.itemsize
    except Exception as e:  # noqa: BLE001 - tifffile raises many types for a broken header
        raise ImageRejected(f"not a readable TIFF image ({_quote(e)})") from None
    eight_bit = dtype.name == "uint8" and channels <= 4
    samples = f"{channels}-channel {dtype.name}"
    return ImageHeader(".tif", width, height, width * height * per_pixel, samples, eight_bit)


def _header(stream: BinaryIO) -> ImageHeader:
    head = stream.read(_SNIFF_BYTES)
    if not head:
        raise ImageRejected("empty file (0 bytes)")
    suffix = sniff_suffix(head)
    stream.seek(0)
    if suffix in (".nii", ".nii.gz", ".dcm"):
        return _medical_header(stream, suffix)
    return _tiff_header(stream) if suffix == ".tif" else _pil_header(stream, suffix)


def image_header(data: bytes) -> ImageHeader:
    """Format and size of an encoded image from its header alone; :class:`ImageRejected` when unreadable."""
    return _header(io.BytesIO(data))


def file_header(path: str | os.PathLike) -> ImageHeader:
    """:func:`image_header` of a file, reading its header only (a few KB, whatever the file's size)."""
    if file_suffix(path) in ITK_SUFFIXES:  # MetaImage and NRRD: a text header, maybe in a file of its own
        if os.path.getsize(path) == 0:
            raise ImageRejected("empty file (0 bytes)")
        return _itk_file_header(path)
    with open(path, "rb") as stream:
        return _header(stream)


def check_headers(
    items: Iterable[Mapping[str, Any]], limits: InputLimits, keys: Iterable[str] = ("image", "label"), what: str = ""
) -> int:
    """Check the header of every file of ``items`` (its ``keys``) against ``limits``; return how many were checked.

    Raises :class:`~masksup_med.data.errors.DatasetError` naming every file over the limits or whose header
    does not read (the first ``MAX_LISTED``, then a count), before anything is decoded.
    """
    keys = tuple(keys)
    problems, checked = [], 0
    for item in items:
        for key in keys:
            if not item.get(key):
                continue
            checked += 1
            try:
                file_header(item[key]).check_size(limits)
            except ImageRejected as e:
                problems.append(f"{item[key]}: {e.reason}")
            except OSError as e:
                problems.append(f"{item[key]}: cannot be opened ({e.strerror or type(e).__name__})")
    if problems:
        listed = "\n".join(f"  {p}" for p in problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DatasetError(
            f"{len(problems)} file(s){' of ' + what if what else ''} over the input limits or unreadable; "
            f"stopped before decoding any image:\n{listed}{more}\n"
            "Remove or shrink them, or raise the limits (bundle overrides --max_pixels N, --max_image_bytes N)."
        )
    return checked


def use_in_pillow(limits: InputLimits) -> None:
    """Make Pillow's own decompression-bomb check agree with ``limits`` (it warns above, fails at twice them).

    Every image is checked from its header before Pillow decodes it; this keeps Pillow from warning about
    or refusing an image that is within ``limits``, and from passing one that is not.
    """
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = limits.max_pixels
