"""A training run's MLflow record, wired to the trainer by one handler.

A bundle config declares :class:`RunTrackingHandler` once in the trainer's handlers, with the store, the
experiment and the run name; it attaches MONAI's ``MLFlowHandler`` (parameters, every loss term,
validation metrics, the split file), the validation figures, the learning curves and the model
registration, all pointed at the same run. It is method-agnostic: the loss terms are whatever the
trainer writes (:mod:`masksup_med.methods.handlers`), the figures show a masked view only when given a masker.

A run's id is kept in a small file next to its checkpoints (``run_file``), so a resumed training
continues the same MLflow run, which ends FINISHED when the training does; a run stopped by SIGTERM
(:mod:`masksup_med.run.stop`) or Ctrl-C is marked KILLED, one that fails FAILED.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler

from masksup_med.methods.handlers import loss_terms
from masksup_med.run.files import write_text_atomically
from masksup_med.run.stop import SignalStopHandler
from masksup_med.tracking.figures import LearningCurveHandler, ValidationFigureHandler
from masksup_med.tracking.registry import ModelRegistrationHandler

__all__ = ["RunTrackingHandler"]

logger = logging.getLogger(__name__)


class RunTrackingHandler:
    """Attach everything a training run records in MLflow to the trainer (and its validator).

    Args:
        tracking_uri, experiment_name, run_name: where the run is recorded (given once, here).
        params: run parameters (see :func:`masksup_med.tracking.store.run_params`); also the registered
            model version's tags.
        artifacts: files logged with the run (e.g. the split, ``datalist.json``).
        evaluator: the validation evaluator: its metrics are logged each round, the figures drawn
            after each round, and its best score tagged on the registered model.
        figures: keyword arguments of ``figure_handler`` (for the default
            :class:`~masksup_med.tracking.figures.ValidationFigureHandler`: ``dataset``, ``network``, optional
            ``masker``, ``num_images``); None: no figures.
        figure_handler: the class drawing the figures, attached to the evaluator, or to the trainer
            when there is none (e.g. :class:`~masksup_med.tracking.figures.ReconstructionFigureHandler` for
            pretraining).
        registration: keyword arguments of :class:`~masksup_med.tracking.registry.ModelRegistrationHandler`
            (``checkpoint``, ``config_file``, ``network``, ``name``, ``input_shape``, ``bundle``,
            ``threshold``, ``alias``); None: nothing is registered.
        other_evaluators: further evaluators whose metrics are logged each round (e.g. the student's
            scores when the validator scores a teacher).
        extra_figures: more figure handlers for ``evaluator``, each given as a callable (in a config, an
            item with ``"_mode_": "callable"``) that takes ``tracking_uri``, ``experiment_name`` and
            ``run_name`` and returns the handler, so it logs to this run (e.g. the semi-supervised
            pseudo-label figures, :class:`~masksup_med.tracking.figures.PseudoLabelFigureHandler`).
        output_transform: what the trainer's output logs per iteration (default: every loss term).
        enabled: False (e.g. on processes other than rank 0 under DDP) attaches nothing.
        run_file: a JSON file keeping the run's id and name (written, atomically, when the trainer starts);
            None: none is kept.
        resuming: True when the training resumes from a checkpoint: the run ``run_file`` names is
            continued (a new one is started, with a warning, when it is not in this store and experiment).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        run_name: str,
        params: Mapping[str, Any] | None = None,
        artifacts: Sequence[str] = (),
        evaluator: Engine | None = None,
        figures: Mapping[str, Any] | None = None,
        figure_handler: Callable[..., Any] = ValidationFigureHandler,
        registration: Mapping[str, Any] | None = None,
        other_evaluators: Sequence[Engine] = (),
        extra_figures: Sequence[Callable[..., Any]] = (),
        output_transform: Callable = loss_terms,
        enabled: bool = True,
        run_file: str | Path | None = None,
        resuming: bool = False,
    ) -> None:
        self.where = {"tracking_uri": tracking_uri, "experiment_name": experiment_name, "run_name": run_name}
        self.params = dict(params or {})
        self.artifacts = list(artifacts)
        self.evaluator = evaluator
        self.figures = dict(figures) if figures is not None else None
        self.figure_handler = figure_handler
        self.registration = dict(registration) if registration is not None else None
        self.other_evaluators = list(other_evaluators)
        self.extra_figures = list(extra_figures)
        self.output_transform = output_transform
        self.enabled = enabled
        self.run_file = Path(run_file) if run_file else None
        self.resuming = bool(resuming)
        self.continued: mlflow.entities.Run | None = None  # the run a resumed training continues
        self.handlers: list[Any] = []

    def attach(self, trainer: Engine) -> None:
        """Attach the trainer's and the evaluator's MLflow handlers, in the order they must run."""
        if not self.enabled:
            return
        params = self.params
        self.continued = self._run_to_continue() if self.resuming else None
        if self.continued is not None:
            self.where["run_name"] = self.continued.info.run_name
            logged = self.continued.data.params
            params = {key: value for key, value in self.params.items() if key not in logged}
        on_trainer = [
            MLFlowHandler(
                **self.where,
                iteration_log=True,
                epoch_log=True,
                tag_name="train_loss",
                output_transform=self.output_transform,
                experiment_param=params,
                artifacts=self.artifacts,
                close_on_complete=True,
            ),
            LearningCurveHandler(**self.where),
        ]
        if self.registration is not None:
            on_trainer.append(
                ModelRegistrationHandler(**self.registration, **self.where, evaluator=self.evaluator, tags=self.params)
            )
        on_evaluator = []
        if self.evaluator is not None:
            on_evaluator.append(MLFlowHandler(**self.where, iteration_log=False, epoch_log=True))
        if self.figures is not None:
            figures = self.figure_handler(**self.figures, **self.where)
            (on_evaluator if self.evaluator is not None else on_trainer).append(figures)
        if self.evaluator is not None:
            on_evaluator.extend(make(**self.where) for make in self.extra_figures)
        for handler in on_trainer:
            handler.attach(trainer)
        if self.run_file is not None:
            trainer.add_event_handler(Events.STARTED, self._keep_run_id)  # after MLFlowHandler.start made the run
        for handler in on_evaluator:
            handler.attach(self.evaluator)
        for evaluator in self.other_evaluators:
            on_evaluator.append(MLFlowHandler(**self.where, iteration_log=False, epoch_log=True))
            on_evaluator[-1].attach(evaluator)
        self.handlers = on_trainer + on_evaluator

    def _client(self) -> mlflow.MlflowClient:
        return mlflow.MlflowClient(tracking_uri=self.where["tracking_uri"])

    def _recorded_run(self) -> dict | None:
        """What ``run_file`` says (``run_id``, ``run_name``, ``experiment_name``), None when there is nothing."""
        if self.run_file is None or not self.run_file.is_file():
            return None
        try:
            record = json.loads(self.run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            logger.warning(f"cannot read {self.run_file} ({e}); it is replaced")
            return None
        return record if isinstance(record, dict) and record.get("run_id") else None

    def _run_to_continue(self) -> mlflow.entities.Run | None:
        """The MLflow run of ``run_file`` when it is in this store and experiment; None, with a warning, if not."""
        record = self._recorded_run()
        if record is None:
            logger.warning(f"no record of the MLflow run to continue ({self.run_file}); a new run is started")
            return None
        try:
            run = self._client().get_run(record["run_id"])
            experiment = self._client().get_experiment(run.info.experiment_id)
        except mlflow.exceptions.MlflowException as e:
            logger.warning(f"MLflow run {record['run_id']} of {self.run_file} is not in this store ({e}); a new run")
            return None
        if experiment.name != self.where["experiment_name"] or run.info.lifecycle_stage != "active":
            logger.warning(
                f"MLflow run {run.info.run_id} of {self.run_file} is in experiment {experiment.name!r} "
                f"({run.info.lifecycle_stage}), not {self.where['experiment_name']!r}; a new run is started"
            )
            return None
        return run

    def _keep_run_id(self, engine: Engine) -> None:
        """Write this run's id to ``run_file`` (when the trainer starts, once MLflow's handler made the run)."""
        run = getattr(self.handlers[0] if self.handlers else None, "cur_run", None)
        if run is None or self.run_file is None:
            return
        record = {"run_id": run.info.run_id, "run_name": run.info.run_name}
        record["experiment_name"] = self.where["experiment_name"]
        write_text_atomically(self.run_file, json.dumps(record, indent=2) + "\n")

    def _open(self) -> None:
        """Before the trainer starts: reopen the run being continued (RUNNING again, its changed parameters
        tagged ``resumed_<name>``), or, starting afresh, mark KILLED the run of ``run_file`` left RUNNING by a
        killed process (this folder is locked, so no live process is writing it)."""
        if not self.enabled:
            return
        if self.continued is not None:
            run_id = self.continued.info.run_id
            try:
                self._client().update_run(run_id, status="RUNNING")
                logged = self.continued.data.params
                for key, value in self.params.items():
                    if key in logged and logged[key] != str(value):
                        self._client().set_tag(run_id, f"resumed_{key}", str(value))
            except mlflow.exceptions.MlflowException as e:
                logger.warning(f"could not reopen MLflow run {run_id}: {e}")
            logger.info(f"continuing MLflow run {self.continued.info.run_name} ({run_id})")
            return
        record = self._recorded_run() if not self.resuming else None
        if record is None:
            return
        try:
            earlier = self._client().get_run(record["run_id"])
            if earlier.info.status == "RUNNING":
                self._client().set_terminated(earlier.info.run_id, "KILLED")
                logger.info(f"marked the earlier run of this folder, MLflow run {earlier.info.run_id}, KILLED")
        except mlflow.exceptions.MlflowException:
            pass  # not in this store (another MLFLOW_TRACKING_URI): nothing to mark

    def run(self, trainer: Engine) -> None:
        """Run ``trainer``; when it fails, mark the MLflow run FAILED (KILLED on Ctrl-C) and re-raise.

        MLflow leaves a run that never completes as RUNNING; ignite gives no failure event that runs
        before MONAI's StatsHandler re-raises, so the run is marked here, around ``trainer.run()``.
        When a signal stopped the trainer (:class:`~masksup_med.run.stop.SignalStopHandler`), the run is
        marked KILLED and the process ends with the stop's last line and exit code (143 for SIGTERM).
        """
        stop = SignalStopHandler.of(trainer)
        self._open()
        try:
            trainer.run()
        except BaseException as e:
            self.mark_ended("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            if stop is not None:
                stop.restore()
        if stop is not None and stop.received is not None:
            run_id = self.mark_ended("KILLED")
            stop.exit(f"MLflow run {run_id} marked KILLED" if run_id else "")

    def mark_ended(self, status: str) -> str | None:
        """Set the status of this run's MLflow record (if it was started) to ``status``; return its id."""
        for handler in self.handlers:
            run = getattr(handler, "cur_run", None)
            if isinstance(handler, MLFlowHandler) and run is not None:
                try:
                    handler.client.set_terminated(run.info.run_id, status)
                except Exception as e:  # noqa: BLE001 - the store may be what failed; the original error matters more
                    logger.warning(f"could not mark MLflow run {run.info.run_id} {status}: {e}")
                return run.info.run_id
        return None
