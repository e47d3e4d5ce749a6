"""How a failed run reports a :class:`~masksup_med.errors.UserError`: the project's message last.

MONAI's config runner wraps every failure of a config expression in ``RuntimeError: Failed to evaluate
ConfigExpression``, so the project's own message ends up in the middle of chained tracebacks.
:func:`install` replaces the interpreter's exception hook: when the exception that ends the process
was caused by a :class:`UserError`, stderr gets one short block ending with that message, and the
full traceback goes to a log file. ``MASKSUP_MED_TRACEBACK=1`` prints the full traceback instead.
Any other exception is printed as Python prints it.

The log files go to a per-user folder, ``error-reports`` in the user cache folder
(:func:`~masksup_med.run.user_cache.user_cache_dir`), made with mode 0700; each file is created
exclusively with mode 0600 and never through a symlink, so nothing planted at a guessable name is
followed or overwritten. Only the newest :data:`KEEP_REPORTS` are kept.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
import traceback
from pathlib import Path
from types import TracebackType

from masksup_med.errors import UserError
from masksup_med.run.user_cache import private_folder, user_cache_dir

__all__ = ["KEEP_REPORTS", "TRACEBACK_ENV", "find_user_error", "install", "report"]

TRACEBACK_ENV = "MASKSUP_MED_TRACEBACK"
KEEP_REPORTS = 10


def _prune(folder: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` reports of ``folder`` (never following a link)."""
    reports = sorted(
        (p for p in folder.glob("masksup-med-error-*.log") if not p.is_symlink()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in reports[keep:]:
        old.unlink(missing_ok=True)


def find_user_error(error: BaseException | None) -> UserError | None:
    """The :class:`UserError` that ``error`` is, or was caused by (through ``__cause__``/``__context__``)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _write_traceback(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> Path | None:
    """Write the full traceback to a new private file (see the module docstring); its path, None if it cannot be."""
    text = "".join(traceback.format_exception(kind, error, tb))
    try:
        folder = private_folder(user_cache_dir() / "error-reports")
        name = f"masksup-med-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(4)}.log"
        path = folder / name
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        descriptor = os.open(path, flags, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        _prune(folder, KEEP_REPORTS)
    except OSError:
        return None
    return path


def report(kind: type[BaseException], error: BaseException, tb: TracebackType | None, stream=None) -> bool:
    """Print the short report of ``error`` when it comes from a :class:`UserError`; True if it did."""
    stream = stream if stream is not None else sys.stderr
    user_error = find_user_error(error)
    if user_error is None or os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0"):
        return False
    saved = _write_traceback(kind, error, tb)
    where = f"in {saved}" if saved else "not saved"
    stream.write(f"\nmasksup-med: the run stopped (full traceback {where}; set {TRACEBACK_ENV}=1 to print it).\n")
    stream.write(f"error: {user_error}\n")
    stream.flush()
    return True


_previous_hook = sys.excepthook


def _hook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    if not report(kind, error, tb):
        _previous_hook(kind, error, tb)


def install() -> None:
    """Make the process report :class:`UserError` failures briefly (see the module docstring). Idempotent;
    other exceptions still reach the hook that was there before."""
    global _previous_hook
    if sys.excepthook is not _hook:
        _previous_hook = sys.excepthook
        sys.excepthook = _hook
