"""Semi-supervised masked learning (MaskMatch): weak-to-strong consistency with a masked student.

Each step of :class:`MaskMatchTrainer` takes a labelled batch and an unlabelled batch in two views of
the same geometry: ``image`` (weakly augmented) and ``image_strong`` (the same pixels, strongly
augmented in colour by the data pipeline). The labelled batch is scored with the trainer's
:class:`~masksup_med.methods.losses.MaskSupLoss`, by default with a2 = a3 = 0 (``semi_train.json``):
the plain segmentation loss of the supervised control, so a comparison measures the unlabelled
images alone; MaskSup's masked terms are an option.

Pseudo-labels come from one of two sources (``pseudo_label_source``):

- ``"teacher"`` (default): the EMA teacher, in training-mode normalisation (batch statistics, as
  SSL4MIS's Mean Teacher), optionally averaged over input scales (``teacher_scales``, default 1 only);
  on GLaS (3 seeds, a quarter and an eighth of the labels) it beat the online source on 6 of 6 seed
  pairs, by 0.023 and 0.066 test mIoU on average, its pseudo-labels closer to the held-back masks;
- ``"online"`` (UniMatch): the network itself, in training mode, in one forward pass with the
  labelled batch (the weak view joins it; its logits are detached).

The network then learns the confident pixels of the pseudo-label
(:class:`~masksup_med.methods.losses.ConfidentPseudoLabelLoss`: cross entropy + Dice with an ignore mask)
through up to three branches, each a config weight:

- ``strong``: the strong view with CutMix (:class:`~masksup_med.transforms.RandCutMix`: image and
  pseudo-label mixed alike);
- ``feature``: the weak view with its features dropped out (:class:`~masksup_med.methods.perturbation.FeatureDropout`);
- ``masked``: the strong view with about 70 % of its patches masked (MaskMatch's masked student).

The unlabelled term is the weighted mean of the branches, times ``unsup_weight`` (1: as heavy as the
labelled loss), from the first step (the threshold gates; a ramp-up is an option).

BatchNorm: only the clean passes (labelled batch, and the weak view with the online source) update
running statistics; the masked labelled pass and every unlabelled branch run under
:func:`~masksup_med.methods.teacher.frozen_norm_statistics`, so the statistics that validation and the
teacher use describe clean images. The EMA teacher copies the network during a burn-in
(``ema_burn_in_epochs``), then follows it with ``ema_momentum``; it is validated and may be kept as
the best model whichever source makes the pseudo-labels.

Optionally (``mim_network``, S4MIM-style class-wise masked image modelling, arXiv 2411.08756), both
masked passes (the labelled batch's masked copy and the student's masked strong view) also
reconstruct their input, through a head on the network's penultimate features
(:class:`~masksup_med.methods.mim.ReconstructionHeads`). The reconstruction is scored on the masked pixels
only, class by class, with the label's classes on labelled images and the pseudo-label
on unlabelled ones (:class:`~masksup_med.methods.losses.ClassWiseReconstructionLoss`); an optional term pulls
the mean feature of each class's masked pixels towards that of its visible pixels
(:class:`~masksup_med.methods.losses.FeatureAggregationLoss`). The head is dropped after training: the
validated, checkpointed and registered network is the plain segmentation network.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from monai.data import MetaTensor
from torch import nn

from masksup_med.errors import ConfigError
from masksup_med.methods.losses import (
    ClassWiseReconstructionLoss,
    ConfidentPseudoLabelLoss,
    FeatureAggregationLoss,
    class_regions,
    confidence_mask,
)
from masksup_med.methods.masksup import MaskSupTrainer, rank_seed
from masksup_med.methods.mim import MIMOutputs, ReconstructionHeads
from masksup_med.methods.perturbation import FeatureDropout
from masksup_med.methods.teacher import (
    burn_in_momentum,
    ema_update,
    frozen_norm_statistics,
    make_teacher,
    probabilities,
    sigmoid_rampup,
    training_mode_probabilities,
)
from masksup_med.run.checkpoints import unreadable_reason
from masksup_med.run.files import save_atomically
from masksup_med.run.runtime import check_same_on_every_process
from masksup_med.transforms.base import RandMask
from masksup_med.transforms.cutmix import RandCutMix
from masksup_med.transforms.patch import RandPatchMask

__all__ = [
    "PSEUDO_LABEL_SOURCES",
    "BestNetworkSelectionHandler",
    "MaskMatchTrainer",
    "MaskedView",
    "SemiKeys",
    "check_semi_settings",
]

logger = logging.getLogger(__name__)

PSEUDO_LABEL_SOURCES = ("online", "teacher")


def check_semi_settings(
    pseudo_label_source: str,
    ema_momentum: float,
    ema_burn_in_epochs: float,
    branch_weights: Sequence[float],
    teacher_scales: Sequence[float],
) -> None:
    """Refuse, with :class:`ConfigError`, a MaskMatch setting that cannot run.

    ``semi_train.json`` calls it in ``initialize``, before the output folder is claimed, so a bad
    setting writes nothing; :class:`MaskMatchTrainer` calls it too. ``branch_weights`` are the strong,
    feature and masked branches' weights.
    """
    if pseudo_label_source not in PSEUDO_LABEL_SOURCES:
        raise ConfigError(f"pseudo_label_source must be one of {PSEUDO_LABEL_SOURCES}, got {pseudo_label_source!r}.")
    if not 0.0 <= ema_momentum <= 1.0:
        raise ConfigError(f"ema_momentum must lie in [0, 1], got {ema_momentum!r}.")
    if ema_burn_in_epochs < 0:
        raise ConfigError(f"ema_burn_in_epochs must be >= 0, got {ema_burn_in_epochs!r}.")
    if len(branch_weights) != len(SemiKeys.BRANCHES):
        raise ConfigError(f"branch_weights must hold one weight per branch {SemiKeys.BRANCHES}, got {branch_weights}.")
    weights = dict(zip(SemiKeys.BRANCHES, map(float, branch_weights)))
    if min(weights.values()) < 0 or sum(weights.values()) == 0:
        raise ConfigError(f"the branch weights must be >= 0 and not all 0, got {weights}.")
    if pseudo_label_source == "online" and tuple(map(float, teacher_scales)) != (1.0,):
        raise ConfigError(
            f"teacher_scales {list(teacher_scales)} only apply to pseudo_label_source 'teacher'; the "
            "online source predicts once, at scale 1, in the labelled batch's pass."
        )


class SemiKeys:
    """Keys of the unlabelled batch and of the extra outputs of :class:`MaskMatchTrainer`."""

    WEAK = "image"
    STRONG = "image_strong"
    UNSUP = "unsup"
    BRANCHES = ("strong", "feature", "masked")
    CONFIDENT = "confident_fraction"
    FOREGROUND = "pseudo_foreground_fraction"
    UNSUP_WEIGHT = "unsup_weight"
    MIM = "mim"
    MIM_FEATURE = "mim_feature"


class MaskedView(NamedTuple):
    """One masked pass of masked image modelling: what was hidden, what the network made of it, whose class."""

    target: torch.Tensor  # the image before masking, B, C, *spatial
    holes: torch.Tensor  # the masked pixels, B, *spatial
    outputs: MIMOutputs  # the pass's segmentation, reconstruction and features
    regions: torch.Tensor | None = None  # B, K, *spatial class regions (label or pseudo-label)


class MaskMatchTrainer(MaskSupTrainer):
    """MaskSupTrainer that also learns from unlabelled images: weak-to-strong pseudo-labels, CutMix, features, masks.

    Takes every argument of :class:`~masksup_med.methods.masksup.MaskSupTrainer` (``single_pass`` excepted:
    it would let the masked pass update BatchNorm's statistics), plus:

    Args:
        unlabelled_loader: batches of unlabelled images with keys ``image`` (weak view) and
            ``image_strong`` (strong view, same geometry); cycled as often as the labelled loader needs.
        pseudo_label_source: ``"teacher"`` (the EMA teacher, training-mode normalisation) or
            ``"online"`` (the network, training mode, one pass with the labelled batch).
        teacher: the EMA teacher (default: a frozen copy of ``network`` made here). Pass the same
            module to the validator and the checkpoint to score and keep it.
        ema_momentum: how slowly the teacher follows after the burn-in
            (``teacher <- m * teacher + (1 - m) * student``).
        ema_burn_in_epochs: epochs (fractions allowed) during which the teacher copies the network
            (momentum 0), so it never averages in the random initial weights.
        unsup_loss: the loss on the pseudo-label's confident pixels (default threshold 0.95, CE + Dice).
        unsup_weight: weight of the unlabelled term (the weighted mean of the branches).
        rampup_epochs: epochs over which the weight ramps up (Mean Teacher's sigmoid ramp-up); 0: none.
        teacher_scales: input scales the teacher's probabilities are averaged over (``"teacher"`` only).
        cutmix: mixes the strong view and its pseudo-label alike (default :class:`~masksup_med.transforms.RandCutMix`,
            p 0.5, 2-40 % of the area; ``RandCutMix(prob=0)`` does not mix).
        feature_perturbation: the feature branch's dropout (default
            :class:`~masksup_med.methods.perturbation.FeatureDropout`, p 0.5 on every MONAI ``SkipConnection``).
        strong_weight, feature_weight, masked_weight: weights of the three branches (>= 0, not all 0);
            a branch of weight 0 is not run (the masked one still is for masked image modelling).
        student_masker: masks the strong view on the device (default: 70 % of 16-pixel patches).
        mim_network: turns on class-wise masked image modelling: a
            :class:`~masksup_med.methods.mim.ReconstructionHeads` around ``network`` (its ``segmenter`` must be
            ``network`` itself; the optimiser must update its head). Both masked passes run through it
            (called directly, not through ``inferer``: a whole-image pass, as SimpleInferer makes).
            The teacher, validation and the best checkpoint use ``network`` alone. The labelled batch's
            masked pass needs a ``batch_masker`` (which says which pixels it hid); with a2 = a3 = 0
            there is no such pass and only unlabelled images are reconstructed.
        mim_loss: the reconstruction loss (default
            :class:`~masksup_med.methods.losses.ClassWiseReconstructionLoss`, L1).
        mim_weight: its weight (constant: the reconstruction target needs no teacher, so no ramp-up).
        mim_feature_loss: the feature-aggregation loss (default
            :class:`~masksup_med.methods.losses.FeatureAggregationLoss`).
        mim_feature_weight: its weight; 0 (default) logs the term without training on it.

    ``engine.state.output`` adds ``loss_unsup`` (the branches' weighted mean, before ``unsup_weight``),
    ``loss_unsup_<branch>`` for each branch run, ``unsup_weight``, ``confident_fraction`` (the share of
    unlabelled pixels the pseudo-label is confident about) and ``pseudo_foreground_fraction`` (the share
    it calls foreground); with ``mim_network`` also ``loss_mim`` and ``loss_mim_feature`` (unweighted).

    Under DistributedDataParallel the unlabelled branches are more forwards of the wrapped network
    before the step's one backward (autograd sums all uses of a parameter before DDP averages it);
    the teacher follows the network inside the wrapper. Every process must take the same number of
    steps, so an ``epoch_length`` that differs between them fails here, and the unlabelled loader
    should have a DistributedSampler (``semi_train.json`` gives it one when ``distributed``).
    ``mim_network`` does not run under DDP yet: it is refused at start.
    """

    def __init__(
        self,
        *args: Any,
        unlabelled_loader: Iterable,
        pseudo_label_source: str = "teacher",
        teacher: nn.Module | None = None,
        ema_momentum: float = 0.99,
        ema_burn_in_epochs: float = 1.0,
        unsup_loss: ConfidentPseudoLabelLoss | None = None,
        unsup_weight: float = 1.0,
        rampup_epochs: float = 0.0,
        teacher_scales: Sequence[float] = (1.0,),
        cutmix: RandCutMix | None = None,
        feature_perturbation: FeatureDropout | None = None,
        strong_weight: float = 1.0,
        feature_weight: float = 1.0,
        masked_weight: float = 1.0,
        student_masker: RandMask | None = None,
        mim_network: ReconstructionHeads | None = None,
        mim_loss: ClassWiseReconstructionLoss | None = None,
        mim_weight: float = 1.0,
        mim_feature_loss: FeatureAggregationLoss | None = None,
        mim_feature_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.single_pass:
            raise ConfigError(
                "MaskMatchTrainer does not take single_pass=True: the masked pass would update BatchNorm's "
                "running statistics together with the clean one."
            )
        weights = (strong_weight, feature_weight, masked_weight)
        check_semi_settings(pseudo_label_source, ema_momentum, ema_burn_in_epochs, weights, teacher_scales)
        self.branch_weights = {name: float(w) for name, w in zip(SemiKeys.BRANCHES, weights)}
        self.teacher_scales = tuple(float(s) for s in teacher_scales)
        self.pseudo_label_source = pseudo_label_source
        self.unlabelled_loader = unlabelled_loader
        self.teacher = (teacher if teacher is not None else make_teacher(self.network)).to(self.state.device)
        self.teacher.eval()
        self.ema_momentum = float(ema_momentum)
        self.ema_burn_in_epochs = float(ema_burn_in_epochs)
        self.unsup_loss = unsup_loss if unsup_loss is not None else ConfidentPseudoLabelLoss()
        supervised_activation = getattr(self.loss_function, "activation", self.unsup_loss.activation)
        if supervised_activation != self.unsup_loss.activation:
            raise ConfigError(
                f"the supervised loss uses activation {supervised_activation!r} but unsup_loss uses "
                f"{self.unsup_loss.activation!r}: the teacher's pseudo-labels would not match the "
                "student's loss. Set both (loss#activation and unsup_loss#activation) alike."
            )
        self.unsup_weight = float(unsup_weight)
        self.rampup_epochs = float(rampup_epochs)
        self.cutmix = cutmix if cutmix is not None else RandCutMix()
        self.cutmix.set_random_state(rank_seed())
        self.feature_perturbation = feature_perturbation if feature_perturbation is not None else FeatureDropout()
        if self.branch_weights["feature"] > 0:
            self.feature_perturbation.modules(self.network)  # a network it cannot perturb fails here, not at step 1
        self.student_masker = student_masker if student_masker is not None else RandPatchMask(0.7, patch_size=16)
        self.student_masker.set_random_state(rank_seed())
        self._unlabelled: Iterator | None = None
        self._joined_weak: torch.Tensor | None = None
        self._weak_logits: torch.Tensor | None = None
        check_same_on_every_process("epoch_length", self.state.epoch_length)
        self.mim_network = mim_network
        self.mim_loss = mim_loss if mim_loss is not None else ClassWiseReconstructionLoss()
        self.mim_feature_loss = mim_feature_loss if mim_feature_loss is not None else FeatureAggregationLoss()
        self.mim_weight, self.mim_feature_weight = float(mim_weight), float(mim_feature_weight)
        self._mim_views: list[MaskedView] = []
        if mim_network is not None:
            self._check_mim_network(mim_network)

    def _check_mim_network(self, mim_network: ReconstructionHeads) -> None:
        """Refuse at start what would train the head wrongly or not at all."""
        if isinstance(self.network, nn.parallel.DistributedDataParallel):
            raise TypeError(
                "masked image modelling (mim_network, semi_mim.json) does not run under "
                "DistributedDataParallel yet: train it in one process."
            )
        if min(self.mim_weight, self.mim_feature_weight) < 0:
            raise ConfigError(
                f"mim_weight and mim_feature_weight must be >= 0, got {self.mim_weight}, {self.mim_feature_weight}."
            )
        if mim_network.segmenter is not self.network:
            raise ConfigError("mim_network must wrap the trainer's network itself (its segmenter is another module).")
        optimised = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        if not all(id(p) in optimised for p in mim_network.head.parameters()):
            raise ConfigError(
                "the optimiser does not update the reconstruction head: build it from "
                "mim_network.parameters() (the network's and the head's)."
            )
        if self.loss_function.uses_masked_pass and self.batch_masker is None:
            raise ConfigError(
                "masked image modelling on labelled images needs batch_masker (it says which pixels "
                "were hidden); a masked copy from the data pipeline does not."
            )

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

    def forward_passes(
        self, inputs: torch.Tensor, masked: torch.Tensor | None, holes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The clean pass (joined by the weak view with the online source) and the masked pass, if any.

        Only the clean pass updates BatchNorm's running statistics. With masked image modelling the
        masked pass reconstructs too (:meth:`compute_terms`).
        """
        weak = self._joined_weak
        if weak is None:
            pred = self.inferer(inputs, self.network)
        else:
            both = self.inferer(torch.cat([_plain(inputs), weak]), self.network)
            pred, self._weak_logits = both.split([inputs.shape[0], weak.shape[0]])
        if masked is None:
            return pred, None
        if self.mim_network is not None and holes is None:
            raise ValueError("masked image modelling needs the masked pixels of the labelled batch: pass batch_masker.")
        with frozen_norm_statistics(self.network):
            if self.mim_network is None:
                return pred, self.inferer(masked, self.network)
            outputs = self.mim_network.outputs(masked)
        self._mim_views.append(MaskedView(_plain(inputs), holes, outputs))
        return pred, outputs.segmentation

    def pseudo_label_probabilities(self, weak: torch.Tensor) -> torch.Tensor:
        """The source's class probabilities on the weak view (no gradient)."""
        activation = self.unsup_loss.activation
        if self.pseudo_label_source == "online":
            if self._weak_logits is None:
                raise RuntimeError("the online source's weak logits are missing: the clean pass did not run.")
            return probabilities(self._weak_logits.detach().float(), activation)
        return training_mode_probabilities(self.teacher, weak, self.teacher_scales, activation).float()

    def compute_terms(self, batchdata: dict[str, Any], inputs: torch.Tensor, targets: torch.Tensor) -> dict:
        """The labelled batch's terms, plus the unlabelled branches on a pseudo-labelled unlabelled batch.

        With masked image modelling, also the class-wise reconstruction and feature terms of both masked passes.
        """
        self._mim_views, self._weak_logits = [], None
        if self.mim_network is not None:
            self.mim_network.train()  # the head too (the engine puts only ``network`` in training mode)
        weak, strong = self._views(self.next_unlabelled())
        self._joined_weak = weak if self.pseudo_label_source == "online" else None
        try:
            terms = super().compute_terms(batchdata, inputs, targets)
        finally:
            self._joined_weak = None
        labelled = [view._replace(regions=class_regions(_plain(targets))) for view in self._mim_views]
        source = self.pseudo_label_probabilities(weak)
        self._weak_logits = None
        branches = self.unlabelled_branches(weak, strong, source, labelled)
        weights = {name: self.branch_weights[name] for name in branches}
        unsup = sum(weights[name] * value for name, value in branches.items()) / max(sum(weights.values()), 1e-12)
        weight = self.current_unsup_weight()
        terms[SemiKeys.UNSUP] = unsup
        terms.update({f"{SemiKeys.UNSUP}_{name}": value for name, value in branches.items()})
        terms["total"] = terms["total"] + weight * unsup
        if self.mim_network is not None:
            mim, feature = self.mim_terms(self._mim_views)
            terms[SemiKeys.MIM], terms[SemiKeys.MIM_FEATURE] = mim, feature
            terms["total"] = terms["total"] + self.mim_weight * mim + self.mim_feature_weight * feature
            self._mim_views = []
        confident = confidence_mask(source, self.unsup_loss.threshold).float().mean()
        self.state.output[SemiKeys.CONFIDENT] = confident.detach()
        self.state.output[SemiKeys.FOREGROUND] = foreground_fraction(source)
        self.state.output[SemiKeys.UNSUP_WEIGHT] = weight
        return terms

    def unlabelled_branches(
        self, weak: torch.Tensor, strong: torch.Tensor, source: torch.Tensor, labelled: list[MaskedView]
    ) -> dict[str, torch.Tensor]:
        """Each branch's loss against the pseudo-label (``source``); BatchNorm's running statistics untouched.

        ``strong``: the CutMixed strong view against the pseudo-label mixed alike; ``feature``: the weak
        view with dropped-out features; ``masked``: the masked strong view (with masked image modelling
        it also reconstructs, and joins ``labelled``'s masked views in ``self._mim_views``).
        """
        losses: dict[str, torch.Tensor] = {}
        with frozen_norm_statistics(self.network):
            if self.branch_weights["strong"] > 0:
                (mixed, mixed_source), _ = self.cutmix(strong, source)
                losses["strong"] = self.unsup_loss(self.inferer(mixed, self.network).float(), mixed_source)[0]
            if self.branch_weights["feature"] > 0:
                with self.feature_perturbation.applied_to(self.network):
                    perturbed = self.inferer(weak, self.network)
                losses["feature"] = self.unsup_loss(perturbed.float(), source)[0]
            if self.branch_weights["masked"] > 0 or self.mim_network is not None:
                masked_strong, holes = self.student_masker.mask_batch(strong)
                if self.mim_network is None:
                    masked_logits = self.inferer(masked_strong, self.network)
                else:
                    outputs = self.mim_network.outputs(masked_strong)
                    masked_logits = outputs.segmentation
                    self._mim_views = [*labelled, MaskedView(strong, holes, outputs, class_regions(source))]
                if self.branch_weights["masked"] > 0:
                    losses["masked"] = self.unsup_loss(masked_logits.float(), source)[0]
        return losses

    def mim_terms(self, views: Sequence[MaskedView]) -> tuple[torch.Tensor, torch.Tensor]:
        """The reconstruction and feature-aggregation losses of the masked passes, pooled over them.

        The reconstruction target is the image before masking, clipped to [0, 1] (the sigmoid's
        range; colour augmentation may push a few pixels out). The feature term is computed
        without gradients when its weight is 0 (logged only).
        """

        def cat(parts: list[torch.Tensor]) -> torch.Tensor:
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        if len({v.regions.shape[1] for v in views}) > 1:
            raise ValueError(
                "masked image modelling: the labels and the teacher's pseudo-labels give different "
                f"numbers of classes ({[v.regions.shape[1] for v in views]}); labels must be binary "
                "(one channel) or one-hot, as the network's output."
            )
        target = cat([v.target.float().clamp(0.0, 1.0) for v in views])
        holes = cat([v.holes.reshape(v.holes.shape[0], *v.target.shape[2:]) for v in views])
        regions = cat([v.regions for v in views])
        reconstruction = cat([v.outputs.reconstruction.float() for v in views])
        mim = self.mim_loss(reconstruction, target, holes, regions)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.mim_feature_weight > 0):
            feature = self.mim_feature_loss(cat([v.outputs.features.float() for v in views]), holes, regions)
        return mim, feature

    def ema_burn_in_steps(self) -> int:
        """Optimiser steps of the burn-in: ``ema_burn_in_epochs`` times the epoch length, rounded."""
        return round(self.ema_burn_in_epochs * (self.state.epoch_length or 1))

    def current_ema_momentum(self) -> float:
        """0 during the burn-in (the teacher copies the network), ``ema_momentum`` after it."""
        return burn_in_momentum(int(self.state.iteration), self.ema_burn_in_steps(), self.ema_momentum)

    def after_step(self) -> None:
        """The teacher follows the student."""
        ema_update(self.teacher, self.network, self.current_ema_momentum())


def foreground_fraction(probs: torch.Tensor) -> torch.Tensor:
    """The share of pixels whose most likely class is foreground (> 0.5 for one channel, arg-max != 0 for several)."""
    foreground = probs > 0.5 if probs.shape[1] == 1 else probs.argmax(dim=1) != 0
    return foreground.float().mean().detach()


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A batch without its per-sample metadata (MetaTensor -> Tensor)."""
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


class BestNetworkSelectionHandler:
    """Keep as the best model whichever network validates best so far: the EMA teacher or the student.

    Attach to the trainer (it attaches itself to every evaluator it watches). After each validation
    round of ``evaluators[name]``, ``metrics[name]`` is compared with the best score of any network;
    a better one writes ``networks[name]``'s weights to ``save_path`` (a plain state dict, written to
    a temporary file first). :meth:`tags` says which network and score were kept (the registered
    model's tags); :meth:`state_dict` goes in the resume checkpoint.

    Args:
        save_path: the best model's file (``models/model.pt``).
        evaluators: validation evaluator of each network, by name (e.g. ``teacher``, ``student``).
        networks: the network each evaluator scores, by the same names.
        metrics: the key metric of each evaluator, by the same names.
        enabled: False (processes other than rank 0 under DDP) attaches nothing.
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
        score = float(evaluator.state.metrics[self.metrics[name]])
        if score <= self.best:
            return False
        self.best, self.best_name, self.best_epoch = score, name, int(evaluator.state.epoch)
        module = self.networks[name]
        module = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
        save_atomically(module.state_dict(), self.save_path)
        return True

    def tags(self) -> dict[str, str]:
        """Which network was kept, its score and epoch."""
        return {
            "selected_network": self.best_name,
            "best_val_mean_iou": f"{self.best:.4f}",
            "best_epoch": str(self.best_epoch),
        }

    def state_dict(self) -> dict[str, Any]:
        """The best score so far, for resuming (:class:`~masksup_med.run.resume.BestMetricState`'s keys, plus which)."""
        return {"best_metric": self.best, "best_metric_epoch": self.best_epoch, "selected_network": self.best_name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, unless ``save_path`` no longer loads: then the next validation writes it."""
        problem = unreadable_reason(self.save_path) if os.path.exists(self.save_path) else None
        if problem is not None:
            logger.warning(f"{self.save_path} does not load ({problem}); the next validation writes a new best model")
            return
        self.best, self.best_epoch, self.best_name = (
            state["best_metric"],
            state["best_metric_epoch"],
            state["selected_network"],
        )
