"""One benchmark run of a bundle on real data: train, pick the checkpoint on validation, score it on test.

Training is ``python -m monai.bundle run training`` with ``--resume auto`` (a run killed halfway
carries on from its last epoch checkpoint); the bundle keeps the checkpoint with the best
*validation* mIoU, and only that checkpoint is then scored with the bundle's ``evaluating`` config
on its test split. Finished runs are kept as JSON lines, one record each, so a study can be
resumed across sessions by skipping what is recorded. ``ablation.py`` and ``glas_recipes.py``
are built on this.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from report import BENCHMARKS_DIR, RESULTS_DIR, code_version, machine, replace_block

from masksup_med.resume import latest_checkpoint

ROOT = BENCHMARKS_DIR.parent
METRICS = ("iou", "dice", "iou_native", "dice_native")


def as_cli_overrides(values: dict[str, Any]) -> list[str]:
    """``--key value`` pairs for ``monai.bundle run``; non-string values are written as JSON."""
    return [item for key, value in values.items() for item in (f"--{key}", value if isinstance(value, str) else json.dumps(value))]


def training_command(configs: Sequence[str], overrides: list[str]) -> list[str]:
    """``monai.bundle run training`` of ``configs`` (merged in order), resuming a half-finished run."""
    return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", _config_arg(configs), *overrides, "--resume", "auto"]


def evaluation_command(configs: Sequence[str], evaluate_config: str, overrides: list[str]) -> list[str]:
    """``monai.bundle run evaluating`` of the best-validation checkpoint on the test split."""
    return [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file", _config_arg([*configs, evaluate_config]),
            *overrides, "--eval_split", "test"]


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


def train_and_evaluate(configs: Sequence[str], evaluate_config: str, values: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """Train ``configs`` with override ``values`` into ``output_dir``, then score the best-validation checkpoint.

    Returns the part of a record every study shares: validation selection, test metrics per test
    group (mean over images), train time, whether it resumed, machine, commit and commands.
    """
    local_dir = output_dir if output_dir.is_absolute() else ROOT / output_dir
    overrides = as_cli_overrides({**values, "output_dir": str(output_dir)})
    train_cmd, eval_cmd = training_command(configs, overrides), evaluation_command(configs, evaluate_config, overrides)
    resumed = latest_checkpoint(local_dir / "models", "auto") is not None
    commit = code_version()
    train_seconds = run_logged(train_cmd, local_dir / "train.log")
    best_val, best_epoch = best_validation(local_dir / "models")
    run_logged(eval_cmd, local_dir / "evaluate.log")
    dataset = values.get("dataset") or json.loads((ROOT / configs[0]).read_text(encoding="utf-8"))["dataset"]
    report = local_dir / "eval" / dataset / "test" / "summary.json"  # the evaluate config keeps reports per dataset
    summary = json.loads(report.read_text(encoding="utf-8"))["summary"]
    return {
        "best_val_iou": best_val,
        "best_epoch": best_epoch,
        "test": {group: {m: summary[group][m]["mean"] for m in METRICS} for group in summary},
        "train_seconds": round(train_seconds, 1),
        "resumed": resumed,
        "machine": machine(),
        "commit": commit,
        "commands": [shown_command(c) for c in (train_cmd, eval_cmd)],
    }


def load_records(results: Path) -> list[dict[str, Any]]:
    """Finished runs recorded so far in the JSON-lines file ``results``."""
    if not results.exists():
        return []
    return [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines() if line.strip()]


def append_record(results: Path, record: dict[str, Any]) -> None:
    """Record one finished run (a single line, flushed at once)."""
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")


def add_study_options(parser: argparse.ArgumentParser, results_name: str, block: str, markdown: Sequence[Path]) -> None:
    """Options every study shares: data, where runs and records go, which Markdown gets the ``block``."""
    parser.add_argument("--dataset-dir", default="../shared/data/glas", help="GLaS folder (relative to the repository root)")
    parser.add_argument("--work-dir", type=Path, default=Path("benchmarks/runs"),
                        help="run outputs, relative to the repository root (not committed)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / results_name)
    parser.add_argument("--markdown", type=Path, nargs="*", default=list(markdown),
                        help=f"Markdown files whose '{block}' block the report replaces")


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


def publish(body: str, block: str, markdown: Sequence[Path]) -> str:
    """Put ``body`` into the generated ``block`` of each Markdown file, print it and return it."""
    for path in markdown:
        replace_block(path, block, body)
    print(body)
    return body
