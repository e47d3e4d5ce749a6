"""The registered-model format: weights plus the definition that rebuilds the network, read without running code.

A registered version's ``model/`` folder holds

- ``weights.pt``: the network's state dict, tensors only, read with ``torch.load(weights_only=True)``
  (a file holding any other Python object is refused before it is unpickled);
- ``network.json``: the bundle's ``network_def`` with every value resolved, e.g.
  ``{"_target_": "monai.networks.nets.unet.UNet", "spatial_dims": 2, …}``; only classes of
  :data:`NETWORK_MODULES` are built from it, with its plain JSON values as arguments;
- ``bundle/train.json``: the bundle config the model was trained with, for people to read (never
  parsed when loading);
- ``MLmodel``: MLflow's descriptor: the tensor signature, the ``masksup_med`` flavor (input shape,
  bundle, threshold) and a ``python_function`` flavor whose loader is this module (tensor in, logits out).

:func:`load_model` is the one function that loads a registered model, for evaluation, prediction,
serving and the tests alike.
"""

from __future__ import annotations

import importlib
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import Model, ModelSignature

from masksup_med.run import weights
from masksup_med.run.files import atomic_path, save_atomically, write_text_atomically

__all__ = [
    "FLAVOR",
    "NETWORK_MODULES",
    "UnsafeModelError",
    "build_network",
    "flavor_config",
    "load_model",
    "network_definition",
    "read_weights",
    "save_model",
]

FLAVOR = "masksup_med"
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.pt"
NETWORK_FILE = "network.json"
BUNDLE_DIR = "bundle"
NETWORK_MODULES = ("monai.networks.nets",)
# network_def keys that are MONAI config directives, not constructor arguments
_DIRECTIVES = frozenset({"_target_", "_disabled_", "_requires_", "_desc_", "_mode_"})


class UnsafeModelError(ValueError):
    """A model file that would need code to load: pickled objects, or a network class that is not allowed."""


def network_class(target: str) -> type[torch.nn.Module]:
    """The network class named ``target`` (``UNet`` or a dotted name), only from :data:`NETWORK_MODULES`."""
    module_name, _, name = str(target).rpartition(".")
    allowed = [m for m in NETWORK_MODULES if not module_name or module_name == m or module_name.startswith(m + ".")]
    if not allowed or not name.isidentifier():
        raise UnsafeModelError(
            f"network {target!r} is not allowed: only classes of {', '.join(NETWORK_MODULES)} are built"
        )
    module = importlib.import_module(module_name or allowed[0])
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise UnsafeModelError(f"network {target!r} is not a network class of {module.__name__}")
    return cls


def _checked_definition(definition: Any, source: str) -> dict[str, Any]:
    """``definition`` as a plain-JSON network definition with an allowed ``_target_``, else ValueError."""
    if not isinstance(definition, Mapping) or not isinstance(definition.get("_target_"), str):
        raise ValueError(  # noqa: TRY004 - a malformed file, not a caller's mistake
            f"{source}: a network definition must be an object with a '_target_' class name"
        )
    try:
        plain = json.loads(json.dumps(dict(definition), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: network definition values must be plain JSON values: {e}") from e
    for key in plain:
        if "pretrained" in key.lower():
            raise UnsafeModelError(
                f"{source}: network argument {key!r} is not allowed (the weights are the model's own)"
            )
    cls = network_class(plain["_target_"])
    return {**plain, "_target_": f"{cls.__module__}.{cls.__qualname__}"}


def network_definition(config: str | Path | Any, key: str = "network_def") -> dict[str, Any]:
    """The bundle config's ``network_def`` with every value resolved to plain JSON (class name + arguments).

    ``config``: a config file, or a ``monai.bundle.ConfigParser`` already holding the run's config.
    """
    from monai.bundle import ConfigParser

    if isinstance(config, ConfigParser):
        parser, config_file = config, "the run's config"
    else:
        parser, config_file = ConfigParser(), config
        parser.read_config(str(config))
    raw = parser.get(key)
    if not isinstance(raw, Mapping) or "_target_" not in raw:
        raise ValueError(f"{config_file}: no network definition {key!r} with a '_target_'")
    definition = {"_target_": raw["_target_"]}
    definition.update({name: parser.get_parsed_content(f"{key}#{name}") for name in raw if name not in _DIRECTIVES})
    return _checked_definition(definition, f"{config_file} ({key})")


def build_network(definition: Mapping[str, Any], source: str = "network definition") -> torch.nn.Module:
    """A freshly initialised network from a definition (see :func:`network_definition`)."""
    checked = _checked_definition(definition, source)
    arguments = {k: v for k, v in checked.items() if k not in _DIRECTIVES}
    try:
        return network_class(checked["_target_"])(**arguments)
    except Exception as e:  # any constructor error means the same thing here
        raise ValueError(f"{source}: cannot build {checked['_target_']}: {type(e).__name__}: {e}") from e


def read_weights(path: str | Path, label: str | None = None) -> dict[str, torch.Tensor]:
    """A registered model's state dict, without unpickling code (:func:`masksup_med.run.weights.read_weights`);
    a file holding Python objects is refused with :class:`UnsafeModelError`."""
    try:
        return weights.read_weights(path, label)
    except weights.PickledObjectsError as e:
        hint = "Register the model again from its checkpoint with `masksup-med registry register`."
        raise UnsafeModelError(f"refused: {e} {hint}") from None


def flavor_config(model_dir: str | Path, source: str | None = None) -> dict[str, Any]:
    """The ``masksup_med`` flavor of a model folder's ``MLmodel``; a clear error for any other model."""
    model_dir = Path(model_dir)
    source = source or str(model_dir)
    if not (model_dir / "MLmodel").is_file():
        raise ValueError(f"{source} is not an MLflow model (no MLmodel file)")
    flavors = Model.load(str(model_dir / "MLmodel")).flavors
    if FLAVOR not in flavors:
        raise ValueError(
            f"{source} is not a masksup-med model (flavors: {', '.join(sorted(flavors)) or 'none'}). Versions "
            "registered as pickled PyTorch models are not loaded; register the version's checkpoint (its "
            "'checkpoint' tag) again with `masksup-med registry register`."
        )
    return dict(flavors[FLAVOR])


def _read_model_dir(model_dir: Path, source: str) -> torch.nn.Module:
    """The network of a downloaded model folder: rebuilt from ``network.json``, weights from ``weights.pt``."""
    flavor_config(model_dir, source)
    network_file = model_dir / NETWORK_FILE
    try:
        definition = json.loads(network_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{source} ({NETWORK_FILE}): unreadable network definition: {e}") from e
    network = build_network(definition, f"{source} ({NETWORK_FILE})")
    state = read_weights(model_dir / WEIGHTS_FILE, f"{source} ({WEIGHTS_FILE})")
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{source}: {WEIGHTS_FILE} does not fit {NETWORK_FILE}: {e}") from e
    return network


def load_model(
    source: str | Path, device: torch.device | str = "cpu", tracking_uri: str | None = None
) -> torch.nn.Module:
    """The network of a registered model, in eval mode on ``device``; nothing is unpickled but tensors.

    ``source``: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/…`` (downloaded from the
    store at ``tracking_uri``, default: MLflow's current one) or a local model folder.
    """
    source = str(source)
    if Path(source).is_dir():
        network = _read_model_dir(Path(source), source)
    else:
        from masksup_med.tracking.store import using_store

        with tempfile.TemporaryDirectory(prefix="masksup-model-") as tmp, using_store(tracking_uri):
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp)
            network = _read_model_dir(Path(local), source)
    return network.to(device).eval()


def save_model(
    path: str | Path,
    mlflow_model: Model | None = None,
    *,
    state_dict: Mapping[str, torch.Tensor],
    network: Mapping[str, Any],
    input_shape: Sequence[int],
    signature: ModelSignature | None = None,
    bundle: str | None = None,
    threshold: float = 0.5,
    config_file: str | Path | None = None,
    **_: Any,
) -> Model:
    """Write a model folder (the flavor function ``mlflow.models.Model.log`` calls with ``flavor=`` this module).

    Each file is written whole or not at all (:mod:`masksup_med.run.files`).

    Args:
        path: the folder to create.
        mlflow_model: the ``Model`` being logged (a new one when None).
        state_dict: the weights.
        network: the network definition (see :func:`network_definition`).
        input_shape: one input sample ``C, *spatial`` (the training size).
        signature: the tensor signature shown in MLflow's UI.
        bundle, threshold: the bundle the model was trained with and its probability threshold.
        config_file: the bundle config, copied to ``bundle/`` for people to read.
    """
    import masksup_med

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    definition = _checked_definition(network, "network definition")
    save_atomically({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, path / WEIGHTS_FILE)
    write_text_atomically(path / NETWORK_FILE, json.dumps(definition, indent=2) + "\n")
    if config_file:
        with atomic_path(path / BUNDLE_DIR / Path(config_file).name) as tmp:
            shutil.copy(config_file, tmp)
    write_text_atomically(
        path / "requirements.txt", f"masksup-med=={masksup_med.__version__}\ntorch\nmonai=={_version('monai')}\n"
    )
    mlflow_model = mlflow_model or Model()
    mlflow_model.signature = signature
    mlflow_model.add_flavor(
        FLAVOR,
        format_version=FORMAT_VERSION,
        weights=WEIGHTS_FILE,
        network=NETWORK_FILE,
        input_shape=[int(s) for s in input_shape],
        bundle=bundle,
        threshold=float(threshold),
        masksup_med_version=masksup_med.__version__,
        torch_version=str(torch.__version__),
    )
    mlflow.pyfunc.add_to_model(mlflow_model, loader_module=__name__)
    with atomic_path(path / "MLmodel") as tmp:
        mlflow_model.save(str(tmp))
    return mlflow_model


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


class _TensorModel:
    """``python_function`` flavor: a batch ``N, C, *spatial`` (float32) in, logits out."""

    def __init__(self, network: torch.nn.Module) -> None:
        self.network = network

    def predict(self, model_input: Any, params: Mapping[str, Any] | None = None) -> np.ndarray:
        """Logits for a batch of images."""
        device = next(self.network.parameters()).device
        with torch.no_grad():
            batch = torch.as_tensor(np.asarray(model_input, dtype=np.float32), device=device)
            return self.network(batch).cpu().numpy()


def _load_pyfunc(data_path: str, model_config: Mapping[str, Any] | None = None) -> _TensorModel:
    """MLflow's pyfunc entry point (``mlflow.pyfunc.load_model``), through :func:`load_model`."""
    return _TensorModel(load_model(data_path, (model_config or {}).get("device", "cpu")))
