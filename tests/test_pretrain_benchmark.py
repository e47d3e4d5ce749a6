"""benchmarks/pretrain.py: its tables (arms, ablation, gains paired by seed), shared pretrainings, the datasets
pretrained on, old epoch-budget records still rendered, and one run end to end at toy size."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from masksup_med.data import make_glas_demo

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import bundle_runs  # noqa: E402
import pretrain  # noqa: E402
from report import RESULTS_MD  # noqa: E402


def _block(text: str, name: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1, text
    return text.split(begin, 1)[1].split(end, 1)[0].strip()


def _record(arm: str, fraction: float, seed: int, test_iou: float, **settings) -> dict:
    test = {m: test_iou for m in ("iou", "dice", "iou_native", "dice_native")}
    record = {
        "arm": arm,
        "label_fraction": fraction,
        "seed": seed,
        "best_val_iou": 0.5,
        "best_epoch": 3,
        "train_seconds": 60.0,
        "commit": "abc1234",
        "test": {"test": test},
        "commands": ["python -m monai.bundle run training ..."],
        **settings,
    }
    return {**record, "pretrain": {"seconds": 120.0}} if arm != "none" else record


def test_pretrain_tables_pair_gains_by_seed_and_label_fraction_ablation_arms_included():
    records = [
        _record("none", 0.25, 0, 0.50),
        _record("none", 0.25, 1, 0.54),
        _record("none", 1.0, 0, 0.70),
        _record("selective", 0.25, 0, 0.55),
        _record("selective", 0.25, 1, 0.53),
        _record("selective", 1.0, 0, 0.72),
        _record("random", 1.0, 1, 0.90),
        _record("raw-targets", 0.25, 0, 0.51),
    ]  # no `none` with seed 1 at fraction 1.0: not paired
    text = pretrain.pretrain_tables(records)
    assert "| none | 0.25 | 2 | 0.5000 ± 0.0000 | 0.5200 ± 0.0283 |" in text and text.count("| none |") == 2
    assert "| selective | 0.25 | 2 |" in text and "| 2.0 | 1.0 |" in text  # pretraining and fine-tuning minutes
    assert "| selective | 0.25 | 2 | +0.0500 (seed 0), -0.0100 (seed 1) | +0.0200 | 1 of 2 |" in text
    assert "| random | 1.0 | 1 | 0.5000 | 0.9000 |" in text and "| random | 1.0 | 1 | +" not in text
    assert "| raw-targets | 0.25 | 1 | +0.0100 (seed 0) | +0.0100 | 1 of 1 |" in text
    against_random = text.split("gain over `random`")[1]
    assert "| selective |" not in against_random and "| raw-targets |" not in against_random  # no random to pair


def test_selective_and_the_ablation_are_paired_with_random_on_the_same_seed():
    records = [
        _record("none", 0.25, 0, 0.50),
        _record("random", 0.25, 0, 0.60),
        _record("random", 0.25, 1, 0.58),
        _record("selective", 0.25, 0, 0.62),
        _record("selective", 0.25, 1, 0.57),
        _record("raw-targets", 0.25, 1, 0.55),
    ]
    against_random = pretrain.pretrain_tables(records).split("gain over `random`")[1]
    assert "| selective | 0.25 | 2 | +0.0200 (seed 0), -0.0100 (seed 1) | +0.0050 | 1 of 2 |" in against_random
    assert "| raw-targets | 0.25 | 1 | -0.0300 (seed 1) | -0.0300 | 0 of 1 |" in against_random
    assert "| none |" not in against_random


def test_the_other_shared_datasets_are_pretrained_on_never_the_fine_tuning_one_as_another():
    glas = pretrain.parse_args(["run"])
    assert glas.seeds == [0, 1, 2, 3, 4] and glas.arms == ["none", "random", "selective"]
    assert set(pretrain.other_datasets(glas)) == {"kvasir-seg", "cvc-clinicdb"}
    kvasir = pretrain.parse_args(["run", "--bundle", "kvasir_seg", "--other-datasets", "glas"])
    assert pretrain.other_datasets(kvasir) == {"glas": "../shared/data/glas"}
    values = pretrain.pretrain_values(kvasir, "own-images-only", 3)
    assert values["pretrain_datasets"] == {} and values["pretrain_masking"] == "random" and values["seed"] == 3
    assert "finetune" not in pretrain.pretrain_values(kvasir, "careful-start", 0)


def test_arms_that_change_only_the_fine_tuning_share_the_pretraining_of_the_arm_they_build_on():
    assert pretrain.pretraining_arm("random") == "random" and pretrain.pretraining_arm("selective") == "selective"
    for arm in ("encoder-only", "bn-reestimate", "warm-up", "slow-encoder", "careful-start"):
        assert pretrain.pretraining_arm(arm) == "random", arm
    for arm in ("small-tiles", "raw-targets", "own-images-only", "per-batch-ranking"):
        assert pretrain.pretraining_arm(arm) == arm


def test_pretraining_is_shared_and_refused_when_made_with_other_settings(tmp_path, capsys):
    args = pretrain.parse_args(
        ["run", "--work-dir", str(tmp_path), "--pretrain-steps", "20", "--image-size", "32", "32"]
    )
    assert args.dataset_dir == "../shared/data/glas" and args.markdown == [RESULTS_MD]  # never a bundle's docs
    run_dir = tmp_path / f"pretrain-glas-{bundle_runs.BUNDLE_DEFAULTS}-selective-s20-32x32-seed1"
    run_dir.mkdir()
    values = pretrain.pretrain_values(args, "selective", 1)
    (run_dir / pretrain.RUN_FILE).write_text(json.dumps({"values": values, "seconds": 5.0, "weights": "w.pt"}))
    assert pretrain.pretrain(args, "selective", 1)["seconds"] == 5.0  # not trained again
    assert "done before, reused" in capsys.readouterr().out
    random_dir = tmp_path / f"pretrain-glas-{bundle_runs.BUNDLE_DEFAULTS}-random-s20-32x32-seed1"
    random_dir.mkdir()
    random_values = pretrain.pretrain_values(args, "random", 1)
    (random_dir / pretrain.RUN_FILE).write_text(json.dumps({"values": random_values, "seconds": 7.0, "weights": "r"}))
    assert pretrain.pretrain(args, "careful-start", 1)["seconds"] == 7.0  # a fine-tuning arm reuses random's
    args.dataset_dir = "elsewhere"
    with pytest.raises(SystemExit, match="was pretrained with"):
        pretrain.pretrain(args, "selective", 1)
    old = pretrain.parse_args(["run", "--pretrain-epochs", "30"])
    with pytest.raises(SystemExit, match="--pretrain-epochs only reports records made before issue 28"):
        pretrain.pretrain(old, "random", 0)


def test_records_of_the_epoch_budget_still_render(tmp_path):
    results, md = tmp_path / "pretrain.jsonl", tmp_path / "RESULTS.md"
    old = {
        "bundle": "glas",
        "dataset_dir": "../shared/data/glas",
        "defaults": bundle_runs.BUNDLE_DEFAULTS,
        "epochs": 10,
        "pretrain_epochs": 10,
        "selective_partitions": None,
        "val_interval": 2,
        "image_size": [256, 256],
    }
    records = [_record("none", 0.25, 0, 0.5, **old), _record("selective", 0.25, 0, 0.45, **old)]
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    options = ["--results", str(results), "--markdown", str(md), "--epochs", "10", "--val-interval", "2"]
    pretrain.main(["report", *options, "--pretrain-epochs", "10", "--seeds", "0"])
    text = md.read_text()
    assert "<!-- pretrain-glas:begin -->" not in text  # the step-budget study's block is left to it
    block = _block(text, "pretrain-glas-epochs")
    assert "pretraining 10 epochs on the training images" in block and "| selective | 0.25 | 1 |" in block
    assert "--pretrain-epochs 10" in block


def test_an_ablation_at_a_reduced_step_budget_gets_its_own_block(tmp_path):
    results, md = tmp_path / "pretrain.jsonl", tmp_path / "RESULTS.md"
    md.write_text("<!-- pretrain-glas:begin -->\nthe study's tables\n<!-- pretrain-glas:end -->\n")
    options = ["--results", str(results), "--markdown", str(md), "--seeds", "0", "--fractions", "0.25"]
    reduced = pretrain.study_settings(pretrain.parse_args(["report", *options, "--pretrain-steps", "500"]))
    for arm, test_iou in (("random", 0.50), ("raw-targets", 0.46)):
        bundle_runs.append_record(results, _record(arm, 0.25, 0, test_iou, **reduced))
    pretrain.main(["report", *options, "--pretrain-steps", "500", "--arms", "random", "raw-targets"])
    text = md.read_text()
    assert _block(text, "pretrain-glas") == "the study's tables"  # the full-budget study is left as it was
    block = _block(text, "pretrain-glas-s500")
    assert "pretraining 500 steps" in block and "| raw-targets | 0.25 | 1 | -0.0400 (seed 0) |" in block
    assert "No `none` run shares a seed with these arms" in block  # no bare table where there is nothing to pair
    assert "--pretrain-steps 500 --pretrain-rounds 10 --arms random raw-targets`" in block  # it reruns the ablation


@pytest.mark.slow  # about two minutes: one pretraining, one fine-tuning and its evaluation at toy size
def test_pretrain_study_pretrains_fine_tunes_records_and_reports(tmp_path):
    demo = make_glas_demo(tmp_path / "glas", n_train=10, n_test_a=2, n_test_b=2, size=(64, 48))
    results, md, runs = tmp_path / "pretrain.jsonl", tmp_path / "RESULTS.md", tmp_path / "runs"
    common = [
        *("--epochs", "1", "--pretrain-steps", "4", "--pretrain-rounds", "2", "--val-interval", "1"),
        *("--image-size", "32", "32", "--dataset-dir", str(demo), "--work-dir", str(runs)),
        *("--results", str(results), "--seeds", "0", "--fractions", "0.25", "--other-datasets"),
    ]
    pretrain.main(["run", "--arms", "selective", *common])
    pretrain.main(["run", "--arms", "selective", *common])  # recorded: skipped
    (record,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert (record["arm"], record["label_fraction"], record["seed"], record["pretrain_steps"]) == (
        "selective",
        0.25,
        0,
        4,
    )
    weights = (
        runs / f"pretrain-glas-{bundle_runs.BUNDLE_DEFAULTS}-selective-s4-32x32-seed0" / "models" / "pretrained.pt"
    )
    assert weights.is_file() and record["pretrain"]["weights"] == str(weights) and record["pretrain"]["seconds"] > 0
    pretrain_cmd, train_cmd, eval_cmd = record["commands"]
    assert "pretrain.json" in pretrain_cmd and "--pretrain_masking selective" in pretrain_cmd
    assert "--pretrain_steps 4" in pretrain_cmd
    assert "finetune.json" in train_cmd and "labelled_only.json" in train_cmd and "--label_fraction 0.25" in train_cmd
    assert f"--pretrained_weights {weights}" in train_cmd and "evaluating" in eval_cmd
    pretrain.main(["report", *common, "--markdown", str(md)])
    block = _block(md.read_text(), "pretrain-glas-s4")  # a toy budget: not the study's block
    assert "| selective | 0.25 | 1 |" in block and "pretraining 4 steps in 2 rounds" in block
    assert all(command in block for command in record["commands"])


def test_fine_tuning_runs_with_other_starts_get_other_folders():
    settings = pretrain.study_settings(pretrain.parse_args(["run", "--bundle", "kvasir_seg"]))
    older = {**settings, "finetune": {**settings["finetune"], "warmup_fraction": 0.5}}
    tags = {pretrain.finetune_tag(settings, "random"), pretrain.finetune_tag(older, "random")}
    tags |= {pretrain.finetune_tag(settings, "careful-start"), pretrain.finetune_tag(settings, "encoder-only")}
    assert len(tags) == 4 and pretrain.finetune_tag(settings, "random") == pretrain.finetune_tag(settings, "selective")


def test_a_record_counts_only_for_the_fine_tuning_defaults_it_was_made_with(tmp_path):
    args = pretrain.parse_args(["run", "--bundle", "kvasir_seg", "--results", str(tmp_path / "pretrain.jsonl")])
    settings = pretrain.study_settings(args)
    shipped = json.loads((bundle_runs.ROOT / "bundles/common/configs/finetune.json").read_text())
    assert settings["finetune"]["warmup_fraction"] == shipped["warmup_fraction"]
    assert settings["finetune"]["transfer_scope"] == shipped["transfer_scope"]
    assert "fine_tune_start" not in settings["finetune"] and "+recipe" not in settings["finetune"]
    older = {**settings, "finetune": {**settings["finetune"], "warmup_fraction": None, "warmup_iterations": 100}}
    for arm, made_with, seed in (("random", settings, 0), ("random", older, 1), ("none", older, 1)):
        bundle_runs.append_record(args.results, _record(arm, 0.25, seed, 0.4, **made_with))

    # the none arm reads no finetune.json: its records count whatever the defaults were
    def made(made_with: dict) -> list[tuple[str, int]]:
        return [(r["arm"], r["seed"]) for r in pretrain.study_records(args.results, made_with)]

    assert made(settings) == [("random", 0), ("none", 1)] and made(older) == [("random", 1), ("none", 1)]
    assert "finetune" not in pretrain.study_settings(pretrain.parse_args(["run", "--pretrain-epochs", "30"]))
