"""16-bit and float intensities (CT, MR, microscopy) to the 0..255 range the bundles' preprocessing expects.

The networks take RGB scaled to [0, 1]: the bundles' ``resizing`` maps 0..255 to 0..1 (an 8-bit image's
range). An image whose file holds another pixel type (``source_dtype`` in its metadata, recorded by
:class:`masksup_med.data.readers.AnyImageReader`) is first mapped to 0..255 here, by one of:

- ``{"mode": "percentile", "lower": 0.5, "upper": 99.5}`` (the default): each image's own 0.5th and
  99.5th percentiles become 0 and 255, values beyond are clipped. Works for any modality, whatever its
  units (MR has none); the cost is that one image's grey levels are not comparable with another's.
- ``{"mode": "window", "center": 40, "width": 400}``: a fixed window (CT in Hounsfield units; 40 / 400
  is soft tissue, -600 / 1500 lung), the same for every image.

8-bit images (and images read without ``source_dtype``, by the readers the 8-bit datasets use) are left
as they are, so a picture stored as PNG or as an 8-bit NIfTI reaches the network unchanged.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends

__all__ = ["DEFAULT_INTENSITY", "NormaliseIntensity", "NormaliseIntensityd", "intensity_window"]

DEFAULT_INTENSITY = {"mode": "percentile", "lower": 0.5, "upper": 99.5}
LEFT_AS_IS = ("uint8",)


def _check(intensity: Mapping[str, Any]) -> dict[str, Any]:
    percentile = intensity.get("mode", "percentile") == "percentile"
    settings = {**DEFAULT_INTENSITY, **dict(intensity)} if percentile else dict(intensity)
    mode = settings.get("mode")
    if mode == "percentile":
        lower, upper = float(settings["lower"]), float(settings["upper"])
        if not 0 <= lower < upper <= 100:
            raise ValueError(f"intensity percentiles must satisfy 0 <= lower < upper <= 100, got {lower} and {upper}")
        return {"mode": mode, "lower": lower, "upper": upper}
    if mode == "window":
        if "center" not in settings or "width" not in settings:
            raise ValueError(f"intensity mode 'window' needs 'center' and 'width', got {dict(intensity)}")
        if float(settings["width"]) <= 0:
            raise ValueError(f"intensity window width must be positive, got {settings['width']}")
        return {"mode": mode, "center": float(settings["center"]), "width": float(settings["width"])}
    raise ValueError(f"intensity mode must be 'percentile' or 'window', got {mode!r} (in {dict(intensity)})")


def intensity_window(image: np.ndarray | torch.Tensor, intensity: Mapping[str, Any] = DEFAULT_INTENSITY):
    """The (low, high) intensities that ``intensity`` maps to 0 and 255 for ``image``."""
    settings = _check(intensity)
    if settings["mode"] == "window":
        half = settings["width"] / 2
        return settings["center"] - half, settings["center"] + half
    values = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    low, high = np.percentile(values.astype(np.float64, copy=False), [settings["lower"], settings["upper"]])
    return float(low), float(high)


class NormaliseIntensity(Transform):
    """Map an image that is not 8-bit to 0..255 (float) by percentiles or a window; leave 8-bit images alone.

    Args:
        intensity: ``{"mode": "percentile", "lower": 0.5, "upper": 99.5}`` (default) or
            ``{"mode": "window", "center": C, "width": W}``.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]  # noqa: RUF012 - MONAI declares backends this way

    def __init__(self, intensity: Mapping[str, Any] | None = None) -> None:
        self.intensity = _check(intensity or DEFAULT_INTENSITY)

    def __call__(self, img, source_dtype: str | None = None):
        meta = getattr(img, "meta", None) or {}
        source_dtype = source_dtype or meta.get("source_dtype")
        if source_dtype is None or str(source_dtype) in LEFT_AS_IS:
            return img
        low, high = intensity_window(img, self.intensity)
        scale = 255.0 / (high - low) if high > low else 0.0
        if isinstance(img, torch.Tensor):
            return ((img.float() - low) * scale).clamp(0, 255)
        return np.clip((np.asarray(img, dtype=np.float32) - low) * scale, 0, 255)


class NormaliseIntensityd(MapTransform):
    """Dictionary version of :class:`NormaliseIntensity`.

    Args:
        keys: keys of the images to normalise.
        intensity: see :class:`NormaliseIntensity` (a bundle's ``intensity`` value).
        allow_missing_keys: don't raise when a key is missing.
    """

    backend = NormaliseIntensity.backend

    def __init__(
        self,
        keys: KeysCollection = "image",
        intensity: Mapping[str, Any] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = NormaliseIntensity(intensity)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d
