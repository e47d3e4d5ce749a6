"""The ``masksup-med`` command line.

Each command group registers its subcommands in an ``_add_<group>`` function and sets
``handler`` (a function of the parsed arguments returning an exit code) on its parser.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from masksup_med import __version__
from masksup_med.cli.bundle import add_bundle_commands
from masksup_med.cli.data import add_data_commands
from masksup_med.cli.deploy import add_deploy_commands
from masksup_med.cli.registry import add_registry_commands
from masksup_med.errors import UserError


def _add_data(commands: argparse._SubParsersAction) -> None:
    add_data_commands(commands)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``masksup-med`` command."""
    parser = argparse.ArgumentParser(
        prog="masksup-med", description="MaskSup segmentation on MONAI: data, models, prediction."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_data(commands)
    add_registry_commands(commands)
    add_deploy_commands(commands)
    add_bundle_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
