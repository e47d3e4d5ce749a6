"""Best-effort GLaS recipes: what gets test mIoU up with no pretrained weights and selection on validation.

A recipe is the GLaS bundle's ``configs/train.json`` with recipe fragments from
``benchmarks/recipes/glas/`` merged over it, in order (plain MONAI config merging: a top-level id
replaces the bundle's, a ``+``-prefixed id extends the bundle's list). Every fragment changes one
thing the literature suggests for GLaS from scratch:

    cosine_lr        cosine learning-rate decay over the run, to 1 % of the bundle's rate
    light_masking    free-form holes over 10-30 % of the image instead of 40-60 %
    aspect_384x256   384x256, close to the tiles' own 775x522 aspect, instead of 256x256
    stain_jitter     per-channel intensity scale and shift (H&E stain variation) and slight blur
    batch_4          batches of 4 instead of 8: twice the optimiser steps for the same epochs

Each try trains, keeps the best-*validation* checkpoint and is scored once on testA + testB (see
``bundle_runs.py``); finished tries go to ``benchmarks/results/glas_recipes.jsonl`` and are
skipped next time::

    python benchmarks/glas_recipes.py run cosine-light --epochs 100
    python benchmarks/glas_recipes.py report          # the "recipes" block of RESULTS.md
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle_runs import (
    METRICS,
    add_study_options,
    append_record,
    load_records,
    publish,
    run_or_report,
    train_and_evaluate,
)

TRAIN_CONFIG = "bundles/glas/configs/train.json"
EVAL_CONFIG = "bundles/glas/configs/evaluate.json"
FRAGMENTS_DIR = "benchmarks/recipes/glas"

RECIPES: dict[str, list[str]] = {
    "shipped": [],
    "cosine": ["cosine_lr"],
    "cosine-light": ["cosine_lr", "light_masking"],
    "cosine-light-384x256": ["cosine_lr", "light_masking", "aspect_384x256"],
    "cosine-light-384x256-stain": ["cosine_lr", "light_masking", "aspect_384x256", "stain_jitter"],
    "cosine-light-384x256-stain-b4": ["cosine_lr", "light_masking", "aspect_384x256", "stain_jitter", "batch_4"],
}


def recipe_configs(recipe: str) -> list[str]:
    """The config files of ``recipe``, relative to the repository root, merged in this order."""
    return [TRAIN_CONFIG, *(f"{FRAGMENTS_DIR}/{fragment}.json" for fragment in RECIPES[recipe])]


def run_recipe(recipe: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train and score one recipe; return its record."""
    values = {
        "dataset_dir": args.dataset_dir,
        "seed": args.seed,
        "max_epochs": args.epochs,
        "val_interval": args.val_interval,
    }
    if args.image_size:
        values["image_size"] = list(args.image_size)
    output_dir = args.work_dir / f"{recipe}-e{args.epochs}-seed{args.seed}"
    outcome = train_and_evaluate(recipe_configs(recipe), EVAL_CONFIG, values, output_dir)
    return {"recipe": recipe, "fragments": RECIPES[recipe], "epochs": args.epochs, "seed": args.seed, **outcome}


def run_tries(args: argparse.Namespace) -> None:
    """Run every named recipe not yet recorded with these epochs and seed."""
    done = {(r["recipe"], r["epochs"], r["seed"]) for r in load_records(args.results)}
    for recipe in args.recipes:
        if (recipe, args.epochs, args.seed) in done:
            print(f"[recipes] {recipe}, {args.epochs} epochs, seed {args.seed}: recorded, skipped", flush=True)
            continue
        print(
            f"[recipes] {recipe} ({' + '.join(RECIPES[recipe]) or 'bundle as shipped'}), "
            f"{args.epochs} epochs: training",
            flush=True,
        )
        record = run_recipe(recipe, args)
        append_record(args.results, record)
        print(
            f"[recipes] {recipe}: val {record['best_val_iou']:.4f}, test mIoU {record['test']['test']['iou']:.4f} "
            f"({record['train_seconds']:.0f} s)",
            flush=True,
        )


def recipes_table(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per try, best test mIoU first, then each try's commands."""
    ordered = sorted(records, key=lambda r: -r["test"]["test"]["iou"])
    lines = [
        "| recipe | fragments over the bundle | epochs | seed | best val mIoU (epoch) | test mIoU | test Dice "
        "| mIoU native | Dice native | testA / testB mIoU | train min | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ordered:
        t = r["test"]
        split_iou = " / ".join(f"{t[g]['iou']:.4f}" for g in ("testA", "testB") if g in t)
        lines.append(
            f"| {r['recipe']} | {', '.join(r['fragments']) or '—'} | {r['epochs']} | {r['seed']} | "
            f"{r['best_val_iou']:.4f} ({r['best_epoch']}) | "
            + " | ".join(f"{t['test'][m]:.4f}" for m in METRICS)
            + f" | {split_iou} | {r['train_seconds'] / 60:.1f} | {r.get('commit', '?')} |"
        )
    lines += ["", "Commands of each try (train, then score the best-validation checkpoint on testA + testB):"]
    for r in ordered:
        lines += ["", f"`{r['recipe']}`, {r['epochs']} epochs:", "", "```", *r["commands"], "```"]
    return "\n".join(lines)


def write_report(args: argparse.Namespace) -> str:
    """Put the tries' table into the "recipes" block of each Markdown file; return the Markdown."""
    records = load_records(args.results)
    if not records:
        raise SystemExit(f"no finished tries in {args.results}")
    return publish(recipes_table(records), "recipes", args.markdown)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line of the recipe runner."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("run", "report"))
    parser.add_argument("recipes", nargs="*", default=[], help=f"recipes to run (run only): {', '.join(RECIPES)}")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--val-interval", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", nargs=2, type=int, help="override the recipe's image size (smoke runs)")
    add_study_options(parser, "glas_recipes.jsonl", "recipes")
    args = parser.parse_args(argv)
    unknown = [name for name in args.recipes if name not in RECIPES]
    if unknown or (args.action == "run" and not args.recipes):
        parser.error(
            f"name the recipes to run from: {', '.join(RECIPES)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return args


def main(argv: Sequence[str] | None = None) -> None:
    run_or_report(parse_args(argv), run_tries, write_report)


if __name__ == "__main__":
    main()
