"""Self-supervised pretraining study: does masked-reconstruction pretraining help, and does selective masking
beat random?

Arms, on one bundle and its real data, each fine-tuned at a label fraction (the same seeded labelled
subset in every arm):

    none        the bundle's training from scratch on the labelled part          (train [+ labelled_only])
    random      pretrain.json with random tiles, then fine-tune through            (pretrain_masking random)
                finetune.json (as shipped: the whole network, no warm-up; measured)
    selective   pretrain.json with the paper's selective masking (parts, fixed      (pretrain_masking selective)
                masks chosen by the previous part's model), then fine-tune

and the ablation (``--arms`` with the names of ``ABLATION``): each changes one thing on the ``random``
arm: undoes one change of issue 28 to the pretraining (or runs the per-batch ranking), or turns on one
step of the careful fine-tuning start (``encoder-only``, ``bn-reestimate``, ``warm-up``,
``slow-encoder``; ``careful-start``: all four). Arms that change the pretraining are best run at a
reduced ``--pretrain-steps``; the fine-tuning arms reuse the ``random`` arm's pretraining, so they
cost one fine-tuning each at the full budget.

Every pretraining arm gets the same step budget (``--pretrain-steps``, in ``--pretrain-rounds``
rounds, one checkpoint each), on every image of the fine-tuning dataset's training split without its
mask plus every image of the other shared datasets (``--other-datasets``; read by their adapters, so
no mask is taken for an image). No validation or test image of the fine-tuning dataset is ever
pretrained on: ``masksup_med.data.pretraining_images`` drops it by path and by content, even when
another dataset holds a copy. A pretraining run is shared by every fine-tuning run with the same
bundle, pretraining settings, seed, budget and image size; it resumes with ``--resume auto`` when
killed halfway and records its time in ``pretrain_run.json`` next to its output. Fine-tuning is the bundle's training
with ``finetune.json`` from ``--pretrained_weights <pretraining>/models/pretrained.pt``: checkpoint
picked on *validation*, scored once on test (``bundle_runs.py``). Finished runs go to
``results/pretrain.jsonl`` and are skipped next time::

    python benchmarks/pretrain.py run --seeds 0 1 2 3 4                 # GLaS, fractions 0.25 and 1.0
    python benchmarks/pretrain.py run --bundle kvasir_seg --arms none selective
    python benchmarks/pretrain.py run --arms random no-encoder-masking raw-targets --pretrain-steps 500
    python benchmarks/pretrain.py report --bundle glas     # the "pretrain-glas" block of RESULTS.md

Records made before issue 28 (an epoch budget, ``pretrain_epochs``) still render with
``report --pretrain-epochs N``, into the ``pretrain-<bundle>-epochs`` block.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bundle_runs as study
from defaults import STUDIES, add_bundle_study_options, bundle_study_args, bundle_study_settings
from report import write_json

ARMS: dict[str, dict[str, Any] | None] = {  # arm -> pretrain.json overrides (None: no pretraining)
    "none": None,
    "random": {"pretrain_masking": "random"},
    "selective": {"pretrain_masking": "selective"},
}
RANDOM = {"pretrain_masking": "random"}
CAREFUL_STEPS = {  # issue 28's transfer, step by step: each an ablation arm, all four ``careful-start``
    "encoder-only": {"transfer_scope": "encoder"},
    "bn-reestimate": {"bn_batches": 50},
    "warm-up": {"warmup_fraction": 0.05},
    "slow-encoder": {"encoder_lr_scale": 0.1, "encoder_fraction": 0.1},
}
ABLATION: dict[str, dict[str, Any]] = {  # arm -> pretrain.json overrides; ``finetune`` holds finetune.json's
    "per-batch-ranking": {"pretrain_masking": "per_batch"},
    "small-tiles": {**RANDOM, "pretrain_tile_size": 16, "pretrain_mask_ratio": 0.5},
    "raw-targets": {**RANDOM, "normalise_targets": False},
    "no-encoder-masking": {**RANDOM, "encoder_masking": "none"},
    "finest-skip-masking": {**RANDOM, "encoder_masking": "finest_skip"},
    "own-images-only": {**RANDOM, "pretrain_datasets": {}},
    # the fine-tuning start (finetune.json) ships plain: the whole network, no warm-up; these turn on each careful step
    **{arm: {**RANDOM, "finetune": step} for arm, step in CAREFUL_STEPS.items()},
    "careful-start": {**RANDOM, "finetune": {k: v for step in CAREFUL_STEPS.values() for k, v in step.items()}},
}
ALL_ARMS = {**ARMS, **ABLATION}
OTHER_DATASETS = {  # bundle -> its adapter name, and the shared folder of its images
    "glas": ("glas", "../shared/data/glas"),
    "kvasir_seg": ("kvasir-seg", "../shared/data/kvasir-seg"),
    "cvc_clinicdb": ("cvc-clinicdb", "../shared/data/cvc-clinicdb-sample"),
}
FINETUNE = "bundles/{bundle}/configs/finetune.json"
STUDY_PRETRAIN_STEPS = 2000  # the study's budget; a report at another budget goes to its own RESULTS.md block
RUN_FILE = "pretrain_run.json"  # written into a pretraining's output folder once it has finished


def budget(args: argparse.Namespace) -> dict[str, Any]:
    """The pretraining budget a record was made with: steps and rounds, and the fine-tuning start's defaults
    (:func:`finetune_defaults`), or (records before issue 28) epochs."""
    if args.pretrain_epochs is not None:
        return {"pretrain_epochs": args.pretrain_epochs, "selective_partitions": args.selective_partitions}
    return {
        "pretrain_steps": args.pretrain_steps,
        "pretrain_rounds": args.pretrain_rounds,
        "finetune": json.loads(args.finetune_settings) if args.finetune_settings else finetune_defaults(args.bundle),
    }


def finetune_defaults(bundle: str) -> dict[str, Any]:
    """The plain values of the bundle's ``finetune.json`` (transfer scope, BatchNorm batches, warm-up, encoder
    schedule): a record made with other defaults is not this study's."""
    config = json.loads((study.ROOT / FINETUNE.format(bundle=bundle)).read_text(encoding="utf-8"))
    return {k: v for k, v in config.items() if not k.startswith("+") and not isinstance(v, (dict, list))}


def study_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What every run of one study shares (a record only counts for the same settings)."""
    return {**bundle_study_settings(args), **budget(args)}


def finetune_tag(settings: dict[str, Any], arm: str) -> str:
    """A short name for the fine-tuning start ``arm`` runs with (the study's ``finetune.json`` values and the arm's
    own), so a run made with other values is never resumed as this one."""
    values = {**settings.get("finetune", {}), **(ALL_ARMS[arm] or {}).get("finetune", {})}
    return "ft" + hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


def study_records(results: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The study's finished runs: those made with ``settings``; the ``none`` arm's whatever ``finetune.json`` said
    (it does not read it)."""
    shared = {k: v for k, v in settings.items() if k != "finetune"}
    return [
        r
        for r in study.load_records(results, shared)
        if r["arm"] == "none" or r.get("finetune") == settings.get("finetune")
    ]


def study_options(args: argparse.Namespace, arms: Sequence[str] = tuple(ARMS)) -> str:
    """The command-line options that select this study's records (:func:`study_settings`): the reproduce line;
    ``--arms`` too where ``arms`` are not the default ones."""
    options = (
        f"--bundle {args.bundle} --dataset-dir {args.dataset_dir} --seeds {' '.join(map(str, args.seeds))} "
        f"--fractions {' '.join(map(str, args.fractions))} "
        f"--epochs {args.epochs} --val-interval {args.val_interval} "
        f"--image-size {args.image_size[0]} {args.image_size[1]}"
    )
    if args.pretrain_epochs is not None:
        options += f" --pretrain-epochs {args.pretrain_epochs}"
        if args.selective_partitions is not None:
            options += f" --selective-partitions {args.selective_partitions}"
    else:
        options += f" --pretrain-steps {args.pretrain_steps} --pretrain-rounds {args.pretrain_rounds}"
    if list(arms) != list(ARMS):
        options += f" --arms {' '.join(arms)}"
    return options


def other_datasets(args: argparse.Namespace) -> dict[str, str]:
    """``pretrain_datasets``: the shared datasets other than the fine-tuning one (``{adapter: folder}``)."""
    return {name: folder for bundle, (name, folder) in OTHER_DATASETS.items() if bundle in args.other_datasets}


def pretrain_configs(bundle: str) -> list[str]:
    """``train.json`` with ``pretrain.json`` merged over it."""
    return [STUDIES[bundle].train_config, f"bundles/{bundle}/configs/pretrain.json"]


def finetune_configs(bundle: str, fraction: float, pretrained: bool = True) -> list[str]:
    """The bundle's training (with ``finetune.json`` after a pretraining), on ``fraction`` of the labels below 1
    (``labelled_only.json``, as in ``semi.py``)."""
    return [
        STUDIES[bundle].train_config,
        *([FINETUNE.format(bundle=bundle)] if pretrained else []),
        *([study.LABELLED_ONLY] if fraction < 1 else []),
    ]


def pretrain_values(args: argparse.Namespace, arm: str, seed: int) -> dict[str, Any]:
    """The pretraining's overrides for ``arm`` and ``seed`` (the fine-tuning dataset's held-out images are dropped by
    ``pretraining_images`` whatever ``pretrain_datasets`` holds)."""
    overrides = pretrain_overrides(arm)
    return {
        "dataset_dir": args.dataset_dir,
        "seed": seed,
        "pretrain_steps": args.pretrain_steps,
        "pretrain_rounds": args.pretrain_rounds,
        "val_interval": args.val_interval,
        "image_size": list(args.image_size),
        "pretrain_datasets": other_datasets(args),
        **overrides,
    }


def pretraining_arm(arm: str) -> str:
    """The first arm pretrained exactly as ``arm`` is: arms that change only the fine-tuning share its pretraining."""
    return next(a for a, o in ALL_ARMS.items() if o is not None and pretrain_overrides(a) == pretrain_overrides(arm))


def pretrain_overrides(arm: str) -> dict[str, Any]:
    """``arm``'s ``pretrain.json`` overrides (its ``finetune`` entry left out)."""
    return {k: v for k, v in (ALL_ARMS[arm] or {}).items() if k != "finetune"}


def pretrain(args: argparse.Namespace, arm: str, seed: int) -> dict[str, Any]:
    """Run (or resume, or reuse) the pretraining of ``arm`` with ``seed``; return its record.

    The record (``values``, ``seconds``, ``resumed``, ``commit``, ``command``, ``weights``) is kept in
    the output folder, so every fine-tuning run with the same bundle, pretraining (:func:`pretraining_arm`),
    seed, budget and image size reuses it; one written with other values is refused, naming the folder.
    """
    if args.pretrain_epochs is not None:
        raise SystemExit("--pretrain-epochs only reports records made before issue 28; run with --pretrain-steps")
    width, height = args.image_size
    shared = pretraining_arm(arm)
    name = f"pretrain-{args.bundle}-{study.BUNDLE_DEFAULTS}-{shared}-s{args.pretrain_steps}-{width}x{height}-seed{seed}"
    out = args.work_dir / name
    local = out if out.is_absolute() else study.ROOT / out
    values = pretrain_values(args, arm, seed)
    if (local / RUN_FILE).is_file():
        record = json.loads((local / RUN_FILE).read_text(encoding="utf-8"))
        if record["values"] != values:
            raise SystemExit(
                f"{local / RUN_FILE} was pretrained with {record['values']}, not {values}; "
                "move it away or choose another --work-dir"
            )
        print(f"[pretrain] {arm} pretraining, seed {seed}: done before, reused ({out})", flush=True)
        return record
    print(f"[pretrain] {arm} pretraining, seed {seed}: {args.pretrain_steps} steps into {out}", flush=True)
    outcome = study.train(pretrain_configs(args.bundle), values, out)
    record = {"values": values, **outcome, "weights": str(out / "models" / "pretrained.pt")}
    write_json(local / RUN_FILE, record)
    return record


def runs(args: argparse.Namespace) -> list[tuple[str, float, int]]:
    """Every (arm, label fraction, seed), seed by seed."""
    return [(arm, fraction, seed) for seed in args.seeds for fraction in args.fractions for arm in args.arms]


def run_study(args: argparse.Namespace) -> None:
    """Pretrain (once per arm and seed) and fine-tune every planned run not recorded yet."""
    settings = study_settings(args)
    done = {(r["arm"], r["label_fraction"], r["seed"]) for r in study_records(args.results, settings)}
    for arm, fraction, seed in runs(args):
        if (arm, fraction, seed) in done:
            print(f"[pretrain] {arm} {fraction} seed {seed}: recorded, skipped", flush=True)
            continue
        values = {
            "dataset_dir": args.dataset_dir,
            "seed": seed,
            "max_epochs": args.epochs,
            "val_interval": args.val_interval,
            "image_size": list(args.image_size),
        }
        if fraction < 1:
            values["label_fraction"] = fraction
        pretrained = None if ALL_ARMS[arm] is None else pretrain(args, arm, seed)
        if pretrained is not None:
            values["pretrained_weights"] = pretrained["weights"]
            values.update(ALL_ARMS[arm].get("finetune", {}))
        width, height = args.image_size
        out = args.work_dir / (
            f"finetune-{args.bundle}-{study.BUNDLE_DEFAULTS}-{arm}-e{args.epochs}-{width}x{height}-f{fraction}-seed{seed}"
            + (f"-pretrain{args.pretrain_steps}-{finetune_tag(settings, arm)}" if pretrained is not None else "")
        )
        print(f"[pretrain] {arm} {fraction} seed {seed}: fine-tuning", flush=True)
        outcome = study.train_and_evaluate(
            finetune_configs(args.bundle, fraction, pretrained is not None),
            STUDIES[args.bundle].evaluate_config,
            values,
            out,
        )
        record = {"arm": arm, "label_fraction": fraction, "seed": seed, **settings, **outcome}
        if pretrained is not None:
            record["pretrain"] = {k: pretrained[k] for k in ("seconds", "resumed", "commit", "weights")}
            record["pretrain"]["images"] = sorted(pretrained["values"].get("pretrain_datasets", {}))
            record["commands"] = [pretrained["command"], *record["commands"]]
        study.append_record(args.results, record)
        print(f"[pretrain] {arm} {fraction} seed {seed}: test mIoU {outcome['test']['test']['iou']:.4f}", flush=True)


def recorded_arms(records: list[dict[str, Any]]) -> list[str]:
    """Every arm of ``records``: ``none`` and ``random`` where present, then :func:`table_arms`."""
    present = {r["arm"] for r in records}
    return [a for a in ("none", "random") if a in present] + table_arms(records)


def table_arms(records: list[dict[str, Any]]) -> list[str]:
    """The pretrained arms of ``records`` but ``random``, in ``ALL_ARMS``'s order, then any other (older) arm."""
    present = {r["arm"] for r in records} - {"none", "random"}
    return [a for a in ALL_ARMS if a in present] + sorted(present - set(ALL_ARMS))


def pretrain_tables(records: list[dict[str, Any]]) -> str:
    """Markdown: mean ± std over seeds per (arm, fraction), then the gain over ``none`` paired by seed."""
    lines = [
        (
            "| arm | label fraction | seeds | val mIoU (selection) | test mIoU | test Dice | test mIoU native | "
            "pretrain min/run | fine-tune min/run |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ["none", "random", *table_arms(records)]:
        for fraction in sorted({r["label_fraction"] for r in records if r["arm"] == arm}):
            rows = [r for r in records if r["arm"] == arm and r["label_fraction"] == fraction]
            cells = [study.mean_std([r["best_val_iou"] for r in rows])]
            cells += [study.mean_std([r["test"]["test"][m] for r in rows]) for m in ("iou", "dice", "iou_native")]
            pretrain_min = (
                f"{statistics.mean(r['pretrain']['seconds'] for r in rows) / 60:.1f}"
                if all("pretrain" in r for r in rows)
                else "—"
            )
            lines.append(
                f"| {arm} | {fraction} | {len(rows)} | " + " | ".join(cells) + f" | {pretrain_min} | "
                f"{statistics.mean(r['train_seconds'] for r in rows) / 60:.1f} |"
            )
    lines += [
        "",
        "Test mIoU gain over `none` (no pretraining) with the same seed and label fraction:",
        "",
        *study.paired_gains(records, "none", ["random", *table_arms(records)], by={"label_fraction": "label fraction"}),
        "",
        "Test mIoU gain over `random` with the same seed and label fraction (`selective` changes only the masking; "
        "each ablation arm changes one thing on `random`):",
        "",
        *study.paired_gains(records, "random", table_arms(records), by={"label_fraction": "label fraction"}),
    ]
    return "\n".join(lines)


def report(args: argparse.Namespace) -> str:
    """The study's tables into the ``pretrain-<bundle>`` block of RESULTS.md."""
    settings = study_settings(args)
    records = study_records(args.results, settings)
    if not records:
        raise SystemExit(f"no finished runs with {settings} in {args.results}")
    example = next((r for r in records if "pretrain" in r), records[0])
    scale = (
        f"{args.pretrain_epochs} epochs on the training images without masks"
        if args.pretrain_epochs is not None
        else f"{args.pretrain_steps} steps in {args.pretrain_rounds} rounds on the training images without masks "
        f"plus the images of {', '.join(other_datasets(args)) or 'no other dataset'}"
    )
    intro = (
        f"Bundle `{args.bundle}` on `{args.dataset_dir}`, {args.image_size[0]}x{args.image_size[1]}: pretraining "
        f"{scale} (the fine-tuning dataset's validation and test images never pretrained on), "
        f"fine-tuning {args.epochs} epochs with validation every {args.val_interval}"
        + (f" (`finetune.json`: {json.dumps(settings['finetune'])})" if "finetune" in settings else "")
        + "; model selected on validation. "
        "Mean ± sample std over seeds; mIoU is per-image foreground IoU averaged over images."
    )
    body = "\n".join(
        [
            intro,
            "",
            pretrain_tables(records),
            "",
            (
                f"Reproduce: `python benchmarks/pretrain.py run {study_options(args, recorded_arms(records))}`, "
                "then `report` with the same options. "
                f"A run is these commands (pretrain, fine-tune, evaluate; here `{example['arm']}`, label fraction "
                f"{example['label_fraction']}, seed {example['seed']}):"
            ),
            "",
            "```",
            *example["commands"],
            "```",
        ]
    )
    return study.publish(body, block_name(args), args.markdown)


def block_name(args: argparse.Namespace) -> str:
    """The RESULTS.md block of a study: ``pretrain-<bundle>``; ``-epochs`` for an epoch budget, ``-s<steps>`` for
    another step budget than the study's (an ablation at a reduced budget), ``-earlier-start`` for records made
    with other ``finetune.json`` values (``--finetune-settings``)."""
    if args.pretrain_epochs is not None:
        return f"pretrain-{args.bundle}-epochs"
    name = f"pretrain-{args.bundle}"
    if args.pretrain_steps != STUDY_PRETRAIN_STEPS:
        name += f"-s{args.pretrain_steps}"
    return name + ("-earlier-start" if args.finetune_settings else "")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line of the pretraining study."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("run", "report"))
    parser.add_argument("--arms", nargs="+", choices=list(ALL_ARMS), default=list(ARMS))
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.25, 1.0])
    parser.add_argument(
        "--pretrain-steps", type=int, default=STUDY_PRETRAIN_STEPS, help="pretraining steps, the same for every arm"
    )
    parser.add_argument("--pretrain-rounds", type=int, default=10, help="rounds (checkpoints; selective's parts)")
    parser.add_argument(
        "--other-datasets",
        nargs="*",
        choices=list(OTHER_DATASETS),
        default=None,
        help="shared datasets whose images are also pretrained on (default: every one but the fine-tuning one)",
    )
    parser.add_argument(
        "--pretrain-epochs", type=int, default=None, help="report only: records made with an epoch budget (before 28)"
    )
    parser.add_argument(
        "--selective-partitions", type=int, default=None, help="report only: with --pretrain-epochs, as those records"
    )
    parser.add_argument(
        "--finetune-settings",
        default=None,
        help="report only: records made with these finetune.json values (JSON) rather than the shipped ones",
    )
    study.add_schedule_options(parser, "fine-tuning epochs per run")
    parser.set_defaults(seeds=[0, 1, 2, 3, 4])
    add_bundle_study_options(parser, "pretrain.jsonl", "pretrain-<bundle>[-epochs]")
    args = bundle_study_args(parser, argv)
    if args.other_datasets is None:
        args.other_datasets = [bundle for bundle in OTHER_DATASETS if bundle != args.bundle]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    study.run_or_report(parse_args(argv), run_study, report)


if __name__ == "__main__":
    main()
