"""MaskSup ablation on real GLaS: which of the two extra loss terms, and how much masking, helps.

Arms (the GLaS bundle's recipe, only these settings change):

    baseline     a2 = a3 = 0            plain supervised training (the masked pass is skipped)
    context      a3 = 0                 + the masked-image segmentation term
    full-heavy   a1 = a2 = a3 = 1       full MaskSup, free-form holes over 40-60 % of the image
    full-light   a1 = a2 = a3 = 1       full MaskSup, holes over 10-30 % of the image

Each (arm, seed) trains with ``python -m monai.bundle run training``, keeps the checkpoint with the
best *validation* mIoU (the bundle's own selection; the test set is never looked at while
training), then runs the bundle's ``evaluating`` config on testA + testB. Every finished run is
appended to ``benchmarks/results/ablation.jsonl`` and skipped next time, and a run killed halfway
resumes from its last epoch checkpoint, so the study can span several sessions::

    python benchmarks/ablation.py run                    # all arms, seeds 0 1 2 (hours on a CPU)
    python benchmarks/ablation.py run --arms baseline --seeds 3
    python benchmarks/ablation.py report                 # tables into RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle_runs import (
    METRICS,
    add_schedule_options,
    add_study_options,
    append_record,
    load_records,
    mean_std,
    paired_gains,
    publish,
    run_or_report,
    train_and_evaluate,
)

TRAIN_CONFIG = "bundles/glas/configs/train.json"
EVAL_CONFIG = "bundles/glas/configs/evaluate.json"

HEAVY, LIGHT = [0.4, 0.6], [0.1, 0.3]
ARMS: dict[str, dict[str, Any]] = {
    "baseline": {"loss_weights": {"a1": 1.0, "a2": 0.0, "a3": 0.0}, "mask_ratio_range": HEAVY},
    "context": {"loss_weights": {"a1": 1.0, "a2": 1.0, "a3": 0.0}, "mask_ratio_range": HEAVY},
    "full-heavy": {"loss_weights": {"a1": 1.0, "a2": 1.0, "a3": 1.0}, "mask_ratio_range": HEAVY},
    "full-light": {"loss_weights": {"a1": 1.0, "a2": 1.0, "a3": 1.0}, "mask_ratio_range": LIGHT},
}


def study_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings every run of one study shares (a record only counts for the same settings)."""
    return {"epochs": args.epochs, "val_interval": args.val_interval, "image_size": list(args.image_size)}


def arm_values(arm: str, seed: int, settings: dict[str, Any], dataset_dir: str) -> dict[str, Any]:
    """Bundle values of one (arm, seed) run: the study settings and the arm's loss weights and masking."""
    return {
        "dataset_dir": dataset_dir,
        "seed": seed,
        "max_epochs": settings["epochs"],
        "val_interval": settings["val_interval"],
        "image_size": settings["image_size"],
        **ARMS[arm],
    }


def run_one(arm: str, seed: int, settings: dict[str, Any], dataset_dir: str, work_dir: Path) -> dict[str, Any]:
    """Train, select on validation, evaluate on test; return the record of one finished run."""
    outcome = train_and_evaluate(
        [TRAIN_CONFIG], EVAL_CONFIG, arm_values(arm, seed, settings, dataset_dir), work_dir / f"{arm}-seed{seed}"
    )
    return {"arm": arm, "seed": seed, **settings, **ARMS[arm], **outcome}


def run_study(args: argparse.Namespace) -> None:
    """Run every (seed, arm) pair not yet recorded for these settings, seed by seed."""
    settings = study_settings(args)
    done = {(r["arm"], r["seed"]) for r in load_records(args.results, settings)}
    for seed in args.seeds:
        for arm in args.arms:
            if (arm, seed) in done:
                print(f"[ablation] {arm} seed {seed}: recorded, skipped", flush=True)
                continue
            print(f"[ablation] {arm} seed {seed}: training ({settings})", flush=True)
            record = run_one(arm, seed, settings, args.dataset_dir, args.work_dir)
            append_record(args.results, record)
            print(
                f"[ablation] {arm} seed {seed}: val {record['best_val_iou']:.4f}, "
                f"test mIoU {record['test']['test']['iou']:.4f} ({record['train_seconds']:.0f} s)",
                flush=True,
            )


def ablation_tables(records: list[dict[str, Any]]) -> str:
    """Markdown: mean ± std per arm, then one row per seed with the commands."""
    arms = [a for a in ARMS if any(r["arm"] == a for r in records)]
    lines = [
        "| arm | seeds | val mIoU (selection) | test mIoU | test Dice | test mIoU native | test Dice native "
        "| train min/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        rows = [r for r in records if r["arm"] == arm]
        cells = [mean_std([r["best_val_iou"] for r in rows])]
        cells += [mean_std([r["test"]["test"][m] for r in rows]) for m in METRICS]
        minutes = statistics.mean(r["train_seconds"] for r in rows) / 60
        lines.append(f"| {arm} | {len(rows)} | " + " | ".join(cells) + f" | {minutes:.1f} |")
    lines += [
        "",
        "Test mIoU gain over the baseline trained with the same seed:",
        "",
        *paired_gains(records, "baseline", list(ARMS)),
    ]
    lines += [
        "",
        "Per run (test = testA + testB):",
        "",
        "| arm | seed | best epoch | val mIoU | test mIoU | test Dice | mIoU native | Dice native "
        "| testA / testB mIoU | commit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (list(ARMS).index(r["arm"]), r["seed"])):
        t = r["test"]
        split_iou = " / ".join(f"{t[g]['iou']:.4f}" for g in ("testA", "testB") if g in t)
        lines.append(
            f"| {r['arm']} | {r['seed']} | {r['best_epoch']} | {r['best_val_iou']:.4f} | "
            + " | ".join(f"{t['test'][m]:.4f}" for m in METRICS)
            + f" | {split_iou} | {r.get('commit', '?')} |"
        )
    return "\n".join(lines)


def write_report(args: argparse.Namespace) -> str:
    """Put the ablation tables into the "ablation" block of RESULTS.md; return the Markdown."""
    settings = study_settings(args)
    records = load_records(args.results, settings)
    if not records:
        raise SystemExit(f"no finished runs with {settings} in {args.results}")
    example = records[0]["commands"]
    body = "\n".join(
        [
            (
                f"Settings: {settings['epochs']} epochs, validation every {settings['val_interval']}, "
                f"{settings['image_size'][0]}x{settings['image_size'][1]}; everything else as in `{TRAIN_CONFIG}`. "
                "Mean ± sample std over seeds; mIoU is per-image foreground IoU averaged over images."
            ),
            "",
            ablation_tables(records),
            "",
            (
                "Reproduce: `python benchmarks/ablation.py run && python benchmarks/ablation.py report`. "
                "One row again, into a fresh record file (recorded runs are skipped): "
                "`python benchmarks/ablation.py run --arms ARM --seeds SEED --results rerun.jsonl`. "
                "Each run is these two commands (here the first recorded run):"
            ),
            "",
            "```",
            *example,
            "```",
        ]
    )
    return publish(body, "ablation", args.markdown)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line of the ablation runner."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("run", "report"))
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    add_schedule_options(parser, "training epochs per run (about 8 min for full MaskSup on 2 idle cores)")
    add_study_options(parser, "ablation.jsonl", "ablation")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    run_or_report(parse_args(argv), run_study, write_report)


if __name__ == "__main__":
    main()
