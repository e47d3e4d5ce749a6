"""A training run's MLflow record, wired to the trainer by one handler.

A bundle config declares :class:`RunTrackingHandler` once in the trainer's handlers, with the store, the
experiment and the run name; it attaches MONAI's ``MLFlowHandler`` (parameters, every loss term,
validation metrics, the split file), the validation figures, the learning curves and the model
registration, all pointed at the same run. It is method-agnostic: the loss terms are whatever the
trainer writes (:mod:`masksup_med.methods.handlers`), the figures show a masked view only when given a masker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ignite.engine import Engine
from monai.handlers import MLFlowHandler

from masksup_med.methods.handlers import loss_terms
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
        self.handlers: list[Any] = []

    def attach(self, trainer: Engine) -> None:
        """Attach the trainer's and the evaluator's MLflow handlers, in the order they must run."""
        if not self.enabled:
            return
        on_trainer = [
            MLFlowHandler(
                **self.where,
                iteration_log=True,
                epoch_log=True,
                tag_name="train_loss",
                output_transform=self.output_transform,
                experiment_param=self.params,
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
        for handler in on_evaluator:
            handler.attach(self.evaluator)
        for evaluator in self.other_evaluators:
            on_evaluator.append(MLFlowHandler(**self.where, iteration_log=False, epoch_log=True))
            on_evaluator[-1].attach(evaluator)
        self.handlers = on_trainer + on_evaluator

    def run(self, trainer: Engine) -> None:
        """Run ``trainer``; when it fails, mark the MLflow run FAILED (KILLED on Ctrl-C) and re-raise.

        MLflow leaves a run that never completes as RUNNING; ignite gives no failure event that runs
        before MONAI's StatsHandler re-raises, so the run is marked here, around ``trainer.run()``.
        """
        try:
            trainer.run()
        except BaseException as e:
            self.mark_ended("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise

    def mark_ended(self, status: str) -> None:
        """Set the status of this run's MLflow record (if it was started) to ``status``."""
        for handler in self.handlers:
            run = getattr(handler, "cur_run", None)
            if isinstance(handler, MLFlowHandler) and run is not None:
                try:
                    handler.client.set_terminated(run.info.run_id, status)
                except Exception as e:  # noqa: BLE001 - the store may be what failed; the original error matters more
                    logger.warning(f"could not mark MLflow run {run.info.run_id} {status}: {e}")
                return
