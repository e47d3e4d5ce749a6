"""One training run per output folder: writable, locked while in use, and no earlier model replaced unasked.

Two trainings on one ``output_dir`` overwrite each other's checkpoints and tracking store, and a fresh
run silently replaces the best model an earlier run left there. :func:`claim` refuses
both at start, before anything is written, with a message that says what to do (and says so when the
model there does not load), and removes the temporary files a killed run left behind.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import socket
import sys
from pathlib import Path

from masksup_med.errors import OutputDirError
from masksup_med.run.checkpoints import unreadable_reason
from masksup_med.run.files import stale_temporaries
from masksup_med.run.overrides import config_flag

__all__ = ["LOCK_NAME", "acquire_lock", "claim", "lock_holder", "release_lock"]

LOCK_NAME = ".masksup-med.lock"

logger = logging.getLogger(__name__)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def lock_holder(lock_file: str | os.PathLike) -> dict | None:
    """What the lock file says of its holder (``pid``, ``host``, ``started``, ``command``); None if unreadable."""
    try:
        holder = json.loads(Path(lock_file).read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _is_stale(holder: dict | None) -> bool:
    """A lock is stale when its holder was on this host and its process is gone (killed runs leave one)."""
    if holder is None:
        return True
    return holder.get("host") == socket.gethostname() and not _process_alive(int(holder.get("pid", -1)))


def release_lock(lock_file: str | os.PathLike) -> None:
    """Remove ``lock_file`` if this process holds it."""
    holder = lock_holder(lock_file)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        Path(lock_file).unlink(missing_ok=True)


def acquire_lock(folder: str | os.PathLike) -> Path:
    """Create ``folder/.masksup-med.lock`` naming this process; released when the process exits.

    A lock left by a process of this host that no longer runs is taken over with a warning; a live
    holder (or one on another host) makes this fail, naming it.
    """
    lock_file = Path(folder) / LOCK_NAME
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    for _ in range(2):
        try:
            fd = os.open(lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = lock_holder(lock_file)
            if not _is_stale(holder):
                raise OutputDirError(
                    f"output_dir {folder} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
                    f"started {holder.get('started')}: {holder.get('command')}). Wait for it to finish or train into "
                    f"another --output_dir; if that run is no longer alive, delete {lock_file}."
                ) from None
            logger.warning(f"taking over the stale lock {lock_file} of a run that no longer runs ({holder})")
            lock_file.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(release_lock, lock_file)
        return lock_file
    raise OutputDirError(
        f"output_dir {folder}: could not create the lock file {lock_file}; another run keeps taking it."
    )


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(
            f"output_dir {folder} cannot be written ({type(e).__name__}: {e.strerror or e}); "
            "pass a writable --output_dir."
        ) from e


def claim(
    output_dir: str | os.PathLike,
    resume_from: str | os.PathLike | None,
    best_model_file: str | os.PathLike | None = None,
    overwrite: bool | str = False,
) -> Path:
    """Make ``output_dir`` this run's: writable, locked, and holding no earlier model unless resuming.

    A fresh run (``resume_from`` None: no checkpoint to resume) into a folder that already holds
    ``best_model_file`` is refused unless ``overwrite`` is true, so an earlier run's best model is never
    replaced without asking; when that file does not load, the message says so. Temporary files of
    killed runs (:mod:`masksup_med.run.files`) in the folder and in ``best_model_file``'s are removed.
    Returns the lock file.
    """
    folder = Path(output_dir)
    replace_model = config_flag(overwrite, "overwrite")
    _check_writable(folder)
    lock_file = acquire_lock(folder)
    if resume_from is None and best_model_file and Path(best_model_file).exists() and not replace_model:
        release_lock(lock_file)
        problem = unreadable_reason(best_model_file)
        if problem is not None:
            raise OutputDirError(
                f"output_dir {folder} holds a model file that does not load: {best_model_file} ({problem}); an "
                "earlier run was probably killed while writing it. Pass --overwrite true to train afresh and replace "
                "it, continue that run with --resume true, or train into a new --output_dir."
            )
        raise OutputDirError(
            f"output_dir {folder} already holds a trained model ({best_model_file}) from an earlier run, which this "
            "run would replace. Continue that run with --resume true, train into a new --output_dir, or pass "
            "--overwrite true to replace it."
        )
    folders = {folder} | ({Path(best_model_file).parent} if best_model_file else set())
    for debris in sorted(path for where in folders for path in stale_temporaries(where, _process_alive)):
        logger.info(f"removing {debris}, the temporary file of a run that was killed while writing")
        debris.unlink(missing_ok=True)
    return lock_file
