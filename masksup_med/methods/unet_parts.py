"""The encoder of MONAI's ``UNet``, and hiding masked positions from it while it is pretrained.

MONAI's ``UNet`` nests ``Sequential(down, SkipConnection(inner), up)`` blocks; the innermost
``inner`` is the bottom layer. Its encoder is every ``down`` block plus the bottom; its decoder is
every ``up`` block. :class:`HiddenPositions` zeroes the masked positions of the encoder's features
during a forward pass (SparK's densified-sparse encoder, in dense form), or only of the finest skip
connection, so the decoder cannot copy visible pixels next to a hole.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers import SkipConnection
from torch import nn

__all__ = ["ENCODER_MASKING", "HiddenPositions", "encoder_modules", "encoder_parameter_names", "decoder_modules"]

ENCODER_MASKING = ("none", "finest_skip", "encoder")


def _levels(network: nn.Module) -> list[nn.Sequential]:
    network = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
    model = getattr(network, "model", None)
    levels = []
    while isinstance(model, nn.Sequential) and len(model) == 3 and isinstance(model[1], SkipConnection):
        levels.append(model)
        model = model[1].submodule
    if not levels:
        raise TypeError(
            f"{type(network).__name__} is not a MONAI UNet (a 'model' of nested Sequential(down, SkipConnection, up)"
            " blocks): its encoder cannot be told apart from its decoder"
        )
    return levels


def encoder_modules(network: nn.Module) -> list[nn.Module]:
    """The encoder stages, finest first: every level's ``down`` block, then the bottom layer."""
    levels = _levels(network)
    return [level[0] for level in levels] + [levels[-1][1].submodule]


def decoder_modules(network: nn.Module) -> list[nn.Module]:
    """The decoder stages, coarsest first: every level's ``up`` block."""
    return [level[2] for level in reversed(_levels(network))]


def encoder_parameter_names(network: nn.Module) -> set[str]:
    """``state_dict`` names (weights and buffers) of the encoder stages."""
    owned = {id(t) for module in encoder_modules(network) for t in [*module.parameters(), *module.buffers()]}
    return {name for name, tensor in [*network.named_parameters(), *network.named_buffers()] if id(tensor) in owned}


def _visible(holes: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """``B, 1, h, w`` float: 1 where no pixel of the feature position's footprint is hidden."""
    hidden = F.adaptive_max_pool2d(holes[:, None].float(), tuple(size))
    return 1.0 - hidden


class HiddenPositions:
    """Context manager: while open, masked positions are zeroed in the network's encoder features.

    Args:
        network: a MONAI ``UNet``.
        holes: ``B, H, W`` boolean, true where the input is hidden.
        mode: ``"encoder"`` zeroes them after every encoder stage (SparK); ``"finest_skip"`` only in the
            finest skip connection (what the top ``up`` block reads besides the deeper path); ``"none"``
            leaves the network alone.
    """

    def __init__(self, network: nn.Module, holes: torch.Tensor, mode: str = "encoder") -> None:
        if mode not in ENCODER_MASKING:
            raise ValueError(f"encoder_masking must be one of {', '.join(ENCODER_MASKING)}, got {mode!r}")
        self.network, self.holes, self.mode = network, holes, mode
        self.handles: list[Any] = []

    def _zero_output(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output * _visible(self.holes, output.shape[2:]).to(output.dtype)

    def _zero_skip(self, module: SkipConnection, args: Any, output: torch.Tensor) -> torch.Tensor:
        skip_channels = args[0].shape[1]  # SkipConnection concatenates its input (the skip) first
        visible = _visible(self.holes, output.shape[2:]).to(output.dtype)
        return torch.cat([output[:, :skip_channels] * visible, output[:, skip_channels:]], dim=1)

    def __enter__(self) -> HiddenPositions:
        if self.mode == "encoder":
            self.handles = [m.register_forward_hook(self._zero_output) for m in encoder_modules(self.network)]
        elif self.mode == "finest_skip":
            top = _levels(self.network)[0][1]
            if top.mode != "cat" or top.dim != 1:
                raise TypeError("finest_skip masking needs a UNet whose skip connections concatenate channels")
            self.handles = [top.register_forward_hook(self._zero_skip)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
