"""Self-supervised pretraining by masked reconstruction, with random or selective tile masking.

The bundle's own network, with as many output channels as the image has, learns to fill in masked
tiles of unlabelled images (:class:`ReconstructionTrainer`). The loss is L1 on the masked pixels
plus (1 - MS-SSIM) between the image and the image with its masked tiles replaced by the
reconstruction (:class:`MaskedReconstructionLoss`), so both terms look only at what was hidden.

Selective masking (Wang and Stavness, "Selective Masking based Self-Supervised Learning for Image
Semantic Segmentation") masks the tiles the current model reconstructs worst instead of random
ones: :class:`SelectiveTileMasker` splits the tiles into partitions, reconstructs the batch once
per partition with that partition masked (no gradients), ranks every tile by its reconstruction
error and masks the highest-loss fraction. A refresh costs ``partitions`` forward passes of the
batch; between refreshes (``refresh_every``) tiles are masked at random.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.losses import SSIMLoss
from monai.metrics import compute_ms_ssim
from monai.utils import CommonKeys
from torch import nn

from masksup_med.methods.handlers import named_terms
from masksup_med.methods.masksup import backward_and_step, rank_seed
from masksup_med.run.overrides import config_flag

__all__ = [
    "MaskedReconstructionLoss",
    "ReconstructionTrainer",
    "SelectiveTileMasker",
    "mask_images",
    "pick_masker",
    "select_tiles",
    "tile_losses",
    "tiles_to_pixels",
]

MS_SSIM_SCALES = 5


def tiles_to_pixels(tiles: torch.Tensor, spatial_shape: Sequence[int], tile_size: int) -> torch.Tensor:
    """``B, ny, nx`` tile mask -> ``B, H, W`` pixel mask (edge tiles cut by the border)."""
    pixels = tiles.repeat_interleave(tile_size, dim=1).repeat_interleave(tile_size, dim=2)
    return pixels[:, : spatial_shape[0], : spatial_shape[1]]


def tile_losses(error: torch.Tensor, tile_size: int) -> torch.Tensor:
    """Mean of a ``B, H, W`` per-pixel error over each tile of the grid: ``B, ny, nx``."""
    height, width = error.shape[1:]
    ny, nx = math.ceil(height / tile_size), math.ceil(width / tile_size)
    padded = F.pad(error[:, None], (0, nx * tile_size - width, 0, ny * tile_size - height))
    counts = F.pad(torch.ones_like(error[:, None]), (0, nx * tile_size - width, 0, ny * tile_size - height))
    sums = F.avg_pool2d(padded, tile_size) * tile_size**2
    return (sums / (F.avg_pool2d(counts, tile_size) * tile_size**2).clamp_min(1))[:, 0]


def select_tiles(losses: torch.Tensor, ratio: float) -> torch.Tensor:
    """The ``round(ratio * n_tiles)`` highest-loss tiles of each image of a ``B, ny, nx`` loss map."""
    flat = losses.flatten(1)
    count = round(float(ratio) * flat.shape[1])
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    if count > 0:
        chosen.scatter_(1, flat.topk(count, dim=1).indices, True)
    return chosen.reshape(losses.shape)


class SelectiveTileMasker:
    """Mask the tiles a network reconstructs worst (every ``refresh_every`` batches; random tiles between).

    Args:
        tile_size: tile side in pixels (256 x 256 images with 16: 256 tiles).
        ratio: fraction of tiles masked (0.5 in the paper's code).
        partitions: tiles are ranked with the batch reconstructed once per partition (10 in the paper).
        refresh_every: rank every this many batches (1: every batch, ``partitions`` extra forward passes).
        fill_value: value written into masked tiles.
    """

    def __init__(
        self,
        tile_size: int = 16,
        ratio: float = 0.5,
        partitions: int = 10,
        refresh_every: int = 1,
        fill_value: float = 0.5,
    ) -> None:
        if not 0 < ratio < 1 or partitions < 1 or refresh_every < 1 or tile_size < 1:
            raise ValueError(
                f"invalid selective masking: tile_size={tile_size}, ratio={ratio}, "
                f"partitions={partitions}, refresh_every={refresh_every}"
            )
        self.tile_size, self.ratio, self.partitions = int(tile_size), float(ratio), int(partitions)
        self.refresh_every, self.fill_value = int(refresh_every), float(fill_value)
        self.R = np.random.RandomState()
        self.calls = 0

    def set_random_state(self, seed: int | None = None) -> SelectiveTileMasker:
        """Seed the partitions and the random tiles between refreshes; the next batch is ranked."""
        self.R = np.random.RandomState(seed)
        self.calls = 0
        return self

    def hyperparameters(self) -> dict[str, Any]:
        """Logged with the run."""
        return {
            "masking": type(self).__name__,
            "mask_tile_size": self.tile_size,
            "mask_ratio": self.ratio,
            "mask_partitions": self.partitions,
            "mask_refresh_every": self.refresh_every,
        }

    def _grid(self, spatial_shape: Sequence[int]) -> tuple[int, int]:
        return math.ceil(spatial_shape[0] / self.tile_size), math.ceil(spatial_shape[1] / self.tile_size)

    @torch.no_grad()
    def rank(self, network: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Per-tile reconstruction loss ``B, ny, nx``, each tile scored in the pass that masked it."""
        ny, nx = self._grid(images.shape[2:])
        part = torch.as_tensor(self.R.randint(0, self.partitions, size=(ny, nx)), device=images.device)
        losses = torch.zeros(images.shape[0], ny, nx, device=images.device)
        was_training = network.training
        network.eval()
        for k in range(self.partitions):
            tiles = (part == k).expand(images.shape[0], ny, nx)
            holes = tiles_to_pixels(tiles, images.shape[2:], self.tile_size)[:, None]
            recon = network(torch.where(holes, torch.full_like(images, self.fill_value), images))
            error = (recon.float() - images.float()).abs().mean(dim=1)
            losses = torch.where(tiles, tile_losses(error, self.tile_size), losses)
        network.train(was_training)
        return losses

    def mask_batch(self, batch: torch.Tensor, network: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked batch and ``B, H, W`` holes: the worst-reconstructed tiles on a refresh, random tiles otherwise."""
        ny, nx = self._grid(batch.shape[2:])
        if self.calls % self.refresh_every == 0:
            losses = self.rank(network, batch)
        else:
            losses = torch.as_tensor(self.R.uniform(size=(batch.shape[0], ny, nx)), device=batch.device)
        self.calls += 1
        holes = tiles_to_pixels(select_tiles(losses, self.ratio), batch.shape[2:], self.tile_size)
        return torch.where(holes[:, None], torch.full_like(batch, self.fill_value), batch), holes


def pick_masker(selective_masking: bool | str, selective: Any, random: Any) -> Any:
    """``selective`` when ``selective_masking`` is true, ``random`` when false (bool, or text from the command line:
    ``--selective_masking false`` arrives as the text "false")."""
    return selective if config_flag(selective_masking, "selective_masking") else random


def mask_images(masker: Any, images: torch.Tensor, network: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked ``images`` and their ``B, H, W`` holes from any masker with ``mask_batch``.

    A :class:`SelectiveTileMasker` ranks the tiles with ``network``; an array masker (e.g.
    ``RandPatchMask``) masks at random.
    """
    if isinstance(masker, SelectiveTileMasker):
        return masker.mask_batch(images, network)
    return masker.mask_batch(images)


class MaskedReconstructionLoss(nn.Module):
    """L1 on the masked pixels + ``ssim_weight`` x (1 - MS-SSIM) of the image with its masked part reconstructed.

    Zero for a perfect reconstruction of the masked part, whatever the visible part predicts.
    Single-scale SSIM stands in for MS-SSIM on images too small for its five scales.
    Returns ``{"total", "l1", "ssim"}``.

    Args:
        ssim_weight: weight of the (1 - MS-SSIM) term (0: L1 only).
        kernel_size: SSIM's Gaussian window size, in pixels.
        data_range: the images' value range (1 for images scaled to [0, 1]).
    """

    def __init__(self, ssim_weight: float = 1.0, kernel_size: int = 7, data_range: float = 1.0) -> None:
        super().__init__()
        self.ssim_weight, self.kernel_size, self.data_range = float(ssim_weight), int(kernel_size), float(data_range)
        self.single_scale = SSIMLoss(spatial_dims=2, data_range=data_range, win_size=kernel_size)

    def hyperparameters(self) -> dict[str, Any]:
        """Logged with the run."""
        return {"loss": type(self).__name__, "ssim_weight": self.ssim_weight, "ssim_kernel_size": self.kernel_size}

    def forward(
        self, reconstruction: torch.Tensor, image: torch.Tensor, holes: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``holes``: ``B, 1, H, W`` (or ``B, H, W``) boolean, true where the input was masked."""
        holes = holes if holes.dim() == image.dim() else holes[:, None]
        weight = holes.expand_as(image).to(reconstruction.dtype)
        l1 = ((reconstruction - image).abs() * weight).sum() / weight.sum().clamp_min(1)
        composite = torch.where(holes, reconstruction, image)
        if min(image.shape[2:]) > (self.kernel_size - 1) * 2 ** (MS_SSIM_SCALES - 1):
            similarity = compute_ms_ssim(
                composite.float(),
                image.float(),
                spatial_dims=2,
                data_range=self.data_range,
                kernel_size=self.kernel_size,
            ).mean()
            ssim = 1.0 - similarity
        else:
            ssim = self.single_scale(composite.float(), image.float())
        return {"total": l1 + self.ssim_weight * ssim, "l1": l1, "ssim": ssim}


class ReconstructionTrainer(SupervisedTrainer):
    """SupervisedTrainer whose step masks the images and learns to reconstruct them (labels are not read).

    ``engine.state.output`` holds ``image``, ``image_masked``, ``pred`` (the reconstruction),
    ``loss`` and ``loss_l1`` / ``loss_ssim``.

    Args:
        masker: a :class:`SelectiveTileMasker`, or any array masker with ``mask_batch`` (e.g.
            ``RandPatchMask`` for random tiles).
        args, kwargs: those of MONAI's ``SupervisedTrainer``; ``loss_function`` is a
            :class:`MaskedReconstructionLoss`.
    """

    def __init__(self, *args: Any, masker: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.masker = masker
        self.masker.set_random_state(rank_seed())  # DDP: each process masks other tiles

    def _iteration(self, engine: ReconstructionTrainer, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        images = batchdata[CommonKeys.IMAGE]
        images = (images.as_tensor() if isinstance(images, MetaTensor) else torch.as_tensor(images)).to(
            engine.state.device, non_blocking=engine.non_blocking
        )
        masked, holes = mask_images(engine.masker, images, engine.network)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast(torch.device(engine.state.device).type, **engine.amp_kwargs, enabled=engine.amp):
            reconstruction = engine.inferer(masked, engine.network)
            terms = named_terms(engine.loss_function(reconstruction.float(), images, holes))
        total = terms.pop("total")
        engine.state.output = {
            CommonKeys.IMAGE: images,
            "image_masked": masked,
            CommonKeys.PRED: reconstruction,
            CommonKeys.LOSS: total,
            **{f"loss_{k}": v.detach() for k, v in terms.items()},
        }
        backward_and_step(engine, total)
        return engine.state.output
