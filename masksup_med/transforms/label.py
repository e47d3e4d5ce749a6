"""Labels as single-channel {0, 1} foreground masks, whatever their encoding on disk.

Masks arrive as 1 or 3 channels, 0/255, instance ids (GLaS) or JPEG-noisy greys (Kvasir-SEG):
take the maximum over channels, then ``> threshold`` (GLaS: 0, CVC-ClinicDB and Kvasir-SEG: 127).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends


def _source(img) -> str:
    meta = getattr(img, "meta", None) or {}
    return str(meta.get("filename_or_obj", "label"))


def foreground_mask(img, threshold: float = 0.0):
    """Channel-first label ``img`` (C, ...) -> (1, ...) float32 mask of ``max over C > threshold``.

    Works on numpy arrays and torch tensors (MetaTensor metadata is kept). Only 1 (grey) or 3
    (colour) channels are accepted: an alpha channel would make every pixel foreground.
    """
    channels = img.shape[0]
    if channels not in (1, 3):
        raise ValueError(
            f"{_source(img)}: label has {channels} channels; expected 1 (grey) or 3 (colour) - "
            "save it without an alpha channel"
        )
    if isinstance(img, torch.Tensor):
        return (img.amax(dim=0, keepdim=True) > threshold).to(torch.float32)
    return (np.asarray(img).max(axis=0, keepdims=True) > threshold).astype(np.float32)


class ForegroundMask(Transform):
    """Array transform: see :func:`foreground_mask`."""

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]  # noqa: RUF012 - MONAI declares backends this way

    def __init__(self, threshold: float = 0.0) -> None:
        self.threshold = float(threshold)

    def __call__(self, img):
        return foreground_mask(img, self.threshold)


class ForegroundMaskd(MapTransform):
    """Dictionary version of :class:`ForegroundMask`: ``ForegroundMaskd(keys="label", threshold=127)``."""

    backend = ForegroundMask.backend

    def __init__(self, keys: KeysCollection = "label", threshold: float = 0.0, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.converter = ForegroundMask(threshold)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d
