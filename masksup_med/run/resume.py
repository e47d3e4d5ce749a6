"""Resuming a killed training run from its last epoch checkpoint (MONAI CheckpointSaver/Loader pattern).

The trainer's CheckpointSaver keeps the last two epoch checkpoints (``checkpoint_epoch=N.pt``) with
the network, optimizer, trainer state and the validator's best metric; a run started with
``--resume true`` loads the newest one that reads back completely, so a kill during a save costs
one epoch, never the run. Checkpoints are read as plain weights (``weights_only=True``): a planted
file holding pickled code is refused, its code never run.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from ignite.engine import Engine
from monai.handlers import CheckpointLoader, CheckpointSaver

from masksup_med.errors import ConfigError
from masksup_med.run.overrides import config_flag

__all__ = ["BestMetricState", "attach_handlers", "check_checkpoint_holds", "latest_checkpoint", "resume_mode"]

logger = logging.getLogger(__name__)

_EPOCH = re.compile(r"checkpoint_epoch=(\d+)\.pt$")


def resume_mode(resume: bool | str) -> str:
    """``"never"``, ``"always"`` or ``"auto"`` from a ``resume`` value (``false``, ``true``, ``auto``; bool or text)."""
    if str(resume).strip().lower() == "auto":
        return "auto"
    try:
        return "always" if config_flag(resume, "resume") else "never"
    except ConfigError:
        raise ConfigError(f"resume must be true, false or auto, got {resume!r}.") from None


def _readable_checkpoints(ckpt_dir: Path) -> tuple[list[tuple[int, Path]], list[str]]:
    """(epoch, path) of every epoch checkpoint that loads as weights, newest first, and why the others did not."""
    candidates = []
    for path in ckpt_dir.glob("*checkpoint_epoch=*.pt"):
        match = _EPOCH.search(path.name)
        if match:
            candidates.append((int(match.group(1)), path))
    readable, refused = [], []
    for epoch, path in sorted(candidates, reverse=True):
        try:
            torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
        except Exception as e:  # noqa: BLE001 - truncated, corrupt or not plain weights: fall back to an older one
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            logger.warning(f"skipping unreadable checkpoint {path} ({type(e).__name__}: {reason})")
            refused.append(f"{path.name} ({type(e).__name__})")
            continue
        readable.append((epoch, path))
    return readable, refused


def latest_checkpoint(ckpt_dir: str | Path, resume: bool | str = True) -> str | None:
    """Path of the newest complete ``checkpoint_epoch=N.pt`` in ``ckpt_dir`` to resume from, or None.

    ``resume`` false: None. True: the checkpoint, or a :class:`ConfigError` when there is none that
    reads back (starting over must be asked for). ``auto``: None when there is none (benchmarks that
    start and resume with one command). Files that do not load as plain weights (cut short by a
    kill, or holding pickled code) are skipped with a warning.
    """
    mode = resume_mode(resume)
    if mode == "never":
        return None
    readable, refused = _readable_checkpoints(Path(ckpt_dir))
    if readable:
        epoch, path = readable[0]
        logger.info(f"resuming from {path} (epoch {epoch})")
        return str(path)
    if mode == "always":
        found = f"unreadable: {', '.join(refused)}" if refused else "none found"
        raise ConfigError(
            f"--resume true, but {ckpt_dir} holds no usable epoch checkpoint ({found}). To start over instead, "
            "run without --resume true (with --overwrite true if the folder holds a model to replace)."
        )
    logger.info(f"no checkpoint to resume from in {ckpt_dir}; training starts at epoch 1")
    return None


class BestMetricState:
    """Checkpointable view of the best-model tracking, so a resumed run keeps its best model.

    Holds the evaluator's best key metric (and its epoch) and the tracking list of the evaluator's
    best-model CheckpointSaver, so ``model.pt`` is replaced after resuming only by a better model,
    while ``model.pt`` itself stays a plain state dict. Put it in the trainer CheckpointSaver's
    ``save_dict`` and the CheckpointLoader's ``load_dict``.

    Args:
        evaluator: the validation evaluator whose best key metric is kept.
        best_saver: the CheckpointSaver writing the best model (None: only the metric is kept).
    """

    def __init__(self, evaluator: Engine, best_saver: CheckpointSaver | None = None) -> None:
        self.evaluator = evaluator
        self.best_saver = best_saver

    def state_dict(self) -> dict:
        """The evaluator's best metric, its epoch, and the best-model saver's tracking list."""
        state = {
            "best_metric": self.evaluator.state.best_metric,
            "best_metric_epoch": self.evaluator.state.best_metric_epoch,
        }
        tracker = getattr(self.best_saver, "_key_metric_checkpoint", None)  # MONAI keeps ignite's Checkpoint here
        if tracker is not None:
            state["best_saver"] = tracker.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        if self.best_saver is not None and "best_saver" in state:
            self.best_saver.load_state_dict(state["best_saver"])


def attach_handlers(engine: Engine, handlers: list) -> Engine:
    """Attach ``handlers`` (skipping disabled ones, which a bundle config resolves to None) to ``engine``.

    For handlers that refer to the engine itself (checkpointing the trainer), which a bundle config
    cannot list in the engine's own ``train_handlers`` without a circular reference. A
    CheckpointLoader's file is checked here, before the run starts, to hold every object it restores.
    """
    for handler in handlers:
        if isinstance(handler, CheckpointLoader):
            check_checkpoint_holds(handler.load_path, handler.load_dict)
        if handler is not None:
            handler.attach(engine)
    return engine


def check_checkpoint_holds(path: str | Path, load_dict: dict) -> None:
    """Fail, naming the file and what is missing, when checkpoint ``path`` lacks an object of ``load_dict``.

    A checkpoint written by an older config (before an id such as ``lr_scheduler`` was added)
    cannot resume the current one; without this check ignite fails with a bare key error.
    """
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if len(load_dict) == 1 and not set(load_dict) & set(saved):
        return  # one object: ignite reads the file as that object's own state dict
    missing = sorted(set(load_dict) - set(saved))
    if missing:
        raise ConfigError(
            f"checkpoint {path} cannot resume this run: it has no {', '.join(missing)} "
            f"(it holds {', '.join(sorted(saved))}); it was written by a different config. "
            "Train again without --resume true, or resume with the config that wrote it."
        )
