"""Command-line overrides of a bundle run that name no config id fail at start, naming the key.

``python -m monai.bundle run training --config_file ... --max_epoch 5`` adds a new, unused id
``max_epoch`` and trains with the default: a misspelt override is silently ignored. The bundle
config calls :func:`check_overrides` first thing in ``initialize``; it reads the run's own command
line and refuses every ``--key`` that the config files do not define.
"""

from __future__ import annotations

import ast
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path

from monai.bundle import ConfigParser

from masksup_med.errors import ConfigError

__all__ = ["RUNNER_OPTIONS", "bundle_run_config", "bundle_run_overrides", "check_overrides"]

# parameters of monai.bundle's ``run`` itself, not config ids
RUNNER_OPTIONS = frozenset(
    {
        "run_id",
        "init_id",
        "final_id",
        "meta_file",
        "config_file",
        "logging_file",
        "tracking",
        "args_file",
        "workflow_type",
        "properties_path",
    }
)


def bundle_run_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, str]] | None:
    """``(config files, {key: value})`` of a ``python -m monai.bundle run ...`` command line; None for any other."""
    if len(argv) < 2 or Path(argv[0]).parent.name != "bundle" or argv[1] != "run":
        return None
    options: dict[str, str] = {}
    args = list(argv[2:])
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        key, sep, value = arg[2:].partition("=")
        if not sep:
            value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else ""
        options[key.replace("-", "_") if key.replace("-", "_") in RUNNER_OPTIONS else key] = value
    files = options.get("config_file", "")
    try:
        parsed = ast.literal_eval(files) if files.startswith("[") else files
    except (ValueError, SyntaxError):
        parsed = files
    config_files = [str(f) for f in parsed] if isinstance(parsed, (list, tuple)) else [str(parsed)]
    return config_files, {k: v for k, v in options.items() if k not in RUNNER_OPTIONS}


def _merged_config(config_files: Sequence[str]) -> ConfigParser:
    """The config files merged in order, as the runner merges them (no overrides)."""
    return ConfigParser(ConfigParser.load_config_files([f for f in config_files if f]))


def bundle_run_config(argv: Sequence[str] | None = None) -> ConfigParser | None:
    """The config of this ``python -m monai.bundle run`` process: its files merged, its overrides applied
    (values read as the runner reads them); None in any other process."""
    from fire.parser import DefaultParseValue  # the runner's own command-line value parser

    found = bundle_run_overrides(sys.argv if argv is None else argv)
    if found is None:
        return None
    config_files, overrides = found
    parser = _merged_config(config_files)
    parser.update({key: DefaultParseValue(value) for key, value in overrides.items()})
    return parser


def check_overrides(argv: Sequence[str] | None = None) -> list[str]:
    """Fail with a :class:`ConfigError` when an override of this bundle run names no id of its config files.

    ``argv`` defaults to ``sys.argv``; a process that is not ``python -m monai.bundle run`` is not
    checked. Returns the override keys that were checked.
    """
    found = bundle_run_overrides(sys.argv if argv is None else argv)
    if found is None:
        return []
    config_files, overrides = found
    parser = _merged_config(config_files)
    unknown = [key for key in overrides if key.lstrip("+~") not in parser]  # "+id"/"~id": MONAI merge/delete
    if unknown:
        top_level = [k for k in parser.get() if not k.startswith("_")]
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key.split("#")[0], top_level, n=1)
            hints.append(f"--{key}" + (f" (did you mean --{close[0]}?)" if close else ""))
        raise ConfigError(
            f"unknown override {', '.join(hints)}: the config files ({', '.join(Path(f).name for f in config_files)}) "
            "define no such id, so it would be ignored. Check the spelling; the bundle's ids are listed in its "
            "configs/train.json."
        )
    return list(overrides)


def config_flag(value: bool | str, name: str) -> bool:
    """A true/false config value, given as a bool or as text typed on the command line (``true``, ``0``, ``no``...).

    Raises:
        ConfigError: naming ``name`` when the value is neither true nor false.
    """
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", "none", ""):
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}.")
