"""Handlers that work for any trainer whose iteration writes named loss terms.

A trainer on MONAI's engine writes its back-propagated total to ``engine.state.output["loss"]``
and each named term it wants logged to ``engine.state.output["loss_<name>"]`` (detached scalars).
Nothing here knows which method wrote them: MaskSup writes ``loss_seg``, ``loss_context`` and
``loss_tasksim``, MONAI's plain ``SupervisedTrainer`` writes ``loss`` alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys

__all__ = ["FinalValidationHandler", "LossTermAveragesHandler", "is_loss_term", "loss_terms", "named_terms"]


def is_loss_term(key: Any) -> bool:
    """True for ``loss`` and ``loss_<name>``: the keys a trainer writes its loss terms under."""
    return isinstance(key, str) and (key == CommonKeys.LOSS or key.startswith(f"{CommonKeys.LOSS}_"))


def named_terms(terms: Any) -> dict[str, torch.Tensor]:
    """``{"total": ..., name: ...}`` of a loss result: a mapping, a named tuple (``total`` first) or a tensor."""
    if isinstance(terms, torch.Tensor):
        return {"total": terms}
    as_dict = dict(terms._asdict()) if hasattr(terms, "_asdict") else dict(terms)
    if "total" not in as_dict:
        raise KeyError(f"a loss with named terms must return a 'total' term; got {sorted(as_dict)}")
    return as_dict


def loss_terms(
    output: Mapping[str, Any] | Sequence[Mapping[str, Any]], extra_keys: Sequence[str] = ()
) -> dict[str, float]:
    """``output_transform`` for StatsHandler / MLFlowHandler: every loss term of the trainer's output as a float.

    Accepts the output before or after decollation (a list of per-sample dicts, scalars repeated).
    ``extra_keys``: other scalars of the output to include (e.g. ``confident_fraction``).
    """
    first = output[0] if isinstance(output, Sequence) else output
    return {
        key: float(value.detach() if isinstance(value, torch.Tensor) else value)
        for key, value in first.items()
        if (is_loss_term(key) or key in extra_keys) and (not isinstance(value, torch.Tensor) or value.numel() == 1)
    }


class LossTermAveragesHandler:
    """Epoch means of every loss term the trainer writes, as ``engine.state.metrics["train_<key>"]``.

    The terms are found in the output (see :func:`loss_terms`), so any method's terms are averaged
    without naming them; ``extra_keys`` adds other scalars a method reports (not losses). Under
    DistributedDataParallel the sums are reduced over processes. List it before StatsHandler and
    MLFlowHandler, which read the metrics at the same event.

    Args:
        prefix: prefix of the metric names (``train_loss``, ``train_loss_seg``, ...).
        extra_keys: output keys of other scalars to average (not losses), e.g. a confident fraction.
    """

    def __init__(self, prefix: str = "train_", extra_keys: Sequence[str] = ()) -> None:
        self.prefix = prefix
        self.extra_keys = tuple(extra_keys)
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def attach(self, engine: Engine) -> None:
        """Reset at each epoch start, accumulate every iteration, publish at the epoch end."""
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.publish)

    def reset(self, engine: Engine | None = None) -> None:
        """Forget the sums of the previous epoch."""
        self._sums.clear()
        self._counts.clear()

    def update(self, engine: Engine) -> None:
        """Add this iteration's terms."""
        for key, value in loss_terms(engine.state.output, self.extra_keys).items():
            self._sums[key] = self._sums.get(key, 0.0) + value
            self._counts[key] = self._counts.get(key, 0) + 1

    def publish(self, engine: Engine) -> None:
        """Write the epoch means into ``engine.state.metrics``."""
        names = sorted(self._sums)
        if not names:
            return
        totals = torch.tensor([[self._sums[n], self._counts[n]] for n in names], dtype=torch.float64)
        if idist.get_world_size() > 1:
            totals = idist.all_reduce(totals.to(idist.device())).cpu()
        for name, (total, count) in zip(names, totals.tolist()):
            engine.state.metrics[f"{self.prefix}{name}"] = total / max(count, 1.0)


class FinalValidationHandler:
    """Validate once more when training ends on an epoch that the validation interval skipped.

    With ``max_epochs`` 3 and ``val_interval`` 5, MONAI's ``ValidationHandler`` never runs: no best
    checkpoint is written and nothing can be registered. List it after the ``ValidationHandler``
    (and before the tracking and registration handlers, which run at the same event).

    Args:
        validator: the validation evaluator to run.
        interval: the validation interval of the run, in epochs (>= 1).
    """

    def __init__(self, validator: Engine, interval: int) -> None:
        if interval < 1:
            raise ValueError(f"validation interval must be >= 1, got {interval!r}.")
        self.validator = validator
        self.interval = int(interval)

    def attach(self, engine: Engine) -> None:
        """Check at ``Events.COMPLETED`` of the trainer."""
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.epoch % self.interval != 0:
            self.validator.run(engine.state.epoch)
