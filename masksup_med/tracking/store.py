"""MLflow tracking: where runs go, a start-up reachability check, finding a run, and a run's parameters.

MONAI's MLFlowHandler logs metrics; what it does not do is here (run parameters, store scoping, run
lookup), in :mod:`masksup_med.tracking.figures`, :mod:`masksup_med.tracking.registry` and, wiring them all to a
trainer, :mod:`masksup_med.tracking.run`. Nothing here knows a training method: components describe
themselves through a ``hyperparameters()`` method.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import monai
import requests
import torch

import masksup_med
from masksup_med.errors import ServerUnreachableError

__all__ = [
    "check_tracking_server",
    "component_params",
    "find_run_id",
    "git_commit",
    "resolve_tracking_uri",
    "run_params",
    "using_store",
]


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
        raise ServerUnreachableError(
            f"MLflow tracking server {tracking_uri} is not reachable ({type(e).__name__}: {e}). Start it, fix "
            "MLFLOW_TRACKING_URI / tracking_uri, or unset it to use the local SQLite store."
        ) from e
    return tracking_uri


def git_commit(path: str | Path = ".") -> str:
    """The git commit of the checkout containing ``path`` (with ``-dirty`` if modified), or ``unknown``."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


@contextlib.contextmanager
def using_store(tracking_uri: str | None) -> Iterator[None]:
    """Point MLflow's fluent API at ``tracking_uri`` (tracking and registry) for a block, then restore.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` to the
    environment (inherited by subprocesses), so both the module state (MLflow 3.17's private globals)
    and the environment are put back as they were, unset included. ``None``: leave everything as it is.
    """
    if not tracking_uri:
        yield
        return
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_globals = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    saved_env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved_globals
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def find_run_id(tracking_uri: str, experiment_name: str, run_name: str) -> str:
    """The id of the (unique) run called ``run_name`` in ``experiment_name``."""
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise LookupError(f"MLflow experiment {experiment_name!r} not found at {tracking_uri}.")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    if not runs:
        raise LookupError(f"MLflow run {run_name!r} not found in experiment {experiment_name!r}.")
    return runs[0].info.run_id


def component_params(role: str, component: Any) -> dict[str, Any]:
    """What a run records of one component: its own ``hyperparameters()``, else ``{role: class name}``.

    ``None`` (a component a method does without) is recorded as ``{role: "none"}``.
    """
    if component is None:
        return {role: "none"}
    describe = getattr(component, "hyperparameters", None)
    if callable(describe):
        return dict(describe())
    return {role: type(component).__name__}


def run_params(
    network: torch.nn.Module,
    components: Mapping[str, Any] | None = None,
    split: Mapping[str, Any] | None = None,
    **recipe: Any,
) -> dict[str, Any]:
    """Parameters that identify a training run: network, components, split, recipe, versions, commit.

    ``components`` maps a role (``loss``, ``masking``, ``lr_scheduler``, ...) to the object playing
    it; each is recorded by :func:`component_params`, so a method's own settings (MaskSup's loss
    weights, its masking ratio) come from its own classes. ``split`` (the dataset adapter's split
    options) is logged key by key as ``split_<key>`` (``split_seed``, ``split_val_fraction``, ...),
    so runs can be searched by them. Values are strings, as MLflow stores them.
    """
    params: dict[str, Any] = {
        "network": type(network).__name__,
        "network_parameters": sum(p.numel() for p in network.parameters()),
    }
    for role, component in (components or {}).items():
        params.update(component_params(role, component))
    params.update({f"split_{key}": value for key, value in (split or {}).items()})
    params.update(recipe)
    params.update(
        {
            "masksup_med_version": masksup_med.__version__,
            "monai_version": monai.__version__,
            "torch_version": torch.__version__,
            "git_commit": git_commit(Path(masksup_med.__file__).parent),
        }
    )
    return {key: str(value) for key, value in params.items()}
