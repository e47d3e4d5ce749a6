"""What the REST endpoint accepts: request and image limits, and the error a refused request gets.

An image's size is read from its header (PNG, JPEG and BMP through Pillow's ``Image.open``, which
decodes nothing; TIFF through ``tifffile``'s page header; NIfTI-1 through ``nibabel``'s header, only its
first 348 bytes decompressed; DICOM through ``pydicom`` stopping before the pixels) and checked
against :class:`ServingLimits` before any pixel is decoded, so a small file declaring 30000 x 30000 pixels
costs nothing.
"""

from __future__ import annotations

import dataclasses
import io
import struct
from collections.abc import Mapping
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

__all__ = ["ImageHeader", "RequestRejected", "ServingLimits", "image_header", "sniff_suffix"]

MiB = 1 << 20

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


@dataclasses.dataclass(frozen=True)
class ServingLimits:
    """Limits of ``masksup-med serve`` (each a ``serve`` option).

    Args:
        max_body_bytes: request body size (the JSON with the base64 images); ``--max-body-bytes``.
        max_pixels: width x height of one image, read from its header; ``--max-pixels``.
        max_image_bytes: one image decoded (width x height x channels x bytes per sample); ``--max-image-bytes``.
    """

    max_body_bytes: int = 32 * MiB
    max_pixels: int = 25_000_000
    max_image_bytes: int = 256 * MiB

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"serving limit {field.name} must be a positive integer, got {value!r}")

    def as_config(self) -> dict[str, int]:
        """The limits as plain values (a pyfunc model config)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> ServingLimits:
        """The limits in a model config; defaults for those it lacks."""
        config = config or {}
        return cls(**{f.name: int(config[f.name]) for f in dataclasses.fields(cls) if config.get(f.name) is not None})


class RequestRejected(MlflowException, ValueError):
    """A request the endpoint refuses: HTTP ``status`` and a message for the client, never a stack trace.

    An ``MlflowException`` so that MLflow's scoring server answers it as JSON; ``masksup_status`` and
    ``masksup_message`` travel in that JSON, untouched, to :mod:`masksup_med.serving.app`.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE, masksup_status=status, masksup_message=message)
        self.status = status
        self.reason = message

    def for_image(self, index: int, count: int) -> RequestRejected:
        """The same refusal, saying which image of the request it was about."""
        return RequestRejected(
            f"image {index + 1} of {count}: {self.reason}" if count > 1 else self.reason, self.status
        )


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

    def check(self, limits: ServingLimits) -> ImageHeader:
        """Raise :class:`RequestRejected` when the image is over ``limits`` (413) or not 8-bit (400); return self."""
        pixels = self.width * self.height
        if pixels > limits.max_pixels:
            raise RequestRejected(
                f"the image is {self.width} x {self.height} = {pixels:,} pixels; the limit is "
                f"{limits.max_pixels:,} pixels (serve --max-pixels)",
                413,
            )
        if self.decoded_bytes > limits.max_image_bytes:
            raise RequestRejected(
                f"the image is {self.decoded_bytes:,} bytes decoded ({self.width} x {self.height}); the limit is "
                f"{limits.max_image_bytes:,} bytes (serve --max-image-bytes)",
                413,
            )
        if not self.eight_bit:
            raise RequestRejected(
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
    raise RequestRejected(
        f"not a PNG, JPEG, BMP, TIFF, NIfTI or DICOM file (starts with {data[:8]!r}); send the image file's bytes, "
        "base64-encoded"
    )


# --- medical formats: NIfTI-1 (.nii, .nii.gz) and DICOM (.dcm), one 2D image each ---------------------------

_NIFTI_HEADER = 348
_GZIP = b"\x1f\x8b"


def _gunzip_head(data: bytes, size: int) -> bytes:
    """The first ``size`` bytes of gzip ``data``, decompressing no more than that (b'' when it is not gzip)."""
    import gzip

    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
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


def _medical_header(data: bytes, suffix: str) -> ImageHeader:
    """Size of a NIfTI-1 or DICOM image from its header (nothing decoded); a volume is refused (400)."""
    import numpy as np

    try:
        if suffix == ".dcm":
            import pydicom

            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            if "Rows" not in ds or "Columns" not in ds:
                raise RequestRejected("DICOM file has no image (no Rows / Columns): it holds no pixel data")
            shape = (int(ds.Columns), int(ds.Rows), int(getattr(ds, "NumberOfFrames", 1) or 1))
            channels, sample = int(getattr(ds, "SamplesPerPixel", 1)), max(int(getattr(ds, "BitsAllocated", 8)) // 8, 1)
            name = "DICOM"
        else:
            import nibabel as nib

            head = data[:_NIFTI_HEADER] if suffix == ".nii" else _gunzip_head(data, _NIFTI_HEADER)
            header = nib.Nifti1Header.from_fileobj(io.BytesIO(head))
            shape, channels = tuple(int(n) for n in header.get_data_shape()), 1
            if len(shape) == 5 and shape[2:4] == (1, 1):  # X x Y x 1 x 1 x components (RGB)
                shape, channels = shape[:2], shape[4]
            sample = np.dtype(header.get_data_dtype()).itemsize
            name = "NIfTI"
    except RequestRejected:
        raise
    except Exception as e:  # noqa: BLE001 - pydicom and nibabel raise many types for a broken header
        raise RequestRejected(f"not a readable {suffix} image ({type(e).__name__}: {e})") from None
    if len(shape) < 2 or any(n != 1 for n in shape[2:]):
        raise RequestRejected(
            f"the {name} image is a volume of shape {' x '.join(map(str, shape))}; the model is 2D: send one slice"
        )
    width, height = shape[0], shape[1]
    return ImageHeader(suffix, width, height, width * height * channels * sample, f"{name} {sample * 8}-bit")


def _pil_header(data: bytes, suffix: str) -> ImageHeader:
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
        with plugin(io.BytesIO(data)) as image:
            mode = ImageMode.getmode(image.mode)
            width, height = image.size
    except (OSError, ValueError, SyntaxError, KeyError, struct.error) as e:
        raise RequestRejected(f"not a readable {_FORMATS[suffix]} image ({type(e).__name__}: {e})") from None
    sample = np.dtype(mode.typestr).itemsize
    eight_bit = mode.mode in _EIGHT_BIT_MODES
    samples = f"8-bit {mode.mode}" if eight_bit else _MODE_NAMES.get(mode.mode, f"Pillow mode {mode.mode}")
    return ImageHeader(suffix, width, height, width * height * len(mode.bands) * sample, samples, eight_bit)


def _tiff_header(data: bytes) -> ImageHeader:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            if len(tif.pages) == 0:
                raise ValueError("no image in the file")
            page = tif.pages.first
            width, height = int(page.imagewidth), int(page.imagelength)
            channels, dtype = int(page.samplesperpixel), page.dtype
            per_pixel = channels * dtype.itemsize
    except RequestRejected:
        raise
    except Exception as e:  # noqa: BLE001 - tifffile raises many types for a broken header
        raise RequestRejected(f"not a readable TIFF image ({type(e).__name__}: {e})") from None
    eight_bit = dtype.name == "uint8" and channels <= 4
    samples = f"{channels}-channel {dtype.name}"
    return ImageHeader(".tif", width, height, width * height * per_pixel, samples, eight_bit)


def image_header(data: bytes) -> ImageHeader:
    """Format and size of an encoded image from its header alone; :class:`RequestRejected` when unreadable."""
    if not data:
        raise RequestRejected("the image is empty (0 bytes)")
    suffix = sniff_suffix(data)
    if suffix in (".nii", ".nii.gz", ".dcm"):
        return _medical_header(data, suffix)  # any pixel type: intensities are normalised (NormaliseIntensity)
    return _tiff_header(data) if suffix == ".tif" else _pil_header(data, suffix)
