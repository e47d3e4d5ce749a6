"""MLflow: what MONAI's MLFlowHandler does not do by itself (the parameters that describe a run)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import monai
import torch

import masksup_med
from masksup_med.losses import MaskSupLoss
from masksup_med.transforms.base import RandMaskd

__all__ = ["git_commit", "run_params"]


def git_commit(path: str | Path = ".") -> str:
    """The git commit of the checkout containing ``path`` (with ``-dirty`` if modified), or ``unknown``."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=path, capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _masking_params(masking: RandMaskd | None) -> dict[str, Any]:
    if masking is None:
        return {"masking": "none"}
    masker = masking.masker
    params: dict[str, Any] = {"masking": type(masking).__name__, "mask_prob": masking.prob,
                              "mask_fill_value": masker.fill_value}
    params["mask_ratio_range"] = list(getattr(masker, "ratio_range", ()))
    if hasattr(masker, "patch_size"):
        params["mask_patch_size"] = masker.patch_size
    return params


def run_params(network: torch.nn.Module, loss: MaskSupLoss, masking: RandMaskd | None, **recipe: Any) -> dict[str, Any]:
    """Parameters that identify a training run: network, loss weights, masking, recipe, versions, commit."""
    params: dict[str, Any] = {
        "network": type(network).__name__,
        "network_parameters": sum(p.numel() for p in network.parameters()),
        "seg_loss": type(loss.seg_loss).__name__,
        "context_loss": type(loss.context_loss).__name__,
        "a1": loss.a1,
        "a2": loss.a2,
        "a3": loss.a3,
        "tasksim_activation": loss.activation,
        **_masking_params(masking),
        **recipe,
        "masksup_med_version": masksup_med.__version__,
        "monai_version": monai.__version__,
        "torch_version": torch.__version__,
        "git_commit": git_commit(Path(masksup_med.__file__).parent),
    }
    return {key: str(value) for key, value in params.items()}
