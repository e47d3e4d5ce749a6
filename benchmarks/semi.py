"""Semi-supervised study: how close a quarter (or an eighth) of the labels gets to all of them.

Arms, on one bundle and its real data, each at a label fraction (the same seeded labelled subset):

    supervised-only   MONAI's plain SupervisedTrainer on the labelled part   (train + supervised + labelled_only)
    masksup           MaskSup on the labelled part                           (train + labelled_only)
    semi              MaskMatch: MaskSup + masked student on the unlabelled  (train + semi_train)
    semi-mim          semi + S4MIM-style class-wise masked image modelling   (train + semi_train + semi_mim)
    full-supervised   plain supervised training on every label (fraction 1, the reference)

Every arm starts from the bundle's shipped defaults (``bundle_runs.BUNDLE_DEFAULTS`` names them; a
record made on other defaults does not count) with the study's own epochs and image size.

Each (arm, fraction, seed) trains with ``python -m monai.bundle run training``, keeps the checkpoint
with the best *validation* mIoU (validation and test stay labelled; the semi-supervised arm selects
its EMA teacher), scores it on the test split, and is recorded in ``results/semi.jsonl`` (resumable,
like ``ablation.py``)::

    python benchmarks/semi.py run --fractions 0.25 0.125 --seeds 0 1 2
    python benchmarks/semi.py run --bundle kvasir_seg
    python benchmarks/semi.py report --bundle glas       # the "semi-glas" block of RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bundle_runs as study
from defaults import STUDIES, add_bundle_study_options, bundle_study_args

ARMS: dict[str, list[str]] = {
    "supervised-only": ["train.json", "supervised.json", study.LABELLED_ONLY],
    "masksup": ["train.json", study.LABELLED_ONLY],
    "semi": ["train.json", "semi_train.json"],
    "semi-mim": ["train.json", "semi_train.json", "semi_mim.json"],
    "full-supervised": ["train.json", "supervised.json"],
}


def configs(bundle: str, arm: str) -> list[str]:
    """The config files of ``arm``, merged in order (bundle files by name, recipe fragments by path)."""
    return [name if "/" in name else f"bundles/{bundle}/configs/{name}" for name in ARMS[arm]]


def study_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What every run of one study shares (a record only counts for the same settings)."""
    return {
        "bundle": args.bundle,
        "dataset_dir": args.dataset_dir,
        "defaults": study.BUNDLE_DEFAULTS,
        "epochs": args.epochs,
        "val_interval": args.val_interval,
        "image_size": list(args.image_size),
    }


def runs(args: argparse.Namespace) -> list[tuple[str, float, int]]:
    """Every (arm, label fraction, seed) of the study; the full-label reference once per seed."""
    planned = []
    for seed in args.seeds:
        for fraction in args.fractions:
            planned += [(arm, fraction, seed) for arm in args.arms if arm != "full-supervised"]
        if "full-supervised" in args.arms:
            planned.append(("full-supervised", 1.0, seed))
    return planned


def run_study(args: argparse.Namespace) -> None:
    """Train and evaluate every planned run not recorded yet."""
    settings = study_settings(args)
    records = study.load_records(args.results, settings)
    done = {(r["arm"], r["label_fraction"], r["seed"]) for r in records}
    for arm, fraction, seed in runs(args):
        if (arm, fraction, seed) in done:
            print(f"[semi] {arm} {fraction} seed {seed}: recorded, skipped", flush=True)
            continue
        values = {
            "dataset_dir": settings["dataset_dir"],
            "seed": seed,
            "max_epochs": args.epochs,
            "val_interval": args.val_interval,
            "image_size": list(args.image_size),
        }
        if arm != "full-supervised":
            values["label_fraction"] = fraction
        width, height = args.image_size
        out = args.work_dir / (
            f"semi-{args.bundle}-{study.BUNDLE_DEFAULTS}-{arm}-e{args.epochs}-{width}x{height}-f{fraction}-seed{seed}"
        )
        print(f"[semi] {arm} {fraction} seed {seed}: training", flush=True)
        outcome = study.train_and_evaluate(configs(args.bundle, arm), STUDIES[args.bundle].evaluate_config, values, out)
        study.append_record(args.results, {"arm": arm, "label_fraction": fraction, "seed": seed, **settings, **outcome})
        print(f"[semi] {arm} {fraction} seed {seed}: test mIoU {outcome['test']['test']['iou']:.4f}", flush=True)


def report(args: argparse.Namespace) -> str:
    """The study's table (mean ± std over seeds per arm and fraction) into the ``semi-<bundle>`` block of RESULTS.md."""
    settings = study_settings(args)
    records = study.load_records(args.results, settings)
    if not records:
        raise SystemExit(f"no finished runs with {settings} in {args.results}")
    intro = (
        f"Bundle `{args.bundle}` on `{args.dataset_dir}`, {args.epochs} epochs, validation every "
        f"{args.val_interval}, {args.image_size[0]}x{args.image_size[1]}; model selected on validation."
    )
    lines = [
        intro,
        "",
        "| arm | label fraction | seeds | val mIoU | test mIoU | test Dice | test mIoU native | train min/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        for fraction in sorted({r["label_fraction"] for r in records if r["arm"] == arm}, reverse=True):
            rows = [r for r in records if r["arm"] == arm and r["label_fraction"] == fraction]
            cells = [study.mean_std([r["best_val_iou"] for r in rows])]
            cells += [study.mean_std([r["test"]["test"][m] for r in rows]) for m in ("iou", "dice", "iou_native")]
            minutes = statistics.mean(r["train_seconds"] for r in rows) / 60
            lines.append(f"| {arm} | {fraction} | {len(rows)} | " + " | ".join(cells) + f" | {minutes:.1f} |")
    fraction = {"label_fraction": "label fraction"}
    arms = [arm for arm in ARMS if arm != "full-supervised"]
    lines += [
        "",
        "Test mIoU gain over supervised-only at the same label fraction, same seed (goal at 1/4: >= +0.05):",
        "",
        *study.paired_gains(records, "supervised-only", arms, by=fraction),
    ]
    lines += [
        "",
        "Test mIoU minus full-label supervised training with the same seed (goal at 1/4: >= -0.03):",
        "",
        *study.paired_gains(records, "full-supervised", arms, by=fraction, match=()),
    ]
    lines += [
        "",
        "Each run is these two commands (here the first recorded run):",
        "",
        "```",
        *records[0]["commands"],
        "```",
    ]
    return study.publish("\n".join(lines), f"semi-{args.bundle}", args.markdown)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line of the semi-supervised study."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("run", "report"))
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.125])
    study.add_schedule_options(parser)
    add_bundle_study_options(parser, "semi.jsonl", "semi-<bundle>")
    return bundle_study_args(parser, argv)


def main(argv: Sequence[str] | None = None) -> None:
    study.run_or_report(parse_args(argv), run_study, report)


if __name__ == "__main__":
    main()
