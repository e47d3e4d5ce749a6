"""Training checks its data before the first batch: the checks of ``masksup-med data check``, cached.

Every image and label a run will read (training, validation and unlabelled items of its datalist)
is decoded once and checked as ``data check`` does: unreadable files, images that are not 8-bit
RGB, labels that are not masks, labels of another size than their image. All problems are named
at start, before anything is written. The outcome of each file is cached by path, size and
modification time, so a second run over unchanged data checks in a moment.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from masksup_med.run.user_cache import CACHE_ENV, user_cache_dir

from .checks import CheckReport, check_image, check_pair
from .errors import DatasetError
from .registry import get_dataset

__all__ = ["CACHE_ENV", "SPLITS_READ_BY_TRAINING", "check_training_data", "default_cache_file"]

SPLITS_READ_BY_TRAINING = ("train", "validation", "unlabelled")
MAX_LISTED = 15
_CACHE_VERSION = 3  # a cache written with another version is dropped when read

logger = logging.getLogger(__name__)


def default_cache_file() -> Path:
    """``data-checks.json`` in ``$MASKSUP_MED_CACHE_DIR`` or ``$XDG_CACHE_HOME/masksup-med`` (``~/.cache/...``)."""
    return user_cache_dir() / "data-checks.json"


def _stamp(path: str) -> str:
    try:
        info = os.stat(path)
    except OSError:
        return "missing"
    return f"{info.st_size}|{info.st_mtime_ns}"


def _key_and_stamp(dataset: str, item: Mapping) -> tuple[str, str]:
    """(the item's entry in the cache: its files, the state of those files now). A changed file replaces its entry."""
    files = [os.path.abspath(item[k]) for k in ("image", "label") if item.get(k)]
    return "|".join([f"v{_CACHE_VERSION}", dataset, *files]), "|".join(_stamp(f) for f in files)


def _load_cache(path: Path) -> dict[str, dict]:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cache, dict):
        return {}
    current = f"v{_CACHE_VERSION}|"
    return {key: value for key, value in cache.items() if key.startswith(current)}


def _save_cache(path: Path, cache: dict[str, dict]) -> None:
    """Write the cache atomically; a cache that cannot be written only costs time on the next run."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(cache, f)
        os.replace(f.name, path)
    except OSError as e:
        logger.debug(f"data check cache {path} not written: {e}")


def _item_problems(item: Mapping, dataset: str) -> list[str]:
    report = CheckReport(dataset, Path())
    if item.get("label"):
        check_pair(dict(item), get_dataset(dataset), report)
    else:
        check_image(item["image"], report, get_dataset(dataset))
    return [str(p) for p in report.problems]


def _items(datalist: Mapping[str, Iterable[Mapping]], splits: Iterable[str]) -> list[Mapping]:
    seen, items = set(), []
    for split in splits:
        for item in datalist.get(split, []):
            if item["image"] not in seen:
                seen.add(item["image"])
                items.append(item)
    return items


def check_training_data(
    datalist: Mapping[str, Iterable[Mapping]],
    dataset: str,
    splits: Iterable[str] = SPLITS_READ_BY_TRAINING,
    cache_file: str | os.PathLike | None = None,
) -> int:
    """Check every item of ``datalist``'s ``splits`` as dataset ``dataset``; return how many were checked.

    Raises :class:`DatasetError` naming every file with a problem (the first ``MAX_LISTED``, then a count).
    """
    cache_path = Path(cache_file) if cache_file is not None else default_cache_file()
    cache = _load_cache(cache_path)
    splits = [s for s in splits if s in datalist]
    items, problems, fresh = _items(datalist, splits), [], 0
    for item in items:
        key, stamp = _key_and_stamp(dataset, item)
        entry = cache.get(key)
        if not isinstance(entry, dict) or entry.get("stamp") != stamp:
            entry = cache[key] = {"stamp": stamp, "problems": _item_problems(item, dataset)}
            fresh += 1
        problems += entry["problems"]
    if fresh:
        _save_cache(cache_path, cache)
    logger.info(
        f"data check: {len(items)} items of {', '.join(splits)} checked ({fresh} read, "
        f"{len(items) - fresh} unchanged since an earlier check), {len(problems)} problem(s)"
    )
    if problems:
        listed = "\n".join(f"  {p}" for p in problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DatasetError(
            f"the training data has {len(problems)} problem(s); nothing was trained or written:\n{listed}{more}\n"
            "Fix or remove these files (`masksup-med data check DATASET DIR` lists every problem), then start again."
        )
    return len(items)
