"""MLflow tracking: where runs go, a start-up reachability check, and the parameters that describe a run.

MONAI's MLFlowHandler logs metrics; what it does not do (run parameters, figures, the registry) is here
and in :mod:`masksup_med.registry`.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import monai
import requests
import torch

import masksup_med
from masksup_med.losses import MaskSupLoss
from masksup_med.transforms.base import RandMaskd

__all__ = ["check_tracking_server", "git_commit", "resolve_tracking_uri", "run_params"]


def resolve_tracking_uri(output_dir: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set (a team's tracking server), else SQLite in ``output_dir``."""
    from_env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if from_env:
        return from_env
    return "sqlite:///" + str(Path(output_dir).resolve() / "mlflow.db")


def check_tracking_server(tracking_uri: str, timeout: float = 10.0) -> str:
    """Fail fast, before training, when an HTTP tracking server does not answer; return the URI."""
    if not tracking_uri.startswith(("http://", "https://")):
        return tracking_uri
    url = tracking_uri.rstrip("/") + "/health"
    try:
        response = requests.get(url, timeout=timeout)
        response.raise_for_status()
    except requests.RequestException as e:
        raise ConnectionError(
            f"MLflow tracking server {tracking_uri} is not reachable ({type(e).__name__}: {e}). Start it, fix "
            "MLFLOW_TRACKING_URI / tracking_uri, or unset it to use the local SQLite store."
        ) from e
    return tracking_uri


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


def run_params(
    network: torch.nn.Module, loss: MaskSupLoss, masking: RandMaskd | None, split: Mapping[str, Any] | None = None,
    **recipe: Any,
) -> dict[str, Any]:
    """Parameters that identify a training run: network, loss weights, masking, split, recipe, versions, commit.

    ``split`` (the dataset adapter's split options) is logged key by key as ``split_<key>``
    (``split_seed``, ``split_val_fraction``, ...), so runs can be searched by them.
    """
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
        **{f"split_{key}": value for key, value in (split or {}).items()},
        **recipe,
        "masksup_med_version": masksup_med.__version__,
        "monai_version": monai.__version__,
        "torch_version": torch.__version__,
        "git_commit": git_commit(Path(masksup_med.__file__).parent),
    }
    return {key: str(value) for key, value in params.items()}
