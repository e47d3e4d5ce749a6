"""Reading this project's bundle configs from any working directory.

A bundle's ``train.json`` takes the shared pipeline from ``bundles/common/configs/train.json`` with
MONAI ``%file#id`` macros, and MONAI reads macro files relative to the working directory, so
``python -m monai.bundle`` runs from the folder that holds ``bundles/`` (the repository root). Code
that reads a bundle config from elsewhere (the deployment jobs, model serving, registering a
checkpoint by hand) expands the macros here first, relative to that folder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from monai.bundle import ConfigParser

__all__ = ["bundles_parent", "load_bundle_config", "write_expanded_config"]


def bundles_parent(config_file: str | os.PathLike) -> Path:
    """The folder holding ``bundles/`` above ``config_file`` (macro paths are relative to it); else the cwd."""
    path = Path(os.path.abspath(config_file))  # not resolve(): a bundle's linked configs stay in their bundle
    for parent in path.parents:
        if parent.name == "bundles":
            return parent.parent
    return Path.cwd()


def load_bundle_config(config_files: str | os.PathLike | Sequence[str | os.PathLike]) -> ConfigParser:
    """A ``ConfigParser`` of ``config_files`` (merged in order, as ``--config_file`` does) with macros expanded."""
    files = [config_files] if isinstance(config_files, (str, os.PathLike)) else list(config_files)
    if not files:
        raise ValueError("no bundle config file given")
    for file in files:
        if not Path(file).is_file():
            raise FileNotFoundError(f"bundle config {file} does not exist")
    parser = ConfigParser()
    parser.read_config([str(Path(f).absolute()) for f in files])
    try:
        with contextlib.chdir(bundles_parent(files[0])):
            parser.resolve_macro_and_relative_ids()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{files[0]}: a %macro names a missing file ({e})") from e
    return parser


def write_expanded_config(
    config_files: str | os.PathLike | Sequence[str | os.PathLike], out_file: str | os.PathLike
) -> Path:
    """Write ``config_files`` merged, with macros expanded, to ``out_file`` (JSON): one self-contained config."""
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    ConfigParser.export_config_file(load_bundle_config(config_files).get(), str(out), indent=4)
    return out
