"""MLflow model registry: register a trained checkpoint, load a registered model.

Registration never touches the checkpoint on disk: its weights are logged with the definition that
rebuilds their network (:mod:`masksup_med.tracking.model_format`: no pickled code), a signature and tags
(bundle, input shape, threshold, the run's scores), then registered. When it fails, the error says
how to register the same checkpoint again by hand with ``masksup-med registry register``.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from ignite.engine import Engine, Events
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import Model, infer_signature

from masksup_med.run.overrides import bundle_run_config
from masksup_med.run.shipped import verify_shipped
from masksup_med.run.weights import read_weights
from masksup_med.tracking import model_format
from masksup_med.tracking.model_format import build_network, load_model, network_definition
from masksup_med.tracking.store import find_run_id, using_store

__all__ = [
    "ModelRegistrationHandler",
    "find_run_id",
    "load_checkpoint",
    "load_network",
    "manual_register_command",
    "register_checkpoint",
    "registered_bundle",
    "using_store",
]

logger = logging.getLogger(__name__)


def load_checkpoint(network: torch.nn.Module, checkpoint: str | Path) -> torch.nn.Module:
    """Load weights saved by MONAI's CheckpointSaver (``{"model": state}`` or a bare state dict) into ``network``.

    A model a bundle ships (listed in its ``large_files.yml``) is checked against its checksum first
    (:func:`masksup_med.run.shipped.verify_shipped`). A missing file raises
    :class:`~masksup_med.errors.MissingInputError`, one that does not load
    :class:`~masksup_med.errors.UnreadableFileError`, each naming the file and what to do.
    """
    checkpoint = Path(checkpoint)
    verify_shipped(checkpoint)  # a model a bundle ships: present and unaltered, else refused naming it
    hint = (
        "Train the bundle (with --overwrite true to replace a broken model in the same folder), or point "
        "model_source at another checkpoint or a registered model (models:/NAME@ALIAS)."
    )
    state = read_weights(checkpoint, f"checkpoint {checkpoint}", hint)
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {checkpoint} does not fit the configured network: {e}") from e
    return network


def load_network(
    source: str | Path, network: torch.nn.Module, device: torch.device | str, tracking_uri: str | None = None
) -> torch.nn.Module:
    """The network to evaluate or run: ``models:/NAME@ALIAS`` (or ``/VERSION``) from the MLflow registry
    (through :func:`masksup_med.tracking.model_format.load_model`: weights and definition, no pickled code),
    otherwise a checkpoint file loaded into the configured ``network``. Returned in eval mode on ``device``."""
    if str(source).startswith(("models:/", "runs:/")):
        return load_model(str(source), torch.device(device), tracking_uri)
    return load_checkpoint(network, source).to(device).eval()


def manual_register_command(
    checkpoint: str | Path, config_file: str | Path, name: str, tracking_uri: str, run_id: str | None = None
) -> str:
    """The shell command that registers ``checkpoint`` by hand (printed when registration fails)."""
    parts = [
        "masksup-med",
        "registry",
        "register",
        str(checkpoint),
        "--config",
        str(config_file),
        "--name",
        name,
        "--tracking-uri",
        tracking_uri,
    ]
    if run_id:
        parts += ["--run-id", run_id]
    return shlex.join(parts)


def register_checkpoint(
    checkpoint: str | Path,
    network_def: Mapping[str, Any],
    name: str,
    tracking_uri: str,
    input_shape: tuple[int, ...],
    run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    alias: str | None = "candidate",
    bundle: str | None = None,
    threshold: float = 0.5,
    config_file: str | Path | None = None,
) -> ModelVersion:
    """Log the weights in ``checkpoint`` with the definition that rebuilds their network, and register them.

    The version holds no pickled code (see :mod:`masksup_med.tracking.model_format`); its tags say the bundle,
    the input shape and the threshold, besides ``tags``.

    Args:
        checkpoint: a state dict saved by MONAI's CheckpointSaver (``{"model": ...}`` or a bare state dict).
        network_def: the network definition, plain JSON (see
            :func:`~masksup_med.tracking.model_format.network_definition`).
        name: registered model name, e.g. ``masksup-glas``.
        tracking_uri: MLflow tracking URI (SQLite file or server).
        input_shape: one input sample ``C, *spatial`` used for the signature.
        run_id: the training run to attach the model to (a new run is created when None).
        tags: set on the model version (dataset, split, validation metrics, masking settings, ...).
        alias: alias given to the new version (``None``: none).
        bundle: the bundle the model was trained with (tag ``bundle``).
        threshold: the bundle's probability threshold (tag ``threshold``).
        config_file: the bundle config, logged with the model for people to read.
    """
    checkpoint = Path(checkpoint)
    model = load_checkpoint(build_network(network_def), checkpoint).eval()
    example = np.zeros((1, *input_shape), dtype=np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)

    version_tags = {
        **(tags or {}),
        "input_shape": ",".join(str(int(s)) for s in input_shape),
        "threshold": threshold,
        "network": type(model).__name__,
        "model_format": "masksup-med weights",
    }
    if bundle:
        version_tags["bundle"] = bundle
    with using_store(tracking_uri):
        with mlflow.start_run(run_id=run_id) as run:
            info = Model.log(
                None,
                model_format,
                name="model",
                state_dict=model.state_dict(),
                network=network_def,
                input_shape=input_shape,
                signature=signature,
                bundle=bundle,
                threshold=threshold,
                config_file=config_file,
            )
        version = mlflow.register_model(info.model_uri, name, tags={k: str(v) for k, v in version_tags.items()})
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.set_model_version_tag(name, version.version, "run_id", run.info.run_id)
    client.set_model_version_tag(name, version.version, "checkpoint", str(checkpoint.resolve()))
    if alias:
        warn_if_alias_moves_to_a_worse_version(client, name, alias, version)
        client.set_registered_model_alias(name, alias, version.version)
    return version


def _best_scores(tags: Mapping[str, str]) -> dict[str, float]:
    scores = {}
    for key, value in tags.items():
        if key.startswith("best_") and key != "best_epoch":
            try:
                scores[key] = float(value)
            except ValueError:
                continue
    return scores


def warn_if_alias_moves_to_a_worse_version(
    client: mlflow.MlflowClient, name: str, alias: str, version: ModelVersion
) -> bool:
    """Log a warning, naming both versions, when ``alias`` is about to leave a version that validated better
    on the same data (same ``dataset`` and ``dataset_dir`` tags) for ``version``. True if it warned."""
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return False  # the alias is new
    same_data = all(holder.tags.get(k) == version.tags.get(k) for k in ("dataset", "dataset_dir"))
    before, after = _best_scores(holder.tags), _best_scores(version.tags)
    worse = {k: (before[k], after[k]) for k in before.keys() & after.keys() if after[k] < before[k]}
    if not (same_data and worse):
        return False
    key, (old, new) = min(worse.items())
    logger.warning(
        f"alias {alias!r} of {name} moves from version {holder.version} ({key} {old:.4f}) to version {version.version} "
        f"({key} {new:.4f}), which validated worse on the same data; to point it back: masksup-med registry promote "
        f"{name} {holder.version} --alias {alias}"
    )
    return True


def registered_bundle(model_uri: str, tracking_uri: str | None = None) -> str | None:
    """The ``bundle`` tag of the version ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names (None: no tag)."""
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name, version = get_model_name_and_version(client, model_uri)
    return client.get_model_version(name, version).tags.get("bundle") or None


class ModelRegistrationHandler:
    """At the end of training, register the best checkpoint in the MLflow model registry.

    Attach to the trainer. The training run is found by name in the tracking store; the version
    gets ``tags`` plus the validation results of the evaluator and the alias ``candidate``.
    The network is registered by its definition, ``network_def`` of ``config_file``, checked to
    describe ``network`` (the one trained). A failure is logged with the command to register by
    hand, and never affects the checkpoint.

    Args:
        checkpoint: path of the best checkpoint written by the evaluator's CheckpointSaver.
        config_file: the bundle's training config: its ``network_def`` is registered, the file logged
            with the model and quoted in the by-hand command on failure.
        network: the network trained (``None``: not checked against ``config_file``).
        name: registered model name.
        tracking_uri, experiment_name, run_name: where the training run is tracked.
        input_shape: one input sample ``C, *spatial``.
        evaluator: the validation evaluator, whose best metric is recorded as a tag.
        tags: extra version tags.
        alias: alias for the new version.
        enabled: set False (e.g. on ranks other than 0) to do nothing.
        selection_tags: when the best checkpoint was chosen among several networks (a teacher and a
            student), a callable giving the tags that say which and its score, instead of the evaluator's.
        bundle: the bundle's name (version tag ``bundle``).
        threshold: the bundle's probability threshold (version tag ``threshold``).
    """

    def __init__(
        self,
        checkpoint: str | Path,
        config_file: str | Path,
        network: torch.nn.Module | None,
        name: str,
        tracking_uri: str,
        experiment_name: str,
        run_name: str,
        input_shape: tuple[int, ...],
        evaluator: Engine | None = None,
        tags: Mapping[str, Any] | None = None,
        alias: str | None = "candidate",
        enabled: bool = True,
        selection_tags: Callable[[], Mapping[str, Any]] | None = None,
        bundle: str | None = None,
        threshold: float = 0.5,
    ) -> None:
        self.checkpoint = Path(checkpoint)
        self.config_file = config_file
        self.network = network
        self.name = name
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.input_shape = tuple(input_shape)
        self.evaluator = evaluator
        self.tags = dict(tags or {})
        self.selection_tags = selection_tags
        self.alias = alias
        self.enabled = enabled
        self.bundle = bundle
        self.threshold = threshold
        self.version: ModelVersion | None = None

    def attach(self, engine: Engine) -> None:
        """Register at ``Events.COMPLETED`` of ``engine``."""
        if self.enabled:
            engine.add_event_handler(Events.COMPLETED, self)

    def _version_tags(self) -> dict[str, Any]:
        """``tags`` plus the evaluator's best key metric and its epoch (the checkpoint's own scores)."""
        tags = dict(self.tags)
        state = getattr(self.evaluator, "state", None)
        if self.selection_tags is not None:  # the best model was chosen among several networks
            tags.update(self.selection_tags())
        elif state is not None and getattr(state, "best_metric_epoch", -1) != -1:
            tags[f"best_{state.key_metric_name}"] = f"{float(state.best_metric):.4f}"
            tags["best_epoch"] = state.best_metric_epoch
        return tags

    def _network_def(self) -> dict[str, Any]:
        """``network_def`` of the run's own config (its merged files and overrides; ``config_file`` outside a
        bundle run), refused when it does not build the network that was trained."""
        run_config = bundle_run_config()
        definition = network_definition(run_config if run_config is not None else self.config_file)
        trained = getattr(self.network, "module", self.network)  # DistributedDataParallel wraps it
        if trained is not None and repr(build_network(definition)) != repr(trained):
            raise ValueError(
                f"network_def of the run's config ({self.config_file} outside a bundle run) does not build the "
                "network that was trained; register by hand with a config file whose network_def is the trained one"
            )
        return definition

    def __call__(self, engine: Engine) -> None:
        run_id = None
        try:
            if not self.checkpoint.is_file():
                raise FileNotFoundError(f"no best checkpoint at {self.checkpoint} (did validation run at least once?)")
            run_id = find_run_id(self.tracking_uri, self.experiment_name, self.run_name)
            self.version = register_checkpoint(
                self.checkpoint,
                self._network_def(),
                self.name,
                self.tracking_uri,
                self.input_shape,
                run_id=run_id,
                tags=self._version_tags(),
                alias=self.alias,
                bundle=self.bundle,
                threshold=self.threshold,
                config_file=self.config_file,
            )
            logger.info(
                f"registered {self.checkpoint} as MLflow model {self.name} version {self.version.version}"
                + (f" (alias {self.alias})" if self.alias else "")
            )
        except Exception as e:  # noqa: BLE001 - registration must never lose the training result
            logger.error(
                f"registering {self.checkpoint} as {self.name!r} failed: {type(e).__name__}: {e}. The checkpoint "
                "is unchanged; register it by hand with: "
                + manual_register_command(self.checkpoint, self.config_file, self.name, self.tracking_uri, run_id)
            )
