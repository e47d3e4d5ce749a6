"""The tile grid of masked-image pretraining: tile <-> pixel masks, per-tile means, random tiles, hole filling,
per-tile target normalisation.

A ``B, H, W`` image is cut into ``ceil(H / t) x ceil(W / t)`` tiles of ``t`` pixels (edge tiles cut by the
border). Masks are boolean, true where the input is hidden.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "RandomTileMasker",
    "fill_holes",
    "normalise_tiles",
    "random_tiles",
    "select_tiles",
    "tile_grid",
    "tile_losses",
    "tiles_to_pixels",
]


def tile_grid(spatial_shape: Sequence[int], tile_size: int) -> tuple[int, int]:
    """Tiles along each axis of an image of ``spatial_shape`` (edge tiles count)."""
    return math.ceil(spatial_shape[0] / tile_size), math.ceil(spatial_shape[1] / tile_size)


def tiles_to_pixels(tiles: torch.Tensor, spatial_shape: Sequence[int], tile_size: int) -> torch.Tensor:
    """``B, ny, nx`` tile mask -> ``B, H, W`` pixel mask (edge tiles cut by the border)."""
    pixels = tiles.repeat_interleave(tile_size, dim=1).repeat_interleave(tile_size, dim=2)
    return pixels[:, : spatial_shape[0], : spatial_shape[1]]


def tile_losses(error: torch.Tensor, tile_size: int) -> torch.Tensor:
    """Mean of a ``B, H, W`` per-pixel error over each tile of the grid: ``B, ny, nx``."""
    height, width = error.shape[1:]
    ny, nx = tile_grid((height, width), tile_size)
    padding = (0, nx * tile_size - width, 0, ny * tile_size - height)
    sums = F.avg_pool2d(F.pad(error[:, None], padding), tile_size)
    counts = F.avg_pool2d(F.pad(torch.ones_like(error[:, None]), padding), tile_size)
    return (sums / counts.clamp_min(1e-12))[:, 0]


def select_tiles(losses: torch.Tensor, ratio: float) -> torch.Tensor:
    """The ``round(ratio * n_tiles)`` highest-loss tiles of each image of a ``B, ny, nx`` loss map."""
    flat = losses.flatten(1)
    count = round(float(ratio) * flat.shape[1])
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    if count > 0:
        chosen.scatter_(1, flat.topk(count, dim=1).indices, True)
    return chosen.reshape(losses.shape)


def random_tiles(R: np.random.RandomState, batch: int, grid: Sequence[int], ratio: float) -> torch.Tensor:
    """``B, ny, nx`` mask with exactly ``round(ratio * ny * nx)`` random tiles per image, drawn from ``R``."""
    return select_tiles(torch.as_tensor(R.uniform(size=(batch, *grid))), ratio)


def fill_holes(images: torch.Tensor, holes: torch.Tensor, fill: torch.Tensor | Sequence[float] | float) -> torch.Tensor:
    """``images`` (``B, C, H, W``) with the ``B, H, W`` ``holes`` set to ``fill`` (a value, or one per channel)."""
    fill = torch.as_tensor(fill, dtype=images.dtype, device=images.device).reshape(-1)
    if fill.numel() not in (1, images.shape[1]):
        raise ValueError(f"hole fill has {fill.numel()} values for images of {images.shape[1]} channels")
    return torch.where(holes[:, None], fill.reshape(1, -1, 1, 1).expand_as(images), images)


def normalise_tiles(
    images: torch.Tensor, tile_size: int, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each tile of each channel to zero mean and unit variance (the MAE / SparK target).

    Returns ``(normalised, mean, std)``, all ``B, C, H, W``: ``images == normalised * std + mean``.
    """
    b, c, h, w = images.shape
    flat = images.reshape(b * c, h, w)
    mean = tile_losses(flat, tile_size)
    var = (tile_losses(flat**2, tile_size) - mean**2).clamp_min(0)
    mean = tiles_to_pixels(mean, (h, w), tile_size).reshape(b, c, h, w)
    std = (tiles_to_pixels(var, (h, w), tile_size).reshape(b, c, h, w) + eps).sqrt()
    return (images - mean) / std, mean, std


class RandomTileMasker:
    """Hide ``ratio`` of the tiles of every image at random (exactly that many per image), filled with ``fill``.

    Args:
        tile_size: tile side in pixels (32 on 256 x 256 inputs: 64 tiles).
        ratio: fraction of tiles hidden, in (0, 1).
        fill: the value written into hidden tiles: one number, or one per channel (the dataset's mean).
    """

    def __init__(self, tile_size: int = 32, ratio: float = 0.6, fill: float | Sequence[float] = 0.5) -> None:
        if not 0 < float(ratio) < 1 or int(tile_size) < 1:
            raise ValueError(f"invalid tile masking: tile_size={tile_size} (>= 1), ratio={ratio} (in (0, 1))")
        self.tile_size, self.ratio = int(tile_size), float(ratio)
        self.fill = [float(v) for v in np.atleast_1d(np.asarray(fill, dtype=float))]
        self.R = np.random.RandomState()

    def set_random_state(self, seed: int | None = None) -> RandomTileMasker:
        """Seed the tiles drawn."""
        self.R = np.random.RandomState(seed)
        return self

    def hyperparameters(self) -> dict[str, Any]:
        """Logged with the run."""
        return {"masking": type(self).__name__, "mask_tile_size": self.tile_size, "mask_ratio": self.ratio}

    def tiles(self, batch: int, spatial_shape: Sequence[int]) -> torch.Tensor:
        """A fresh ``B, ny, nx`` random tile mask."""
        return random_tiles(self.R, batch, tile_grid(spatial_shape, self.tile_size), self.ratio)

    def holes(self, batch: int, spatial_shape: Sequence[int]) -> torch.Tensor:
        """A fresh ``B, H, W`` random pixel mask made of whole tiles."""
        return tiles_to_pixels(self.tiles(batch, spatial_shape), spatial_shape, self.tile_size)

    def mask_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked ``images`` and their ``B, H, W`` holes."""
        holes = self.holes(images.shape[0], images.shape[2:]).to(images.device)
        return fill_holes(images, holes, self.fill), holes
