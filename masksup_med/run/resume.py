"""Resuming a stopped training run from its last epoch checkpoint (MONAI CheckpointSaver/Loader pattern).

The trainer's CheckpointSaver keeps the last two epoch checkpoints (``checkpoint_epoch=N.pt``) with
the network, optimizer, trainer state and the validator's best metric, each written whole or not at
all (:mod:`masksup_med.run.checkpoints`); a run started with ``--resume true`` loads the newest one
that reads back completely, so a kill costs at most the epoch under way, never the run. A run stopped
by SIGTERM (:mod:`masksup_med.run.stop`) saves its epoch's checkpoint at the iteration it stopped at,
and the resumed run finishes that epoch. Checkpoints are read as plain weights (``weights_only=True``):
a planted file holding pickled code is refused, its code never run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Engine
from monai.handlers import CheckpointLoader, CheckpointSaver

from masksup_med.errors import ConfigError
from masksup_med.run.checkpoints import epoch_checkpoints, keep_latest_epoch_checkpoints, unreadable_reason
from masksup_med.run.overrides import config_flag
from masksup_med.run.stop import SignalStopHandler

__all__ = ["BestMetricState", "attach_handlers", "check_checkpoint_holds", "latest_checkpoint", "resume_mode"]

logger = logging.getLogger(__name__)


def resume_mode(resume: bool | str) -> str:
    """``"never"``, ``"always"`` or ``"auto"`` from a ``resume`` value (``false``, ``true``, ``auto``; bool or text)."""
    if str(resume).strip().lower() == "auto":
        return "auto"
    try:
        return "always" if config_flag(resume, "resume") else "never"
    except ConfigError:
        raise ConfigError(f"resume must be true, false or auto, got {resume!r}.") from None


def _readable_checkpoints(ckpt_dir: Path) -> tuple[list[tuple[int, Path, object]], list[str]]:
    """(epoch, path, trainer state) of every epoch checkpoint that loads as weights, newest first, and why the
    others did not."""
    readable, refused = [], []
    for epoch, path in reversed(epoch_checkpoints(ckpt_dir)):
        try:
            contents = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
        except Exception as e:  # noqa: BLE001 - truncated, corrupt or not plain weights: fall back to an older one
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            logger.warning(f"skipping unreadable checkpoint {path} ({type(e).__name__}: {reason})")
            refused.append(f"{path.name} ({type(e).__name__})")
            continue
        readable.append((epoch, path, contents.get("trainer") if isinstance(contents, Mapping) else None))
    return readable, refused


def _where_it_stopped(epoch: int, trainer: object) -> str:
    """``epoch N``, or for a checkpoint saved mid-epoch (a run stopped by SIGTERM) how far that epoch went."""
    try:
        done = int(trainer["iteration"]) - (epoch - 1) * int(trainer["epoch_length"])
        length = int(trainer["epoch_length"])
    except (TypeError, KeyError, ValueError):
        return f"epoch {epoch}"
    if 0 < done < length:
        return f"epoch {epoch} stopped after iteration {done} of {length}; the rest of that epoch runs first"
    return f"epoch {epoch}"


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
        epoch, path, trainer = readable[0]
        logger.info(f"resuming from {path} ({_where_it_stopped(epoch, trainer)})")
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

    def best_model_file(self) -> Path | None:
        """The file the best-model saver writes (None: no saver, or no fixed file name)."""
        tracker = getattr(self.best_saver, "_key_metric_checkpoint", None)
        handler = getattr(tracker, "save_handler", None)
        name, folder = getattr(handler, "filename", None), getattr(handler, "dirname", None)
        return Path(folder) / name if name and folder else None

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
        """Restore what :meth:`state_dict` saved, unless the best model's file no longer loads: then the next
        validation writes a new one."""
        best_file = self.best_model_file()
        problem = unreadable_reason(best_file) if best_file is not None and best_file.exists() else None
        if problem is not None:
            logger.warning(
                f"{best_file} does not load ({problem}); the best score so far is forgotten, so the next "
                "validation writes a new best model"
            )
            return
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        if self.best_saver is not None and "best_saver" in state:
            self.best_saver.load_state_dict(state["best_saver"])


def attach_handlers(engine: Engine, handlers: list) -> Engine:
    """Attach ``handlers`` (skipping disabled ones, which a bundle config resolves to None) to ``engine``.

    For handlers that refer to the engine itself (checkpointing the trainer), which a bundle config
    cannot list in the engine's own ``train_handlers`` without a circular reference. A
    CheckpointLoader's file is checked here, before the run starts, to hold every object it restores.
    The epoch CheckpointSaver (one saving every ``save_interval``) is given the epoch checkpoints
    already in its folder (:func:`~masksup_med.run.checkpoints.keep_latest_epoch_checkpoints`: kept to
    ``n_saved`` when resuming, removed when starting afresh), and a
    :class:`~masksup_med.run.stop.SignalStopHandler` is attached last, so SIGTERM stops the run with
    a checkpoint to resume from.
    """
    resume_from = None
    for handler in handlers:
        if isinstance(handler, CheckpointLoader):
            check_checkpoint_holds(handler.load_path, handler.load_dict)
            resume_from = handler.load_path
        if handler is not None:
            handler.attach(engine)
    savers = [h for h in handlers if isinstance(h, CheckpointSaver) and h._interval_checkpoint is not None]
    saver = savers[0] if savers else None
    keep_latest_epoch_checkpoints(saver, resume_from)
    SignalStopHandler(saver).attach(engine)
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
