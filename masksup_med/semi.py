"""Semi-supervised masked learning (MaskMatch): MaskSup on labelled images, a masked student on unlabelled ones.

Each step of :class:`MaskMatchTrainer` takes a labelled batch, scored with the MaskSup loss as in
:class:`~masksup_med.engines.MaskSupTrainer` (which it extends: same iteration, one more term), and
an unlabelled batch in two views of the same geometry: ``image`` (weakly augmented) and
``image_strong`` (the same pixels, strongly augmented in colour by the data pipeline). The teacher,
an exponential moving average of the network, predicts on the weak view, averaged over several
input scales; the student (the network being trained) sees the strong view with about 70 % of
its patches masked and learns the teacher's confident pixels
(:class:`~masksup_med.losses.ConfidentPseudoLabelLoss`), weighted by a ramp-up over the first
epochs. After every optimiser step the teacher follows the student.

Choices the MaskMatch paper does not pin down follow its family: Mean Teacher's EMA and sigmoid
ramp-up, FixMatch / UniMatch's confidence threshold and normalisation over all pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from torch import nn

from masksup_med.engines import MaskSupTrainer, rank_seed
from masksup_med.losses import ConfidentPseudoLabelLoss
from masksup_med.runtime import check_same_on_every_process
from masksup_med.teacher import ema_update, make_teacher, multiscale_probabilities, sigmoid_rampup
from masksup_med.transforms.base import RandMask
from masksup_med.transforms.patch import RandPatchMask

__all__ = ["BestNetworkSelector", "MaskMatchTrainer", "SemiKeys"]


class SemiKeys:
    """Keys of the unlabelled batch and of the extra outputs of :class:`MaskMatchTrainer`."""

    WEAK = "image"
    STRONG = "image_strong"
    UNSUP = "unsup"
    CONFIDENT = "confident_fraction"
    UNSUP_WEIGHT = "unsup_weight"


class MaskMatchTrainer(MaskSupTrainer):
    """MaskSupTrainer that also learns from unlabelled images through a masked student and an EMA teacher.

    Takes every argument of :class:`~masksup_med.engines.MaskSupTrainer`, plus:

    Args:
        unlabelled_loader: batches of unlabelled images with keys ``image`` (weak view) and
            ``image_strong`` (strong view, same geometry); cycled as often as the labelled loader needs.
        teacher: the EMA teacher (default: a frozen copy of ``network`` made here). Pass the same
            module to the validator and the checkpoint to score and keep it.
        ema_momentum: how slowly the teacher follows (``teacher <- m * teacher + (1 - m) * student``);
            early on Mean Teacher's ``min(ema_momentum, 1 - 1 / (step + 1))`` lets it catch up, so a
            short run (few steps per epoch with few labels) does not validate a teacher stuck near
            its random start.
        unsup_loss: the loss on the teacher's confident pixels (default threshold 0.95).
        unsup_weight: weight of the unsupervised term once ramped up.
        rampup_epochs: epochs over which the weight ramps up (Mean Teacher's sigmoid ramp-up).
        teacher_scales: input scales the teacher's probabilities are averaged over.
        student_masker: masks the strong view on the device (default: 70 % of 16-pixel patches).

    ``engine.state.output`` adds ``loss_unsup`` (unweighted), ``unsup_weight`` and
    ``confident_fraction`` (the share of unlabelled pixels the teacher is confident about).

    Under DistributedDataParallel the student's pass is a second forward of the wrapped network
    before the step's one backward (autograd sums both uses of a parameter before DDP averages it);
    the teacher follows the network inside the wrapper. Every process must take the same number of
    steps, so an ``epoch_length`` that differs between them fails here, and the unlabelled loader
    should have a DistributedSampler (``semi_train.json`` gives it one when ``distributed``).
    """

    def __init__(
        self,
        *args: Any,
        unlabelled_loader: Iterable,
        teacher: nn.Module | None = None,
        ema_momentum: float = 0.99,
        unsup_loss: ConfidentPseudoLabelLoss | None = None,
        unsup_weight: float = 1.0,
        rampup_epochs: float = 5.0,
        teacher_scales: Sequence[float] = (0.75, 1.0, 1.25),
        student_masker: RandMask | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= ema_momentum <= 1.0:
            raise ValueError(f"ema_momentum must lie in [0, 1], got {ema_momentum!r}.")
        self.unlabelled_loader = unlabelled_loader
        self.teacher = (teacher if teacher is not None else make_teacher(self.network)).to(self.state.device)
        self.teacher.eval()
        self.ema_momentum = float(ema_momentum)
        self.unsup_loss = unsup_loss if unsup_loss is not None else ConfidentPseudoLabelLoss()
        self.unsup_weight = float(unsup_weight)
        self.rampup_epochs = float(rampup_epochs)
        self.teacher_scales = tuple(float(s) for s in teacher_scales)
        self.student_masker = student_masker if student_masker is not None else RandPatchMask(0.7, patch_size=16)
        self.student_masker.set_random_state(rank_seed())
        self._unlabelled: Iterator | None = None
        check_same_on_every_process("epoch_length", self.state.epoch_length)

    def next_unlabelled(self) -> dict[str, Any]:
        """The next unlabelled batch, starting the loader over when it runs out.

        A sampler with ``set_epoch`` (DistributedSampler under DDP) is given the trainer's iteration at
        each start: every pass shuffles anew, the same way on every process, and again after a resume.
        """
        if self._unlabelled is not None:
            try:
                return next(self._unlabelled)
            except StopIteration:
                pass
        sampler = getattr(self.unlabelled_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(int(self.state.iteration))
        self._unlabelled = iter(self.unlabelled_loader)
        return next(self._unlabelled)

    def current_unsup_weight(self) -> float:
        """``unsup_weight`` times the ramp-up at the current (fractional) epoch."""
        epoch_length = self.state.epoch_length or 1
        progress = (self.state.iteration - 1) / epoch_length
        return self.unsup_weight * sigmoid_rampup(progress, self.rampup_epochs)

    def _views(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        def on_device(value: Any) -> torch.Tensor:
            tensor = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
            return tensor.to(self.state.device, non_blocking=self.non_blocking)

        if SemiKeys.STRONG not in batch:
            raise KeyError(
                f"MaskMatchTrainer: the unlabelled batch has no {SemiKeys.STRONG!r} (keys: {sorted(batch)}); the "
                "unlabelled pipeline must copy the weak view and augment the copy in colour only."
            )
        return on_device(batch[SemiKeys.WEAK]), on_device(batch[SemiKeys.STRONG])

    def compute_terms(self, batchdata: dict[str, Any], inputs: torch.Tensor, targets: torch.Tensor) -> dict:
        """MaskSup's terms on the labelled batch, plus the masked student's term on an unlabelled batch."""
        terms = super().compute_terms(batchdata, inputs, targets)
        weak, strong = self._views(self.next_unlabelled())
        activation = getattr(self.loss_function, "activation", "sigmoid")
        teacher_probs = multiscale_probabilities(self.teacher, weak, self.teacher_scales, activation)
        student_logits = self.inferer(self.student_masker.mask_batch(strong)[0], self.network)
        unsup, confident = self.unsup_loss(student_logits.float(), teacher_probs.float())
        weight = self.current_unsup_weight()
        terms[SemiKeys.UNSUP] = unsup
        terms["total"] = terms["total"] + weight * unsup
        self.state.output[SemiKeys.CONFIDENT] = confident.detach()
        self.state.output[SemiKeys.UNSUP_WEIGHT] = weight
        return terms

    def current_ema_momentum(self) -> float:
        """``min(ema_momentum, 1 - 1 / (step + 1))`` at the current iteration (Mean Teacher's warm-up)."""
        return min(self.ema_momentum, 1.0 - 1.0 / (self.state.iteration + 1))

    def after_step(self) -> None:
        """The teacher follows the student."""
        ema_update(self.teacher, self.network, self.current_ema_momentum())


class BestNetworkSelector:
    """Keep as the best model whichever network validates best so far: the EMA teacher or the student.

    Attach to the trainer (it attaches itself to every evaluator it watches). After each validation
    round of ``evaluators[name]``, ``metrics[name]`` is compared with the best score of any network;
    a better one writes ``networks[name]``'s weights to ``save_path`` (a plain state dict, written to
    a temporary file first). :meth:`tags` says which network and score were kept (the registered
    model's tags); :meth:`state_dict` goes in the resume checkpoint.
    """

    def __init__(
        self,
        save_path: str,
        evaluators: dict[str, Any],
        networks: dict[str, nn.Module],
        metrics: dict[str, str],
        enabled: bool = True,
    ) -> None:
        if set(evaluators) != set(networks) or set(evaluators) != set(metrics):
            raise ValueError("evaluators, networks and metrics must name the same networks")
        self.save_path = str(save_path)
        self.evaluators, self.networks, self.metrics = evaluators, networks, metrics
        self.enabled = enabled
        self.best, self.best_name, self.best_epoch = -float("inf"), "", -1

    def attach(self, engine: Any) -> None:
        """Watch every evaluator's rounds (``engine``, the trainer, only carries the handler)."""
        if not self.enabled:
            return
        from ignite.engine import Events

        for name, evaluator in self.evaluators.items():
            evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e, name=name: self.consider(name, e))

    def consider(self, name: str, evaluator: Any) -> bool:
        """Keep ``name``'s weights if its score beats every network's so far; True when it did."""
        import os

        score = float(evaluator.state.metrics[self.metrics[name]])
        if score <= self.best:
            return False
        self.best, self.best_name, self.best_epoch = score, name, int(evaluator.state.epoch)
        module = self.networks[name]
        module = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
        os.makedirs(os.path.dirname(self.save_path) or ".", exist_ok=True)
        partial = self.save_path + ".partial"
        torch.save(module.state_dict(), partial)
        os.replace(partial, self.save_path)
        return True

    def tags(self) -> dict[str, str]:
        """Which network was kept, its score and epoch."""
        return {"selected_network": self.best_name, "best_val_mean_iou": f"{self.best:.4f}",
                "best_epoch": str(self.best_epoch)}

    def state_dict(self) -> dict[str, Any]:
        """The best score so far, for resuming (the keys of :class:`~masksup_med.resume.BestMetricState`, plus which)."""
        return {"best_metric": self.best, "best_metric_epoch": self.best_epoch, "selected_network": self.best_name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.best, self.best_epoch, self.best_name = state["best_metric"], state["best_metric_epoch"], state["selected_network"]
