"""The bundles' shipped defaults on real data: several seeds per bundle, plus a cross-dataset check.

Each run is the bundle's ``configs/train.json`` exactly as shipped (only the data folder, the seed
and the output folder are set), the checkpoint kept on *validation* and scored once on the
bundle's test split (see ``bundle_runs.py``). A bundle may also name other datasets its model is
scored on without any training on them (the Kvasir-SEG model on the CVC-ClinicDB sample: another
hospital's endoscopes); every frame of such a dataset is scored, split by split, and pooled.
Finished runs go to ``benchmarks/results/defaults.jsonl`` and are skipped next time::

    python benchmarks/defaults.py run --bundles kvasir_seg --seeds 0 1 2
    python benchmarks/defaults.py report      # the "defaults" block of RESULTS.md
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle_runs import (
    BUNDLE_DEFAULTS,
    METRICS,
    ROOT,
    add_study_options,
    append_record,
    as_cli_overrides,
    evaluation_command,
    load_records,
    mean_std,
    publish,
    run_logged,
    shown_command,
    train_and_evaluate,
)
from report import RESULTS_DIR, RESULTS_MD

SPLITS = ("train", "validation", "test")


class BundleStudy:
    """One bundle as shipped: its real data and the datasets its model is also scored on."""

    def __init__(
        self, bundle: str, dataset_dir: str, cross: Sequence[tuple[str, str]] = (), bundle_dir: str | None = None
    ) -> None:
        self.bundle = bundle
        self.dataset_dir = dataset_dir
        self.cross = tuple(cross)
        self.bundle_dir = bundle_dir or f"bundles/{bundle}"  # relative to the repository, or absolute

    @property
    def train_config(self) -> str:
        return f"{self.bundle_dir}/configs/train.json"

    @property
    def evaluate_config(self) -> str:
        return f"{self.bundle_dir}/configs/evaluate.json"


STUDIES = {
    "glas": BundleStudy("glas", "../shared/data/glas"),
    "kvasir_seg": BundleStudy(
        "kvasir_seg", "../shared/data/kvasir-seg", cross=[("cvc-clinicdb", "../shared/data/cvc-clinicdb-sample")]
    ),
}


def add_bundle_study_options(parser: argparse.ArgumentParser, results_name: str, block: str) -> None:
    """``--bundle`` (one of ``STUDIES``) and the shared study options, with the bundle's data as default."""
    parser.add_argument("--bundle", default="glas", choices=sorted(STUDIES))
    add_study_options(parser, results_name, block, dataset_dir=None)


def bundle_study_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; an unset ``--dataset-dir`` becomes the bundle's data."""
    args = parser.parse_args(argv)
    args.dataset_dir = args.dataset_dir or STUDIES[args.bundle].dataset_dir
    return args


def bundle_study_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What every run of one bundle study shares (a record only counts for the same settings)."""
    return {
        "bundle": args.bundle,
        "dataset_dir": args.dataset_dir,
        "defaults": BUNDLE_DEFAULTS,
        "epochs": args.epochs,
        "val_interval": args.val_interval,
        "image_size": list(args.image_size),
    }


def score_elsewhere(study: BundleStudy, output_dir: Path, dataset: str, dataset_dir: str) -> dict[str, Any]:
    """Score the run's best-validation checkpoint on every frame of another dataset (all its splits pooled)."""
    local_dir = ROOT / output_dir
    rows, commands = [], []
    for split in SPLITS:
        overrides = as_cli_overrides({"dataset": dataset, "dataset_dir": dataset_dir, "output_dir": str(output_dir)})
        command = evaluation_command([study.train_config], study.evaluate_config, overrides)
        command[-1] = split  # evaluation_command ends with "--eval_split test"
        run_logged(command, local_dir / "evaluate.log")
        commands.append(shown_command(command))
        with (local_dir / "eval" / dataset / split / "per_image.csv").open(encoding="utf-8") as table:
            rows += list(csv.DictReader(table))
    if not rows:
        raise RuntimeError(f"no frame of {dataset_dir} was scored")
    means = {metric: statistics.fmean(float(row[metric]) for row in rows) for metric in METRICS}
    return {"dataset": dataset, "dataset_dir": dataset_dir, "images": len(rows), **means, "commands": commands}


def run_study(args: argparse.Namespace) -> None:
    """Train and score every (bundle, seed) not yet recorded."""
    done = {(r["bundle"], r["seed"]) for r in load_records(args.results)}
    for name in args.bundles:
        study = STUDIES[name]
        for seed in args.seeds:
            if (name, seed) in done:
                print(f"[defaults] {name}, seed {seed}: recorded, skipped", flush=True)
                continue
            print(f"[defaults] {name}, seed {seed}: training as shipped", flush=True)
            output_dir = args.work_dir / f"defaults-{name}-seed{seed}"
            values = {"dataset_dir": study.dataset_dir, "seed": seed}
            record = {
                "bundle": name,
                "seed": seed,
                **train_and_evaluate([study.train_config], study.evaluate_config, values, output_dir),
            }
            record["elsewhere"] = [score_elsewhere(study, output_dir, *target) for target in study.cross]
            append_record(args.results, record)
            print(
                f"[defaults] {name}, seed {seed}: val {record['best_val_iou']:.4f}, "
                f"test mIoU {record['test']['test']['iou']:.4f} ({record['train_seconds'] / 60:.1f} min)",
                flush=True,
            )


def defaults_table(records: list[dict[str, Any]]) -> str:
    """Markdown: per bundle the mean ± std over seeds, then one row per run, then the commands."""
    lines = [
        (
            "Each bundle's `configs/train.json` as shipped; checkpoint picked on validation, test scored once. "
            "Mean ± sample std over seeds; mIoU is per-image foreground IoU averaged over images."
        ),
        "",
        "| bundle | seeds | val mIoU (selection) | test mIoU | test Dice | test mIoU native "
        "| other dataset: mIoU (images) | train min/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    bundles = sorted({r["bundle"] for r in records})
    for bundle in bundles:
        runs = [r for r in records if r["bundle"] == bundle]

        def scores_on(dataset: str, runs=runs) -> list[float]:
            return [e["iou"] for r in runs for e in r["elsewhere"] if e["dataset"] == dataset]

        elsewhere = (
            ", ".join(
                f"{target['dataset']} {mean_std(scores_on(target['dataset']))} ({target['images']})"
                for target in runs[0]["elsewhere"]
            )
            or "—"
        )
        lines.append(
            f"| {bundle} | {len(runs)} | {mean_std([r['best_val_iou'] for r in runs])} | "
            + " | ".join(mean_std([r["test"]["test"][m] for r in runs]) for m in ("iou", "dice", "iou_native"))
            + f" | {elsewhere} | {statistics.fmean(r['train_seconds'] for r in runs) / 60:.1f} |"
        )
    lines += [
        "",
        "| bundle | seed | best epoch | val mIoU | test mIoU | test Dice | per test group mIoU "
        "| other dataset mIoU / Dice | train min | commit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["bundle"], r["seed"])):
        groups = " / ".join(f"{g} {v['iou']:.4f}" for g, v in r["test"].items() if g != "test") or "—"
        other = ", ".join(f"{e['dataset']} {e['iou']:.4f} / {e['dice']:.4f}" for e in r["elsewhere"]) or "—"
        lines.append(
            f"| {r['bundle']} | {r['seed']} | {r['best_epoch']} | {r['best_val_iou']:.4f} | "
            f"{r['test']['test']['iou']:.4f} | "
            f"{r['test']['test']['dice']:.4f} | {groups} | {other} | {r['train_seconds'] / 60:.1f} | {r['commit']} |"
        )
    for bundle in bundles:
        first = next(r for r in records if r["bundle"] == bundle)
        lines += [
            "",
            f"`{bundle}` (seed {first['seed']}; other seeds change `--seed` and the output folder):",
            "",
            "```",
            *first["commands"],
            *(c for e in first["elsewhere"] for c in e["commands"]),
            "```",
        ]
    return "\n".join(lines)


def write_report(args: argparse.Namespace) -> str:
    """Put the table (every studied bundle) into the "defaults" block of RESULTS.md; return the Markdown."""
    records = load_records(args.results)
    if not records:
        raise SystemExit(f"no finished runs in {args.results}")
    return publish(defaults_table(records), "defaults", args.markdown)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line of the defaults study."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("run", "report"))
    parser.add_argument("--bundles", nargs="+", choices=sorted(STUDIES), default=sorted(STUDIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("benchmarks/runs"),
        help="run outputs, relative to the repository root (not committed)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / "defaults.jsonl")
    parser.add_argument(
        "--markdown",
        type=Path,
        nargs="*",
        default=[RESULTS_MD],
        help="Markdown files whose 'defaults' block the report replaces (default: benchmarks/RESULTS.md)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.action == "run":
        run_study(args)
    else:
        write_report(args)


if __name__ == "__main__":
    main()
