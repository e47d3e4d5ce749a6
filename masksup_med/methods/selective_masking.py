"""Selective masking as Wang and Stavness's code does it: dataset partitions, a random-mask first part, and
fixed masks for every later part chosen by the previous part's model.

The pretraining images are split (seeded) into ``parts``; training runs one round per part
(:class:`PartitionSchedule`, :class:`PartitionSampler`). Round 0 hides random tiles. At the start of
round ``k >= 1`` the model as it ended round ``k - 1`` scores every tile of every image of part ``k``
(:func:`score_tiles`: L1 + (1 - SSIM) of the reconstruction, averaged over several random masks);
the highest-scoring ``ratio`` of each image's tiles become its fixed mask for the round
(:class:`FixedTileMasks`). :class:`AttachTileMaskd` writes an image's fixed mask next to it before
the spatial augmentation, so a crop or flip moves the mask with the content it hides.
:class:`PartitionRoundsHandler` is the ignite handler that runs the schedule; with ``partitioned=False``
every round draws from every image with random masks (the random arm, same rounds and budget).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.transforms.transform import RandomizableTrait
from torch import nn
from torch.utils.data import DataLoader, Sampler

from masksup_med.methods.tiles import (
    fill_holes,
    normalise_tiles,
    random_tiles,
    select_tiles,
    tile_grid,
    tile_losses,
    tiles_to_pixels,
)
from masksup_med.methods.unet_parts import HiddenPositions

__all__ = [
    "AttachTileMaskd",
    "FixedTileMasks",
    "PartitionRoundsHandler",
    "PartitionSampler",
    "PartitionSchedule",
    "score_tiles",
    "ssim_map",
]

logger = logging.getLogger(__name__)

FIXED_KEY = "fixed_mask"  # per item: 1.0 when ``holes`` is a fixed mask, 0.0 when tiles are to be drawn at random


class PartitionSchedule:
    """Which images each pretraining round draws from, and how their tiles are masked.

    Args:
        num_items: pretraining images.
        rounds: training rounds (one checkpoint each); with ``partitioned``, also the number of parts.
        seed: the split of the images into parts.
        partitioned: true: round ``k`` trains on part ``k`` only (part 0 with random masks, later parts
            with fixed masks); false: every round trains on every image with random masks.
    """

    def __init__(self, num_items: int, rounds: int = 10, seed: int = 0, partitioned: bool = True) -> None:
        if int(rounds) < 1 or (partitioned and int(num_items) < int(rounds)):
            raise ValueError(
                f"cannot split {num_items} pretraining images into {rounds} parts (rounds must be >= 1, and at most "
                "the number of images when partitioned)"
            )
        self.num_items, self.rounds, self.partitioned = int(num_items), int(rounds), bool(partitioned)
        order = np.random.RandomState(seed).permutation(self.num_items)
        self.parts = [sorted(p.tolist()) for p in np.array_split(order, self.rounds)] if partitioned else []

    def items(self, round_index: int) -> list[int]:
        """Indices of the images round ``round_index`` (0-based) trains on."""
        if not 0 <= round_index < self.rounds:
            raise IndexError(f"round {round_index} is outside the schedule's {self.rounds} rounds")
        return self.parts[round_index] if self.partitioned else list(range(self.num_items))

    def fixed_masks(self, round_index: int) -> bool:
        """True when round ``round_index`` trains on fixed masks chosen by the previous round's model."""
        return self.partitioned and round_index >= 1


class PartitionSampler(Sampler[int]):
    """``batches_per_round * batch_size`` indices of the current round's images (reshuffled each pass over them).

    ``set_epoch(round_index)`` picks the round (:class:`PartitionRoundsHandler` calls it at every epoch start).

    Args:
        schedule: the rounds and their images.
        batches_per_round: training steps of one round (the trainer's ``epoch_length``).
        batch_size: images per step.
        seed: the order the images are drawn in (with the round index).
    """

    def __init__(self, schedule: PartitionSchedule, batches_per_round: int, batch_size: int, seed: int = 0) -> None:
        if int(batches_per_round) < 1:
            raise ValueError(f"batches_per_round must be >= 1, got {batches_per_round}")
        self.schedule, self.seed = schedule, int(seed)
        self.length = int(batches_per_round) * int(batch_size)
        self.round_index = 0

    def set_epoch(self, round_index: int) -> None:
        """Draw from round ``round_index``'s images from the next iterator on."""
        self.round_index = int(round_index)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        items = np.asarray(self.schedule.items(self.round_index))
        R = np.random.RandomState(self.seed * 1000 + self.round_index)
        drawn = np.concatenate([R.permutation(items) for _ in range(-(-self.length // len(items)))])
        return iter(drawn[: self.length].tolist())


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: int = 7, data_range: float = 1.0) -> torch.Tensor:
    """Per-pixel SSIM of two ``B, C, H, W`` images, over a uniform ``window`` (reflect-padded): ``B, C, H, W``."""
    pad = window // 2

    def local_mean(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.pad(t, (pad, pad, pad, pad), mode="reflect"), window, stride=1)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = local_mean(x), local_mean(y)
    vx, vy, cov = local_mean(x * x) - mx**2, local_mean(y * y) - my**2, local_mean(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


@torch.no_grad()
def score_tiles(
    network: nn.Module,
    images: torch.Tensor,
    tile_size: int,
    ratio: float,
    passes: int,
    R: np.random.RandomState,
    fill: Sequence[float] | float = 0.5,
    normalise_targets: bool = False,
    encoder_masking: str = "none",
) -> torch.Tensor:
    """Each tile's reconstruction score, L1 + (1 - SSIM), averaged over ``passes`` random masks: ``B, ny, nx``.

    Every pass hides ``ratio`` of the tiles at random (drawn from ``R``); a tile's score is the mean
    over the passes that hid it. A tile no pass hid gets its image's mean score. The network runs
    in eval mode (its mode is restored). ``normalise_targets``: the network predicts per-tile
    normalised pixels, turned back into an image with the true tiles' mean and std.
    """
    grid = tile_grid(images.shape[2:], tile_size)
    total = torch.zeros(images.shape[0], *grid, device=images.device)
    count = torch.zeros_like(total)
    was_training = network.training
    network.eval()
    try:
        for _ in range(int(passes)):
            tiles = random_tiles(R, images.shape[0], grid, ratio).to(images.device)
            holes = tiles_to_pixels(tiles, images.shape[2:], tile_size)
            with HiddenPositions(network, holes, encoder_masking):
                output = network(fill_holes(images, holes, fill)).float()
            if normalise_targets:
                _, mean, std = normalise_tiles(images.float(), tile_size)
                output = output * std + mean
            error = (output - images).abs().mean(dim=1) + (1 - ssim_map(output, images.float())).mean(dim=1)
            total += torch.where(tiles, tile_losses(error, tile_size), torch.zeros_like(total))
            count += tiles
    finally:
        network.train(was_training)
    scores = total / count.clamp_min(1)
    image_mean = (total.flatten(1).sum(1) / count.flatten(1).sum(1).clamp_min(1))[:, None, None]
    return torch.where(count > 0, scores, image_mean.expand_as(scores))


class FixedTileMasks:
    """The fixed tile masks of the current round: image id -> ``ny, nx`` boolean array (empty in random rounds).

    Args:
        tile_size: tile side in pixels (the masks' grid).
    """

    def __init__(self, tile_size: int) -> None:
        self.tile_size = int(tile_size)
        self.masks: dict[str, np.ndarray] = {}

    def replace(self, masks: Mapping[str, np.ndarray]) -> None:
        """The next round's masks (the previous round's are dropped)."""
        self.masks = {str(k): np.asarray(v, dtype=bool) for k, v in masks.items()}

    def holes(self, item_id: str, spatial_shape: Sequence[int]) -> np.ndarray | None:
        """``H, W`` boolean pixel mask of ``item_id``, or None when it has no fixed mask."""
        tiles = self.masks.get(str(item_id))
        if tiles is None:
            return None
        expected = tile_grid(spatial_shape, self.tile_size)
        if tiles.shape != expected:
            raise ValueError(f"fixed mask of {item_id} has {tiles.shape} tiles, its image {expected}")
        return tiles.repeat(self.tile_size, 0).repeat(self.tile_size, 1)[: spatial_shape[0], : spatial_shape[1]]


class AttachTileMaskd(MapTransform, RandomizableTrait):
    """Write an item's fixed mask as ``holes`` (``1, H, W`` float) and ``fixed_mask`` (1.0, or 0.0 when it has none).

    Placed after resizing and before spatial augmentation (which must also move ``holes``, nearest
    neighbour), so the mask follows the content. Never cached (``RandomizableTrait``: MONAI's cache
    datasets stop before it): the masks change every round. The loader's workers must start after the
    round's masks are set (``persistent_workers`` false: the loader starts new ones every round).

    Args:
        keys: the image key (its spatial shape sizes the mask).
        masks: the shared :class:`FixedTileMasks`.
        id_key: the item's id key.
        holes_key: where the mask is written.
    """

    def __init__(
        self, keys: KeysCollection, masks: FixedTileMasks, id_key: str = "id", holes_key: str = "holes"
    ) -> None:
        super().__init__(keys)
        self.masks, self.id_key, self.holes_key = masks, id_key, holes_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            shape = tuple(d[key].shape[1:])
            holes = self.masks.holes(d[self.id_key], shape)
            d[FIXED_KEY] = torch.tensor(0.0 if holes is None else 1.0)
            d[self.holes_key] = torch.as_tensor(np.zeros(shape, bool) if holes is None else holes)[None].float()
        return d


class PartitionRoundsHandler:
    """Runs a :class:`PartitionSchedule` on a trainer: at every epoch (round) start, point the sampler at the
    round's images and, in a fixed-mask round, choose its masks with the network as it is.

    Args:
        schedule: the rounds.
        sampler: the training loader's :class:`PartitionSampler`.
        masks: the :class:`FixedTileMasks` that :class:`AttachTileMaskd` reads.
        dataset: the pretraining images preprocessed without augmentation (indexable like the sampler's indices).
        network: the network being pretrained.
        tile_size, ratio: the tiles and the fraction hidden.
        score_passes: random masks each tile score is averaged over (5 in the paper's code).
        fill, normalise_targets, encoder_masking: as the trainer uses them.
        batch_size: images scored at once.
        seed: the scoring's random masks.
    """

    def __init__(
        self,
        schedule: PartitionSchedule,
        sampler: PartitionSampler,
        masks: FixedTileMasks,
        dataset: Any,
        network: nn.Module,
        tile_size: int,
        ratio: float,
        score_passes: int = 5,
        fill: Sequence[float] | float = 0.5,
        normalise_targets: bool = False,
        encoder_masking: str = "none",
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        self.schedule, self.sampler, self.masks, self.dataset, self.network = schedule, sampler, masks, dataset, network
        self.tile_size, self.ratio, self.score_passes = int(tile_size), float(ratio), int(score_passes)
        self.fill, self.normalise_targets, self.encoder_masking = fill, bool(normalise_targets), encoder_masking
        self.batch_size, self.seed = int(batch_size), int(seed)

    def attach(self, engine: Engine) -> None:
        """Run :meth:`start_round` at every epoch start; log how the round's images were masked at its end."""
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.start_round(e.state.epoch - 1))
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.report_round)

    def report_round(self, engine: Engine) -> None:
        """Log the round's images seen and how many of them came with a fixed mask (the trainer counts them)."""
        seen, fixed = getattr(engine, "masked_items", (0, 0))
        logger.info(
            f"pretraining round {engine.state.epoch} of {self.schedule.rounds}: {len(self.masks.masks)} images with "
            f"fixed masks; {fixed} of {seen} images trained on were masked with theirs"
        )
        engine.masked_items = (0, 0)

    def choose_masks(self, round_index: int) -> dict[str, np.ndarray]:
        """Fixed masks of round ``round_index``'s images: the top ``ratio`` of each image's tile scores."""
        device = next(self.network.parameters()).device
        subset = torch.utils.data.Subset(self.dataset, self.schedule.items(round_index))
        R = np.random.RandomState(self.seed * 1000 + round_index)
        chosen: dict[str, np.ndarray] = {}
        for batch in DataLoader(subset, batch_size=self.batch_size, shuffle=False, num_workers=0):
            images = torch.as_tensor(batch["image"]).to(device)
            scores = score_tiles(
                self.network,
                images,
                self.tile_size,
                self.ratio,
                self.score_passes,
                R,
                self.fill,
                self.normalise_targets,
                self.encoder_masking,
            )
            for item_id, tiles in zip(batch["id"], select_tiles(scores, self.ratio).cpu().numpy()):
                chosen[str(item_id)] = tiles
        return chosen

    def start_round(self, round_index: int) -> None:
        """Point the sampler at round ``round_index`` and set its masks (fixed, or none for random tiles)."""
        self.sampler.set_epoch(round_index)
        self.masks.replace(self.choose_masks(round_index) if self.schedule.fixed_masks(round_index) else {})
