"""Where semi-supervised pseudo-labels come from: the EMA teacher, its burn-in, and BatchNorm statistics kept clean.

Mean Teacher (Tarvainen and Valpola, 2017) keeps a copy of the network whose weights follow the
student's slowly. Here the teacher copies the student outright during a short burn-in (momentum 0:
no average that still carries the random initial weights), then follows it with a fixed momentum.

Pseudo-labels are made in training-mode normalisation (batch statistics), as SSL4MIS's Mean Teacher
and UniMatch do, never from running statistics the masked and strong passes have pulled away from
clean images: :func:`frozen_norm_statistics` runs such passes with batch statistics while leaving
every BatchNorm's running statistics (those validation and the teacher use) untouched. The pieces
here are plain functions on tensors and modules, so each can be checked on hand-made values.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "burn_in_momentum",
    "ema_update",
    "frozen_norm_statistics",
    "make_teacher",
    "multiscale_probabilities",
    "probabilities",
    "pseudo_labelling_mode",
    "sigmoid_rampup",
    "training_mode_probabilities",
]


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of ``student`` (unwrapped from DistributedDataParallel) to follow it by EMA."""
    module = student.module if isinstance(student, nn.parallel.DistributedDataParallel) else student
    teacher = copy.deepcopy(module)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student`` for every parameter; buffers copied.

    Buffers (BatchNorm's running statistics and batch counter) are the student's, not an average:
    they are already a moving average of recent clean batches, and averaging them again keeps the
    initial running variance of 1 in the teacher for hundreds of steps (with momentum 0.99 and a
    one-epoch burn-in on GLaS, the first layer's variance was still 3.7 times the student's at step
    247, and the teacher in eval mode called every pixel foreground). ``momentum`` 0 copies the student.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must lie in [0, 1], got {momentum!r}.")
    module = student.module if isinstance(student, nn.parallel.DistributedDataParallel) else student
    for mine, theirs in zip(teacher.parameters(), module.parameters()):
        mine.mul_(momentum).add_(theirs.detach(), alpha=1.0 - momentum)
    for mine, theirs in zip(teacher.buffers(), module.buffers()):
        mine.copy_(theirs)


def burn_in_momentum(step: int, burn_in_steps: int, momentum: float) -> float:
    """EMA momentum at optimiser ``step`` (1-based): 0 (copy the student) up to ``burn_in_steps``, then ``momentum``."""
    return 0.0 if step <= burn_in_steps else float(momentum)


def sigmoid_rampup(epoch: float, length: float) -> float:
    """Mean Teacher's ramp-up ``exp(-5 (1 - t)^2)``, ``t = epoch / length`` clipped to [0, 1]; 1 if ``length`` <= 0."""
    if length <= 0:
        return 1.0
    t = min(max(float(epoch) / float(length), 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


@contextlib.contextmanager
def frozen_norm_statistics(network: nn.Module) -> Iterator[nn.Module]:
    """Inside, every BatchNorm of ``network`` normalises with the batch's statistics and updates no running ones.

    Each ``_BatchNorm`` (SyncBatchNorm included) that tracks running statistics has
    ``track_running_stats`` switched off for the duration (PyTorch then passes no running buffers
    to ``batch_norm`` in training mode: nothing is updated, not even the batch counter), and back
    on afterwards, also when the block raises. Meant for passes in training mode (masked, strong,
    feature-perturbed views, pseudo-labelling); in eval mode running statistics would not be used either.
    """
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for norm in norms:
        norm.track_running_stats = False
    try:
        yield network
    finally:
        for norm in norms:
            norm.track_running_stats = True


def probabilities(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """Class probabilities of ``logits``: sigmoid per channel or softmax over channels."""
    return torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, dim=1)


@torch.no_grad()
def multiscale_probabilities(
    network: nn.Module, images: torch.Tensor, scales: Sequence[float] = (1.0,), activation: str = "sigmoid"
) -> torch.Tensor:
    """The network's class probabilities on ``images``, averaged over input ``scales``.

    Each scale resizes the batch (bilinear), predicts, and resizes the probabilities back to the
    input size, so all scales vote on the same pixels. Sizes other than the input's (scale 1) are
    rounded to multiples of 16 so a UNet's skip connections line up.
    """
    spatial = images.shape[2:]
    total = None
    for scale in scales:
        size = list(spatial) if scale == 1.0 else [max(16, round(s * scale / 16) * 16) for s in spatial]
        scaled = images
        if list(size) != list(spatial):
            scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        probs = probabilities(network(scaled), activation)
        if list(probs.shape[2:]) != list(spatial):
            probs = F.interpolate(probs, size=list(spatial), mode="bilinear", align_corners=False)
        total = probs if total is None else total + probs
    return total / len(scales)


@contextlib.contextmanager
def pseudo_labelling_mode(network: nn.Module) -> Iterator[nn.Module]:
    """Inside, ``network`` is in training mode, running statistics frozen, no gradients; its mode restored after."""
    was_training = network.training
    network.train()
    try:
        with torch.no_grad(), frozen_norm_statistics(network):
            yield network
    finally:
        network.train(was_training)


@torch.no_grad()
def training_mode_probabilities(
    network: nn.Module, images: torch.Tensor, scales: Sequence[float] = (1.0,), activation: str = "sigmoid"
) -> torch.Tensor:
    """:func:`multiscale_probabilities` with ``network`` in training mode and its running statistics left alone.

    How the EMA teacher makes pseudo-labels (SSL4MIS never puts its teacher in eval mode): batch
    statistics of the images at hand (and dropout, if the network has any), never running statistics.
    The network's mode is put back afterwards.
    """
    with pseudo_labelling_mode(network):
        return multiscale_probabilities(network, images, scales, activation)
