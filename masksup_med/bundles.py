"""Writing each bundle's ``configs/train.json`` from the one shared pipeline.

A bundle folder runs on its own, wherever it is copied (as a MONAI model-zoo bundle does), so its
``train.json`` holds the whole training config. What every bundle shares is written once, in
``bundles/common/configs/``: ``pipeline.json`` (data, network, trainer, validation, checkpoints,
resume, tracking) with the default method, ``masksup.json``, merged over it (MONAI's multi-file
merge, nested ids included). A bundle's ``train.json`` starts with its own values (dataset, paths,
split, image size, network, augmentation, recipe), up to the id ``_shared_``; everything after that
id is written by this module::

    python -m masksup_med.bundles            # rewrite every bundle's train.json
    python -m masksup_med.bundles --check    # exit 1, naming the files, when one is out of date

A bundle may set a shared id among its own values (say ``seg_loss``); the shared one is then left out.

Bundles of one family share their recipe too: a bundle whose own values include ``"_defaults_":
"polyp.json"`` gets the ids of ``bundles/common/configs/polyp.json`` written after the marker,
before the shared pipeline (again, except those it sets itself). So the CVC-ClinicDB and Kvasir-SEG
bundles take one set of polyp defaults, written once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

__all__ = [
    "DEFAULTS",
    "MARKER",
    "SHARED_SOURCES",
    "bundle_dirs",
    "compose_train_config",
    "defaults_config",
    "marker_note",
    "render",
    "shared_config",
    "sync_bundle",
    "sync_bundles",
]

SHARED_SOURCES = ("pipeline.json", "masksup.json")
MARKER = "_shared_"
DEFAULTS = "_defaults_"
LINE_WIDTH = 120


def marker_note(defaults: str | None = None) -> str:
    """The marker's value: which files of ``bundles/common/configs/`` wrote the ids after it."""
    sources = ([defaults] if defaults else []) + list(SHARED_SOURCES)
    return (
        "ids from here on are written by `python -m masksup_med.bundles` from bundles/common/configs/"
        + " + ".join(sources)
        + "; change them there"
    )


def shared_config(common_configs: str | Path) -> dict[str, Any]:
    """The shared training config: ``SHARED_SOURCES`` of ``common_configs`` merged in order."""
    return ConfigParser.load_config_files([str(Path(common_configs) / name) for name in SHARED_SOURCES])


def defaults_config(common_configs: str | Path, values: Mapping[str, Any]) -> dict[str, Any]:
    """The family defaults a bundle names in its ``_defaults_`` value (``{}`` when it names none)."""
    name = values.get(DEFAULTS)
    if not name:
        return {}
    path = Path(common_configs) / str(name)
    if not path.is_file():
        raise ValueError(f"{DEFAULTS} names {name!r}, but {path} does not exist")
    return ConfigParser.load_config_file(str(path))


def bundle_values(train_config: Mapping[str, Any]) -> dict[str, Any]:
    """A bundle's own ids: those of its ``train.json`` before ``MARKER`` (all of them when it has none)."""
    values: dict[str, Any] = {}
    for key, value in train_config.items():
        if key == MARKER:
            break
        values[key] = value
    return values


def compose_train_config(
    values: Mapping[str, Any], shared: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The bundle's full ``train.json``: its values, the marker, then every id of its family ``defaults``
    and of the ``shared`` pipeline that it does not set itself."""
    generated = {**(defaults or {}), **{k: v for k, v in shared.items() if k not in (defaults or {})}}
    note = marker_note(values.get(DEFAULTS))
    return {**values, MARKER: note, **{k: v for k, v in generated.items() if k not in values}}


def render(value: Any, indent: int = 0) -> str:
    """JSON with 4-space indents, each list or object on one line when it fits in ``LINE_WIDTH``."""
    flat = json.dumps(value, ensure_ascii=False)
    if indent and indent + len(flat) <= LINE_WIDTH or not isinstance(value, (dict, list)) or not value:
        return flat
    pad = " " * (indent + 4)
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(k, ensure_ascii=False)}: {render(v, indent + 4)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [f"{pad}{render(v, indent + 4)}" for v in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def sync_bundle(bundle_dir: str | Path, common_configs: str | Path, check: bool = False) -> bool:
    """Rewrite ``bundle_dir/configs/train.json`` from the shared configs; True when it was (or, with
    ``check``, would be) changed. The bundle's own values are kept as they are."""
    train_file = Path(bundle_dir) / "configs" / "train.json"
    try:
        current = json.loads(train_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{train_file}: cannot read the bundle's training config ({e})") from e
    values = bundle_values(current)
    try:
        defaults = defaults_config(common_configs, values)
    except ValueError as e:
        raise ValueError(f"{train_file}: {e}") from e
    text = render(compose_train_config(values, shared_config(common_configs), defaults)) + "\n"
    changed = text != train_file.read_text(encoding="utf-8")
    if changed and not check:
        train_file.write_text(text, encoding="utf-8")
    return changed


def bundle_dirs(bundles_dir: str | Path) -> list[Path]:
    """Every bundle under ``bundles_dir``: the folders other than ``common`` with ``configs/train.json``, sorted."""
    root = Path(bundles_dir)
    return sorted(p for p in root.iterdir() if p.name != "common" and (p / "configs" / "train.json").is_file())


def sync_bundles(bundles_dir: str | Path, check: bool = False) -> list[Path]:
    """Sync every bundle under ``bundles_dir`` (see :func:`bundle_dirs`); return those changed."""
    common = Path(bundles_dir) / "common" / "configs"
    return [p for p in bundle_dirs(bundles_dir) if sync_bundle(p, common, check=check)]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m masksup_med.bundles [--check] [BUNDLES_DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m masksup_med.bundles", description=__doc__.splitlines()[0])
    parser.add_argument(
        "bundles_dir",
        nargs="?",
        default=Path(__file__).resolve().parent.parent / "bundles",
        help="folder holding common/ and the bundles (default: this checkout's bundles/)",
    )
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a bundle is out of date")
    args = parser.parse_args(argv)
    changed = sync_bundles(args.bundles_dir, check=args.check)
    for bundle in changed:
        verb = "out of date" if args.check else "rewritten"
        print(f"{bundle / 'configs' / 'train.json'}: {verb}", file=sys.stderr)
    if args.check and changed:
        print("run `python -m masksup_med.bundles` to rewrite them from bundles/common/configs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
