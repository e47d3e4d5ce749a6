"""Reading a weights file: the one way every loader here opens a ``.pt`` (checkpoints, pretrained weights, a
shipped model, a registered model's weights).

The file is read with ``torch.load(weights_only=True)``, so nothing but tensors is ever unpickled. MONAI's
CheckpointSaver writes ``{"model": state}`` (plus optimiser and the rest, in an epoch checkpoint); the state
dict is taken from there, or the file is a bare state dict.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from masksup_med.errors import MissingInputError, UnreadableFileError

__all__ = ["PickledObjectsError", "error_summary", "read_weights"]


class PickledObjectsError(UnreadableFileError):
    """A weights file holding Python objects besides tensors: refused, never unpickled (it could run code)."""


def error_summary(error: Exception) -> str:
    """``Type: first line of the message`` (``torch.load``'s messages run to many lines)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def read_weights(path: str | os.PathLike, label: str | None = None, hint: str = "") -> dict[str, torch.Tensor]:
    """The state dict (weight names to tensors, on the CPU) a weights file holds.

    ``label`` names the file in errors (default: its path); ``hint``, what to do about it, ends each message.

    Raises:
        MissingInputError: there is no such file.
        PickledObjectsError: it holds Python objects besides tensors (refused unread).
        UnreadableFileError: it does not load (cut short by a kill, another format) or holds no state dict.
    """
    path = Path(path)
    label = label or str(path)
    tail = f" {hint}" if hint else ""
    if not path.is_file():
        raise MissingInputError(f"{label} does not exist.{tail}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it references {found.group(1)}" if found else "torch.load(weights_only=True) rejected it"
        raise PickledObjectsError(
            f"{label} holds Python objects besides tensors, which could run code when unpickled ({what}); "
            f"it was not loaded.{tail}"
        ) from None
    except Exception as e:  # noqa: BLE001 - a file cut short fails in several ways (EOFError, RuntimeError, OSError)
        raise UnreadableFileError(
            f"{label} does not load ({error_summary(e)}); it was cut short (a kill while it was written) or is not "
            f"a weights file.{tail}"
        ) from e
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]  # a CheckpointSaver file
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UnreadableFileError(f"{label} is not a state dict of weights (names to tensors).{tail}")
    return {k: v.detach().cpu() for k, v in state.items()}
