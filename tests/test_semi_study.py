"""benchmarks/semi.py's controls on hand-made records: their schedule, their place in the plan, and how earlier
records (semi-supervised arms on older defaults, by-hand equal-steps runs) enter the report's table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bundle_runs  # noqa: E402
import semi  # noqa: E402


def _args(tmp_path, **kwargs):
    values = {
        "bundle": "glas",
        "dataset_dir": "d",
        "epochs": 10,
        "val_interval": 2,
        "image_size": [64, 64],
        "results": tmp_path / "semi.jsonl",
        "work_dir": tmp_path / "runs",
        "seeds": [0],
        "fractions": [0.25],
        "arms": list(semi.ARMS),
    }
    return argparse.Namespace(**{**values, **kwargs})


def _record(args, arm, seed=0, fraction=0.25, iou=0.5, **extra):
    settings = semi.study_settings(args)
    test = {"test": {"iou": iou, "dice": iou, "iou_native": iou, "dice_native": iou}}
    return {"arm": arm, "label_fraction": fraction, "seed": seed, **settings, "best_val_iou": iou, "test": test,
            "train_seconds": 60.0, "commands": ["train", "evaluate"], **extra}  # fmt: skip


def test_controls_are_sized_on_the_semi_and_supervised_only_runs_of_their_fraction_and_seed(tmp_path):
    args = _args(tmp_path)
    records = [
        _record(args, "semi", epoch_length=13, train_seconds=300.0),
        _record(args, "supervised-only", epoch_length=5, train_seconds=60.0),
    ]
    assert semi.control_schedule(args, "supervised-steps", 0.25, 0, records) == (26, 5)  # 10 * 13 / 5, 2 * 2.6
    assert semi.control_schedule(args, "supervised-time", 0.25, 0, records) == (50, 10)  # 10 * 300 / 60
    with pytest.raises(SystemExit, match="'semi' run of the same fraction and seed"):
        semi.control_schedule(args, "supervised-steps", 0.25, 1, records)
    plan = [arm for arm, _, _ in semi.runs(args)]
    assert plan.index("supervised-steps") > max(plan.index("semi"), plan.index("supervised-only"))
    assert plan[-1] == "full-supervised"


def test_old_semi_records_keep_their_version_and_by_hand_long_runs_count_as_equal_steps(tmp_path):
    args = _args(tmp_path)
    old_long = _record(_args(tmp_path, epochs=26, val_interval=5), "supervised-only", iou=0.7)
    rows = [
        _record(args, "supervised-only", iou=0.5),
        _record(args, "semi", iou=0.6),  # issue 14's MaskMatch: no semi_version
        _record(args, "semi", iou=0.75, semi_version=semi.SEMI_VERSION),
        old_long,
        _record(args, "supervised-only", iou=0.1) | {"defaults": "older"},  # other bundle defaults: left out
    ]
    args.results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = semi.study_records(args)
    assert [(r["arm"], r.get("max_epochs", r["epochs"])) for r in records] == [
        ("supervised-only", 10),
        ("semi (issue14)", 10),
        ("semi", 10),
        ("supervised-steps", 26),
    ]
    md = tmp_path / "RESULTS.md"
    md.write_text("<!-- semi-glas:begin -->\n<!-- semi-glas:end -->\n")
    block = semi.report(_args(tmp_path, markdown=[md]))
    assert "| semi (issue14) | 0.25 | 1 | 10 |" in block and "| supervised-steps | 0.25 | 1 | 26 |" in block
    assert block.index("| semi (issue14) |") < block.index("| semi | 0.25")  # earlier version first
    steps = block[block.index("equal labelled steps") :]
    assert (
        "| semi | 0.25 | 1 | +0.0500 (seed 0) |" in steps
        and "| semi (issue14) | 0.25 | 1 | -0.1000 (seed 0) |" in steps
    )
    assert bundle_runs.load_records(args.results) == rows  # the records file is read, never rewritten


def test_ablation_arms_train_semi_with_one_change_and_are_reported_against_semi(tmp_path, monkeypatch):
    args = _args(tmp_path, arms=["semi-masked-only"], seeds=[0])
    assert semi.configs("glas", "semi-masked-only") == semi.configs("glas", "semi")
    trained = []

    def train(configs, evaluate_config, values, output_dir):
        trained.append((configs, values, output_dir))
        test = {"test": {"iou": 0.4, "dice": 0.5, "iou_native": 0.4, "dice_native": 0.5}}
        return {"best_val_iou": 0.4, "test": test, "train_seconds": 10.0, "commands": ["train", "evaluate"]}

    monkeypatch.setattr(bundle_runs, "train_and_evaluate", train)
    monkeypatch.setattr(semi, "epoch_length", lambda output_dir: 13)
    semi.run_study(args)
    ((configs, values, output_dir),) = trained
    assert values["strong_weight"] == 0.0 and values["feature_weight"] == 0.0 and values["label_fraction"] == 0.25
    assert "semi-masked-only-issue27" in output_dir.name  # an ablation run is a semi-supervised run of this version
    semi_record = _record(args, "semi", iou=0.5, semi_version=semi.SEMI_VERSION, commands=["semi-train", "semi-eval"])
    args.results.open("a").write(json.dumps(semi_record) + "\n")
    md = tmp_path / "RESULTS.md"
    md.write_text("<!-- semi-glas:begin -->\n<!-- semi-glas:end -->\n")
    block = semi.report(_args(tmp_path, markdown=[md]))
    ablation = block[block.index("Ablation") :]
    assert "| semi-masked-only | 0.25 | 1 | -0.1000 (seed 0) |" in ablation
    assert "semi-train\nsemi-eval\n```" in block  # the example commands are the semi arm's, though recorded later
    with pytest.raises(SystemExit):
        semi.parse_args(["run", "--arms", "semi-no-such-change"])


def test_records_of_earlier_defaults_that_are_the_same_run_count_as_the_current_arm(tmp_path):
    """Issue 27's first defaults differed from today's in the pseudo-label source alone: its online ``semi``
    is today's ``semi-online-source``, and its ``semi-teacher-source`` today's ``semi``."""
    args = _args(tmp_path)
    rows = [
        _record(args, "semi", iou=0.6, semi_version="issue27"),
        _record(args, "semi-teacher-source", iou=0.7, semi_version="issue27"),
        _record(args, "semi-masked-only", iou=0.65, semi_version="issue27"),  # made on the online source: kept apart
    ]
    args.results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    labels = {r["arm"]: r["test"]["test"]["iou"] for r in semi.study_records(args)}
    assert labels == {"semi-online-source": 0.6, "semi": 0.7, "semi-masked-only (issue27)": 0.65}
    assert semi.SAME_RUNS[("semi-teacher-source", "issue27")] == "semi"
    config = json.loads((Path(__file__).resolve().parents[1] / "bundles/common/configs/semi_train.json").read_text())
    assert config["pseudo_label_source"] == "teacher"  # what makes the mapping true
    args.arms = ["semi"]
    args.results.open("a").write(json.dumps(_record(args, "supervised-only")) + "\n")
    md = tmp_path / "RESULTS.md"
    md.write_text("<!-- semi-glas:begin -->\n<!-- semi-glas:end -->\n")
    block = semi.report(_args(tmp_path, markdown=[md]))
    assert "| semi-online-source | 0.25 | 1 | -0.1000 (seed 0) |" in block[block.index("Ablation") :]
