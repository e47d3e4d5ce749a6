"""The MaskSup objective: segmentation on the full image, on the masked image, and their agreement.

    L_total = a1 * L_seg(M_p, M_gt) + a2 * L_context(M_pm, M_gt) + a3 * L_tasksim(M_p, M_pm)

``M_p`` are the network's logits on the image, ``M_pm`` its logits on the masked copy. The task
similarity term compares probabilities (sigmoid for one-channel / multi-label outputs, softmax for
multi-class), never argmax, so it stays differentiable; neither side is detached.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from masksup_med.teacher import confidence_mask

__all__ = ["ConfidentPseudoLabelLoss", "MaskSupLoss", "MaskSupTerms"]


class MaskSupTerms(NamedTuple):
    """The weighted total and each unweighted term, for the optimiser and for logging."""

    total: torch.Tensor
    seg: torch.Tensor
    context: torch.Tensor
    tasksim: torch.Tensor


class MaskSupLoss(nn.Module):
    """MaskSup loss with the published defaults (BCE-with-logits, sigmoid MSE, weights 1/1/1).

    Args:
        seg_loss: loss of the full-image prediction against the label, called as
            ``seg_loss(logits, label)``; any MONAI or torch loss (e.g. ``DiceCELoss(sigmoid=True)``).
            Default ``BCEWithLogitsLoss``.
        context_loss: loss of the masked-image prediction against the label; default: ``seg_loss``.
        a1, a2, a3: weights of the segmentation, context and task-similarity terms (>= 0).
        activation: ``"sigmoid"`` (binary / multi-label) or ``"softmax"`` (multi-class, over dim 1):
            how logits become probabilities for the task-similarity term.
    """

    def __init__(
        self,
        seg_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        context_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        a1: float = 1.0,
        a2: float = 1.0,
        a3: float = 1.0,
        activation: str = "sigmoid",
    ) -> None:
        super().__init__()
        if min(a1, a2, a3) < 0:
            raise ValueError(f"loss weights must be >= 0, got a1={a1}, a2={a2}, a3={a3}.")
        if activation not in ("sigmoid", "softmax"):
            raise ValueError(f"activation must be 'sigmoid' or 'softmax', got {activation!r}.")
        self.seg_loss = seg_loss if seg_loss is not None else nn.BCEWithLogitsLoss()
        self.context_loss = context_loss if context_loss is not None else self.seg_loss
        self.a1, self.a2, self.a3 = float(a1), float(a2), float(a3)
        self.activation = activation

    def hyperparameters(self) -> dict[str, object]:
        """The settings that identify this loss in a run's record (logged as MLflow parameters)."""
        return {
            "loss": type(self).__name__,
            "seg_loss": type(self.seg_loss).__name__,
            "context_loss": type(self.context_loss).__name__,
            "a1": self.a1,
            "a2": self.a2,
            "a3": self.a3,
            "tasksim_activation": self.activation,
        }

    @property
    def uses_masked_pass(self) -> bool:
        """False when a2 = a3 = 0: the masked prediction cannot change the loss (plain supervision)."""
        return self.a2 > 0 or self.a3 > 0

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Differentiable class probabilities used by the task-similarity term."""
        return torch.sigmoid(logits) if self.activation == "sigmoid" else torch.softmax(logits, dim=1)

    def forward(self, pred: torch.Tensor, pred_masked: torch.Tensor | None, target: torch.Tensor) -> MaskSupTerms:
        """Compute all terms; ``pred_masked`` may be None only when a2 = a3 = 0."""
        seg = self.seg_loss(pred, target).mean()
        if pred_masked is None:
            if self.uses_masked_pass:
                raise ValueError("pred_masked is required when a2 or a3 is non-zero.")
            zero = seg.new_zeros(())
            return MaskSupTerms(self.a1 * seg, seg, zero, zero)
        if pred_masked.shape != pred.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and pred_masked {tuple(pred_masked.shape)} differ in shape.")
        context = self.context_loss(pred_masked, target).mean()
        tasksim = torch.mean((self.probabilities(pred) - self.probabilities(pred_masked)) ** 2)
        total = self.a1 * seg + self.a2 * context + self.a3 * tasksim
        return MaskSupTerms(total, seg, context, tasksim)


class ConfidentPseudoLabelLoss(nn.Module):
    """Student logits against a teacher's hard pseudo-labels, on the teacher's confident pixels only.

    FixMatch / UniMatch's unsupervised term: the pseudo-label is the teacher's class (probability
    > 0.5 for one sigmoid channel, the arg-max for softmax), a pixel counts when the teacher's
    probability of that class is >= ``threshold``, and the per-pixel loss (BCE with logits or cross
    entropy) is summed over counted pixels and divided by all pixels, so a teacher confident
    nowhere contributes nothing.

    Returns ``(loss, confident_fraction)``.
    """

    def __init__(self, threshold: float = 0.95, activation: str = "sigmoid") -> None:
        super().__init__()
        if not 0.5 <= threshold <= 1.0:
            raise ValueError(f"confidence threshold must lie in [0.5, 1], got {threshold!r}.")
        if activation not in ("sigmoid", "softmax"):
            raise ValueError(f"activation must be 'sigmoid' or 'softmax', got {activation!r}.")
        self.threshold = float(threshold)
        self.activation = activation

    def hyperparameters(self) -> dict[str, object]:
        """Logged with the run."""
        return {"unsup_loss": type(self).__name__, "confidence_threshold": self.threshold}

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and the fraction of confident pixels."""
        if self.activation == "sigmoid":
            pseudo = (teacher_probs > 0.5).to(student_logits.dtype)
            per_pixel = nn.functional.binary_cross_entropy_with_logits(student_logits, pseudo, reduction="none")
        else:
            pseudo = teacher_probs.argmax(dim=1)
            per_pixel = nn.functional.cross_entropy(student_logits, pseudo, reduction="none")[:, None]
        confident = confidence_mask(teacher_probs, self.threshold).to(per_pixel.dtype)
        return (per_pixel * confident).sum() / per_pixel.numel(), confident.mean()
