"""The ``masksup-med data`` command group: ``demo``, ``check`` and ``prepare``."""

from __future__ import annotations

import argparse
import sys
import warnings

from masksup_med.data import make_cvc_clinicdb_demo, make_glas_demo, make_kvasir_seg_demo, write_datalist
from masksup_med.data.cvc_clinicdb import builtin_sequence_table, sequence_of
from masksup_med.data.registry import available_datasets, get_dataset
from masksup_med.data.synthetic import CVC_MIN_FRAMES, KVASIR_MIN_IMAGES, cvc_clinicdb_demo_frames


def check_dataset(*args, **kwargs):
    """:func:`masksup_med.data.checks.check_dataset`, imported on first use (it loads MONAI)."""
    from masksup_med.data.checks import check_dataset as check

    return check(*args, **kwargs)


def int_at_least(minimum: int, what: str, maximum: int | None = None):
    """Return an argparse ``type`` accepting integers >= ``minimum`` (and <= ``maximum`` if given)."""
    bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {what} (an integer {bounds}), got {text!r}")
        return value

    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


_count = int_at_least(0, "an image count")
_side = int_at_least(32, "an image side in pixels")
_seed = int_at_least(0, "a seed")
_frames = int_at_least(CVC_MIN_FRAMES, "a frame count", maximum=builtin_sequence_table()[-1][1])
_images = int_at_least(KVASIR_MIN_IMAGES, "an image count")


def _wrote_demo(out, count: int, what: str, details: str, args: argparse.Namespace) -> int:
    """Print the one line a ``data demo`` command ends with; return exit code 0."""
    print(f"wrote {count} synthetic {what} ({details}, {args.size[0]}x{args.size[1]}, seed {args.seed}) to {out}")
    return 0


def _demo_glas(args: argparse.Namespace) -> int:
    out = make_glas_demo(
        args.out_dir,
        n_train=args.n_train,
        n_test_a=args.n_test_a,
        n_test_b=args.n_test_b,
        size=tuple(args.size),
        seed=args.seed,
    )
    return _wrote_demo(
        out,
        args.n_train + args.n_test_a + args.n_test_b,
        "GLaS image/annotation pairs",
        f"{args.n_train} train, {args.n_test_a} testA, {args.n_test_b} testB",
        args,
    )


def _demo_cvc_clinicdb(args: argparse.Namespace) -> int:
    out = make_cvc_clinicdb_demo(args.out_dir, n_frames=args.n_frames, size=tuple(args.size), seed=args.seed)
    table = builtin_sequence_table()
    sequences = {sequence_of(str(frame), table) for frame in cvc_clinicdb_demo_frames(args.n_frames)}
    return _wrote_demo(
        out,
        args.n_frames,
        "CVC-ClinicDB frame/mask pairs",
        f"{len(sequences)} video sequences, official layout Original/ + Ground Truth/",
        args,
    )


def _demo_kvasir_seg(args: argparse.Namespace) -> int:
    out = make_kvasir_seg_demo(args.out_dir, n_images=args.n_images, size=tuple(args.size), seed=args.seed)
    return _wrote_demo(
        out,
        args.n_images,
        "Kvasir-SEG image/mask pairs",
        "release layout images/ + masks/, each image of its own size around",
        args,
    )


def _add_demo_parser(
    datasets: argparse._SubParsersAction, name: str, description: str, handler, size: tuple[int, int]
) -> argparse.ArgumentParser:
    """Add ``data demo NAME OUT_DIR [--seed N] [--size W H]``; the caller adds the counts."""
    demo = datasets.add_parser(name, help=description)
    demo.add_argument("out_dir", metavar="OUT_DIR", help="folder to write into (created if missing)")
    demo.add_argument("--seed", type=_seed, metavar="N", default=0, help="random seed (default: 0)")
    demo.add_argument(
        "--size",
        type=_side,
        nargs=2,
        metavar=("W", "H"),
        default=list(size),
        help=f"image width and height in pixels (default: {size[0]} {size[1]})",
    )
    demo.set_defaults(handler=handler)
    return demo


def _split_options(args: argparse.Namespace) -> dict | None:
    """Split keyword options given on the command line; None (after an error line) if one does not apply."""
    given = {
        k: getattr(args, k)
        for k in ("seed", "val_fraction", "test_fraction", "by", "train_list")
        if getattr(args, k) is not None
    }
    accepted = get_dataset(args.dataset).split_options
    wrong = [k for k in given if k not in accepted]
    if wrong:
        options = ", ".join("--" + k.replace("_", "-") for k in wrong)
        print(f"error: {options} does not apply to dataset {args.dataset}", file=sys.stderr)
        return None
    return given


def _with_unlabelled(args: argparse.Namespace, splits: dict) -> dict:
    """``splits`` with ``--label-fraction`` / ``--unlabelled-dir`` applied (as ``semi_train.json`` does)."""
    if args.label_fraction is None and args.unlabelled_dir is None:
        return splits
    from masksup_med.data import with_unlabelled

    fraction = 1.0 if args.label_fraction is None else args.label_fraction
    return with_unlabelled(splits, fraction, args.seed or 0, args.unlabelled_dir)


def _labelled_counts(splits: dict) -> str:
    """``labelled 17 of 68 training images; unlabelled 51 (51 from train, 0 from the unlabelled folder)``."""
    unlabelled = splits.get("unlabelled", [])
    from_train = sum(item.get("source") == "train" for item in unlabelled)
    total = len(splits["train"]) + from_train
    return (
        f"labelled {len(splits['train'])} of {total} training images; unlabelled {len(unlabelled)} "
        f"({from_train} from train, {len(unlabelled) - from_train} from the unlabelled folder)"
    )


def _print_findings(report) -> None:
    for line in report.warnings:
        print(f"warning: {line}", file=sys.stderr)
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)


def _check(args: argparse.Namespace) -> int:
    options = _split_options(args)
    if options is None:
        return 2
    report = check_dataset(args.dataset, args.dataset_dir, **options)
    print("\n".join(report.summary(get_dataset(args.dataset).label_threshold)))
    _print_findings(report)
    if report.ok:
        if args.label_fraction is not None or args.unlabelled_dir is not None:
            spec = get_dataset(args.dataset)
            print(_labelled_counts(_with_unlabelled(args, spec.split(args.dataset_dir, **options))))
        left_out = sum(": left out: " in w for w in report.warnings)
        print(f"OK: {report.pairs} pairs usable" + (f"; {left_out} file(s) left out, listed above" if left_out else ""))
        return 0
    print(f"FAILED: {len(report.problems)} problem(s), listed above")
    return 1


def _prepare(args: argparse.Namespace) -> int:
    options = _split_options(args)
    if options is None:
        return 2
    spec = get_dataset(args.dataset)
    if args.check:
        report = check_dataset(args.dataset, args.dataset_dir, **options)
        _print_findings(report)
        if not report.ok:
            print(
                f"FAILED: {len(report.problems)} problem(s), nothing written "
                f"(see `masksup-med data check {args.dataset} DIR`)"
            )
            return 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = _with_unlabelled(args, spec.split(args.dataset_dir, **options))
    if not args.check:  # otherwise the check already printed them
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
    path = write_datalist(splits, args.out)
    sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
    print(f"wrote {spec.name} datalist ({sizes}) to {path}")
    if "unlabelled" in splits:
        print(_labelled_counts(splits))
    return 0


def _add_split_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dataset", metavar="DATASET", choices=available_datasets(), help=f"one of: {', '.join(available_datasets())}"
    )
    parser.add_argument("dataset_dir", metavar="DIR", help="the dataset folder, as downloaded")
    parser.add_argument("--seed", type=int, metavar="N", help="split seed (default: 0)")
    parser.add_argument(
        "--val-fraction",
        type=_fraction,
        metavar="F",
        help="validation fraction (default: the dataset's, e.g. 0.2 of GLaS train)",
    )
    parser.add_argument(
        "--test-fraction",
        type=_fraction,
        metavar="F",
        help="test fraction for datasets without an official test set (default: 0.2)",
    )
    parser.add_argument(
        "--by",
        choices=("sequence", "frame"),
        help="cvc-clinicdb: split by video sequence (default) or by frame (leaks)",
    )
    parser.add_argument(
        "--train-list",
        metavar="FILE|DIR",
        help="kvasir-cvc (the PraNet protocol): the training images, a text file naming one per line "
        "or a folder of them (e.g. PraNet's TrainDataset/image); every other image is test",
    )
    parser.add_argument(
        "--label-fraction",
        type=float,
        metavar="F",
        help="semi-supervised: keep this fraction of the training images labelled (seeded by --seed)",
    )
    parser.add_argument(
        "--unlabelled-dir",
        metavar="DIR",
        help="semi-supervised: a folder of further images without masks (each is read to check it)",
    )


def add_data_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``data demo|check|prepare`` on the top-level subcommand action ``commands``."""
    data = commands.add_parser("data", help="prepare, check or generate datasets")
    actions = data.add_subparsers(dest="action", metavar="ACTION", required=True)

    check = actions.add_parser("check", help="read every file of a dataset folder and report all problems")
    _add_split_arguments(check)
    check.set_defaults(handler=_check)

    prepare = actions.add_parser("prepare", help="check a dataset and write its datalist with splits")
    _add_split_arguments(prepare)
    prepare.add_argument("--out", required=True, metavar="FILE.json", help="datalist file to write")
    prepare.add_argument(
        "--no-check", dest="check", action="store_false", help="skip reading every file (pairing is still checked)"
    )
    prepare.set_defaults(handler=_prepare)

    demo = actions.add_parser("demo", help="write a synthetic look-alike dataset for demos and tests")
    datasets = demo.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    glas = _add_demo_parser(
        datasets, "glas", "GLaS-like histology in the official release layout (.bmp)", _demo_glas, (160, 120)
    )
    glas.add_argument("--n-train", type=_count, metavar="N", default=24, help="training images (default: 24)")
    glas.add_argument("--n-test-a", type=_count, metavar="N", default=8, help="test A images (default: 8)")
    glas.add_argument("--n-test-b", type=_count, metavar="N", default=4, help="test B images (default: 4)")
    cvc = _add_demo_parser(
        datasets,
        "cvc-clinicdb",
        "CVC-ClinicDB-like colonoscopy frames in the official release layout (.tif)",
        _demo_cvc_clinicdb,
        (384, 288),
    )
    cvc.add_argument(
        "--n-frames",
        type=_frames,
        metavar="N",
        default=24,
        help=f"frames, two per video sequence (default: 24; at least {CVC_MIN_FRAMES}, for "
        "non-empty train, validation and test parts of the split by sequence)",
    )
    kvasir = _add_demo_parser(
        datasets,
        "kvasir-seg",
        "Kvasir-SEG-like colonoscopy images in the release layout (.jpg, sizes varying around --size)",
        _demo_kvasir_seg,
        (160, 136),
    )
    kvasir.add_argument(
        "--n-images",
        type=_images,
        metavar="N",
        default=24,
        help=f"images (default: 24; at least {KVASIR_MIN_IMAGES}, for non-empty train, validation "
        "and test parts of the default split)",
    )
