"""Images as three colour channels, whatever their mode on disk (grey, grey + alpha, RGB, RGBA).

The bundles' networks take RGB. A grey image (a monochrome endoscope frame, a greyscale scan) is
repeated to three channels and an alpha channel is dropped, so inference and serving accept the
same files, by the same rule.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends

__all__ = ["EnsureRGB", "EnsureRGBd"]


class EnsureRGB(Transform):
    """Channel-first image with 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA) channels -> 3 channels."""

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]  # noqa: RUF012 - MONAI declares backends this way

    def __call__(self, img):
        channels = img.shape[0]
        if channels in (1, 2):
            grey = img[:1]
            return grey.repeat(3, *([1] * (img.ndim - 1))) if isinstance(img, torch.Tensor) else np.repeat(grey, 3, 0)
        if channels in (3, 4):
            return img[:3]
        meta = getattr(img, "meta", None) or {}
        raise ValueError(
            f"{meta.get('filename_or_obj', 'image')}: {channels} channels; expected grey, grey + alpha, RGB or RGBA"
        )


class EnsureRGBd(MapTransform):
    """Dictionary version of :class:`EnsureRGB`.

    Args:
        keys: keys of the images to make three-channel.
        allow_missing_keys: don't raise when a key is missing.
    """

    backend = EnsureRGB.backend

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = EnsureRGB()

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d
