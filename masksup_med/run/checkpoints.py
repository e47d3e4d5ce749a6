"""Checkpoint files that survive a kill, and no more of them than asked for, across resumes too.

MONAI's CheckpointSaver writes in place (ignite's ``DiskSaver(atomic=False)``) and, for a fixed file
name such as ``models/model.pt``, deletes the old file before writing the new one: a kill in between
leaves a truncated best model, or none. :class:`AtomicCheckpointSaver` is the same handler writing
through :func:`masksup_med.run.files.atomic_path`: the new file replaces the old one in one rename,
and a file it rotates out is deleted only once its successor is on disk.

Its epoch checkpoints (``checkpoint_epoch=N.pt``, ``n_saved`` of them) are counted by the saver of
one process only; :func:`keep_latest_epoch_checkpoints` hands a resumed run's saver the checkpoints
already in the folder, so the count holds across resumes.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointSaver

from masksup_med.run.files import atomic_path
from masksup_med.run.weights import error_summary

__all__ = [
    "EPOCH_CHECKPOINT",
    "AtomicCheckpointSaver",
    "AtomicDiskSaver",
    "epoch_checkpoints",
    "keep_latest_epoch_checkpoints",
    "unreadable_reason",
]

logger = logging.getLogger(__name__)

EPOCH_CHECKPOINT = re.compile(r"checkpoint_epoch=(\d+)\.pt$")


def unreadable_reason(path: str | os.PathLike) -> str | None:
    """Why ``path`` does not load as plain weights (``torch.load(weights_only=True)``), or None when it does."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, not plain weights: all mean "does not load"
        return error_summary(e)
    return None


def epoch_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of every ``checkpoint_epoch=N.pt`` in ``folder``, oldest first."""
    found = []
    for path in Path(folder).glob("*checkpoint_epoch=*.pt"):
        match = EPOCH_CHECKPOINT.search(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


class AtomicDiskSaver(DiskSaver):
    """ignite's DiskSaver writing each file to a temporary name and renaming it into place.

    ``remove`` only notes a file: it is deleted after the next file is written (ignite removes the
    file it rotates out before writing the new one). MONAI's ``atomic=False`` avoided ignite's own
    atomic mode because its temporary file is readable by its owner only; this one is created with
    the usual permissions.

    Args:
        dirname: the folder the files go to (created if missing).
        filename: a fixed file name for every save (``model.pt``); None: the name ignite gives.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, atomic=False, create_dir=True, require_empty=False)
        self.filename = filename
        self.pending_removal: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        written = self.filename or filename
        super().__call__(checkpoint, written, metadata)
        if idist.get_rank() == self.save_on_rank:
            for old in self.pending_removal:
                if old != written:
                    (self.dirname / old).unlink(missing_ok=True)
        self.pending_removal.clear()

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            func(checkpoint, f, **self.kwargs)

    def remove(self, filename: str) -> None:
        """Delete ``filename`` once the next file is written (a fixed file name is replaced, not deleted)."""
        self.pending_removal.append(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's CheckpointSaver whose every file is written whole or not at all (see the module docstring).

    The epoch checkpoints keep the newest of equal epoch numbers (a run stopped mid-epoch saves its
    epoch's file, which the epoch's end then replaces).

    Args:
        save_dir: the folder the checkpoints go to.
        save_dict: the objects to save, by name.
        kwargs: the other arguments of ``monai.handlers.CheckpointSaver`` (``save_key_metric``,
            ``key_metric_filename``, ``save_interval``, ``n_saved``, ``save_final``, ...).
    """

    def __init__(self, save_dir: str, save_dict: dict, **kwargs: Any) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(save_dir, getattr(checkpoint.save_handler, "filename", None))
        if self._interval_checkpoint is not None:
            self._interval_checkpoint.greater_or_equal = True


def keep_latest_epoch_checkpoints(saver: CheckpointSaver | None, resume_from: str | os.PathLike | None) -> list[Path]:
    """Give ``saver`` (the trainer's epoch CheckpointSaver) the epoch checkpoints of earlier runs in its folder.

    Resuming (``resume_from``, one of them): the newest ``n_saved`` up to that one are kept and counted
    as the saver's own, so it deletes them in turn as it writes new ones; older ones, and newer ones
    that did not load, are deleted now. Starting afresh (None): every epoch checkpoint there is from an
    earlier run, which would mix with this run's and be taken by a later ``--resume``: all are deleted.
    Returns the deleted files.
    """
    checkpoint = getattr(saver, "_interval_checkpoint", None)
    if saver is None or checkpoint is None:
        return []
    found = epoch_checkpoints(saver.save_dir)
    keep: list[tuple[int, Path]] = []
    if resume_from is not None:
        resumed = Path(resume_from).resolve()
        resumed_epoch = next((epoch for epoch, path in found if path.resolve() == resumed), None)
        if resumed_epoch is not None:
            keep = [(epoch, path) for epoch, path in found if epoch <= resumed_epoch]
            if checkpoint.n_saved is not None:
                keep = keep[-checkpoint.n_saved :]
    removed = [path for epoch, path in found if (epoch, path) not in keep]
    if idist.get_rank() == 0:
        for path in removed:
            path.unlink(missing_ok=True)
    if removed:
        why = f"beyond the {checkpoint.n_saved} kept" if resume_from is not None else "of an earlier run"
        logger.info(f"removed {len(removed)} epoch checkpoint(s) {why}: {', '.join(p.name for p in removed)}")
    checkpoint._saved = [Checkpoint.Item(epoch, path.name) for epoch, path in keep]
    return removed
