"""How good the pseudo-labels are: scored against the held-back masks of the unlabelled training images.

In a study the unlabelled part of the training split is labelled images whose masks were set aside
(:func:`~masksup_med.data.with_unlabelled`). Training never reads those masks; this module scores the
pseudo-label source on them after each epoch, so a run shows whether its pseudo-labels improve:
:func:`held_back_items` finds the items, :class:`PseudoLabelInferer` predicts them as training makes
pseudo-labels (training-mode normalisation, running statistics untouched), and a plain
``SupervisedEvaluator`` with a mean-IoU handler scores them (``semi_train.json``'s ``pseudo_label_quality``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.inferers import Inferer
from torch import nn

from masksup_med.methods.teacher import pseudo_labelling_mode

__all__ = ["PseudoLabelInferer", "held_back_items"]


def held_back_items(labelled_train: Sequence[dict], unlabelled: Sequence[dict]) -> list[dict]:
    """The items of the full training split (with their labels) whose images are in ``unlabelled``.

    Args:
        labelled_train: the training split before the label fraction was applied (every item labelled).
        unlabelled: the unlabelled items training uses; images from an unlabelled folder have no
            held-back mask and are left out.
    """
    images = {str(item["image"]) for item in unlabelled}
    return [dict(item) for item in labelled_train if str(item["image"]) in images and "label" in item]


class PseudoLabelInferer(Inferer):
    """The network's logits as training makes pseudo-labels: training mode, frozen running statistics, no gradient.

    Use it in an evaluator of the pseudo-label source; the network's mode is restored after each call.
    """

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``network(inputs)`` in pseudo-labelling mode."""
        with pseudo_labelling_mode(network):
            return network(inputs, *args, **kwargs)
