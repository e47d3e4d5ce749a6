"""The ``masksup-med`` command line.

Each command group registers its subcommands in an ``_add_<group>`` function and sets
``handler`` (a function of the parsed arguments returning an exit code) on its parser.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from masksup_med import __version__
from masksup_med.data import DatasetError, make_glas_demo


def _int_at_least(minimum: int, what: str):
    """Return an argparse ``type`` accepting integers >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what} (an integer >= {minimum}), got {text!r}")
        return value

    return parse


_count = _int_at_least(0, "an image count")
_side = _int_at_least(32, "an image side in pixels")


def _demo_glas(args: argparse.Namespace) -> int:
    out = make_glas_demo(
        args.out_dir, n_train=args.n_train, n_test_a=args.n_test_a, n_test_b=args.n_test_b,
        size=tuple(args.size), seed=args.seed,
    )
    total = args.n_train + args.n_test_a + args.n_test_b
    print(
        f"wrote {total} synthetic GLaS image/annotation pairs ({args.n_train} train, {args.n_test_a} testA, "
        f"{args.n_test_b} testB, {args.size[0]}x{args.size[1]}, seed {args.seed}) to {out}"
    )
    return 0


def _add_data(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="prepare, check or generate datasets")
    actions = data.add_subparsers(dest="action", metavar="ACTION", required=True)
    demo = actions.add_parser("demo", help="write a synthetic look-alike dataset for demos and tests")
    datasets = demo.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    glas = datasets.add_parser("glas", help="GLaS-like histology in the official release layout (.bmp)")
    glas.add_argument("out_dir", metavar="OUT_DIR", help="folder to write into (created if missing)")
    glas.add_argument("--seed", type=int, metavar="N", default=0, help="random seed (default: 0)")
    glas.add_argument("--n-train", type=_count, metavar="N", default=24, help="training images (default: 24)")
    glas.add_argument("--n-test-a", type=_count, metavar="N", default=8, help="test A images (default: 8)")
    glas.add_argument("--n-test-b", type=_count, metavar="N", default=4, help="test B images (default: 4)")
    glas.add_argument("--size", type=_side, nargs=2, metavar=("W", "H"), default=[160, 120],
                      help="image width and height in pixels (default: 160 120)")
    glas.set_defaults(handler=_demo_glas)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``masksup-med`` command."""
    parser = argparse.ArgumentParser(
        prog="masksup-med", description="MaskSup segmentation on MONAI: data, models, prediction."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_data(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
