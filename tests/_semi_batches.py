"""Hand-made batches for the semi-supervised trainer tests: weak and strong views, with or without labels."""

from __future__ import annotations

import torch


def semi_batches(n: int, seed: int, labelled: bool = True) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of two 3x32x32 images; the strong view is the weak one brightened, the label a threshold of it."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        image = torch.rand(2, 3, 32, 32, generator=g)
        batch = {"image": image, "image_strong": (image * 1.2).clamp(0, 1)}
        if labelled:
            batch["label"] = (image[:, :1] > 0.5).float()
        out.append(batch)
    return out
