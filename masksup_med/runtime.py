"""Run-time choices a bundle config delegates to the package: device, run names."""

from __future__ import annotations

import datetime
import secrets

import torch

__all__ = ["distributed_backend", "select_device", "unique_run_name"]


def select_device(device: str | torch.device = "auto", local_rank: int | None = None) -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; anything else is passed to ``torch.device``.

    With ``local_rank`` (one process per GPU under torchrun), a CUDA choice becomes ``cuda:<local_rank>``.
    Asking for CUDA on a machine without it fails here, at start, not at the first batch.
    """
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if local_rank is not None and str(device) == "cuda":
        device = f"cuda:{local_rank}"
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} was requested but CUDA is not available; use 'auto' or 'cpu'.")
    return chosen


def unique_run_name(prefix: str) -> str:
    """``PREFIX-YYYYmmdd-HHMMSS-xxxx``: unique, so MLflow never resumes an unfinished run by name."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{prefix}-{stamp}-{secrets.token_hex(2)}"


def distributed_backend(device: str | torch.device = "auto") -> str:
    """``nccl`` when the run uses CUDA, ``gloo`` on CPU."""
    return "nccl" if select_device(device).type == "cuda" else "gloo"
