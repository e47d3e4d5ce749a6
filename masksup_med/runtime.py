"""Run-time choices and start-up checks a bundle config delegates to the package: device, run names, sizes."""

from __future__ import annotations

import datetime
import math
import secrets
from collections.abc import Sequence
from typing import Any

import torch
from monai.transforms import RandRotate90, RandRotate90d

__all__ = ["check_augmentation_keeps_size", "check_image_size", "distributed_backend", "select_device", "unique_run_name"]


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


def check_image_size(image_size: Sequence[int], network: torch.nn.Module) -> None:
    """Fail at start, with sizes that work, when ``image_size`` does not divide by the network's total stride.

    A UNet downsamples by the product of its ``strides``; a side that does not divide by it makes the
    skip connections mismatch at the first batch, with a tensor-size error that does not name the cause.
    Networks without a ``strides`` attribute are not checked.
    """
    strides = getattr(network, "strides", None)
    if not strides:
        return
    sizes = [int(s) for s in image_size]
    factors = [math.prod(int(s) if isinstance(s, int) else int(s[d]) for s in strides) for d in range(len(sizes))]
    if any(side % factor for side, factor in zip(sizes, factors)):
        fitting = [math.ceil(side / factor) * factor for side, factor in zip(sizes, factors)]
        multiple = factors[0] if len(set(factors)) == 1 else factors
        raise ValueError(
            f"image_size {sizes} does not suit {type(network).__name__}: every side must be a multiple of {multiple} "
            f"(the product of its strides {list(strides)}); use e.g. --image_size \"{fitting}\""
        )


def check_augmentation_keeps_size(augmentation: Sequence[Any], image_size: Sequence[int]) -> None:
    """Fail at start when a 90-degree rotation in ``augmentation`` would swap two unequal sides of ``image_size``.

    Rotated and unrotated samples then differ in shape, and the first batch fails to collate with a
    stacking error that names neither the transform nor the size.
    """
    sizes = [int(s) for s in image_size]
    for transform in augmentation:
        axes = getattr(transform, "spatial_axes", None)
        if isinstance(transform, (RandRotate90, RandRotate90d)) and transform.prob > 0 and sizes[axes[0]] != sizes[axes[1]]:
            raise ValueError(
                f"augmentation {type(transform).__name__}(prob={transform.prob}, spatial_axes={tuple(axes)}) swaps sides "
                f"{sizes[axes[0]]} and {sizes[axes[1]]} of image_size {sizes}, so samples in a batch would differ in shape: "
                "use a square image_size, set its prob to 0, or remove it"
            )
