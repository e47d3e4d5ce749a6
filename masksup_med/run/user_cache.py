"""The user's own cache folder: the data-check cache and the start-up error reports live there."""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["CACHE_ENV", "private_folder", "user_cache_dir"]

CACHE_ENV = "MASKSUP_MED_CACHE_DIR"


def user_cache_dir() -> Path:
    """``$MASKSUP_MED_CACHE_DIR``, else ``$XDG_CACHE_HOME/masksup-med``, else ``~/.cache/masksup-med``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "masksup-med"


def private_folder(folder: Path) -> Path:
    """``folder``, made with mode 0700 if missing; OSError unless it is a real folder (not a link) of this user."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
        raise OSError(f"{folder} is not a folder of this user")
    return folder
