"""Feature perturbation: channel dropout on a network's intermediate features for one pass.

UniMatch's third unlabelled branch decodes the weak view's features after ``Dropout2d(0.5)`` and
learns the pseudo-label from that, so consistency is asked of the features, not only of the input.
Here the dropout is a forward hook on chosen submodules of any network, active only inside
:meth:`FeatureDropout.applied_to`: the network itself is not changed, and validation, the teacher
and the registered model never see it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from monai.networks.layers import SkipConnection
from torch import nn

__all__ = ["FeatureDropout"]


class FeatureDropout:
    """Channel dropout (``Dropout2d`` / ``Dropout3d``) on the outputs of chosen submodules, while applied.

    Args:
        p: probability of zeroing a channel (survivors are scaled by ``1 / (1 - p)``), in [0, 1).
        module_names: names (as in ``network.named_modules()``) of the submodules whose outputs are
            perturbed. Default: every MONAI ``SkipConnection`` (in MONAI's UNet, the features each
            decoder level receives: the encoder's skip features joined with the deeper decoder's).
    """

    def __init__(self, p: float = 0.5, module_names: Sequence[str] | None = None) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"feature dropout p must lie in [0, 1), got {p!r}.")
        self.p = float(p)
        self.module_names = None if module_names is None else [str(name) for name in module_names]

    def hyperparameters(self) -> dict[str, object]:
        """Logged with the run."""
        return {"feature_dropout": self.p, "feature_dropout_modules": self.module_names or "SkipConnection"}

    def modules(self, network: nn.Module) -> list[nn.Module]:
        """The submodules of ``network`` whose outputs are perturbed; a clear error when there are none."""
        network = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
        named = dict(network.named_modules())
        if self.module_names is None:
            found = [module for module in named.values() if isinstance(module, SkipConnection)]
            if not found:
                raise ValueError(
                    f"FeatureDropout: {type(network).__name__} has no MONAI SkipConnection; name the submodules "
                    "to perturb (module_names, as in network.named_modules())."
                )
            return found
        missing = [name for name in self.module_names if name not in named]
        if missing:
            raise ValueError(f"FeatureDropout: {type(network).__name__} has no submodule named {missing}.")
        return [named[name] for name in self.module_names]

    def _drop(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        dropout = nn.functional.dropout3d if output.dim() == 5 else nn.functional.dropout2d
        return dropout(output, self.p, training=True)

    @contextlib.contextmanager
    def applied_to(self, network: nn.Module) -> Iterator[nn.Module]:
        """Inside, ``network``'s chosen features are dropped out on every forward pass; removed on leaving."""
        hooks = [module.register_forward_hook(self._drop) for module in self.modules(network)]
        try:
            yield network
        finally:
            for hook in hooks:
                hook.remove()
