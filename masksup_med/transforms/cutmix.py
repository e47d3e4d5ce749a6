"""CutMix on a batch: a random box of each sample replaced by the same box of another sample.

UniMatch's strong views paste, with probability 0.5, a box covering 2-40 % of the image (aspect
ratio between 0.3 and 1/0.3) from another unlabelled image; the pseudo-label is pasted from the
same box of that image's pseudo-label, so image and target stay aligned. Here the partner of
sample ``i`` is sample ``i - 1`` of the same batch (``torch.roll``), and every tensor passed in one
call (images, probability maps, anything ``B, C, *spatial``) gets the same boxes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.transforms import RandomizableTransform

__all__ = ["RandCutMix"]


class RandCutMix(RandomizableTransform):
    """Paste a random box of the previous sample of the batch into each sample, in every tensor given alike.

    Args:
        prob: probability that a sample gets a box at all.
        area_range: the box's share of the image, ``(low, high)`` within (0, 1].
        aspect_range: the box's height / width, ``(low, high)``, both > 0.

    ``mixed, boxes = cutmix(images, probs)``: ``boxes`` are the ``B, 1, *spatial`` pasted pixels
    (2D images; a batch of one is left as it is, having no partner).
    """

    def __init__(
        self,
        prob: float = 0.5,
        area_range: Sequence[float] = (0.02, 0.4),
        aspect_range: Sequence[float] = (0.3, 1 / 0.3),
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        low, high = (float(v) for v in area_range)
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"area_range must lie in (0, 1] with low <= high, got {tuple(area_range)!r}.")
        short, long = (float(v) for v in aspect_range)
        if not 0.0 < short <= long:
            raise ValueError(f"aspect_range must be positive with low <= high, got {tuple(aspect_range)!r}.")
        self.area_range, self.aspect_range = (low, high), (short, long)

    def hyperparameters(self) -> dict[str, object]:
        """Logged with the run."""
        area, aspect = list(self.area_range), list(self.aspect_range)
        return {"cutmix_prob": self.prob, "cutmix_area": area, "cutmix_aspect": aspect}

    def box(self, height: int, width: int) -> tuple[int, int, int, int] | None:
        """One sample's box ``(top, left, box_height, box_width)``, or None when this sample is not mixed."""
        if self.R.rand() >= self.prob:
            return None
        area = self.R.uniform(*self.area_range) * height * width
        aspect = math.exp(self.R.uniform(math.log(self.aspect_range[0]), math.log(self.aspect_range[1])))
        box_h = min(height, max(1, round(math.sqrt(area * aspect))))
        box_w = min(width, max(1, round(math.sqrt(area / aspect))))
        top, left = int(self.R.randint(0, height - box_h + 1)), int(self.R.randint(0, width - box_w + 1))
        return top, left, box_h, box_w

    def boxes(self, batch_size: int, spatial: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """``B, 1, H, W`` booleans: the pixels each sample takes from its partner."""
        if len(spatial) != 2:
            raise ValueError(f"RandCutMix mixes 2D images, got spatial size {tuple(spatial)}.")
        height, width = (int(s) for s in spatial)
        out = torch.zeros(batch_size, 1, height, width, dtype=torch.bool, device=device)
        for i in range(batch_size):
            drawn = self.box(height, width)
            if drawn is not None and batch_size > 1:
                top, left, box_h, box_w = drawn
                out[i, :, top : top + box_h, left : left + box_w] = True
        return out

    def __call__(self, *tensors: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:  # type: ignore[override]
        """Every tensor with the same boxes pasted from the previous sample; and the boxes."""
        if not tensors:
            raise ValueError("RandCutMix needs at least one tensor to mix.")
        first = tensors[0]
        for tensor in tensors[1:]:
            if tensor.shape[0] != first.shape[0] or tensor.shape[2:] != first.shape[2:]:
                raise ValueError(
                    "RandCutMix mixes tensors of one batch and size; got "
                    f"{tuple(first.shape)} and {tuple(tensor.shape)}."
                )
        boxes = self.boxes(first.shape[0], first.shape[2:], first.device)
        mixed = tuple(torch.where(boxes, torch.roll(tensor, 1, dims=0), tensor) for tensor in tensors)
        return mixed, boxes
