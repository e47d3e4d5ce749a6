"""MAE-style masking: a regular grid of square (cubic) patches, a random subset hidden.

The grid starts at the image origin; edge patches may be cut by the border. The number of hidden
patches is ``round(ratio * n_patches)`` with ``ratio`` drawn from ``ratio_range``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.config import KeysCollection
from monai.utils import ensure_tuple_rep

from masksup_med.transforms.base import RandMask, RandMaskd, check_ratio

__all__ = ["PatchGeometry", "RandPatchMask", "RandPatchMaskd"]


@dataclass(frozen=True)
class PatchGeometry:
    """Which patches of the grid are hidden, and the patch size."""

    hidden: np.ndarray  # bool, shape = patch grid shape
    patch_size: tuple[int, ...]


class RandPatchMask(RandMask):
    """Hide a random subset of a grid of square patches of a channel-first image.

    Args:
        ratio_range: fraction of patches to hide, a float or a (low, high) range drawn per image,
            in [0, 1). Default 0.5.
        patch_size: patch side in pixels (an int, or one per spatial dimension). Must not exceed
            the image; checked at the first call.
        fill_value: value written into the holes (default 0.5, the mid value of [0, 1] images).
        prob: probability of masking at all.
    """

    def __init__(
        self,
        ratio_range: float | Sequence[float] = 0.5,
        patch_size: int | Sequence[int] = 32,
        fill_value: float = 0.5,
        prob: float = 1.0,
    ) -> None:
        super().__init__(fill_value=fill_value, prob=prob)
        self.ratio_range = check_ratio(ratio_range, "ratio_range")
        sizes = patch_size if isinstance(patch_size, Sequence) else (patch_size,)
        if any(int(p) < 1 for p in sizes):
            raise ValueError(f"patch_size must be positive, got {patch_size!r}.")
        self.patch_size = patch_size

    def _patch_size_for(self, spatial_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(int(p) for p in ensure_tuple_rep(self.patch_size, len(spatial_shape)))

    def check_spatial_shape(self, spatial_shape: tuple[int, ...]) -> None:
        """Also refuse a patch larger than the image."""
        super().check_spatial_shape(spatial_shape)
        patch = self._patch_size_for(spatial_shape)
        if any(p > s for p, s in zip(patch, spatial_shape)):
            raise ValueError(f"patch_size {patch} is larger than the image (spatial shape {spatial_shape}).")

    def sample_geometry(self, spatial_shape: tuple[int, ...]) -> PatchGeometry:
        """Draw the ratio, then which patches of the grid to hide."""
        patch = self._patch_size_for(spatial_shape)
        grid = tuple(math.ceil(s / p) for s, p in zip(spatial_shape, patch))
        n_patches = int(np.prod(grid))
        ratio = self.R.uniform(*self.ratio_range)
        hidden = np.zeros(n_patches, dtype=bool)
        hidden[self.R.permutation(n_patches)[: round(ratio * n_patches)]] = True
        return PatchGeometry(hidden=hidden.reshape(grid), patch_size=patch)

    def rasterize(self, geometry: PatchGeometry, spatial_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Expand the patch grid to pixels and crop to the image."""
        holes = torch.as_tensor(geometry.hidden, device=device)
        for dim, size in enumerate(geometry.patch_size):
            holes = holes.repeat_interleave(size, dim=dim)
        return holes[tuple(slice(0, s) for s in spatial_shape)]


class RandPatchMaskd(RandMaskd):
    """Dictionary version of :class:`RandPatchMask`: writes the masked copy of ``keys`` to ``masked_keys``.

    ``keys``, ``masked_keys``, ``hole_key``, ``prob`` and ``allow_missing_keys`` are those of
    :class:`~masksup_med.transforms.base.RandMaskd`; the masking arguments those of :class:`RandPatchMask`.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        ratio_range: float | Sequence[float] = 0.5,
        patch_size: int | Sequence[int] = 32,
        fill_value: float = 0.5,
        masked_keys: KeysCollection = "image_masked",
        hole_key: Hashable | None = None,
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(
            keys, RandPatchMask(ratio_range, patch_size, fill_value), masked_keys, hole_key, prob, allow_missing_keys
        )
