"""One benchmark run of a bundle on real data: train, pick the checkpoint on validation, score it on test.

Training is ``python -m monai.bundle run training`` with ``--resume auto`` (a run killed halfway
carries on from its last epoch checkpoint); the bundle keeps the checkpoint with the best
*validation* mIoU, and only that checkpoint is then scored with the bundle's ``evaluating`` config
on its test split. Finished runs are kept as JSON lines, one record each, so a study can be
resumed across sessions by skipping what is recorded. ``ablation.py``, ``recipes.py``,
``semi.py``, ``pretrain.py`` and ``defaults.py`` are built on this.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from report import BENCHMARKS_DIR, RESULTS_DIR, RESULTS_MD, code_version, machine, replace_block

from masksup_med.run.resume import latest_checkpoint

ROOT = BENCHMARKS_DIR.parent
METRICS = ("iou", "dice", "iou_native", "dice_native")
# The bundles' defaults a study's records were made on: a study keeps only records with this tag. Change
# it whenever the shipped defaults change (learning-rate schedule, masking, augmentation, batch size).
BUNDLE_DEFAULTS = "issue14"
LABELLED_ONLY = (
    "benchmarks/recipes/semi/labelled_only.json"  # merged after train.json: train on ``label_fraction`` of the labels
)


def as_cli_overrides(values: dict[str, Any]) -> list[str]:
    """``--key value`` pairs for ``monai.bundle run``; non-string values are written as JSON, booleans and None
    as Python's ``True`` / ``False`` / ``None`` (the runner's parser reads JSON's ``false`` as the text "false")."""

    def text(value: Any) -> str:
        return (
            value
            if isinstance(value, str)
            else repr(value)
            if value is None or isinstance(value, bool)
            else json.dumps(value)
        )

    return [item for key, value in values.items() for item in (f"--{key}", text(value))]


def training_command(configs: Sequence[str], overrides: list[str]) -> list[str]:
    """``monai.bundle run training`` of ``configs`` (merged in order), resuming a half-finished run."""
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        _config_arg(configs),
        *overrides,
        "--resume",
        "auto",
    ]


def evaluation_command(configs: Sequence[str], evaluate_config: str, overrides: list[str]) -> list[str]:
    """``monai.bundle run evaluating`` of the best-validation checkpoint on the test split."""
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "evaluating",
        "--config_file",
        _config_arg([*configs, evaluate_config]),
        *overrides,
        "--eval_split",
        "test",
    ]


def _config_arg(configs: Sequence[str]) -> str:
    return configs[0] if len(configs) == 1 else json.dumps(list(configs))


def shown_command(command: list[str]) -> str:
    """``command`` as a user would type it from the repository root."""
    return subprocess.list2cmdline(["python", *command[1:]] if command[0] == sys.executable else command)


def run_logged(command: list[str], log_file: Path) -> float:
    """Run ``command`` from the repository root, appending its output to ``log_file``; return seconds taken."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log_file.open("a", encoding="utf-8") as log:
        log.write(f"\n$ {subprocess.list2cmdline(command)}\n")
        log.flush()
        code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise RuntimeError(f"command failed with exit code {code}; see {log_file}: {subprocess.list2cmdline(command)}")
    return time.perf_counter() - start


def best_validation(ckpt_dir: Path) -> tuple[float, int]:
    """Best validation mIoU and its epoch, from the run's newest epoch checkpoint."""
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        raise RuntimeError(f"no epoch checkpoint in {ckpt_dir}: training did not finish an epoch")
    state = torch.load(path, map_location="cpu", weights_only=False)["best_metric"]
    return float(state["best_metric"]), int(state["best_metric_epoch"])


CURVE_METRICS = {"val_iou": "val_mean_iou", "val_dice": "val_mean_dice", "train_loss": "train_loss"}


def learning_curve(output_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """A run's curves so far, read from its own MLflow store (``OUTPUT_DIR/mlflow.db``), finished or not.

    Returns ``val_iou``, ``val_dice`` and ``train_loss`` as (epoch, value) pairs (both are logged once per epoch,
    with the epoch as step). Raises when the run has no store or no run file.
    """
    import mlflow

    local_dir = output_dir if output_dir.is_absolute() else ROOT / output_dir
    run_file, store = local_dir / "models" / "mlflow_run.json", local_dir / "mlflow.db"
    if not run_file.is_file() or not store.is_file():
        raise RuntimeError(f"{local_dir} holds no tracked run (no models/mlflow_run.json or mlflow.db)")
    run_id = json.loads(run_file.read_text(encoding="utf-8"))["run_id"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store.resolve()}")
    curves = {}
    for name, metric in CURVE_METRICS.items():
        points = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, metric))
        by_step = {step: value for step, _, value in points}  # a resumed epoch logs again: the newest value counts
        curves[name] = sorted(by_step.items())
    return curves


def train(configs: Sequence[str], values: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """Train ``configs`` with override ``values`` into ``output_dir``, resuming a half-finished run.

    Returns ``seconds`` (this call's wall time), ``resumed`` (an epoch checkpoint was there to carry
    on from), ``commit`` and the ``command`` as a user would type it.
    """
    command = training_command(configs, as_cli_overrides({**values, "output_dir": str(output_dir)}))
    local_dir = output_dir if output_dir.is_absolute() else ROOT / output_dir
    resumed = latest_checkpoint(local_dir / "models", "auto") is not None
    commit = code_version()
    seconds = run_logged(command, local_dir / "train.log")
    return {"seconds": round(seconds, 1), "resumed": resumed, "commit": commit, "command": shown_command(command)}


def score_test(
    configs: Sequence[str], evaluate_config: str, values: dict[str, Any], output_dir: Path
) -> dict[str, Any]:
    """Score the best-validation checkpoint of a finished run in ``output_dir`` on the test split.

    Returns ``test`` (metrics per test group, mean over images) and the evaluation ``command``.
    """
    local_dir = output_dir if output_dir.is_absolute() else ROOT / output_dir
    eval_cmd = evaluation_command(configs, evaluate_config, as_cli_overrides({**values, "output_dir": str(output_dir)}))
    run_logged(eval_cmd, local_dir / "evaluate.log")
    dataset = values.get("dataset") or json.loads((ROOT / configs[0]).read_text(encoding="utf-8"))["dataset"]
    report = local_dir / "eval" / dataset / "test" / "summary.json"  # the evaluate config keeps reports per dataset
    summary = json.loads(report.read_text(encoding="utf-8"))["summary"]
    return {
        "test": {group: {m: summary[group][m]["mean"] for m in METRICS} for group in summary},
        "command": shown_command(eval_cmd),
    }


def train_and_select(configs: Sequence[str], values: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """Train ``configs`` with override ``values`` into ``output_dir`` and read the validation selection.

    Returns the part of a record every study shares, test aside: best validation mIoU and its epoch,
    train time, whether it resumed, machine, commit and the training command.
    """
    local_dir = output_dir if output_dir.is_absolute() else ROOT / output_dir
    trained = train(configs, values, output_dir)
    best_val, best_epoch = best_validation(local_dir / "models")
    return {
        "best_val_iou": best_val,
        "best_epoch": best_epoch,
        "train_seconds": trained["seconds"],
        "resumed": trained["resumed"],
        "machine": machine(),
        "commit": trained["commit"],
        "commands": [trained["command"]],
    }


def train_and_evaluate(
    configs: Sequence[str], evaluate_config: str, values: dict[str, Any], output_dir: Path
) -> dict[str, Any]:
    """Train ``configs`` with override ``values`` into ``output_dir``, then score the best-validation checkpoint.

    Returns :func:`train_and_select`'s record with ``test`` (metrics per test group) and the
    evaluation command added.
    """
    record = train_and_select(configs, values, output_dir)
    scored = score_test(configs, evaluate_config, values, output_dir)
    return {**record, "test": scored["test"], "commands": [*record["commands"], scored["command"]]}


def load_records(results: Path, settings: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Finished runs recorded so far in the JSON-lines file ``results`` (only those with ``settings``, if given)."""
    if not results.exists():
        return []
    records = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if all(r.get(k) == v for k, v in (settings or {}).items())]


def append_record(results: Path, record: dict[str, Any]) -> None:
    """Record one finished run (a single line, flushed at once)."""
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")


def add_study_options(
    parser: argparse.ArgumentParser,
    results_name: str | None,
    block: str,
    dataset_dir: str | None = "../shared/data/glas",
) -> None:
    """Options every study shares: data, where runs and records go, which Markdown gets the ``block``
    (``benchmarks/RESULTS.md`` unless ``--markdown`` names others).

    ``results_name`` or ``dataset_dir`` None: the study fills it in from its other options (e.g. the bundle's).
    """
    where = dataset_dir or "the bundle's data in ../shared/data"
    parser.add_argument(
        "--dataset-dir", default=dataset_dir, help=f"dataset folder, relative to the repository root (default: {where})"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path("benchmarks/runs"),
        help="run outputs, relative to the repository root (not committed)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / results_name if results_name else None)
    parser.add_argument(
        "--markdown",
        type=Path,
        nargs="*",
        default=[RESULTS_MD],
        help=f"Markdown files whose '{block}' block the report replaces (default: benchmarks/RESULTS.md)",
    )


def add_schedule_options(parser: argparse.ArgumentParser, epochs_help: str = "training epochs per run") -> None:
    """Options of a multi-seed study: seeds, epochs, validation interval, image size."""
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30, help=epochs_help)
    parser.add_argument("--val-interval", type=int, default=3)
    parser.add_argument("--image-size", nargs=2, type=int, default=[256, 256])


def run_or_report(args: argparse.Namespace, run: Callable, report: Callable) -> None:
    """``run(args)`` for the ``run`` action, ``report(args)`` otherwise."""
    if args.action == "run":
        run(args)
    else:
        report(args)


def mean_std(values: Sequence[float]) -> str:
    """``mean ± sample std``; the mean alone for a single value (one seed has no spread to show)."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def paired_gains(
    records: list[dict[str, Any]],
    reference: str,
    arms: Sequence[str],
    by: dict[str, str] | None = None,
    match: Sequence[str] | None = None,
) -> list[str]:
    """Markdown table: each arm's test mIoU minus the ``reference`` arm's on the same seed, per seed and on average.

    ``by``: further record keys that group the arms, each shown as a column (``{"label_fraction": "label
    fraction"}``). ``match``: those of them the reference run must share too (default: all of ``by``;
    ``()`` pairs every group with the reference on the seed alone, e.g. with a full-label reference). No pair at
    all gives one sentence that says so, not an empty table.
    """
    by = by or {}
    match = list(by) if match is None else list(match)

    def key(r: dict[str, Any], keys: Sequence[str]) -> tuple:
        return tuple(r[k] for k in keys)

    iou = {(key(r, match), r["seed"]): r["test"]["test"]["iou"] for r in records if r["arm"] == reference}
    lines = [
        "| arm | "
        + "".join(f"{name} | " for name in by.values())
        + "seeds paired | gain per seed | mean gain | seeds with a gain |",
        "|---|" + "---|" * len(by) + "---|---|---|---|",
    ]
    for arm in [a for a in arms if a != reference]:
        for group in sorted({key(r, by) for r in records if r["arm"] == arm}):
            rows = [r for r in records if r["arm"] == arm and key(r, by) == group]
            gains = {
                r["seed"]: r["test"]["test"]["iou"] - iou[key(r, match), r["seed"]]
                for r in rows
                if (key(r, match), r["seed"]) in iou
            }
            if gains:
                per_seed = ", ".join(f"{gains[s]:+.4f} (seed {s})" for s in sorted(gains))
                lines.append(
                    f"| {arm} | " + "".join(f"{v} | " for v in group) + f"{len(gains)} | {per_seed} | "
                    f"{statistics.mean(gains.values()):+.4f} | {sum(g > 0 for g in gains.values())} of {len(gains)} |"
                )
    if len(lines) == 2:
        return [f"No `{reference}` run shares a seed with these arms: nothing to pair."]
    return lines


def publish(body: str, block: str, markdown: Sequence[Path]) -> str:
    """Put ``body`` into the generated ``block`` of each Markdown file, print it and return it."""
    for path in markdown:
        replace_block(path, block, body)
    print(body)
    return body
