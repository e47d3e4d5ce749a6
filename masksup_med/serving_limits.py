"""What the REST endpoint accepts: request and image limits, and the error a refused request gets.

An image's size is read from its header (PNG, JPEG and BMP through Pillow's ``Image.open``, which
decodes nothing; TIFF through ``tifffile``'s page header) and checked against :class:`ServingLimits`
before any pixel is decoded, so a small file declaring 30000 x 30000 pixels costs nothing.
"""

from __future__ import annotations

import dataclasses
import io
import re
import warnings
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


class RequestRejected(MlflowException):
    """A request the endpoint refuses: HTTP ``status`` and a message for the client, never a stack trace.

    An ``MlflowException`` so that MLflow's scoring server answers it as JSON; ``masksup_status`` and
    ``masksup_message`` travel in that JSON, untouched, to :mod:`masksup_med.serving_app`.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE, masksup_status=status, masksup_message=message)
        self.status = status
        self.reason = message

    def for_image(self, index: int, count: int) -> RequestRejected:
        """The same refusal, saying which image of the request it was about."""
        return RequestRejected(f"image {index + 1} of {count}: {self.reason}" if count > 1 else self.reason, self.status)


@dataclasses.dataclass(frozen=True)
class ImageHeader:
    """An encoded image's format (file suffix), size and decoded size, from its header."""

    suffix: str
    width: int
    height: int
    decoded_bytes: int

    def check(self, limits: ServingLimits) -> ImageHeader:
        """Raise :class:`RequestRejected` (413) when the image is over ``limits``; return self."""
        pixels = self.width * self.height
        if pixels > limits.max_pixels:
            raise RequestRejected(
                f"the image is {self.width} x {self.height} = {pixels:,} pixels; the limit is "
                f"{limits.max_pixels:,} pixels (serve --max-pixels)", 413)
        if self.decoded_bytes > limits.max_image_bytes:
            raise RequestRejected(
                f"the image is {self.decoded_bytes:,} bytes decoded ({self.width} x {self.height}); the limit is "
                f"{limits.max_image_bytes:,} bytes (serve --max-image-bytes)", 413)
        return self


def sniff_suffix(data: bytes) -> str:
    """The file suffix of an encoded image from its first bytes (PNG, JPEG, BMP, TIFF)."""
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    raise RequestRejected(
        f"not a PNG, JPEG, BMP or TIFF file (starts with {data[:8]!r}); send the image file's bytes, base64-encoded"
    )


def _pil_header(data: bytes, suffix: str) -> ImageHeader:
    import numpy as np
    from PIL import Image, ImageMode, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                mode = ImageMode.getmode(image.mode)
                width, height = image.size
    except Image.DecompressionBombError as e:  # over twice PIL's MAX_IMAGE_PIXELS: it gives the count only
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = f"{int(found.group(1)):,} pixels" if found else "more pixels than Pillow allows"
        raise RequestRejected(f"the image declares {pixels}; far over the limit (serve --max-pixels)", 413) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise RequestRejected(f"not a readable {suffix[1:].upper()} image ({type(e).__name__}: {e})") from None
    sample = np.dtype(mode.typestr).itemsize
    return ImageHeader(suffix, width, height, width * height * len(mode.bands) * sample)


def _tiff_header(data: bytes) -> ImageHeader:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            if len(tif.pages) == 0:
                raise ValueError("no image in the file")
            page = tif.pages.first
            width, height = int(page.imagewidth), int(page.imagelength)
            per_pixel = int(page.samplesperpixel) * page.dtype.itemsize
    except RequestRejected:
        raise
    except Exception as e:  # noqa: BLE001 - tifffile raises many types for a broken header
        raise RequestRejected(f"not a readable TIFF image ({type(e).__name__}: {e})") from None
    return ImageHeader(".tif", width, height, width * height * per_pixel)


def image_header(data: bytes) -> ImageHeader:
    """Format and size of an encoded image from its header alone; :class:`RequestRejected` when unreadable."""
    if not data:
        raise RequestRejected("the image is empty (0 bytes)")
    suffix = sniff_suffix(data)
    return _tiff_header(data) if suffix == ".tif" else _pil_header(data, suffix)
