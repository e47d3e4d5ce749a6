"""Starting a network from pretrained weights (for example a masked-reconstruction pretraining run).

Every weight whose name and shape match is loaded; weights whose shape differs (an output head
with another number of channels: image channels when pretraining, classes when segmenting) keep
their fresh initialisation. A file that matches no weight of the network is refused, naming it; a
model a bundle ships is checked against its listed checksum first (:mod:`masksup_med.run.shipped`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from masksup_med.errors import ConfigError
from masksup_med.run.shipped import verify_shipped
from masksup_med.run.weights import read_weights

__all__ = ["load_pretrained_weights"]

logger = logging.getLogger(__name__)


def _state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    verify_shipped(path)  # a bundle's shipped model: present and unaltered, else refused naming it
    hint = "Pass the pretraining run's models/pretrained.pt, or a trained model."
    return read_weights(path, f"pretrained_weights {path}", hint)


def load_pretrained_weights(network: nn.Module, path: str | os.PathLike | None) -> dict[str, list[str]]:
    """Load the matching weights of ``path`` into ``network`` in place; ``None`` or ``""``: do nothing.

    Returns ``{"loaded": [...], "reinitialised": [...], "unused": [...]}`` (weight names) and logs it.
    """
    if path in (None, ""):
        return {"loaded": [], "reinitialised": [], "unused": []}
    path = Path(path)
    state = _state_dict(path)
    own = network.state_dict()
    loaded = [k for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)]
    reinitialised = [k for k in own if k in state and k not in loaded]
    unused = [k for k in state if k not in own]
    if not loaded:
        raise ConfigError(
            f"pretrained_weights {path} matches no weight of {type(network).__name__} (its first names: "
            f"{', '.join(list(state)[:3]) or 'none'}); it was written for another network."
        )
    network.load_state_dict({k: state[k] for k in loaded}, strict=False)
    logger.info(
        f"pretrained weights from {path}: {len(loaded)} of {len(own)} tensors loaded"
        + (f", re-initialised (shape differs): {', '.join(reinitialised)}" if reinitialised else "")
    )
    return {"loaded": loaded, "reinitialised": reinitialised, "unused": unused}
