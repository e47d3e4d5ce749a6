"""``masksup-med bundle ship``: put a trained model into a bundle, with its checksum (for maintainers)."""

from __future__ import annotations

import argparse
from pathlib import Path

from masksup_med.cli.deploy import bundle_dir
from masksup_med.run.shipped import LARGE_FILES, ship_model
from masksup_med.tracking.model_format import build_network, network_definition

__all__ = ["add_bundle_commands"]


def _ship(args: argparse.Namespace) -> int:
    folder = bundle_dir(args.bundle, args.bundles_dir)
    config = folder / "configs" / "train.json"
    network = build_network(network_definition(config), str(config))
    target, sha = ship_model(args.model, folder, network)
    print(f"shipped {args.model} as {target} (sha256 {sha}), listed in {folder / LARGE_FILES}")
    print(f"commit both: git add {target} {folder / LARGE_FILES}")
    return 0


def add_bundle_commands(commands: argparse._SubParsersAction) -> None:
    """Add the ``bundle`` command group (``ship``)."""
    group = commands.add_parser("bundle", help="maintain the bundles: ship a trained model with one")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    ship = actions.add_parser(
        "ship",
        help="copy a trained model into BUNDLE/models/model.pt and list its sha256 in BUNDLE/large_files.yml",
        description="Copy the weights of a training run's models/model.pt into the bundle (a plain state dict, "
        "written whole or not at all), after checking they fit the bundle's network_def, and list the file with "
        "its sha256 in the bundle's large_files.yml (MONAI's model-zoo format). Every load checks that checksum.",
        epilog="example: masksup-med bundle ship --bundle kvasir_seg --model runs/long/models/model.pt",
    )
    ship.add_argument("--bundle", required=True, help="bundle name, e.g. kvasir_seg")
    ship.add_argument("--model", required=True, type=Path, metavar="FILE", help="a training run's models/model.pt")
    ship.add_argument("--bundles-dir", metavar="DIR", help="folder holding the bundles (default: as predict)")
    ship.set_defaults(handler=_ship)
