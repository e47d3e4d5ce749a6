"""Semi-supervised study: how close a quarter (or an eighth) of the labels gets to all of them.

Arms, on one bundle and its real data, each at a label fraction (the same seeded labelled subset):

    supervised-only   MONAI's plain SupervisedTrainer on the labelled part   (train + supervised + labelled_only)
    masksup           MaskSup on the labelled part                           (train + labelled_only)
    semi              MaskMatch: the labelled loss + the unlabelled branches (train + semi_train)
    semi-mim          semi + S4MIM-style class-wise masked image modelling   (train + semi_train + semi_mim)
    supervised-steps  supervised-only for as many labelled steps as semi     (control: more epochs)
    supervised-time   supervised-only for as long as semi trained            (control: wall-clock)
    full-supervised   plain supervised training on every label (fraction 1, the reference)

and the ablation (``--arms`` with the names of ``ABLATION``, best at a reduced budget): each undoes one
change of issue 27 on ``semi`` through its ``semi_train.json`` values, paired with ``semi`` by seed.

A semi-supervised epoch is one pass over the larger, unlabelled set, so at equal epochs ``semi``
takes more labelled steps than the arms on the labelled part alone; the two controls take that
away. ``supervised-steps`` trains ``epochs * semi's steps per epoch / supervised-only's`` epochs (the
steps per epoch read from each run's checkpoint), ``supervised-time`` ``epochs * semi's training
time / supervised-only's``; both validate as often per run as the study (``val_interval`` scaled
alike) and need the ``semi`` and ``supervised-only`` runs of their fraction and seed first. The
report pairs every arm with each control by seed.

Every arm starts from the bundle's shipped defaults (``bundle_runs.BUNDLE_DEFAULTS`` names them; a
record made on other defaults does not count) with the study's own epochs and image size. The
semi-supervised arms' records also carry ``semi_version`` (the ``semi_train.json`` defaults they were
made on, :data:`SEMI_VERSION`); records made on earlier ones stay in the table, labelled with their
version (records without one are issue 14's MaskMatch), so old and new semi arms compare side by side;
one made on earlier defaults that is the same run as an arm on the current ones counts as that arm
(:data:`SAME_RUNS`: issue 27's online-source ``semi`` is today's ``semi-online-source``).
Supervised-only runs of more epochs than the study's, made by hand before these arms existed (issue
14's equal-labelled-steps control), count as ``supervised-steps``.

Each (arm, fraction, seed) trains with ``python -m monai.bundle run training``, keeps the checkpoint
with the best *validation* mIoU (validation and test stay labelled; the semi-supervised arm selects
the better of its EMA teacher and its network), scores it on the test split, and is recorded in
``results/semi.jsonl`` (resumable, like ``ablation.py``)::

    python benchmarks/semi.py run --fractions 0.25 0.125 --seeds 0 1 2
    python benchmarks/semi.py run --bundle kvasir_seg
    python benchmarks/semi.py run --bundle kvasir_seg --epochs 10 --image-size 160 128 --fractions 0.25 \
        --seeds 0 --arms semi supervised-only semi-masked-only semi-online-source
    python benchmarks/semi.py report --bundle glas       # the "semi-glas" block of RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bundle_runs as study
from defaults import STUDIES, add_bundle_study_options, bundle_study_args, bundle_study_settings

from masksup_med.run.resume import latest_checkpoint

ARMS: dict[str, list[str]] = {
    "supervised-only": ["train.json", "supervised.json", study.LABELLED_ONLY],
    "masksup": ["train.json", study.LABELLED_ONLY],
    "semi": ["train.json", "semi_train.json"],
    "semi-mim": ["train.json", "semi_train.json", "semi_mim.json"],
    "supervised-steps": ["train.json", "supervised.json", study.LABELLED_ONLY],
    "supervised-time": ["train.json", "supervised.json", study.LABELLED_ONLY],
    "full-supervised": ["train.json", "supervised.json"],
}
ABLATION: dict[str, dict[str, Any]] = {  # arm -> semi_train.json overrides, each undoing one change of issue 27
    "semi-online-source": {"pseudo_label_source": "online"},  # the network's own pseudo-labels, not the teacher's
    "semi-masked-only": {"strong_weight": 0.0, "feature_weight": 0.0},  # no weak-to-strong branches (issue 14)
    "semi-no-masked-view": {"masked_weight": 0.0},  # weak-to-strong only: MaskMatch's masked view dropped
    "semi-ce-only": {"unsup_dice_weight": 0.0},  # the unlabelled loss without its ignore-mask Dice
    "semi-labelled-masksup": {"labelled_masked_terms": True},  # MaskSup's masked terms on the labelled batch
    "semi-multi-scale": {"teacher_scales": [0.75, 1.0, 1.25]},  # pseudo-labels averaged over three input scales
}
SEMI_ARMS = ("semi", "semi-mim", *ABLATION)
# The semi_train.json defaults new semi-supervised records are made on; change it when they change.
SEMI_VERSION = "issue27-teacher"
# Records made on earlier defaults that are, value for value, runs of an arm on the current ones: issue 27's
# first defaults differed from today's in the pseudo-label source alone (the network online, now the EMA teacher).
SAME_RUNS = {("semi", "issue27"): "semi-online-source", ("semi-teacher-source", "issue27"): "semi"}
EARLIEST_SEMI_VERSION = "issue14"  # what a semi-supervised record without ``semi_version`` was made on
ALL_ARMS = [*ARMS, *ABLATION]  # report and plan order
CONTROLS = {"supervised-steps": "equal labelled steps", "supervised-time": "equal wall-clock"}


def configs(bundle: str, arm: str) -> list[str]:
    """The config files of ``arm``, merged in order (bundle files by name, recipe fragments by path)."""
    files = ARMS["semi"] if arm in ABLATION else ARMS[arm]
    return [name if "/" in name else f"bundles/{bundle}/configs/{name}" for name in files]


def study_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What every run of one study shares (a record only counts for the same settings)."""
    return bundle_study_settings(args)


def semi_version(record: dict[str, Any]) -> str | None:
    """The semi_train.json defaults a semi-supervised record was made on; None for the other arms."""
    return record.get("semi_version", EARLIEST_SEMI_VERSION) if record["arm"] in SEMI_ARMS else None


def current_arm(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` under the arm that makes the same run on the current defaults (:data:`SAME_RUNS`), else as it is."""
    arm = SAME_RUNS.get((record["arm"], record.get("semi_version")))
    return record if arm is None else {**record, "arm": arm, "semi_version": SEMI_VERSION}


def arm_label(record: dict[str, Any]) -> str:
    """The arm as the report shows it: semi-supervised arms made on earlier defaults carry their version."""
    version = semi_version(record)
    return record["arm"] if version in (None, SEMI_VERSION) else f"{record['arm']} ({version})"


def study_records(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The study's records, each with ``arm`` set to its report label (:func:`arm_label`).

    Supervised-only runs of the same study but more epochs (issue 14's equal-labelled-steps control,
    run by hand) are taken as ``supervised-steps``, with ``max_epochs`` their own epochs.
    """
    settings = study_settings(args)
    relaxed = {k: v for k, v in settings.items() if k not in ("epochs", "val_interval")}
    out = []
    for record in map(current_arm, study.load_records(args.results, relaxed)):
        if record["epochs"] == args.epochs and record["val_interval"] == args.val_interval:
            out.append({**record, "arm": arm_label(record)})
        elif record["arm"] == "supervised-only" and record["epochs"] > args.epochs:
            out.append({**record, "arm": "supervised-steps", "max_epochs": record["epochs"], "epochs": args.epochs})
    return out


def runs(args: argparse.Namespace) -> list[tuple[str, float, int]]:
    """Every (arm, label fraction, seed) of the study, controls after the runs they are sized on; full labels once."""
    planned = []
    for seed in args.seeds:
        for fraction in args.fractions:
            planned += [(arm, fraction, seed) for arm in ALL_ARMS if arm in args.arms and arm != "full-supervised"]
        if "full-supervised" in args.arms:
            planned.append(("full-supervised", 1.0, seed))
    return planned


def run_dir(args: argparse.Namespace, arm: str, fraction: float, seed: int) -> Path:
    """The output folder of one run (the semi-supervised arms' folders name their version)."""
    width, height = args.image_size
    version = f"-{SEMI_VERSION}" if arm in SEMI_ARMS else ""
    return args.work_dir / (
        f"semi-{args.bundle}-{study.BUNDLE_DEFAULTS}-{arm}{version}-e{args.epochs}-{width}x{height}-f{fraction}-seed{seed}"
    )


def epoch_length(output_dir: Path) -> int:
    """Steps per epoch of a finished run, from its newest epoch checkpoint."""
    local = output_dir if output_dir.is_absolute() else study.ROOT / output_dir
    path = latest_checkpoint(local / "models")
    if path is None:
        raise SystemExit(f"no epoch checkpoint in {local / 'models'}: the run's steps per epoch are unknown")
    return int(torch.load(path, map_location="cpu", weights_only=False)["trainer"]["epoch_length"])


def control_schedule(
    args: argparse.Namespace, arm: str, fraction: float, seed: int, records: list[dict[str, Any]]
) -> tuple[int, int]:
    """Epochs and validation interval of a control run, sized on the ``semi`` and ``supervised-only`` records."""

    def recorded(name: str) -> dict[str, Any]:
        for record in records:
            if record["arm"] == name and record["label_fraction"] == fraction and record["seed"] == seed:
                return record
        raise SystemExit(
            f"[semi] {arm} {fraction} seed {seed} is sized on the '{name}' run of the same fraction and seed: "
            f"run it first (--arms {name} {arm})."
        )

    semi, alone = recorded("semi"), recorded("supervised-only")
    if arm == "supervised-steps":
        steps = [r.get("epoch_length") or epoch_length(run_dir(args, r["arm"], fraction, seed)) for r in (semi, alone)]
        factor = steps[0] / steps[1]
    else:
        factor = semi["train_seconds"] / alone["train_seconds"]
    epochs = max(args.epochs, round(args.epochs * factor))
    return epochs, max(1, round(args.val_interval * epochs / args.epochs))


def run_study(args: argparse.Namespace) -> None:
    """Train and evaluate every planned run not recorded yet."""
    settings = study_settings(args)
    for arm, fraction, seed in runs(args):
        records = study_records(args)
        if any(r["arm"] == arm and r["label_fraction"] == fraction and r["seed"] == seed for r in records):
            print(f"[semi] {arm} {fraction} seed {seed}: recorded, skipped", flush=True)
            continue
        epochs, val_interval = args.epochs, args.val_interval
        if arm in CONTROLS:
            epochs, val_interval = control_schedule(args, arm, fraction, seed, records)
        values = {
            "dataset_dir": settings["dataset_dir"],
            "seed": seed,
            "max_epochs": epochs,
            "val_interval": val_interval,
            "image_size": list(args.image_size),
        }
        if arm != "full-supervised":
            values["label_fraction"] = fraction
        values.update(ABLATION.get(arm, {}))
        out = run_dir(args, arm, fraction, seed)
        print(f"[semi] {arm} {fraction} seed {seed}: training {epochs} epochs", flush=True)
        outcome = study.train_and_evaluate(configs(args.bundle, arm), STUDIES[args.bundle].evaluate_config, values, out)
        extra: dict[str, Any] = {"max_epochs": epochs, "epoch_length": epoch_length(out)}
        if arm in SEMI_ARMS:
            extra["semi_version"] = SEMI_VERSION
        record = {"arm": arm, "label_fraction": fraction, "seed": seed, **settings, **extra, **outcome}
        study.append_record(args.results, record)
        print(f"[semi] {arm} {fraction} seed {seed}: test mIoU {outcome['test']['test']['iou']:.4f}", flush=True)


def report(args: argparse.Namespace) -> str:
    """The study's table (mean ± std over seeds per arm and fraction) into the ``semi-<bundle>`` block of RESULTS.md."""
    records = study_records(args)
    if not records:
        raise SystemExit(f"no finished runs with {study_settings(args)} in {args.results}")
    intro = (
        f"Bundle `{args.bundle}` on `{args.dataset_dir}`, {args.epochs} epochs, validation every "
        f"{args.val_interval}, {args.image_size[0]}x{args.image_size[1]}; model selected on validation. "
        f"Semi-supervised arms on the `semi_train.json` defaults of {SEMI_VERSION}; those marked "
        "(issueN) on earlier ones. The controls train longer (epochs column)."
    )
    lines = [
        intro,
        "",
        "| arm | label fraction | seeds | epochs | val mIoU | test mIoU | test Dice | test mIoU native "
        "| train min/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    labels = list(dict.fromkeys(r["arm"] for r in sorted(records, key=lambda r: _arm_order(r["arm"]))))
    for arm in labels:
        for fraction in sorted({r["label_fraction"] for r in records if r["arm"] == arm}, reverse=True):
            rows = [r for r in records if r["arm"] == arm and r["label_fraction"] == fraction]
            epochs = sorted({r.get("max_epochs", r["epochs"]) for r in rows})
            cells = [study.mean_std([r["best_val_iou"] for r in rows])]
            cells += [study.mean_std([r["test"]["test"][m] for r in rows]) for m in ("iou", "dice", "iou_native")]
            minutes = statistics.mean(r["train_seconds"] for r in rows) / 60
            lines.append(
                f"| {arm} | {fraction} | {len(rows)} | {'/'.join(map(str, epochs))} | "
                + " | ".join(cells)
                + f" | {minutes:.1f} |"
            )
    fraction = {"label_fraction": "label fraction"}
    arms = [arm for arm in labels if arm != "full-supervised"]
    semi_arms = [arm for arm in labels if arm.split(" ")[0] in SEMI_ARMS]
    lines += [
        "",
        "Test mIoU gain over supervised-only at the same label fraction and epochs, same seed (goal at 1/4: >= +0.05):",
        "",
        *study.paired_gains(records, "supervised-only", arms, by=fraction),
    ]
    for control, what in CONTROLS.items():
        if any(r["arm"] == control for r in records):
            lines += [
                "",
                f"Test mIoU gain of the semi-supervised arms over supervised-only at {what} ({control}), same seed:",
                "",
                *study.paired_gains(records, control, semi_arms, by=fraction),
            ]
    ablated = [arm for arm in labels if arm in ABLATION]
    if ablated and "semi" in labels:
        lines += [
            "",
            "Ablation: test mIoU of each arm that undoes one change of issue 27, minus `semi`'s, same seed:",
            "",
            *study.paired_gains(records, "semi", ablated, by=fraction),
        ]
    lines += [
        "",
        "Test mIoU minus full-label supervised training with the same seed (goal at 1/4: >= -0.03):",
        "",
        *study.paired_gains(records, "full-supervised", arms, by=fraction, match=()),
    ]
    lines += [
        "",
        "Each run is these two commands (here the first recorded run of the current semi-supervised arm):",
        "",
        "```",
        *_example_commands(records),
        "```",
    ]
    return study.publish("\n".join(lines), f"semi-{args.bundle}", args.markdown)


def _example_commands(records: list[dict[str, Any]]) -> list[str]:
    """The commands of the first current ``semi`` record, else of the first record that kept its commands."""
    ranked = sorted(records, key=lambda r: r["arm"] != "semi")  # stable: the first semi record, if any, leads
    return next((r["commands"] for r in ranked if r.get("commands")), [])


def _arm_order(label: str) -> tuple[int, str]:
    """Report order: the order of :data:`ARMS`, earlier semi-supervised versions before the current one."""
    name = label.split(" ")[0]
    return (ALL_ARMS.index(name) if name in ALL_ARMS else len(ALL_ARMS)), ("0" if label == name else "-") + label


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line of the semi-supervised study."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("run", "report"))
    parser.add_argument("--arms", nargs="+", choices=ALL_ARMS, default=list(ARMS))
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.125])
    study.add_schedule_options(parser)
    add_bundle_study_options(parser, "semi.jsonl", "semi-<bundle>")
    return bundle_study_args(parser, argv)


def main(argv: Sequence[str] | None = None) -> None:
    study.run_or_report(parse_args(argv), run_study, report)


if __name__ == "__main__":
    main()
