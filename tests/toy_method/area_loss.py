"""A toy third method for the tests: MaskSup plus one more named loss term.

``area`` is the gap between the predicted and the true foreground fraction of the batch; the
pipeline knows nothing of it and must still log, average, plot and register it like any term.
"""

from __future__ import annotations

import torch

from masksup_med.methods.losses import MaskSupLoss


class AreaMaskSupLoss(MaskSupLoss):
    """MaskSup loss + ``area_weight`` x |mean predicted foreground - mean true foreground|."""

    def __init__(self, *args, area_weight: float = 0.1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.area_weight = float(area_weight)

    def hyperparameters(self) -> dict[str, object]:
        """MaskSup's settings plus the area weight."""
        return {**super().hyperparameters(), "area_weight": self.area_weight}

    def forward(self, pred, pred_masked, target) -> dict[str, torch.Tensor]:
        terms = super().forward(pred, pred_masked, target)._asdict()
        terms["area"] = (torch.sigmoid(pred).mean() - target.float().mean()).abs()
        terms["total"] = terms["total"] + self.area_weight * terms["area"]
        return terms
