"""Self-supervised pretraining by masked reconstruction: random tiles, the paper's selective masking, or a
per-batch ranking.

The bundle's own network, with as many output channels as the image has, learns to fill in hidden
tiles of unlabelled images (:class:`ReconstructionTrainer`). Hidden tiles are filled with the
dataset's mean colour (:func:`channel_mean`), not a constant the network can spot; the targets
may be normalised per tile (MAE / SparK); the loss looks only at what was hidden
(:class:`MaskedReconstructionLoss`: L1 + (1 - MS-SSIM)). With ``encoder_masking`` the encoder's
features are zeroed at hidden positions (:class:`~masksup_med.methods.unet_parts.HiddenPositions`), so
the U-Net's skip connections cannot hand the decoder the pixels next to a hole.

Masking (``pretrain_masking``): ``random`` (:class:`~masksup_med.methods.tiles.RandomTileMasker`),
``selective`` (Wang and Stavness's partitions and fixed masks chosen by the previous part's model:
:mod:`masksup_med.methods.selective_masking`; the batch then carries each image's ``holes``), or
``per_batch`` (:class:`SelectiveTileMasker`: the current model ranks the tiles of every batch, this
project's earlier reading of the paper, kept for comparison).

``pretrain.json``'s options (command line: ``--name value``), defaults to be settled by
``benchmarks/pretrain.py``:

    pretrain_steps / pretrain_rounds   the budget in steps, in rounds of one checkpoint each (2000 / 10);
                                       selective masking's parts are the rounds
    pretrain_masking                   random (default) | selective | per_batch
    pretrain_tile_size / _mask_ratio   32 px tiles, 0.6 of them hidden
    normalise_targets                  per-tile normalised targets (true)
    encoder_masking                    encoder | finest_skip | none
    selective_score_passes             random masks each tile score is averaged over (5)
    unlabelled_dir, pretrain_dirs,     more images: a folder, folders, other datasets read by their adapters
    pretrain_datasets                  ({"kvasir-seg": "/path"}); held-out images and copies are never used

``finetune.json`` (with ``--pretrained_weights``): ``transfer_scope`` (encoder | whole), ``bn_batches``,
``warmup_fraction``, ``encoder_lr_scale``, ``encoder_fraction``
(:mod:`masksup_med.methods.transfer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.losses import SSIMLoss
from monai.metrics import compute_ms_ssim
from monai.utils import CommonKeys
from torch import nn

from masksup_med.methods.handlers import named_terms
from masksup_med.methods.masksup import backward_and_step, rank_seed
from masksup_med.methods.selective_masking import FIXED_KEY
from masksup_med.methods.tiles import (
    RandomTileMasker,
    fill_holes,
    normalise_tiles,
    select_tiles,
    tile_grid,
    tile_losses,
    tiles_to_pixels,
)
from masksup_med.methods.unet_parts import HiddenPositions, encoder_modules

__all__ = [
    "MASKINGS",
    "MaskedReconstructionLoss",
    "RandomTileMasker",
    "ReconstructionTrainer",
    "SelectiveTileMasker",
    "channel_mean",
    "fill_holes",
    "mask_images",
    "normalise_tiles",
    "pick_masker",
    "select_tiles",
    "tile_losses",
    "tiles_to_pixels",
]

MASKINGS = ("random", "selective", "per_batch")

MS_SSIM_SCALES = 5


class SelectiveTileMasker:
    """Per-batch ranking: mask the tiles the current network reconstructs worst (every ``refresh_every`` batches;
    random tiles between).

    Tiles are split into ``partitions`` random groups; the batch is reconstructed once per group with
    that group hidden (no gradients, eval mode) and the highest-loss ``ratio`` of the tiles is hidden.

    Args:
        tile_size: tile side in pixels.
        ratio: fraction of tiles masked.
        partitions: tiles are ranked with the batch reconstructed once per partition.
        refresh_every: rank every this many batches (1: every batch, ``partitions`` extra forward passes).
        fill: value written into masked tiles (one, or one per channel).
    """

    def __init__(
        self,
        tile_size: int = 32,
        ratio: float = 0.6,
        partitions: int = 10,
        refresh_every: int = 1,
        fill: float | Sequence[float] = 0.5,
    ) -> None:
        if not 0 < ratio < 1 or partitions < 1 or refresh_every < 1 or tile_size < 1:
            raise ValueError(
                f"invalid selective masking: tile_size={tile_size}, ratio={ratio}, "
                f"partitions={partitions}, refresh_every={refresh_every}"
            )
        self.tile_size, self.ratio, self.partitions = int(tile_size), float(ratio), int(partitions)
        self.refresh_every, self.fill = int(refresh_every), fill
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

    @torch.no_grad()
    def rank(self, network: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Per-tile reconstruction loss ``B, ny, nx``, each tile scored in the pass that masked it."""
        ny, nx = tile_grid(images.shape[2:], self.tile_size)
        part = torch.as_tensor(self.R.randint(0, self.partitions, size=(ny, nx)), device=images.device)
        losses = torch.zeros(images.shape[0], ny, nx, device=images.device)
        was_training = network.training
        network.eval()
        for k in range(self.partitions):
            tiles = (part == k).expand(images.shape[0], ny, nx)
            holes = tiles_to_pixels(tiles, images.shape[2:], self.tile_size)
            recon = network(fill_holes(images, holes, self.fill))
            error = (recon.float() - images.float()).abs().mean(dim=1)
            losses = torch.where(tiles, tile_losses(error, self.tile_size), losses)
        network.train(was_training)
        return losses

    def mask_batch(self, batch: torch.Tensor, network: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked batch and ``B, H, W`` holes: the worst-reconstructed tiles on a refresh, random tiles otherwise."""
        ny, nx = tile_grid(batch.shape[2:], self.tile_size)
        if self.calls % self.refresh_every == 0:
            losses = self.rank(network, batch)
        else:
            losses = torch.as_tensor(self.R.uniform(size=(batch.shape[0], ny, nx)), device=batch.device)
        self.calls += 1
        holes = tiles_to_pixels(select_tiles(losses, self.ratio), batch.shape[2:], self.tile_size)
        return fill_holes(batch, holes, self.fill), holes


def pick_masker(masking: str, random: Any, per_batch: Any) -> Any:
    """The batch masker of ``pretrain_masking``: ``per_batch`` ranks every batch; ``random`` and ``selective``
    draw random tiles (``selective`` replaces them with fixed masks carried by the batch after its first part)."""
    if masking not in MASKINGS:
        raise ValueError(f"pretrain_masking must be one of {', '.join(MASKINGS)}, got {masking!r}")
    return per_batch if masking == "per_batch" else random


def mask_images(masker: Any, images: torch.Tensor, network: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked ``images`` and their ``B, H, W`` holes from any masker with ``mask_batch``.

    A :class:`SelectiveTileMasker` ranks the tiles with ``network``; an array masker (e.g.
    :class:`RandomTileMasker`) masks at random.
    """
    if isinstance(masker, SelectiveTileMasker):
        return masker.mask_batch(images, network)
    return masker.mask_batch(images)


def channel_mean(dataset: Any, max_items: int = 64, key: str = "image") -> list[float]:
    """Mean of every channel over (up to) the first ``max_items`` items of a preprocessed ``dataset``: the hole fill.

    Args:
        dataset: indexable items holding ``key`` (``C, H, W``).
        max_items: items read (the first ones: enough for a mean colour).
        key: the image key.
    """
    count = min(len(dataset), int(max_items))
    if count < 1:
        raise ValueError("cannot compute the images' mean colour: the pretraining dataset is empty")
    means = [torch.as_tensor(dataset[i][key]).float().mean(dim=tuple(range(1, 3))) for i in range(count)]
    return [round(float(v), 6) for v in torch.stack(means).mean(dim=0)]


class MaskedReconstructionLoss(nn.Module):
    """L1 on the masked pixels + ``ssim_weight`` x (1 - MS-SSIM) of the image with its masked part reconstructed.

    Zero for a perfect reconstruction of the masked part, whatever the visible part predicts.
    Single-scale SSIM stands in for MS-SSIM on images too small for its five scales. With
    ``normalise_targets_tile`` the network predicts every tile normalised to zero mean and unit
    variance per channel (:func:`normalise_tiles`): L1 compares it with the normalised image, and the
    SSIM term sees the prediction turned back with the true tile statistics.
    Returns ``{"total", "l1", "ssim"}``.

    Args:
        ssim_weight: weight of the (1 - MS-SSIM) term (0: L1 only).
        kernel_size: SSIM's Gaussian window size, in pixels.
        data_range: the images' value range (1 for images scaled to [0, 1]).
        normalise_targets_tile: tile size of the target normalisation; 0 (default): raw pixels.
    """

    def __init__(
        self,
        ssim_weight: float = 1.0,
        kernel_size: int = 7,
        data_range: float = 1.0,
        normalise_targets_tile: int = 0,
    ) -> None:
        super().__init__()
        self.ssim_weight, self.kernel_size, self.data_range = float(ssim_weight), int(kernel_size), float(data_range)
        self.normalise_targets_tile = int(normalise_targets_tile)
        self.single_scale = SSIMLoss(spatial_dims=2, data_range=data_range, win_size=kernel_size)

    def hyperparameters(self) -> dict[str, Any]:
        """Logged with the run."""
        return {
            "loss": type(self).__name__,
            "ssim_weight": self.ssim_weight,
            "ssim_kernel_size": self.kernel_size,
            "normalise_targets_tile": self.normalise_targets_tile,
        }

    def as_image(self, output: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The network's ``output`` as an image (undoing the target normalisation with ``image``'s tiles)."""
        if not self.normalise_targets_tile:
            return output
        _, mean, std = normalise_tiles(image, self.normalise_targets_tile)
        return output * std + mean

    def forward(
        self, reconstruction: torch.Tensor, image: torch.Tensor, holes: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``holes``: ``B, 1, H, W`` (or ``B, H, W``) boolean, true where the input was masked."""
        holes = holes if holes.dim() == image.dim() else holes[:, None]
        weight = holes.expand_as(image).to(reconstruction.dtype)
        target = normalise_tiles(image, self.normalise_targets_tile)[0] if self.normalise_targets_tile else image
        l1 = ((reconstruction - target).abs() * weight).sum() / weight.sum().clamp_min(1)
        composite = torch.where(holes, self.as_image(reconstruction, image), image)
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


def _tensor(value: Any, device: Any, non_blocking: bool) -> torch.Tensor:
    value = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
    return value.to(device, non_blocking=non_blocking)


class ReconstructionTrainer(SupervisedTrainer):
    """SupervisedTrainer whose step masks the images and learns to reconstruct them (labels are not read).

    An item whose batch entry ``fixed_mask`` is 1 is masked with its own ``holes`` (selective
    masking's fixed masks, moved by the augmentation with the image); the others by ``masker``.
    Hidden tiles are filled with ``masker.fill``. ``engine.state.output`` holds ``image``,
    ``image_masked``, ``pred`` (the reconstruction, as an image), ``loss`` and ``loss_l1`` / ``loss_ssim``.

    Args:
        masker: a :class:`RandomTileMasker` or :class:`SelectiveTileMasker` (anything with ``mask_batch``
            and ``fill``).
        encoder_masking: ``"none"``, ``"finest_skip"`` or ``"encoder"``
            (:class:`~masksup_med.methods.unet_parts.HiddenPositions`).
        args, kwargs: those of MONAI's ``SupervisedTrainer``; ``loss_function`` is a
            :class:`MaskedReconstructionLoss`.
    """

    def __init__(self, *args: Any, masker: Any, encoder_masking: str = "none", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.masker = masker
        self.encoder_masking = encoder_masking
        HiddenPositions(self.network, torch.zeros(1, 1, 1, dtype=torch.bool), encoder_masking)  # checks the mode
        if encoder_masking != "none":
            encoder_modules(self.network)  # a network whose encoder cannot be found is refused now, naming it
        self.masker.set_random_state(rank_seed())  # DDP: each process masks other tiles

    def _holes(self, engine: ReconstructionTrainer, batchdata: dict[str, Any], images: torch.Tensor) -> torch.Tensor:
        _, holes = mask_images(engine.masker, images, engine.network)
        if FIXED_KEY in batchdata:
            fixed = _tensor(batchdata[FIXED_KEY], images.device, engine.non_blocking).reshape(-1) > 0.5
            given = _tensor(batchdata["holes"], images.device, engine.non_blocking)[:, 0] > 0.5
            holes = torch.where(fixed[:, None, None], given, holes)
            seen, count = getattr(engine, "masked_items", (0, 0))
            engine.masked_items = (seen + len(fixed), count + int(fixed.sum()))
        return holes

    def _iteration(self, engine: ReconstructionTrainer, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        images = _tensor(batchdata[CommonKeys.IMAGE], engine.state.device, engine.non_blocking)
        holes = self._holes(engine, batchdata, images)
        masked = fill_holes(images, holes, engine.masker.fill)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast(torch.device(engine.state.device).type, **engine.amp_kwargs, enabled=engine.amp):
            with HiddenPositions(engine.network, holes, engine.encoder_masking):
                output = engine.inferer(masked, engine.network)
            terms = named_terms(engine.loss_function(output.float(), images, holes))
        total = terms.pop("total")
        as_image = getattr(engine.loss_function, "as_image", lambda out, _: out)
        engine.state.output = {
            CommonKeys.IMAGE: images,
            "image_masked": masked,
            CommonKeys.PRED: as_image(output.detach().float(), images),
            CommonKeys.LOSS: total,
            **{f"loss_{k}": v.detach() for k, v in terms.items()},
        }
        backward_and_step(engine, total)
        return engine.state.output
