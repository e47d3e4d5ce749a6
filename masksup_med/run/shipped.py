"""A trained model shipped inside a bundle (``BUNDLE/models/model.pt``), listed with its checksum.

MONAI's model zoo lists a bundle's large files in ``large_files.yml`` at the bundle's root, one entry
each with ``path`` (relative to the bundle), ``url``, ``hash_val`` and ``hash_type``
(``python -m monai.bundle download_large_files`` reads it). A bundle here ships its model the same way:
the weights (a plain state dict, tensors only) are committed at ``models/model.pt`` and the entry's
``hash_val`` is their SHA-256; ``url`` is empty (nothing to download: the file is in the bundle).

- :func:`ship_model` (``masksup-med bundle ship``) copies a training run's weights there, whole or not at
  all, and writes ``large_files.yml``.
- :func:`verify_shipped` refuses a listed file that is missing or whose checksum differs, naming it;
  :func:`masksup_med.tracking.registry.load_checkpoint` calls it, so evaluation, inference, ``predict``,
  ``serve`` and ``registry register`` all check the file before they load it.
- :func:`default_model_source`: which model the evaluate and inference configs run when none is given:
  the run's own ``models/model.pt`` when it exists (as before), else the bundle's shipped model.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from masksup_med.errors import ConfigError, MissingInputError, UnreadableFileError
from masksup_med.run.files import atomic_path, save_atomically
from masksup_med.run.weights import read_weights

__all__ = [
    "HASH_TYPE",
    "LARGE_FILES",
    "SHIPPED_MODEL",
    "ChecksumMismatchError",
    "default_model_source",
    "file_sha256",
    "large_files",
    "ship_model",
    "shipped_model",
    "verify_shipped",
]

logger = logging.getLogger(__name__)

LARGE_FILES = "large_files.yml"
SHIPPED_MODEL = "models/model.pt"
HASH_TYPE = "sha256"


class ChecksumMismatchError(UnreadableFileError):
    """A shipped file whose content is not the one its bundle lists (altered, cut short, replaced)."""


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of ``path``'s bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def large_files(bundle_dir: str | os.PathLike) -> dict[Path, dict[str, Any]]:
    """The files a bundle lists in its ``large_files.yml``: resolved path -> entry.

    ``{}`` when the bundle lists none. A list file that does not read, or an entry without ``path``, is refused
    (:class:`ConfigError`, naming the file).
    """
    from monai.bundle import ConfigParser

    bundle_dir = Path(bundle_dir)
    list_file = bundle_dir / LARGE_FILES
    if not list_file.is_file():
        return {}
    try:
        entries = ConfigParser.load_config_file(str(list_file)).get("large_files") or []
        if not isinstance(entries, list):
            raise TypeError(f"large_files is a {type(entries).__name__}, not a list")
    except Exception as e:  # noqa: BLE001 - a YAML error or a wrong shape: one message
        raise ConfigError(f"{list_file} does not read as a large-files list: {type(e).__name__}: {e}") from e
    found = {}
    for entry in entries:
        if not isinstance(entry, Mapping) or not entry.get("path"):
            raise ConfigError(f"{list_file}: every entry of large_files needs a 'path', got {entry!r}")
        found[(bundle_dir / str(entry["path"])).resolve()] = {**entry, "list_file": list_file}
    return found


def _listing(path: Path) -> dict[str, Any] | None:
    """The large-files entry of the bundle ``path`` lies in that lists it (its root is two levels up at most)."""
    resolved = path.resolve()
    for bundle_dir in list(resolved.parents)[:3]:
        entry = large_files(bundle_dir).get(resolved)
        if entry is not None:
            return entry
    return None


def verify_shipped(path: str | os.PathLike) -> bool:
    """Check a file its bundle lists in ``large_files.yml`` against its checksum; False for a file not listed.

    Raises:
        MissingInputError: the bundle lists ``path`` but it is not there.
        ChecksumMismatchError: its checksum is not the listed one (both are named).
    """
    path = Path(path)
    entry = _listing(path)
    if entry is None:
        return False
    list_file = entry["list_file"]
    if not path.is_file():
        raise MissingInputError(
            f"{path} is missing: {list_file} lists it as the bundle's shipped model. Restore it from the "
            f"repository (git checkout -- {path}, or git lfs pull), train the bundle, or pass another model."
        )
    expected = str(entry.get("hash_val") or "").strip().lower()
    hash_type = str(entry.get("hash_type") or HASH_TYPE).lower()
    if not expected:
        raise ConfigError(f"{list_file} lists {entry['path']} without a hash_val; ship it again to record one.")
    if hash_type != HASH_TYPE:
        raise ConfigError(f"{list_file}: hash_type of {entry['path']} is {hash_type!r}; only {HASH_TYPE} is checked.")
    actual = file_sha256(path)
    if actual != expected:
        raise ChecksumMismatchError(
            f"{path}: checksum mismatch: its {HASH_TYPE} is {actual}, {list_file} lists {expected}; the file was "
            "altered, cut short or replaced, and was not loaded. Restore it from the repository "
            f"(git checkout -- {path}) or ship the model again (masksup-med bundle ship)."
        )
    return True


def shipped_model(bundle_dir: str | os.PathLike) -> Path | None:
    """The bundle's shipped model (``models/model.pt``) when its ``large_files.yml`` lists it, else None."""
    path = (Path(bundle_dir) / SHIPPED_MODEL).resolve()
    return path if path in large_files(bundle_dir) else None


def default_model_source(best_model_file: str | os.PathLike, bundle_root: str | os.PathLike) -> str:
    """The model the evaluate and inference configs run when no ``model_source`` is given.

    The run's own best checkpoint (``best_model_file``, in ``output_dir/models/``) when it exists, else the
    model the bundle ships, else ``best_model_file`` (whose absence is then reported when it is loaded).
    """
    if Path(best_model_file).is_file():
        return str(best_model_file)
    shipped = shipped_model(bundle_root)
    if shipped is None:
        return str(best_model_file)
    logger.info(f"no trained model at {best_model_file}: running the model the bundle ships, {shipped}")
    return str(shipped)


def _first_lines(error: Exception, lines: int = 3, chars: int = 400) -> str:
    """The start of a long error message (``load_state_dict`` lists every tensor), on one line."""
    return " ".join(line.strip() for line in str(error).splitlines()[:lines])[:chars]


def _large_files_text(entries: Mapping[str, str]) -> str:
    lines = [
        "# Large files of this bundle (MONAI model-zoo format), written by `masksup-med bundle ship`.",
        "# The files are committed with the bundle, so url is empty; hash_val is checked before each load.",
        "large_files:",
    ]
    for path, sha in sorted(entries.items()):
        lines += [f'  - path: "{path}"', '    url: ""', f'    hash_val: "{sha}"', f'    hash_type: "{HASH_TYPE}"']
    return "\n".join(lines) + "\n"


def ship_model(
    checkpoint: str | os.PathLike, bundle_dir: str | os.PathLike, network: torch.nn.Module | None = None
) -> tuple[Path, str]:
    """Copy a training run's weights into ``bundle_dir/models/model.pt`` and list them, with their SHA-256, in
    the bundle's ``large_files.yml``; return the model's path and checksum.

    The weights are saved as a plain state dict (tensors only: no optimiser, nothing pickled), whole or not at
    all (:mod:`masksup_med.run.files`). ``network``: the bundle's network, built from its ``network_def``; the
    weights must fit it exactly (the configs build that network to run the model), else :class:`ConfigError`.
    """
    checkpoint, bundle_dir = Path(checkpoint), Path(bundle_dir)
    state = {
        k: v.contiguous()
        for k, v in read_weights(checkpoint, f"model {checkpoint}", "Pass a training run's models/model.pt.").items()
    }
    if network is not None:
        try:
            network.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(
                f"model {checkpoint} does not fit the network_def of {bundle_dir / 'configs' / 'train.json'}: "
                f"{_first_lines(e)} Make the bundle's network_def the one the run trained, then ship."
            ) from e
    target = bundle_dir / SHIPPED_MODEL
    save_atomically(state, target)
    sha = file_sha256(target)
    entries = {
        str(Path(p).relative_to(bundle_dir.resolve())): str(e.get("hash_val") or "")
        for p, e in large_files(bundle_dir).items()
    }
    entries[SHIPPED_MODEL] = sha
    list_file = bundle_dir / LARGE_FILES
    with atomic_path(list_file) as tmp:
        tmp.write_text(_large_files_text(entries), encoding="utf-8")
    logger.info(f"shipped {checkpoint} as {target} ({HASH_TYPE} {sha}), listed in {list_file}")
    return target, sha
