"""Class-wise masked image modelling (S4MIM-style): the segmentation network also reconstructs its masked input.

:class:`ReconstructionHeads` gives a segmentation network extra output channels for training: its
output is the segmentation logits (the network's own channels, channel 0 for the bundles' binary
UNet) followed by one reconstruction channel per image channel (1..3 for RGB), read through a
sigmoid as an image in [0, 1]. :class:`~masksup_med.methods.maskmatch.MaskMatchTrainer` uses it for its masked
passes when given ``mim_network`` and scores the reconstruction of the masked pixels class by class
(:class:`~masksup_med.methods.losses.ClassWiseReconstructionLoss`).

Why a wrapper around the unchanged network, and not ``out_channels = 1 + 3`` on the bundle's UNet:
MONAI's UNet ends (with ``num_res_units > 0``) in a transposed convolution with batch norm and
PReLU over all output channels, then a residual convolution that mixes them, so channel 0 of a
four-channel UNet depends on the other three; dropping them after training would leave a
different, untrained network. Here the reconstruction head reads the segmentation network's
penultimate features (the input of its last block) and nothing of the segmentation path depends on
the head, so dropping the extra channels is exact: it is :attr:`ReconstructionHeads.segmenter`,
the bundle's own ``network`` module. The best checkpoint (``model.pt``), the registered model and
the evaluate / inference configs see that network alone (one output channel, ``network_def``'s
weights and names, as without MIM); only the training checkpoints also hold the head, for resuming.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

__all__ = ["MIMOutputs", "ReconstructionHeads"]


class MIMOutputs(NamedTuple):
    """What one pass of :meth:`ReconstructionHeads.outputs` gives the trainer."""

    segmentation: torch.Tensor  # the segmentation network's logits, exactly ``segmenter(x)``
    reconstruction: torch.Tensor  # the reconstructed image, sigmoid of the head's logits, in [0, 1]
    features: torch.Tensor  # the penultimate features, resized to the input size (the head's input)


def _first_conv(block: nn.Module) -> nn.modules.conv._ConvNd:
    """The first convolution in ``block`` (its input channels and dimensionality are the block's)."""
    for module in block.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return module
    raise TypeError(f"cannot tell the input channels or dimensions of {type(block).__name__}: it holds no convolution")


class ReconstructionHeads(nn.Module):
    """A segmentation network plus a reconstruction head on its penultimate features.

    Works with networks whose ``forward`` is their ``nn.Sequential`` attribute ``model`` (MONAI's
    ``UNet`` and ``AttentionUnet``): the features are the input of ``model``'s last block (for the
    bundles' UNet, the top skip connection's output: ``2 * channels[0]`` channels at half the input
    size), resized (bilinear) to the input size. The head is a 3x3 convolution with batch norm and
    PReLU to ``hidden_channels``, then a 1x1 convolution to ``image_channels`` logits.

    Args:
        segmenter: the segmentation network (shared, not copied: it is the bundle's ``network``).
        image_channels: channels of the image to reconstruct (3 for RGB).
        hidden_channels: channels of the head's hidden layer.

    ``forward(x)`` returns all output channels: the segmentation logits, then the reconstruction
    logits (:meth:`split` separates them and applies the sigmoid). Training uses :meth:`outputs`,
    which also returns the features; deployment uses :attr:`segmenter` alone (:meth:`drop_heads`).
    """

    def __init__(self, segmenter: nn.Module, image_channels: int = 3, hidden_channels: int = 16) -> None:
        super().__init__()
        if isinstance(segmenter, nn.parallel.DistributedDataParallel):
            raise TypeError(
                "masked image modelling (semi_mim.json) does not run under DistributedDataParallel yet "
                "(the heads read the network's own layers, which DDP hides): train it in one process."
            )
        model = getattr(segmenter, "model", None)
        if not isinstance(model, nn.Sequential) or len(model) < 2:
            raise TypeError(
                f"ReconstructionHeads needs a network whose forward is its nn.Sequential 'model' (MONAI's UNet, "
                f"AttentionUnet), to read its penultimate features; got {type(segmenter).__name__}."
            )
        spatial_dims = len(_first_conv(model).kernel_size)
        self.segmenter = segmenter
        self.image_channels = int(image_channels)
        self.spatial_dims = spatial_dims
        self.head = nn.Sequential(
            Convolution(
                spatial_dims,
                int(_first_conv(model[-1]).in_channels),
                hidden_channels,
                kernel_size=3,
                act="prelu",
                norm="batch",
            ),
            Convolution(spatial_dims, hidden_channels, self.image_channels, kernel_size=1, conv_only=True),
        )

    def outputs(self, x: torch.Tensor) -> MIMOutputs:
        """Segmentation logits (exactly ``segmenter(x)``), the reconstruction in [0, 1], and the features."""
        seg, logits, features = self._forward(x)
        return MIMOutputs(seg, torch.sigmoid(logits), features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every output channel: the segmentation logits, then one reconstruction logit per image channel."""
        seg, logits, _ = self._forward(x)
        return torch.cat([seg, logits], dim=1)

    def split(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward``'s output as (segmentation logits, reconstruction in [0, 1])."""
        seg_channels = output.shape[1] - self.image_channels
        return output[:, :seg_channels], torch.sigmoid(output[:, seg_channels:])

    def drop_heads(self) -> nn.Module:
        """The segmentation network alone: what is checkpointed as the best model, registered and deployed."""
        return self.segmenter

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layers = list(self.segmenter.model)
        features = x
        for layer in layers[:-1]:
            features = layer(features)
        seg = layers[-1](features)
        if features.shape[2:] != x.shape[2:]:
            mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
            features = F.interpolate(features, size=x.shape[2:], mode=mode, align_corners=False)
        return seg, self.head(features), features
