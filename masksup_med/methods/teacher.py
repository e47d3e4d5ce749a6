"""The teacher of semi-supervised training: an exponential moving average of the student.

Mean Teacher (Tarvainen and Valpola, 2017) keeps a copy of the network whose weights follow the
student's slowly; FixMatch / UniMatch train the student on the teacher's confident pixels only,
with the unsupervised weight ramped up over the first epochs; MaskMatch averages the teacher's
predictions over several input scales to make its pseudo-labels more reliable. The pieces here are
plain functions on tensors and modules, so each can be checked on hand-made values.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ema_update", "make_teacher", "multiscale_probabilities", "sigmoid_rampup"]


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of ``student`` (unwrapped from DistributedDataParallel) to follow it by EMA."""
    module = student.module if isinstance(student, nn.parallel.DistributedDataParallel) else student
    teacher = copy.deepcopy(module)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student`` for every parameter and float buffer.

    Integer buffers (BatchNorm's batch counter) are copied. ``momentum`` 0 copies the student.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must lie in [0, 1], got {momentum!r}.")
    module = student.module if isinstance(student, nn.parallel.DistributedDataParallel) else student
    for mine, theirs in zip(teacher.parameters(), module.parameters()):
        mine.mul_(momentum).add_(theirs.detach(), alpha=1.0 - momentum)
    for mine, theirs in zip(teacher.buffers(), module.buffers()):
        if mine.dtype.is_floating_point:
            mine.mul_(momentum).add_(theirs.detach(), alpha=1.0 - momentum)
        else:
            mine.copy_(theirs)


def sigmoid_rampup(epoch: float, length: float) -> float:
    """Mean Teacher's ramp-up ``exp(-5 (1 - t)^2)``, ``t = epoch / length`` clipped to [0, 1]; 1 if ``length`` <= 0."""
    if length <= 0:
        return 1.0
    t = min(max(float(epoch) / float(length), 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


@torch.no_grad()
def multiscale_probabilities(
    network: nn.Module, images: torch.Tensor, scales: Sequence[float] = (1.0,), activation: str = "sigmoid"
) -> torch.Tensor:
    """The network's class probabilities on ``images``, averaged over input ``scales``.

    Each scale resizes the batch (bilinear), predicts, and resizes the probabilities back to the
    input size, so all scales vote on the same pixels. Sizes are rounded to multiples of 16 so a
    UNet's skip connections line up.
    """
    spatial = images.shape[2:]
    total = None
    for scale in scales:
        size = [max(16, round(s * scale / 16) * 16) for s in spatial]
        scaled = images
        if list(size) != list(spatial):
            scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        logits = network(scaled)
        probs = torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, dim=1)
        if list(probs.shape[2:]) != list(spatial):
            probs = F.interpolate(probs, size=list(spatial), mode="bilinear", align_corners=False)
        total = probs if total is None else total + probs
    return total / len(scales)
