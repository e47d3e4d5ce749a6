"""The MaskSup objective: segmentation on the full image, on the masked image, and their agreement.

    L_total = a1 * L_seg(M_p, M_gt) + a2 * L_context(M_pm, M_gt) + a3 * L_tasksim(M_p, M_pm)

``M_p`` are the network's logits on the image, ``M_pm`` its logits on the masked copy. The task
similarity term compares probabilities (sigmoid for one-channel / multi-label outputs, softmax for
multi-class), never argmax, so it stays differentiable; neither side is detached.

The losses of the methods built on MaskSup live here too: MaskMatch's cross entropy + Dice on
confident pseudo-labels, and the class-wise masked-image-modelling losses (reconstruction of the masked
pixels averaged class by class, feature aggregation of masked and visible pixels) with the class
regions they are split by, and the boundary-weighted "structure loss" of the polyp literature.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from monai.losses import DiceLoss
from torch import nn

__all__ = [
    "ClassWiseReconstructionLoss",
    "ConfidentPseudoLabelLoss",
    "FeatureAggregationLoss",
    "MaskSupLoss",
    "MaskSupTerms",
    "StructureLoss",
    "class_regions",
    "confidence_mask",
]


def confidence_mask(probabilities: torch.Tensor, threshold: float) -> torch.Tensor:
    """Pixels whose predicted class has probability >= ``threshold``.

    One channel (sigmoid): ``max(p, 1 - p)``; several channels (softmax): the largest channel.
    Returns a ``B, 1, *spatial`` boolean tensor.
    """
    if probabilities.shape[1] == 1:
        confidence = torch.maximum(probabilities, 1.0 - probabilities)
    else:
        confidence = probabilities.amax(dim=1, keepdim=True)
    return confidence >= threshold


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
    """Student logits against hard pseudo-labels: cross entropy plus Dice, on the confident pixels only.

    FixMatch / UniMatch's unsupervised term. The pseudo-label is the source's class (probability >
    0.5 for one sigmoid channel, the arg-max for softmax); a pixel counts when the source's
    probability of that class is >= ``threshold`` (the others form the ignore mask).

    - Cross entropy (BCE with logits for one sigmoid channel) summed over confident pixels and
      divided by all pixels (UniMatch's normalisation: a source confident nowhere contributes nothing).
    - Dice with the ignore mask (UniMatch's medical version): MONAI's ``DiceLoss`` over every class
      (background and foreground for one sigmoid channel), pooled over the batch, on the student's
      probabilities and the one-hot pseudo-label both multiplied by the confident pixels, so ignored
      pixels count neither as overlap nor as area; averaged over the classes the confident pixels
      hold (a class absent from them would only add a constant). No confident pixel: 0.

    ``forward(student_logits, source_probs)`` returns ``(loss, confident_fraction)``.

    Args:
        threshold: source probability of its class from which a pixel counts, in [0.5, 1].
        activation: ``"sigmoid"`` (one channel) or ``"softmax"`` (several); the source's
            probabilities must come from the same one.
        ce_weight: weight of the cross-entropy term (>= 0).
        dice_weight: weight of the Dice term (>= 0); 0 gives FixMatch's cross entropy alone.
    """

    def __init__(
        self, threshold: float = 0.95, activation: str = "sigmoid", ce_weight: float = 1.0, dice_weight: float = 1.0
    ) -> None:
        super().__init__()
        if not 0.5 <= threshold <= 1.0:
            raise ValueError(f"confidence threshold must lie in [0.5, 1], got {threshold!r}.")
        if activation not in ("sigmoid", "softmax"):
            raise ValueError(f"activation must be 'sigmoid' or 'softmax', got {activation!r}.")
        if min(ce_weight, dice_weight) < 0 or ce_weight + dice_weight == 0:
            raise ValueError(f"ce_weight and dice_weight must be >= 0, not both 0; got {ce_weight}, {dice_weight}.")
        self.threshold = float(threshold)
        self.activation = activation
        self.ce_weight, self.dice_weight = float(ce_weight), float(dice_weight)
        self.dice = DiceLoss(include_background=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5, reduction="none")

    def hyperparameters(self) -> dict[str, object]:
        """Logged with the run."""
        return {
            "unsup_loss": type(self).__name__,
            "confidence_threshold": self.threshold,
            "unsup_ce_weight": self.ce_weight,
            "unsup_dice_weight": self.dice_weight,
        }

    def forward(self, student_logits: torch.Tensor, source_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and the fraction of confident pixels."""
        if student_logits.shape != source_probs.shape:
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} and pseudo-label probabilities "
                f"{tuple(source_probs.shape)} differ in shape."
            )
        confident = confidence_mask(source_probs, self.threshold).to(student_logits.dtype)
        if self.activation == "sigmoid":
            pseudo = (source_probs > 0.5).to(student_logits.dtype)
            per_pixel = nn.functional.binary_cross_entropy_with_logits(student_logits, pseudo, reduction="none")
            foreground = torch.sigmoid(student_logits)
            student_probs, one_hot = torch.cat([1 - foreground, foreground], 1), torch.cat([1 - pseudo, pseudo], 1)
        else:
            index = source_probs.argmax(dim=1)
            per_pixel = nn.functional.cross_entropy(student_logits, index, reduction="none")[:, None]
            student_probs = torch.softmax(student_logits, dim=1)
            one_hot = nn.functional.one_hot(index, student_logits.shape[1]).movedim(-1, 1).to(student_logits.dtype)
        loss = self.ce_weight * (per_pixel * confident).sum() / per_pixel.numel()
        present = (one_hot * confident).flatten(2).sum(dim=(0, 2)) > 0  # classes the confident pixels hold
        if self.dice_weight > 0 and bool(present.any()):
            per_class = self.dice(student_probs * confident, one_hot * confident).flatten()
            loss = loss + self.dice_weight * per_class[present].mean()
        return loss, confident.mean()


def class_regions(maps: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Class regions of a label or of class probabilities, as ``B, K, *spatial`` booleans (one-hot).

    One channel (a binary label or sigmoid probabilities): ``K = 2``, background (``<= threshold``)
    then foreground (``> threshold``). Several channels (one-hot labels or softmax probabilities):
    ``K`` = the channels, each pixel in the region of its arg-max channel.
    """
    if maps.shape[1] == 1:
        foreground = maps > threshold
        return torch.cat([~foreground, foreground], dim=1)
    index = maps.argmax(dim=1, keepdim=True)
    return torch.zeros_like(maps, dtype=torch.bool).scatter_(1, index, True)


def _per_class_masks(holes: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """``holes`` (``B, *spatial`` or ``B, 1, *spatial``) as ``B, 1, *spatial`` booleans, checked against ``regions``."""
    if holes.dim() == regions.dim() - 1:
        holes = holes.unsqueeze(1)
    if holes.shape[0] != regions.shape[0] or holes.shape[2:] != regions.shape[2:] or holes.shape[1] != 1:
        raise ValueError(f"holes {tuple(holes.shape)} do not match class regions {tuple(regions.shape)}")
    return holes.bool()


class ClassWiseReconstructionLoss(nn.Module):
    """Reconstruction error on the masked pixels, averaged within each class region, then over the classes.

    S4MIM's class-wise masked image modelling (arXiv 2411.08756), reduced to its weighting: for each
    class ``k`` with masked pixels in the batch, the mean per-pixel error over the masked pixels of
    that class (pooled over the batch); the loss is the mean of these class means. So a small
    foreground (a polyp, a few glands) weighs as much as the large background, where a plain mean
    over masked pixels would be dominated by the background. Visible pixels are never counted.
    A batch without any masked pixel gives 0.

    Args:
        distance: ``"l1"`` (default: absolute error, as SimMIM and this project's pretraining use on
            masked pixels; less dominated than squared error by the few pixels that strong colour
            augmentation pushes far, so the class means stay comparable) or ``"mse"`` (MAE's choice).

    ``forward(reconstruction, target, holes, regions)``: ``reconstruction`` and ``target``
    ``B, C, *spatial`` (the error is averaged over channels), ``holes`` the masked pixels
    (``B, *spatial`` or ``B, 1, *spatial``), ``regions`` the ``B, K, *spatial`` class regions
    (:func:`class_regions` of a label or of a teacher's probabilities).
    """

    def __init__(self, distance: str = "l1") -> None:
        super().__init__()
        if distance not in ("l1", "mse"):
            raise ValueError(f"distance must be 'l1' or 'mse', got {distance!r}.")
        self.distance = distance

    def hyperparameters(self) -> dict[str, object]:
        """Logged with the run."""
        return {"mim_loss": type(self).__name__, "mim_distance": self.distance}

    def forward(
        self, reconstruction: torch.Tensor, target: torch.Tensor, holes: torch.Tensor, regions: torch.Tensor
    ) -> torch.Tensor:
        """The mean over present classes of each class's mean error on its masked pixels."""
        if reconstruction.shape != target.shape:
            raise ValueError(f"reconstruction {tuple(reconstruction.shape)} and target {tuple(target.shape)} differ")
        holes = _per_class_masks(holes, regions)
        difference = reconstruction - target
        error = (difference.abs() if self.distance == "l1" else difference**2).mean(dim=1, keepdim=True)
        counted = (holes & regions.bool()).to(error.dtype)  # B, K, *spatial
        dims = [0, *range(2, counted.dim())]
        sums, counts = (error * counted).sum(dim=dims), counted.sum(dim=dims)
        present = counts > 0
        if not bool(present.any()):
            return error.sum() * 0.0  # nothing masked: zero, still part of the graph
        return (sums[present] / counts[present]).mean()


class FeatureAggregationLoss(nn.Module):
    """Pull the mean feature of each class's masked pixels towards the mean feature of its visible pixels.

    S4MIM's feature aggregation, kept simple: for each class ``k`` with both masked and visible
    pixels in the batch, the class's masked-pixel mean feature and visible-pixel mean feature
    (pooled over the batch) are compared by cosine distance ``1 - cos``; the loss is the mean over
    such classes. The visible mean is the target and is detached (stop-gradient, as in BYOL /
    SimSiam): the features of hidden pixels learn to look like those of visible pixels of their
    class, not the other way round. Cosine, not squared distance, so shrinking the features cannot
    lower the loss. No class with both kinds of pixels: 0.

    ``forward(features, holes, regions)``: ``features`` ``B, F, *spatial`` at the regions' size.
    """

    def hyperparameters(self) -> dict[str, object]:
        """Logged with the run."""
        return {"mim_feature_loss": type(self).__name__, "mim_feature_distance": "cosine, visible mean detached"}

    def forward(self, features: torch.Tensor, holes: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """Mean over classes of ``1 - cos(mean masked feature, mean visible feature)``."""
        if features.shape[0] != regions.shape[0] or features.shape[2:] != regions.shape[2:]:
            raise ValueError(f"features {tuple(features.shape)} do not match class regions {tuple(regions.shape)}")
        holes = _per_class_masks(holes, regions)
        flat = features.flatten(2)  # B, F, N
        masked = (holes & regions.bool()).flatten(2).to(flat.dtype)  # B, K, N
        visible = (~holes & regions.bool()).flatten(2).to(flat.dtype)
        n_masked, n_visible = masked.sum(dim=(0, 2)), visible.sum(dim=(0, 2))  # K
        present = (n_masked > 0) & (n_visible > 0)
        if not bool(present.any()):
            return features.sum() * 0.0
        mean_masked = torch.einsum("bfn,bkn->kf", flat, masked)[present] / n_masked[present, None]
        mean_visible = torch.einsum("bfn,bkn->kf", flat.detach(), visible)[present] / n_visible[present, None]
        return (1.0 - nn.functional.cosine_similarity(mean_masked, mean_visible, dim=1)).mean()


class StructureLoss(nn.Module):
    """Boundary-weighted BCE plus boundary-weighted soft IoU, on one sigmoid channel (PraNet's "structure loss").

    A pixel's weight is ``1 + boundary_weight * |local mean of the mask - mask|``, the local mean taken
    over a ``kernel_size`` window: pixels near the object's edge count up to ``1 + boundary_weight``
    times more, pixels deep inside or far outside count once. Both terms are computed per image and
    averaged over the batch.

    Args:
        kernel_size: odd side of the window the local mask mean is taken over (pixels).
        boundary_weight: extra weight of a pixel whose window is half object, half background (>= 0).
    """

    def __init__(self, kernel_size: int = 31, boundary_weight: float = 5.0) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size!r}.")
        if boundary_weight < 0:
            raise ValueError(f"boundary_weight must be >= 0, got {boundary_weight!r}.")
        self.kernel_size = int(kernel_size)
        self.boundary_weight = float(boundary_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` against the binary ``target``, both ``B, 1, *spatial``."""
        if logits.shape != target.shape or logits.shape[1] != 1:
            raise ValueError(
                f"StructureLoss takes one-channel logits and a target of the same shape, got "
                f"{tuple(logits.shape)} and {tuple(target.shape)}."
            )
        target = target.to(logits.dtype)
        pool = (nn.functional.avg_pool1d, nn.functional.avg_pool2d, nn.functional.avg_pool3d)[target.ndim - 3]
        local_mean = pool(target, self.kernel_size, stride=1, padding=self.kernel_size // 2, count_include_pad=True)
        weight = 1.0 + self.boundary_weight * (local_mean - target).abs()
        dims = tuple(range(1, target.ndim))
        bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        weighted_bce = (weight * bce).sum(dims) / weight.sum(dims)
        probs = torch.sigmoid(logits)
        intersection = (probs * target * weight).sum(dims)
        union = ((probs + target) * weight).sum(dims)
        weighted_iou = 1.0 - (intersection + 1.0) / (union - intersection + 1.0)
        return (weighted_bce + weighted_iou).mean()
