"""The MaskSup training iteration on MONAI's ignite-based :class:`~monai.engines.SupervisedTrainer`.

Each iteration runs the one network twice, on the image and on its masked copy, and optimises
:class:`~masksup_med.methods.losses.MaskSupLoss`. Validation and inference use MONAI's plain evaluators and
inferers: nothing of the masking remains after training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import ignite.distributed as idist
import torch
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

from masksup_med.methods.handlers import LossTermAveragesHandler, loss_terms, named_terms
from masksup_med.methods.losses import MaskSupLoss
from masksup_med.transforms.base import RandMask

# the generic loss-term handlers live in masksup_med.methods.handlers; re-exported for MaskSup users
__all__ = ["LossTermAveragesHandler", "MaskSupKeys", "MaskSupTrainer", "backward_and_step", "loss_terms", "rank_seed"]


class MaskSupKeys:
    """Extra keys of ``engine.state.output`` written by :class:`MaskSupTrainer`."""

    IMAGE_MASKED = "image_masked"
    PRED_MASKED = "pred_masked"
    SEG = "loss_seg"
    CONTEXT = "loss_context"
    TASKSIM = "loss_tasksim"
    TERMS = (CommonKeys.LOSS, SEG, CONTEXT, TASKSIM)


class MaskSupTrainer(SupervisedTrainer):
    """SupervisedTrainer whose iteration optimises the MaskSup objective.

    Takes every argument of :class:`~monai.engines.SupervisedTrainer`, with ``loss_function`` a
    :class:`~masksup_med.methods.losses.MaskSupLoss`, plus:

    Args:
        masked_key: batch key holding the masked copy of the image (written by a masking
            dictionary transform such as ``RandFreeFormMaskd`` in the training pipeline).
        batch_masker: alternatively, a masking array transform applied to the whole batch on the
            training device (``RandMask.mask_batch``; :class:`~masksup_med.transforms.RandMaskBank`
            masks a batch with a few tensor operations), so GPU runs do not mask on CPU workers.
            When given, ``masked_key`` is not read. It is seeded here from torch's global random
            state (and the process rank under DDP), as MONAI's DataLoader seeds a dataset's random
            transforms, so ``set_determinism`` makes a run's masks reproducible.

        single_pass: run the network once on the image and masked batches concatenated, instead of
            the published two passes (one batch may use a GPU better); BatchNorm then normalises over
            both halves together, so the objective changes slightly. Off by default, also under
            DistributedDataParallel: DDP reduces the gradients of two forwards before one backward
            like any others (tested with two processes), so each process runs the published two passes.

    With ``a2 = a3 = 0`` the masked pass is skipped and the iteration is plain supervised
    training with ``seg_loss`` (the ablation baseline), through the same code.
    ``engine.state.output`` holds ``image``, ``label``, ``pred``, ``loss`` (the total), and every
    other term the loss returns as ``loss_<name>`` (detached): ``loss_seg``, ``loss_context`` and
    ``loss_tasksim`` for :class:`~masksup_med.methods.losses.MaskSupLoss`, plus whatever a subclass adds.
    """

    def __init__(
        self,
        *args: Any,
        masked_key: str = MaskSupKeys.IMAGE_MASKED,
        batch_masker: RandMask | None = None,
        single_pass: bool = False,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("accumulation_steps", 1) != 1:
            raise ValueError("MaskSupTrainer does not support gradient accumulation (accumulation_steps must be 1).")
        if kwargs.get("compile", False):
            raise ValueError("MaskSupTrainer does not support compile=True; compile the network before passing it.")
        super().__init__(*args, **kwargs)
        if not isinstance(self.loss_function, MaskSupLoss):
            raise TypeError(f"loss_function must be a MaskSupLoss, got {type(self.loss_function).__name__}.")
        self.masked_key = masked_key
        if batch_masker is not None:
            batch_masker.set_random_state(rank_seed())
        self.batch_masker = batch_masker
        self.single_pass = single_pass

    def _masked_inputs(
        self, batchdata: Mapping[str, Any], inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The masked copy of the batch and its ``B, *spatial`` holes (None when the pipeline masked it: unknown)."""
        if self.batch_masker is not None:
            plain = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs  # a batch's metadata is per sample
            return self.batch_masker.mask_batch(plain)
        if self.masked_key not in batchdata:
            raise KeyError(
                f"MaskSupTrainer: the batch has no {self.masked_key!r} (keys: {sorted(batchdata)}). Add a masking "
                f"transform such as RandFreeFormMaskd(keys='image', masked_keys={self.masked_key!r}) to the training "
                "transforms, or pass batch_masker=RandFreeFormMask() to mask on the device."
            )
        masked = torch.as_tensor(batchdata[self.masked_key])
        return masked.to(device=inputs.device, dtype=inputs.dtype, non_blocking=self.non_blocking), None

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.state.device).type, **self.amp_kwargs)

    def compute_terms(self, batchdata: dict[str, Any], inputs: torch.Tensor, targets: torch.Tensor) -> dict:
        """The forward pass(es) and the loss terms of one step (``{"total": ..., name: ...}``), under autocast.

        Writes ``pred`` to the output and fires ``FORWARD_COMPLETED``. A method built on MaskSup
        overrides this to add its own terms (and adds them into ``total``).
        """
        loss_fn: MaskSupLoss = self.loss_function
        masked, holes = self._masked_inputs(batchdata, inputs) if loss_fn.uses_masked_pass else (None, None)
        pred, pred_masked = self.forward_passes(inputs, masked, holes)
        self.state.output[CommonKeys.PRED] = pred
        self.fire_event(IterationEvents.FORWARD_COMPLETED)
        return named_terms(loss_fn(pred, pred_masked, targets))

    def forward_passes(
        self, inputs: torch.Tensor, masked: torch.Tensor | None, holes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The network's logits on the image and on its masked copy (None when there is no masked pass).

        ``holes`` (the masked pixels, ``B, *spatial``; None when unknown) is not needed here; a
        subclass whose network has more heads than segmentation reads it (MaskMatch's masked image
        modelling, :class:`~masksup_med.methods.maskmatch.MaskMatchTrainer`).
        """
        if masked is not None and self.single_pass:
            pred, pred_masked = self.inferer(torch.cat([inputs, masked]), self.network).chunk(2)
            return pred, pred_masked
        pred = self.inferer(inputs, self.network)
        return pred, (self.inferer(masked, self.network) if masked is not None else None)

    def after_step(self) -> None:
        """Called after each optimiser step (nothing for MaskSup; a teacher's EMA update for semi-supervised)."""

    def _iteration(self, engine: MaskSupTrainer, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        """One step: forward pass(es) and loss terms (:meth:`compute_terms`), one backward, one optimiser step."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        inputs, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)[
            :2
        ]
        engine.state.output = {CommonKeys.IMAGE: inputs, CommonKeys.LABEL: targets}

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with engine._autocast():
            terms = engine.compute_terms(batchdata, inputs, targets)
        total = terms.pop("total")
        engine.state.output[CommonKeys.LOSS] = total
        for name, value in terms.items():
            engine.state.output[f"{CommonKeys.LOSS}_{name}"] = value.detach()
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        backward_and_step(engine, total)
        engine.after_step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def rank_seed() -> int:
    """A seed drawn from torch's global random state, offset by the process rank (DDP: each process masks differently).

    As MONAI's DataLoader seeds a dataset's random transforms, so ``set_determinism`` makes it repeat.
    """
    return int(torch.randint(0, 2**31 - 1 - idist.get_world_size(), (1,)).item()) + idist.get_rank()


def backward_and_step(engine: SupervisedTrainer, total: torch.Tensor) -> None:
    """Back-propagate ``total`` (through the AMP gradient scaler when there is one) and step the optimiser."""
    if engine.amp and engine.scaler is not None:
        engine.scaler.scale(total).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.scaler.step(engine.optimizer)
        engine.scaler.update()
    else:
        total.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
