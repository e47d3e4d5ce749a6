"""Run-time choices a bundle config delegates to the package: device, run names."""

from __future__ import annotations

import datetime
import secrets

import torch

__all__ = ["select_device", "unique_run_name"]


def select_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; anything else is passed to ``torch.device``.

    Asking for CUDA on a machine without it fails here, at start, not at the first batch.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} was requested but CUDA is not available; use 'auto' or 'cpu'.")
    return chosen


def unique_run_name(prefix: str) -> str:
    """``PREFIX-YYYYmmdd-HHMMSS-xxxx``: unique, so MLflow never resumes an unfinished run by name."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{prefix}-{stamp}-{secrets.token_hex(2)}"
