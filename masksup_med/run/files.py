"""Files a run writes for the user are written whole or not at all: to a temporary name, then renamed.

A kill while a file is being written leaves the previous version of it (or none), never half of one:
the data goes to a hidden sibling ``.NAME.PID.XXXXXXXX.tmp`` in the same folder, is flushed to disk,
and ``os.replace`` puts it in place in one step. A process killed outright (SIGKILL, power loss) can
leave the temporary file behind; :func:`stale_temporaries` finds those whose process is gone, and
:func:`masksup_med.run.output_dir.claim` removes them when the next run takes the folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["TEMPORARY_NAME", "atomic_path", "save_atomically", "stale_temporaries", "write_text_atomically"]

TEMPORARY_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` only when the block succeeds.

    The block writes the whole file to the yielded path; its data is flushed to disk (``fsync``) and
    renamed onto ``path``. When the block fails (or the rename does), the temporary file is removed and
    ``path`` keeps what it held. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_atomically(obj: Any, path: str | os.PathLike, save: Callable[..., None] | None = None, **kwargs: Any) -> Path:
    """``save(obj, file, **kwargs)`` (default ``torch.save``) to ``path`` through :func:`atomic_path`."""
    if save is None:
        import torch  # here, so the data layer's writers do not load torch

        save = torch.save
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        save(obj, f, **kwargs)
    return Path(path)


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def stale_temporaries(folder: str | os.PathLike, alive: Callable[[int], bool]) -> list[Path]:
    """The temporary files of :func:`atomic_path` in ``folder`` (not its subfolders) whose process is not ``alive``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = TEMPORARY_NAME.match(path.name)
        if match and path.is_file() and int(match.group("pid")) != os.getpid() and not alive(int(match.group("pid"))):
            found.append(path)
    return sorted(found)
