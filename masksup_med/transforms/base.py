"""Shared machinery of the random masking transforms.

A masking transform draws a *hole mask* (a boolean array over the spatial dimensions) from its
own random state, then fills the holes of every channel with ``fill_value``. Drawing (``randomize``)
and rasterising (``holes``) are separate, so the same geometry can be rasterised on any device:
the per-sample transform rasterises next to the image, :meth:`RandMask.mask_batch` rasterises a
whole batch already on the training device with the same random draws, sample by sample.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor, ensure_tuple_rep

__all__ = ["RandMask", "RandMaskd", "check_ratio"]


def check_ratio(value: float | Sequence[float], name: str) -> tuple[float, float]:
    """Return ``value`` as a ``(low, high)`` range inside [0, 1), or raise a ValueError naming it."""
    bounds = (value, value) if np.isscalar(value) else tuple(value)  # type: ignore[arg-type]
    if len(bounds) != 2:
        raise ValueError(f"{name} must be a float or a (low, high) pair, got {value!r}.")
    low, high = float(bounds[0]), float(bounds[1])
    if not (0.0 <= low <= high < 1.0):
        raise ValueError(f"{name} must lie in [0, 1) with low <= high, got {value!r}.")
    return low, high


class RandMask(RandomizableTransform):
    """Base array transform: hide random regions of a channel-first image behind ``fill_value``.

    Subclasses implement :meth:`sample_geometry` (all randomness, through ``self.R``) and
    :meth:`rasterize` (deterministic, on any torch device).

    Args:
        fill_value: value written into the holes, cast to the image dtype. The default 0.5 is the
            mid value of images scaled to [0, 1], as in the published MaskSup code.
        prob: probability of masking at all; when not applied the output equals the input.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]  # noqa: RUF012 - MONAI declares backends this way

    def __init__(self, fill_value: float = 0.5, prob: float = 1.0) -> None:
        RandomizableTransform.__init__(self, prob)
        self.fill_value = float(fill_value)
        self._geometry: Any = None
        self._spatial_shape: tuple[int, ...] | None = None

    def hyperparameters(self) -> dict[str, Any]:
        """The settings that identify this masking in a run's record (logged as MLflow parameters)."""
        params: dict[str, Any] = {
            "masking": type(self).__name__,
            "mask_prob": self.prob,
            "mask_fill_value": self.fill_value,
            "mask_ratio_range": list(getattr(self, "ratio_range", ())),
        }
        if hasattr(self, "patch_size"):
            params["mask_patch_size"] = self.patch_size
        return params

    @abstractmethod
    def sample_geometry(self, spatial_shape: tuple[int, ...]) -> Any:
        """Draw the random description of the holes for an image of ``spatial_shape``."""

    @abstractmethod
    def rasterize(self, geometry: Any, spatial_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Turn ``geometry`` into a boolean hole mask of ``spatial_shape`` on ``device``."""

    def check_spatial_shape(self, spatial_shape: tuple[int, ...]) -> None:
        """Raise a ValueError when the transform cannot mask an image of this shape."""
        if len(spatial_shape) not in (2, 3) or min(spatial_shape) < 1:
            raise ValueError(
                f"{type(self).__name__} expects a channel-first 2D or 3D image, got spatial shape {spatial_shape}."
            )

    def randomize(self, spatial_shape: Sequence[int]) -> None:  # type: ignore[override]
        """Decide whether to mask and draw the hole geometry for ``spatial_shape``."""
        spatial_shape = tuple(int(s) for s in spatial_shape)
        self.check_spatial_shape(spatial_shape)
        super().randomize(None)
        self._spatial_shape = spatial_shape
        self._geometry = self.sample_geometry(spatial_shape) if self._do_transform else None

    def skip(self, spatial_shape: Sequence[int]) -> None:
        """Prepare to leave an image of ``spatial_shape`` unmasked (no holes), drawing no random numbers."""
        spatial_shape = tuple(int(s) for s in spatial_shape)
        self.check_spatial_shape(spatial_shape)  # a bad shape fails whether or not the image is masked
        self._spatial_shape, self._geometry = spatial_shape, None

    def holes(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean hole mask (spatial shape) of the last :meth:`randomize` call."""
        if self._spatial_shape is None:
            raise RuntimeError(f"{type(self).__name__}.holes() called before randomize().")
        device = torch.device("cpu") if device is None else torch.device(device)
        if self._geometry is None:
            return torch.zeros(self._spatial_shape, dtype=torch.bool, device=device)
        return self.rasterize(self._geometry, self._spatial_shape, device)

    def fill(self, img: NdarrayOrTensor, holes: torch.Tensor) -> NdarrayOrTensor:
        """Copy of ``img`` with ``fill_value`` wherever ``holes`` is true.

        ``holes`` broadcasts against ``img``: ``1, *spatial`` for an image, ``B, 1, *spatial`` for a batch.
        """
        img_t = convert_to_tensor(img, track_meta=False)  # plain tensor: MetaTensor dispatch costs more than the fill
        holes = holes.to(img_t.device)
        out = torch.where(holes, torch.tensor(self.fill_value, dtype=img_t.dtype, device=img_t.device), img_t)
        if isinstance(img, MetaTensor):
            out = MetaTensor(out, meta=img.meta, applied_operations=list(img.applied_operations))
        out, *_ = convert_to_dst_type(out, dst=img, dtype=img.dtype)
        return out

    def mask_with_holes(self, img: NdarrayOrTensor, randomize: bool = True) -> tuple[NdarrayOrTensor, torch.Tensor]:
        """Mask one channel-first image; return the masked copy and the boolean hole mask."""
        if randomize:
            self.randomize(img.shape[1:])
        elif self._spatial_shape != tuple(img.shape[1:]):
            raise ValueError(
                f"{type(self).__name__}: randomize=False but the image spatial shape {tuple(img.shape[1:])} "
                f"differs from the last randomized shape {self._spatial_shape}."
            )
        device = img.device if isinstance(img, torch.Tensor) else torch.device("cpu")
        holes = self.holes(device)
        return self.fill(img, holes.unsqueeze(0)), holes

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:  # type: ignore[override]
        """Return a masked copy of the channel-first image ``img`` (numpy or torch, dtype kept)."""
        return self.mask_with_holes(img, randomize)[0]

    def mask_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask a ``B, C, *spatial`` batch on its own device, sample by sample.

        The random draws are the ones the per-sample transform would make for the same samples
        in the same order, so a seeded run gives identical holes whichever way it masks.
        Returns the masked batch and the ``B, *spatial`` boolean hole masks.
        """
        spatial_shape = tuple(batch.shape[2:])
        holes = []
        for _ in range(batch.shape[0]):
            self.randomize(spatial_shape)
            holes.append(self.holes(batch.device))
        stacked = torch.stack(holes)
        return self.fill(batch, stacked.unsqueeze(1)), stacked


class RandMaskd(RandomizableTransform, MapTransform):
    """Base dictionary transform: write a masked copy of ``keys`` under ``masked_keys``.

    The same holes are used for every key of one sample (e.g. several modalities); the source
    keys, the label and all other keys are left untouched.

    Args:
        keys: keys of the images to mask (default ``image``).
        masker: the array transform that draws and fills the holes (its own ``prob`` is ignored).
        masked_keys: where to write the masked copies, one per key (default ``image_masked``).
        hole_key: if given, also write the boolean hole mask there, shape ``1, *spatial``.
        prob: probability of masking a sample; when not applied the masked copy equals the image.
        allow_missing_keys: do not raise when a key is absent.
    """

    backend = RandMask.backend

    def __init__(
        self,
        keys: KeysCollection,
        masker: RandMask,
        masked_keys: KeysCollection = "image_masked",
        hole_key: Hashable | None = None,
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.masked_keys = ensure_tuple_rep(masked_keys, len(self.keys))
        overlap = set(self.masked_keys) & set(self.keys)
        if overlap:
            raise ValueError(f"masked_keys must differ from keys (the source is kept), both contain {sorted(overlap)}.")
        if hole_key is not None and (hole_key in self.keys or hole_key in self.masked_keys):
            raise ValueError(f"hole_key {hole_key!r} must differ from keys and masked_keys.")
        self.hole_key = hole_key
        self.masker = masker
        self.masker.prob = 1.0

    def hyperparameters(self) -> dict[str, Any]:
        """The settings that identify this masking in a run's record (logged as MLflow parameters)."""
        return {**self.masker.hyperparameters(), "masking": type(self).__name__, "mask_prob": self.prob}

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandMaskd:
        """Seed this transform and its array masker (MONAI's pattern for composite random transforms)."""
        super().set_random_state(seed, state)
        self.masker.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:  # type: ignore[override]
        """Add the masked copy (and optionally the hole mask) to a copy of ``data``."""
        d = dict(data)
        present = list(self.key_iterator(d))
        if not present:
            return d
        shape = tuple(d[present[0]].shape)
        for key in present:
            if tuple(d[key].shape) != shape:
                raise ValueError(
                    f"{type(self).__name__}: key {key!r} has shape {tuple(d[key].shape)}, "
                    f"but {present[0]!r} has {shape}; all masked keys must share one shape."
                )
        self.randomize(None)
        if self._do_transform:
            self.masker.randomize(shape[1:])
        else:
            self.masker.skip(shape[1:])
        holes = None
        for key, masked_key in self.key_iterator(d, self.masked_keys):
            masked, holes = self.masker.mask_with_holes(d[key], randomize=False)
            d[masked_key] = masked
        if self.hole_key is not None and holes is not None:
            src = d[present[0]]
            hole_map = holes.unsqueeze(0)
            if isinstance(src, MetaTensor):
                hole_map = MetaTensor(hole_map, meta=src.meta)
            d[self.hole_key] = hole_map if isinstance(src, torch.Tensor) else hole_map.cpu().numpy()
        return d
