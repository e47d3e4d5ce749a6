"""Starting fine-tuning from pretrained weights with care: encoder-only transfer, BatchNorm statistics re-estimated
on unmasked images, a warm-up, and a lower encoder learning rate at the start.

:class:`FineTuneStartHandler` is the ignite handler (``finetune.json`` adds it to the training). On a fresh
start (not a resume) it re-initialises the decoder when ``scope`` is ``"encoder"`` (the weights file
was loaded whole by ``--pretrained_weights``), then re-estimates every BatchNorm layer's running
statistics on the training images (:func:`reestimate_batchnorm`: pretraining computed them on
half-hidden inputs). During the first part of the run it scales every update (:class:`UpdateScale`): the
whole network's linearly from 0 (warm-up, ``warmup_fraction`` of the run's iterations) and the encoder's
by a further ``encoder_lr_scale`` (for ``encoder_fraction``), so the schedule fits a short run as well as a
long one.
Scaling the update a step makes is scaling the learning rate, for any optimizer, and leaves the
optimizer's state and param groups alone, so checkpoints resume as before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from torch import nn

from masksup_med.methods.unet_parts import decoder_modules, encoder_modules

__all__ = ["TRANSFER_SCOPES", "FineTuneStartHandler", "UpdateScale", "reestimate_batchnorm", "reinitialise"]

logger = logging.getLogger(__name__)

TRANSFER_SCOPES = ("whole", "encoder")


def reinitialise(modules: Iterable[nn.Module]) -> int:
    """Fresh initialisation (each layer's ``reset_parameters``, BatchNorm statistics too) of every layer in
    ``modules``; returns how many layers were reset."""
    count = 0
    for module in modules:
        for layer in module.modules():
            if layer is not module or not list(layer.children()):
                reset = getattr(layer, "reset_parameters", None)
                if callable(reset):
                    reset()
                    count += 1
    return count


@torch.no_grad()
def reestimate_batchnorm(
    network: nn.Module, batches: Iterable[Any], max_batches: int = 50, key: str = "image", device: Any = None
) -> int:
    """Recompute every BatchNorm layer's running mean and variance as the plain average over ``batches``.

    The network's weights are not changed; its training mode is restored. Returns the batches used
    (0 leaves the statistics as they were: a network without BatchNorm, or no batch).

    Args:
        network: the network (any module with ``_BatchNorm`` layers).
        batches: dictionaries holding ``key`` (``B, C, H, W``) or plain tensors: unmasked images.
        max_batches: stop after this many.
        key: the image key of dictionary batches.
        device: where the images go (default: the network's).
    """
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or max_batches < 1:
        return 0
    device = device if device is not None else next(network.parameters()).device
    saved = {m: (m.momentum, {k: v.clone() for k, v in m.state_dict().items()}) for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    was_training = network.training
    network.train()
    used = 0
    try:
        for batch in batches:
            if used >= max_batches:
                break
            images = batch[key] if isinstance(batch, dict) else batch
            images = images.as_tensor() if isinstance(images, MetaTensor) else torch.as_tensor(images)
            network(images.to(device))
            used += 1
    finally:
        network.train(was_training)
        for m, (momentum, state) in saved.items():
            m.momentum = momentum
            if used == 0:
                m.load_state_dict(state)
    return used


class UpdateScale:
    """Scale the update of chosen parameters by a factor that depends on the iteration.

    ``factor(iteration)`` (1-based) returns the scale for that step; at 1 nothing is done.

    Args:
        parameters: the parameters whose updates are scaled.
        factor: iteration -> scale.
    """

    def __init__(self, parameters: Iterable[nn.Parameter], factor: Any) -> None:
        self.parameters = [p for p in parameters if p.requires_grad]
        self.factor = factor
        self.before: list[torch.Tensor] | None = None

    def snapshot(self, iteration: int) -> None:
        """Remember the parameters before step ``iteration`` (only when that step is scaled)."""
        self.before = [p.detach().clone() for p in self.parameters] if self.factor(iteration) != 1 else None

    @torch.no_grad()
    def apply(self, iteration: int) -> None:
        """Shrink step ``iteration``'s update: ``p = before + factor * (p - before)``."""
        if self.before is None:
            return
        scale = float(self.factor(iteration))
        for p, old in zip(self.parameters, self.before):
            p.copy_(old + scale * (p - old))
        self.before = None


class FineTuneStartHandler:
    """The start of fine-tuning from pretrained weights (see the module's docstring).

    Args:
        network: the network being fine-tuned (a MONAI ``UNet``).
        pretrained_weights: the weights file given; None or "": the handler does nothing.
        scope: ``"whole"`` keeps what was loaded; ``"encoder"`` re-initialises the decoder.
        batches: the training loader (unmasked images) for the BatchNorm statistics.
        bn_batches: batches averaged for them (0: keep the pretrained statistics).
        warmup_fraction: every update grows linearly to full size over this fraction of the run's
            iterations (``max_epochs * epoch_length``, known when the run starts; 0: no warm-up).
        encoder_lr_scale: the encoder's updates are further scaled by this ...
        encoder_fraction: ... during this first fraction of the run's iterations (0: never).
    """

    def __init__(
        self,
        network: nn.Module,
        pretrained_weights: str | None,
        scope: str = "encoder",
        batches: Iterable[Any] = (),
        bn_batches: int = 50,
        warmup_fraction: float = 0.05,
        encoder_lr_scale: float = 0.1,
        encoder_fraction: float = 0.1,
    ) -> None:
        if scope not in TRANSFER_SCOPES:
            raise ValueError(f"transfer_scope must be one of {', '.join(TRANSFER_SCOPES)}, got {scope!r}")
        if (
            not 0 < float(encoder_lr_scale) <= 1
            or not 0 <= float(warmup_fraction) <= 1
            or not (0 <= float(encoder_fraction) <= 1)
        ):
            raise ValueError(
                f"invalid fine-tuning start: encoder_lr_scale={encoder_lr_scale} (in (0, 1]), "
                f"warmup_fraction={warmup_fraction}, encoder_fraction={encoder_fraction} (in [0, 1])"
            )
        self.network = getattr(network, "module", network)
        self.enabled = pretrained_weights not in (None, "")
        self.scope, self.batches, self.bn_batches = scope, batches, int(bn_batches)
        self.warmup_fraction, self.encoder_fraction = float(warmup_fraction), float(encoder_fraction)
        self.encoder_scale = float(encoder_lr_scale)
        self.warmup = self.encoder_iterations = 0  # iterations, set from the run's length when it starts
        encoder = {id(p) for m in encoder_modules(self.network) for p in m.parameters()}
        params = list(self.network.parameters())
        self.scales = [
            UpdateScale([p for p in params if id(p) in encoder], self.encoder_factor),
            UpdateScale([p for p in params if id(p) not in encoder], self.warmup_factor),
        ]

    def warmup_factor(self, iteration: int) -> float:
        """The whole network's update scale at ``iteration`` (1-based)."""
        return min(1.0, iteration / self.warmup) if self.warmup else 1.0

    def encoder_factor(self, iteration: int) -> float:
        """The encoder's update scale at ``iteration``: the warm-up's, times ``encoder_lr_scale`` at the start."""
        return self.warmup_factor(iteration) * (self.encoder_scale if iteration <= self.encoder_iterations else 1.0)

    def iterations(self, engine: Engine) -> int:
        """The run's iterations (``max_epochs * epoch_length``) and, from them, the warm-up's and the slow encoder's."""
        total = int(engine.state.max_epochs or 0) * int(engine.state.epoch_length or 0)
        self.warmup = max(1, round(self.warmup_fraction * total)) if self.warmup_fraction else 0
        self.encoder_iterations = round(self.encoder_fraction * total)
        return total

    def start(self, engine: Engine) -> None:
        """Size the schedule from the run's length; on a fresh start also the transfer scope and the BatchNorm
        statistics (a resumed run's checkpoint, loaded after this, replaces the network)."""
        total = self.iterations(engine)
        if engine.state.iteration > 0:
            return  # resumed: the checkpoint holds the fine-tuned network
        reset = reinitialise(decoder_modules(self.network)) if self.scope == "encoder" else 0
        used = reestimate_batchnorm(self.network, self.batches, self.bn_batches)
        logger.info(
            f"fine-tuning from pretrained weights: {self.scope} transferred ({reset} decoder layers re-initialised), "
            f"BatchNorm statistics from {used} batches of unmasked images, warm-up {self.warmup} of {total} "
            f"iterations, encoder updates x{self.encoder_scale} for {self.encoder_iterations}"
        )

    def attach(self, engine: Engine) -> None:
        """Hook the start and every iteration (when pretrained weights were given)."""
        if not self.enabled:
            return
        engine.add_event_handler(Events.STARTED, self.start)
        for scale in self.scales:
            engine.add_event_handler(Events.ITERATION_STARTED, lambda e, s=scale: s.snapshot(e.state.iteration))
            engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e, s=scale: s.apply(e.state.iteration))
