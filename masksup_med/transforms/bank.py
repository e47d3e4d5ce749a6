"""Masks at device speed: a bank of pre-drawn hole masks, reused with random flips and offsets.

Drawing free-form strokes costs milliseconds an image on the CPU, more than a GPU training step
(see ``benchmarks/RESULTS.md``); the published MaskSup code loads pre-drawn masks from disk instead.
:class:`RandMaskBank` draws ``bank_size`` masks once per image shape and device with any
:class:`~masksup_med.transforms.base.RandMask` (free-form strokes by default), keeps them on the
device, and hands out one per image with a random flip along each axis and a random circular
offset. Flips and offsets move holes without changing how many pixels they cover, so the
masked-area distribution is that of the source masker. A batch is masked with a few tensor
operations (:meth:`RandMaskBank.mask_batch`), never a per-image Python loop.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection

from masksup_med.transforms.base import RandMask, RandMaskd
from masksup_med.transforms.free_form import RandFreeFormMask

__all__ = ["BankDraw", "RandMaskBank", "RandMaskBankd"]


@dataclass(frozen=True)
class BankDraw:
    """Which bank masks, flipped along which axes, shifted by how much (one row per image)."""

    index: np.ndarray  # (B,) int
    flips: np.ndarray  # (B, ndim) bool
    shifts: np.ndarray  # (B, ndim) int


class RandMaskBank(RandMask):
    """Hand out hole masks from a bank drawn once by ``source``, with random flips and offsets.

    Args:
        source: the masker whose masks fill the bank (default: ``RandFreeFormMask(ratio_range)``).
        ratio_range: masked-area range of the default source; ignored when ``source`` is given.
        bank_size: masks drawn per image shape and device. More masks: more variety, longer start.
        bank_seed: seed of the source when the bank is drawn, so the bank is the same in every run
            and process; the per-image choices come from this transform's own random state.
        fill_value: value written into the holes.
        prob: probability of masking at all.
    """

    def __init__(
        self,
        source: RandMask | None = None,
        ratio_range: float | Sequence[float] = (0.4, 0.6),
        bank_size: int = 256,
        bank_seed: int = 0,
        fill_value: float = 0.5,
        prob: float = 1.0,
    ) -> None:
        super().__init__(fill_value=fill_value, prob=prob)
        if bank_size < 1:
            raise ValueError(f"bank_size must be >= 1, got {bank_size!r}.")
        self.source = source if source is not None else RandFreeFormMask(ratio_range, fill_value=fill_value)
        self.ratio_range = getattr(self.source, "ratio_range", ())
        self.bank_size = int(bank_size)
        self.bank_seed = int(bank_seed)
        self._banks: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}

    def hyperparameters(self) -> dict[str, Any]:
        """The source masker's settings, with the bank's."""
        return {
            **self.source.hyperparameters(),
            **super().hyperparameters(),
            "mask_source": type(self.source).__name__,
            "mask_bank_size": self.bank_size,
        }

    def bank(self, spatial_shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        """The ``bank_size, *spatial_shape`` boolean masks for this shape, drawn on first use and kept."""
        device = torch.device(device)
        key = (tuple(spatial_shape), str(device))
        if key not in self._banks:
            cpu_key = (tuple(spatial_shape), "cpu")
            if cpu_key not in self._banks:
                self.source.set_random_state(self.bank_seed)
                masks = []
                for _ in range(self.bank_size):
                    self.source.randomize(spatial_shape)
                    masks.append(self.source.holes("cpu"))
                self._banks[cpu_key] = torch.stack(masks)
            self._banks[key] = self._banks[cpu_key].to(device)
        return self._banks[key]

    def draw(self, count: int, spatial_shape: tuple[int, ...]) -> BankDraw:
        """Random bank indices, flips and offsets for ``count`` images (all from ``self.R``)."""
        ndim = len(spatial_shape)
        return BankDraw(
            index=self.R.randint(0, self.bank_size, size=count),
            flips=self.R.uniform(size=(count, ndim)) < 0.5,
            shifts=(self.R.uniform(size=(count, ndim)) * np.asarray(spatial_shape)).astype(np.int64),
        )

    def sample_geometry(self, spatial_shape: tuple[int, ...]) -> BankDraw:
        """One image's draw."""
        return self.draw(1, spatial_shape)

    def rasterize(self, geometry: BankDraw, spatial_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The hole mask of one draw."""
        return self.lookup(geometry, spatial_shape, device)[0]

    def lookup(self, draw: BankDraw, spatial_shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
        """``B, *spatial`` masks of ``draw``: bank masks gathered, flipped and rolled, on ``device``."""
        bank = self.bank(spatial_shape, device)
        count, ndim = len(draw.index), len(spatial_shape)
        flat = torch.zeros([count] + [1] * ndim, dtype=torch.long, device=bank.device)
        for axis, size in enumerate(spatial_shape):
            flip = torch.as_tensor(draw.flips[:, axis], device=bank.device)
            shift = torch.as_tensor(draw.shifts[:, axis], device=bank.device)
            position = torch.arange(size, device=bank.device)
            source = torch.where(flip[:, None], size - 1 - position, position)
            source = (source - shift[:, None]) % size  # flipped, then rolled by the offset: a bijection per axis
            shape = [count] + [1] * ndim
            shape[axis + 1] = size
            flat = flat * size + source.reshape(shape)  # row-major index into one bank mask
        chosen = bank[torch.as_tensor(draw.index, device=bank.device)].reshape(count, -1)
        return torch.gather(chosen, 1, flat.reshape(count, -1)).reshape(count, *spatial_shape)

    def mask_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask a ``B, C, *spatial`` batch on its device; return it and the ``B, *spatial`` holes.

        The random numbers are drawn image by image, as the per-sample transform draws them (a few
        numbers each), and the masks are then looked up for the whole batch at once.
        """
        spatial_shape = tuple(int(s) for s in batch.shape[2:])
        draws = []
        for _ in range(batch.shape[0]):
            self.randomize(spatial_shape)
            draws.append(self._geometry)  # None: this image is not masked (prob < 1)
        holes = torch.zeros((batch.shape[0], *spatial_shape), dtype=torch.bool, device=batch.device)
        masked = [i for i, d in enumerate(draws) if d is not None]
        if masked:
            fields = ("index", "flips", "shifts")
            combined = BankDraw(*(np.concatenate([getattr(draws[i], f) for i in masked]) for f in fields))
            holes[torch.as_tensor(masked, device=batch.device)] = self.lookup(combined, spatial_shape, batch.device)
        return self.fill(batch, holes.unsqueeze(1)), holes


class RandMaskBankd(RandMaskd):
    """Dictionary version of :class:`RandMaskBank` (per sample, e.g. for figures; train with ``mask_batch``)."""

    def __init__(
        self,
        keys: KeysCollection = "image",
        source: RandMask | None = None,
        ratio_range: float | Sequence[float] = (0.4, 0.6),
        bank_size: int = 256,
        bank_seed: int = 0,
        fill_value: float = 0.5,
        masked_keys: KeysCollection = "image_masked",
        hole_key: Hashable | None = None,
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        masker = RandMaskBank(source, ratio_range, bank_size, bank_seed, fill_value)
        super().__init__(keys, masker, masked_keys, hole_key, prob, allow_missing_keys)
