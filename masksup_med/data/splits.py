"""Dataset-independent helpers: natural ordering, validation carving, group splits, datalist JSON I/O."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np

from masksup_med.run.files import atomic_path

from .errors import DatasetError, DatasetNotFoundError

_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple:
    """Sort key that orders embedded numbers by value: ``train_2`` before ``train_10``."""
    return tuple(int(part) if part.isdigit() else part for part in _DIGITS.split(str(text)))


def _item_key(item: dict) -> tuple:
    if "id" not in item:
        raise ValueError(f"datalist item has no 'id' key: {item!r}")
    return natural_key(item["id"]), json.dumps(item, sort_keys=True, default=str)


def carve_validation(items: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split ``items`` into (train, validation), deterministically from ``seed``.

    The items are ordered by ``id`` before shuffling, so the result does not depend on the
    input order. With ``fraction > 0`` and at least two items, validation gets at least one
    item and train keeps at least one. Both outputs stay in natural ``id`` order.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction!r}")
    ordered = sorted(items, key=_item_key)
    n = len(ordered)
    n_val = 0
    if fraction > 0 and n >= 2:
        n_val = min(max(1, round(fraction * n)), n - 1)
    picked = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    train = [it for i, it in enumerate(ordered) if i not in picked]
    validation = [it for i, it in enumerate(ordered) if i in picked]
    return train, validation


def _jsonable(value):
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write {type(value).__name__} value {value!r} to a datalist")


def write_datalist(splits: dict[str, list[dict]], path: str | os.PathLike) -> Path:
    """Write ``{"train": [...], "validation": [...], ...}`` as JSON, atomically; return the path.

    ``pathlib.Path`` values are written as strings.
    """
    path = Path(path)
    text = json.dumps(splits, indent=2, default=_jsonable) + "\n"
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return path


def read_datalist(path: str | os.PathLike) -> dict[str, list[dict]]:
    """Read a datalist written by :func:`write_datalist`, checking its shape."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"datalist file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not a valid JSON datalist ({e})") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object mapping split names to lists")
    for key, items in data.items():
        if not isinstance(items, list) or not all(isinstance(it, dict) for it in items):
            raise DatasetError(f"{path}: split {key!r} must be a list of objects")
    return data


def _group_counts(n: int, test_fraction: float, val_fraction: float) -> tuple[int, int]:
    """Numbers of (test, validation) groups out of ``n``: at least one each when asked, train keeps one."""
    n_test = min(max(1, round(test_fraction * n)), n - 1) if test_fraction > 0 and n >= 2 else 0
    rest = n - n_test
    n_val = min(max(1, round(val_fraction * n)), rest - 1) if val_fraction > 0 and rest >= 2 else 0
    return n_test, n_val


def split_groups(
    items: list[dict], group_key: str, test_fraction: float, val_fraction: float, seed: int, what: str = "group"
) -> dict[str, list[dict]]:
    """Split ``items`` into train / validation / test so that no ``item[group_key]`` straddles two parts.

    Fractions count groups (of all groups). Groups are drawn by ``seed`` from their sorted list,
    so the result does not depend on input order. When there are too few groups for a part that
    was asked for, that part stays empty and a ``UserWarning`` says so.
    """
    for name, fraction in (("test", test_fraction), ("validation", val_fraction)):
        if not 0 <= fraction < 1:
            raise ValueError(f"{name} fraction must be in [0, 1), got {fraction!r}")
    if test_fraction + val_fraction >= 1:
        raise ValueError(
            f"test + validation fractions must leave some training data, got {test_fraction!r} + {val_fraction!r}"
        )
    groups = sorted({item[group_key] for item in items}, key=natural_key)
    n_test, n_val = _group_counts(len(groups), test_fraction, val_fraction)
    for name, fraction, count in (("test", test_fraction, n_test), ("validation", val_fraction, n_val)):
        if fraction > 0 and count == 0:
            warnings.warn(
                f"only {len(groups)} {what}(s) found: the {name} split is left empty (asked for "
                f"{fraction:g} of the {what}s, but training must keep at least one)",
                UserWarning,
                stacklevel=2,
            )
    order = [groups[i] for i in np.random.default_rng(seed).permutation(len(groups))]
    part = {g: "test" for g in order[:n_test]} | {g: "validation" for g in order[n_test : n_test + n_val]}
    ordered = sorted(items, key=_item_key)
    return {
        name: [it for it in ordered if part.get(it[group_key], "train") == name]
        for name in ("train", "validation", "test")
    }


def split_images(
    items: list[dict], val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
) -> dict[str, list[dict]]:
    """Seeded random train / validation / test split of independent images; fractions count images."""
    return split_groups(items, "id", test_fraction, val_fraction, seed, what="image")
