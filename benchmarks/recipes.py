"""Recipe searches on a bundle's real data: what gets validation mIoU up, with no pretrained weights.

A recipe is the bundle's ``configs/train.json`` with recipe fragments from
``benchmarks/recipes/<bundle>/`` merged over it, in order (plain MONAI config merging: a top-level
id replaces the bundle's, a ``+``-prefixed id extends the bundle's list). Every fragment changes one
thing:

    glas
    cosine_lr        cosine learning-rate decay over the run, to 1 % of the bundle's rate
    light_masking    free-form holes over 10-30 % of the image instead of 40-60 %
    aspect_384x256   384x256, close to the tiles' own 775x522 aspect, instead of 256x256
    stain_jitter     per-channel intensity scale and shift (H&E stain variation) and slight blur
    batch_4          batches of 4 instead of 8: twice the optimiser steps for the same epochs

    kvasir_seg
    structure_loss   PraNet's weighted BCE + weighted IoU instead of Dice + CE
    plain            no masked pass (MaskSup's a2 = a3 = 0): about half the cost of an epoch
    size_352         352x352 inputs (the PraNet protocol's size) instead of 320x272
    adamw            AdamW with weight decay 1e-4 instead of Adam
    wide             UNet channels 24-384 instead of 16-256 (about 2.2x the cost of an epoch)

A try trains and keeps its best-*validation* checkpoint; its record holds the validation selection
only. The test split is scored once, for a chosen recipe, by the ``score`` action. Records go to
``benchmarks/results/<bundle>_recipes.jsonl``; a recorded try is skipped next time::

    python benchmarks/recipes.py run --bundle kvasir_seg shipped plain --epochs 16
    python benchmarks/recipes.py score --bundle kvasir_seg plain --epochs 16   # test, once
    python benchmarks/recipes.py report --bundle kvasir_seg   # the "kvasir_seg-recipes" block
    python benchmarks/recipes.py curve --bundle kvasir_seg plain-structure --epochs 120   # its validation curve
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
    RESULTS_DIR,
    add_study_options,
    append_record,
    learning_curve,
    load_records,
    publish,
    score_test,
    train_and_select,
)

RECIPES: dict[str, dict[str, list[str]]] = {
    "glas": {
        "shipped": [],
        "cosine": ["cosine_lr"],
        "cosine-light": ["cosine_lr", "light_masking"],
        "cosine-light-384x256": ["cosine_lr", "light_masking", "aspect_384x256"],
        "cosine-light-384x256-stain": ["cosine_lr", "light_masking", "aspect_384x256", "stain_jitter"],
        "cosine-light-384x256-stain-b4": ["cosine_lr", "light_masking", "aspect_384x256", "stain_jitter", "batch_4"],
    },
    "kvasir_seg": {
        "shipped": [],
        "structure": ["structure_loss"],
        "plain": ["plain"],
        "352": ["size_352"],
        "adamw": ["adamw"],
        "wide": ["wide"],
        "plain-structure": ["plain", "structure_loss"],
    },
}
# Where each bundle's records went before the runner served more than GLaS.
RESULTS_NAMES = {"glas": "glas_recipes.jsonl"}


def recipe_configs(bundle: str, recipe: str) -> list[str]:
    """The config files of ``recipe``, relative to the repository root, merged in this order."""
    fragments = (f"benchmarks/recipes/{bundle}/{fragment}.json" for fragment in RECIPES[bundle][recipe])
    return [f"bundles/{bundle}/configs/train.json", *fragments]


def _values(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {"seed": args.seed, "max_epochs": args.epochs, "val_interval": args.val_interval}
    if args.dataset_dir:
        values["dataset_dir"] = args.dataset_dir
    if args.image_size:
        values["image_size"] = list(args.image_size)
    return values


def _output_dir(recipe: str, args: argparse.Namespace) -> Path:
    suffix = "" if args.bundle == "glas" else f"{args.bundle}-"  # GLaS tries kept their first folder names
    return args.work_dir / f"{suffix}{recipe}-e{args.epochs}-seed{args.seed}"


def _key(record: dict[str, Any]) -> tuple:
    return record["recipe"], record["epochs"], record["seed"]


def run_tries(args: argparse.Namespace) -> None:
    """Train every named recipe not yet recorded with these epochs and seed; record its validation selection."""
    done = {_key(r) for r in load_records(args.results) if "best_val_iou" in r}
    for recipe in args.recipes:
        if (recipe, args.epochs, args.seed) in done:
            print(f"[recipes] {recipe}, {args.epochs} epochs, seed {args.seed}: recorded, skipped", flush=True)
            continue
        fragments = RECIPES[args.bundle][recipe]
        print(
            f"[recipes] {args.bundle} {recipe} ({' + '.join(fragments) or 'bundle as shipped'}), "
            f"{args.epochs} epochs: training",
            flush=True,
        )
        outcome = train_and_select(recipe_configs(args.bundle, recipe), _values(args), _output_dir(recipe, args))
        record = {"recipe": recipe, "fragments": fragments, "epochs": args.epochs, "seed": args.seed, **outcome}
        append_record(args.results, record)
        print(
            f"[recipes] {recipe}: best val {record['best_val_iou']:.4f} at epoch {record['best_epoch']} "
            f"({record['train_seconds']:.0f} s)",
            flush=True,
        )


def score_tries(args: argparse.Namespace) -> None:
    """Score the named, trained recipes on the test split: once each, never again."""
    records = load_records(args.results)
    trained = {_key(r) for r in records if "best_val_iou" in r}
    scored = {_key(r) for r in records if "test" in r}
    for recipe in args.recipes:
        key = (recipe, args.epochs, args.seed)
        if key not in trained:
            raise SystemExit(f"{args.bundle} {recipe}, {args.epochs} epochs, seed {args.seed}: not trained yet")
        if key in scored:
            print(f"[recipes] {recipe}: test already scored, not scored again", flush=True)
            continue
        configs = recipe_configs(args.bundle, recipe)
        outcome = score_test(
            configs, f"bundles/{args.bundle}/configs/evaluate.json", _values(args), _output_dir(recipe, args)
        )
        append_record(
            args.results,
            {
                "recipe": recipe,
                "epochs": args.epochs,
                "seed": args.seed,
                "test": outcome["test"],
                "commands": [outcome["command"]],
            },
        )
        print(f"[recipes] {recipe}: test mIoU {outcome['test']['test']['iou']:.4f}", flush=True)


def recipes_table(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per try, best validation mIoU first (test where it was scored), then the commands."""
    tests = {_key(r): r for r in records if "test" in r}
    tries = sorted((r for r in records if "best_val_iou" in r), key=lambda r: -r["best_val_iou"])
    lines = [
        "| recipe | fragments over the bundle | epochs | seed | best val mIoU (epoch) | test mIoU | test Dice "
        "| mIoU native | Dice native | per test group mIoU | train min | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in tries:
        scored = tests.get(_key(r))
        t = scored["test"] if scored else None
        groups = " / ".join(f"{g} {t[g]['iou']:.4f}" for g in sorted(t) if g != "test") if t else ""
        metrics = " | ".join(f"{t['test'][m]:.4f}" for m in METRICS) if t else " | ".join("—" for _ in METRICS)
        lines.append(
            f"| {r['recipe']} | {', '.join(r['fragments']) or '—'} | {r['epochs']} | {r['seed']} | "
            f"{r['best_val_iou']:.4f} ({r['best_epoch']}) | {metrics} | {groups or '—'} | "
            f"{r['train_seconds'] / 60:.1f} | {r.get('commit', '?')} |"
        )
    lines += ["", "Commands of each try (train; score the best-validation checkpoint on the test split where it was):"]
    for r in tries:
        scored = tests.get(_key(r))
        commands = [*r["commands"], *(scored["commands"] if scored and scored is not r else [])]
        lines += ["", f"`{r['recipe']}`, {r['epochs']} epochs, seed {r['seed']}:", "", "```", *commands, "```"]
    return "\n".join(lines)


def curve_table(curve: dict[str, list[tuple[int, float]]], epochs: int) -> str:
    """Markdown: the validation curve of one run, one row per validation, the best marked."""
    losses = dict(curve["train_loss"])
    dice = dict(curve["val_dice"])
    best_epoch, best = max(curve["val_iou"], key=lambda point: (point[1], -point[0]))
    done = max(losses, default=0)
    lines = [
        f"Epochs done: {done} of {epochs}; best validation mIoU so far {best:.4f} at epoch {best_epoch}.",
        "",
        "| epoch | val mIoU | val Dice | train loss |",
        "|---|---|---|---|",
    ]
    for epoch, iou in curve["val_iou"]:
        loss = f"{losses[epoch]:.4f}" if epoch in losses else "—"
        mark = " (best)" if epoch == best_epoch else ""
        lines.append(f"| {epoch} | {iou:.4f}{mark} | {dice.get(epoch, float('nan')):.4f} | {loss} |")
    return "\n".join(lines)


def write_curves(args: argparse.Namespace) -> str:
    """Put each named run's validation curve so far into its own block (``BUNDLE-RECIPE-eN-curve``)."""
    bodies = []
    for recipe in args.recipes:
        curve = learning_curve(_output_dir(recipe, args))
        if not curve["val_iou"]:
            raise SystemExit(f"{_output_dir(recipe, args)}: no validation logged yet")
        block = f"{args.bundle}-{recipe}-e{args.epochs}-curve"
        bodies.append(publish(curve_table(curve, args.epochs), block, args.markdown))
    return "\n\n".join(bodies)


def write_report(args: argparse.Namespace) -> str:
    """Put the tries' table into the bundle's recipes block of each Markdown file; return the Markdown."""
    records = load_records(args.results)
    if not records:
        raise SystemExit(f"no finished tries in {args.results}")
    return publish(recipes_table(records), _block(args.bundle), args.markdown)


def _block(bundle: str) -> str:
    return "recipes" if bundle == "glas" else f"{bundle}-recipes"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line of the recipe runner."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("run", "score", "report", "curve"))
    parser.add_argument("recipes", nargs="*", default=[], help="recipes to run or score (see above)")
    parser.add_argument("--bundle", choices=sorted(RECIPES), default="glas")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--val-interval", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", nargs=2, type=int, help="override the recipe's image size (smoke runs)")
    add_study_options(parser, None, "recipes", dataset_dir=None)
    args = parser.parse_intermixed_args(argv)
    if args.results is None:  # no --results: the bundle's own records
        args.results = RESULTS_DIR / RESULTS_NAMES.get(args.bundle, f"{args.bundle}_recipes.jsonl")
    if args.dataset_dir is None:
        args.dataset_dir = {"glas": "../shared/data/glas", "kvasir_seg": "../shared/data/kvasir-seg"}[args.bundle]
    known = RECIPES[args.bundle]
    unknown = [name for name in args.recipes if name not in known]
    if unknown or (args.action != "report" and not args.recipes):
        parser.error(
            f"name the {args.bundle} recipes to {args.action} from: {', '.join(known)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    {"run": run_tries, "score": score_tries, "report": write_report, "curve": write_curves}[args.action](args)


if __name__ == "__main__":
    main()
