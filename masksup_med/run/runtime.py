"""Run-time choices and start-up checks a bundle config delegates to the package: device, run names, sizes."""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import math
import secrets
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ignite.distributed as idist
import torch
from monai.transforms import RandRotate90, RandRotate90d

from masksup_med.errors import ConfigError

__all__ = [
    "check_augmentation_keeps_size",
    "check_image_size",
    "check_numbers",
    "check_same_on_every_process",
    "distributed_backend",
    "keep_freed_memory",
    "select_device",
    "unique_run_name",
]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def keep_freed_memory() -> bool:
    """Make glibc's allocator keep freed memory for reuse instead of returning it to the system.

    A training step frees and re-allocates the same large activation tensors every step; by
    default glibc serves each from a fresh ``mmap`` and unmaps it when freed, so every step faults
    its memory in again. On 2 CPU cores that doubled the MaskSup step at GLaS's native size
    (``benchmarks/RESULTS.md``). The process keeps its peak memory instead. Returns True when
    applied (Linux with glibc), False elsewhere (nothing to do).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    largest = 2**31 - 1
    return bool(mallopt(_M_MMAP_THRESHOLD, largest)) and bool(mallopt(_M_TRIM_THRESHOLD, largest))


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
        raise ConfigError(f"device {str(device)!r} was requested but CUDA is not available; use 'auto' or 'cpu'.")
    return chosen


def unique_run_name(prefix: str) -> str:
    """``PREFIX-YYYYmmdd-HHMMSS-xxxx``: unique, so MLflow never resumes an unfinished run by name."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{prefix}-{stamp}-{secrets.token_hex(2)}"


def distributed_backend(device: str | torch.device = "auto") -> str:
    """``nccl`` when the run uses CUDA, ``gloo`` on CPU."""
    return "nccl" if select_device(device).type == "cuda" else "gloo"


def check_same_on_every_process(name: str, value: int | None) -> None:
    """Under DDP, fail at start when ``value`` differs between processes (say, an ``epoch_length`` that would
    leave one process waiting for a gradient the others never send); nothing in one process or for None."""
    if value is None or idist.get_world_size() < 2:
        return
    values = [int(v) for v in idist.all_gather(torch.tensor([int(value)])).tolist()]
    if len(set(values)) > 1:
        raise ConfigError(
            f"{name} differs between the DDP processes ({values}, by rank): every process must take the same number "
            "of steps. Sample each loader with DistributedSampler(even_divisible=True)."
        )


def check_image_size(image_size: Sequence[int], network: torch.nn.Module) -> None:
    """Fail at start, with sizes that work, when ``image_size`` does not divide by the network's total stride.

    A UNet downsamples by the product of its ``strides``; a side that does not divide by it makes the
    skip connections mismatch at the first batch, with a tensor-size error that does not name the cause.
    Networks without a ``strides`` attribute are not checked. ``image_size`` is in the network input's
    axis order, MONAI's: [width, height] for images read by ``PILReader`` / ``TiffReader``.
    """
    strides = getattr(network, "strides", None)
    if not strides:
        return
    sizes = [int(s) for s in image_size]
    factors = [math.prod(int(s) if isinstance(s, int) else int(s[d]) for s in strides) for d in range(len(sizes))]
    if any(side % factor for side, factor in zip(sizes, factors)):
        fitting = [math.ceil(side / factor) * factor for side, factor in zip(sizes, factors)]
        multiple = factors[0] if len(set(factors)) == 1 else factors
        raise ConfigError(
            f"image_size {sizes} does not suit {type(network).__name__}: every side must be a multiple of {multiple} "
            f'(the product of its strides {list(strides)}); use e.g. --image_size "{fitting}"'
        )


def check_augmentation_keeps_size(augmentation: Sequence[Any], image_size: Sequence[int]) -> None:
    """Fail at start when a 90-degree rotation in ``augmentation`` would swap two unequal sides of ``image_size``.

    Rotated and unrotated samples then differ in shape, and the first batch fails to collate with a
    stacking error that names neither the transform nor the size.
    """
    sizes = [int(s) for s in image_size]
    for transform in augmentation:
        axes = getattr(transform, "spatial_axes", None)
        if (
            isinstance(transform, (RandRotate90, RandRotate90d))
            and transform.prob > 0
            and sizes[axes[0]] != sizes[axes[1]]
        ):
            raise ConfigError(
                f"augmentation {type(transform).__name__}(prob={transform.prob}, spatial_axes={tuple(axes)}) "
                f"swaps sides {sizes[axes[0]]} and {sizes[axes[1]]} of image_size {sizes}, so samples in a batch "
                "would differ in shape: "
                "use a square image_size, set its prob to 0, or remove it"
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


# what each numeric option of the bundles must be: (the rule in words, the test, an example value)
NUMBER_RULES: dict[str, tuple[str, Any, str]] = {
    "batch_size": ("a whole number >= 1", lambda v: _is_int(v) and v >= 1, "4"),
    "max_epochs": ("a whole number >= 1", lambda v: _is_int(v) and v >= 1, "40"),
    "val_interval": ("a whole number >= 1", lambda v: _is_int(v) and v >= 1, "2"),
    "seed": ("a whole number >= 0", lambda v: _is_int(v) and v >= 0, "0"),
    "learning_rate": ("a number > 0", lambda v: _is_number(v) and v > 0, "1e-3"),
    "val_fraction": ("a number between 0 and 1 (both excluded)", lambda v: _is_number(v) and 0 < v < 1, "0.2"),
    "test_fraction": ("a number between 0 and 1 (both excluded)", lambda v: _is_number(v) and 0 < v < 1, "0.1"),
    "label_fraction": ("a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1, "0.25"),
    "image_size": (
        "a list of whole numbers >= 1, [width, height]",
        lambda v: isinstance(v, (list, tuple)) and len(v) in (2, 3) and all(_is_int(s) and s >= 1 for s in v),
        '"[256,256]"',
    ),
}


def check_numbers(*groups: Mapping[str, Any]) -> None:
    """Fail at start, before anything is written, when a numeric option has a value it cannot take.

    Each group maps option names to values (a config's ``recipe``, ``split_options``, ...); the names
    of :data:`NUMBER_RULES` are checked (``seed`` in ``split_options`` is the split seed), others ignored.
    Every wrong value is named in one message, with the rule and an example.
    """
    problems = []
    for group in groups:
        for name, value in group.items():
            rule = NUMBER_RULES.get(name)
            if rule is not None and not rule[1](value):
                what, _, example = rule
                problems.append(f"{name} must be {what}, got {value!r} (e.g. --{name} {example})")
    if problems:
        raise ConfigError("; ".join(problems) + ".")
