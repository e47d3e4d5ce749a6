"""Smoke tests of the benchmark scripts: ``report.replace_block``, the ablation, defaults and pretraining tables,
``speed.py``, ``recipes.py``, ``semi.py``, ``pretrain.py`` and ``serve_load.py`` end to end at toy size."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from masksup_med.data import make_glas_demo
from masksup_med.tracking.store import resolve_tracking_uri

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import ablation
import bundle_runs
import defaults
import recipes
import serve_load
import speed
from report import RESULTS_MD, replace_block

SPEED_MEASURES = (
    "masksup_over_plain_step",
    "throughput_plain",
    "throughput_masksup",
    "bank_seconds",
    "masking_share",
    "mask_batch_share",
    "inference_masksup_over_plain",
    "flops_fraction_of_peak",
    "peak_memory_mib",
)


def _block(text: str, name: str) -> str:
    """Body between the markers of block ``name`` (exactly one such block must exist)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1, text
    return text.split(begin, 1)[1].split(end, 1)[0].strip()


def test_replace_block_replaces_existing_block_and_keeps_surrounding_text(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nintro\n\n<!-- speed:begin -->\nold figures\n<!-- speed:end -->\n\noutro\n")
    replace_block(md, "speed", "new figures\n")
    text = md.read_text()
    assert _block(text, "speed") == "new figures"
    assert "old figures" not in text
    assert text.startswith("# Results\n\nintro\n\n<!-- speed:begin -->")
    assert text.endswith("<!-- speed:end -->\n\noutro\n")


def test_replace_block_appends_when_absent_and_leaves_other_blocks(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\n<!-- ablation:begin -->\nablation table\n<!-- ablation:end -->\n")
    replace_block(md, "speed", "speed table")
    text = md.read_text()
    assert _block(text, "ablation") == "ablation table"
    assert _block(text, "speed") == "speed table"
    assert text.index("ablation:end") < text.index("speed:begin")


def test_replace_block_creates_missing_file(tmp_path):
    md = tmp_path / "new.md"
    replace_block(md, "speed", "first")
    replace_block(md, "speed", "second")
    assert md.read_text() == "<!-- speed:begin -->\nsecond\n<!-- speed:end -->\n"


@pytest.mark.slow  # about 30-60 s: most of it the memory measurement's fresh interpreter
def test_pretrain_speed_times_every_masking_arm_and_writes_its_block(tmp_path):
    import pretrain_speed

    out, md = tmp_path / "pretrain_speed.json", tmp_path / "RESULTS.md"
    md.write_text("# Results\n")
    argv = [
        "--image-size",
        "32",
        "32",
        "--batch-size",
        "2",
        "--rounds",
        "2",
        "--refresh-every",
        "3",
        "--device",
        "cpu",
        "--output",
        str(out),
        "--markdown",
        str(md),
    ]
    pretrain_speed.main(argv)
    data = json.loads(out.read_text())
    assert list(data["arms"]) == ["random", "per-batch", "per-batch-every-3", "selective-scoring"]
    assert data["arms"]["random"]["ratio_to_random"] == 1.0
    assert all(math.isfinite(arm["step_s"]) and arm["step_s"] > 0 for arm in data["arms"].values())
    assert data["settings"]["partitions"] == 10 and data["settings"]["image_size"] == [32, 32]
    block = _block(md.read_text(), "pretrain-speed")
    assert "| per-batch-every-3 |" in block and "python benchmarks/pretrain_speed.py --image-size 32 32" in block


def test_speed_benchmark_smoke(tmp_path, capsys):
    out, md = tmp_path / "speed.json", tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nhand-written notes\n")
    argv = [
        "--image-size",
        "32",
        "32",
        "--batch-size",
        "2",
        "--rounds",
        "2",
        "--device",
        "cpu",
        "--matmul-size",
        "128",
        "--output",
        str(out),
        "--markdown",
        str(md),
    ]
    speed.main(argv)

    data = json.loads(out.read_text())
    assert set(data["measures"]) == set(SPEED_MEASURES)
    for key in SPEED_MEASURES:
        value = data["measures"][key]["value"]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert data["settings"]["image_size"] == [32, 32] and data["settings"]["batch_size"] == 2
    assert data["settings"]["device"] == "cpu"
    assert all(len(times) == 2 for times in data["details"]["train_seconds"].values())
    memory = data["details"]["memory"]
    assert (
        0 < memory["rss_before_training_mib"] <= memory["rss_peak_mib"] == data["measures"]["peak_memory_mib"]["value"]
    )
    flops = data["details"]["step_flops"]
    assert flops["masksup"] == 2 * flops["plain"] > 0  # two passes of the same network, same batch
    assert data["machine"]["cpu_count"] >= 1
    assert data["command"].startswith("python benchmarks/speed.py --image-size 32 32")

    text = md.read_text()
    assert text.startswith("# Results\n\nhand-written notes\n")
    block = _block(text, "speed")
    assert "| measure | value | goal | met |" in block
    for key in SPEED_MEASURES:
        assert data["measures"][key]["label"] in block
    assert f"`{data['command']}`" in block
    assert "MaskSup training step (masking included) / plain step" in capsys.readouterr().out


def test_serve_load_percentiles_and_request_bodies():
    assert serve_load.percentile([1, 2, 3, 4, 5], 0.5) == 3 and serve_load.percentile([1, 2], 0.95) == 1.95
    bodies = serve_load.request_bodies(max_body_bytes=10_000, max_images=3)
    assert set(bodies) == set(serve_load.KINDS)
    assert len(bodies["oversized"]) > 10_000 and len(json.loads(bodies["too-many"])["dataframe_records"]) == 4
    assert serve_load.png_bomb(12000, 12000)[16:24] == (12000).to_bytes(4, "big") * 2  # IHDR width, height


@pytest.mark.slow  # half a minute: a server started on 127.0.0.1, a few requests of each kind
def test_serve_load_smoke(tmp_path, capsys):
    out, md = tmp_path / "serve_load.json", tmp_path / "RESULTS.md"
    md.write_text("# Results\n")
    argv = ["--requests", "14", "--clients", "2", "--network", "tiny", "--output", str(out), "--markdown", str(md)]
    serve_load.main(argv)
    data = json.loads(out.read_text())
    load = data["load"]
    assert load["sent"] == 14 and load["server_errors"] == 0 and load["no_answer"] == 0 and load["unexpected"] == 0
    assert data["memory"]["peak_after_mib"] >= data["memory"]["peak_before_mib"] > 0
    block = _block(md.read_text(), "serve-load")
    assert "| request | share | expected | status codes |" in block and "**5xx: 0**" in block
    assert "python benchmarks/serve_load.py --requests 14" in block
    assert "status codes:" in capsys.readouterr().out


@pytest.mark.slow  # about a minute: two short bundle trainings and evaluations at toy size
def test_recipe_runner_trains_selects_on_validation_and_records(tmp_path):
    """A recipe merges its fragments over the bundle: the cosine schedule reaches its floor and is checkpointed."""
    demo = make_glas_demo(tmp_path / "glas", n_train=10, n_test_a=2, n_test_b=2, size=(64, 48))
    results, md = tmp_path / "recipes.jsonl", tmp_path / "RESULTS.md"
    common = [
        "--epochs",
        "2",
        "--val-interval",
        "1",
        "--image-size",
        "32",
        "48",
        "--dataset-dir",
        str(demo),
        "--work-dir",
        str(tmp_path / "runs"),
        "--results",
        str(results),
    ]
    recipes.main(["run", "cosine-light", *common])
    recipes.main(["run", "cosine-light", *common])  # recorded: skipped, not trained again

    (record,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert record["recipe"] == "cosine-light" and record["fragments"] == ["cosine_lr", "light_masking"]
    assert 1 <= record["best_epoch"] <= 2 and 0 <= record["best_val_iou"] <= 1
    assert "test" not in record  # a try is selected on validation; the test split waits for `score`
    assert "benchmarks/recipes/glas/cosine_lr.json" in record["commands"][0]
    recipes.main(["score", "cosine-light", *common])
    recipes.main(["score", "cosine-light", *common])  # scored once, never again
    (_, scored) = [json.loads(line) for line in results.read_text().splitlines()]
    assert set(scored["test"]) == {"test", "testA", "testB"} and "evaluating" in scored["commands"][0]

    run_dir = tmp_path / "runs" / "cosine-light-e2-seed0"
    (last,) = sorted((run_dir / "models").glob("checkpoint_epoch=2.pt"))
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["lr_scheduler"]["last_epoch"] == 2
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-5)  # cosine floor: 1 % of 1e-3
    client = MlflowClient(resolve_tracking_uri(str(run_dir)))
    (run,) = client.search_runs([client.get_experiment_by_name("masksup-glas").experiment_id])
    assert run.data.params["lr_scheduler"] == "CosineAnnealingLR" and run.data.params["image_size"] == "[32, 48]"

    recipes.main(["report", "--results", str(results), "--markdown", str(md)])
    block = _block(md.read_text(), "recipes")
    assert "| cosine-light | cosine_lr, light_masking | 2 | 0 |" in block
    assert f"| {scored['test']['test']['iou']:.4f} |" in block and scored["commands"][0] in block

    recipes.main(["curve", "cosine-light", *common, "--markdown", str(md)])
    curve = _block(md.read_text(), "glas-cosine-light-e2-curve")
    assert "Epochs done: 2 of 2;" in curve and f"{record['best_val_iou']:.4f} at epoch {record['best_epoch']}" in curve
    assert [line.split(" |")[0] for line in curve.splitlines() if line[:3] in ("| 1", "| 2")] == ["| 1", "| 2"]


def _ablation_record(arm: str, seed: int, test_iou: float) -> dict:
    test = {m: test_iou for m in ("iou", "dice", "iou_native", "dice_native")}
    return {
        "arm": arm,
        "seed": seed,
        "best_val_iou": 0.5,
        "best_epoch": 3,
        "train_seconds": 60.0,
        "commit": "abc1234",
        "test": {"test": test, "testA": test, "testB": test},
    }


def test_semi_gains_pair_by_fraction_and_seed_and_the_full_label_gap_by_seed_alone():
    def record(arm, fraction, seed, iou):
        return {**_ablation_record(arm, seed, iou), "label_fraction": fraction}

    records = [
        record("supervised-only", 0.25, 0, 0.60),
        record("supervised-only", 0.25, 1, 0.62),
        record("supervised-only", 0.125, 0, 0.50),
        record("semi", 0.25, 0, 0.66),
        record("semi", 0.25, 1, 0.61),
        record("semi", 0.125, 0, 0.58),
        record("full-supervised", 1.0, 0, 0.70),
        record("full-supervised", 1.0, 1, 0.72),
    ]
    fraction = {"label_fraction": "label fraction"}
    over_supervised = "\n".join(
        bundle_runs.paired_gains(records, "supervised-only", ["supervised-only", "semi"], by=fraction)
    )
    assert "| semi | 0.125 | 1 | +0.0800 (seed 0) | +0.0800 | 1 of 1 |" in over_supervised
    assert "| semi | 0.25 | 2 | +0.0600 (seed 0), -0.0100 (seed 1) | +0.0250 | 1 of 2 |" in over_supervised
    to_full = "\n".join(bundle_runs.paired_gains(records, "full-supervised", ["semi"], by=fraction, match=()))
    assert "| semi | 0.125 | 1 | -0.1200 (seed 0) |" in to_full
    assert "| semi | 0.25 | 2 | -0.0400 (seed 0), -0.1100 (seed 1) | -0.0750 | 0 of 2 |" in to_full


def test_ablation_tables_report_spread_and_gains_paired_by_seed():
    records = [
        _ablation_record("baseline", 0, 0.60),
        _ablation_record("baseline", 1, 0.64),
        _ablation_record("full-heavy", 0, 0.65),
        _ablation_record("full-heavy", 1, 0.63),
        _ablation_record("context", 2, 0.70),
    ]  # no baseline with seed 2: not paired
    text = ablation.ablation_tables(records)
    assert "| baseline | 2 | 0.5000 ± 0.0000 | 0.6200 ± 0.0283 |" in text
    assert "| context | 1 | 0.5000 | 0.7000 |" in text  # one seed: the mean alone
    assert "| full-heavy | 2 | +0.0500 (seed 0), -0.0100 (seed 1) | +0.0200 | 1 of 2 |" in text
    assert "| context | 0 |" not in text and "| full-light" not in text
    assert text.count("| abc1234 |") == 5


def _defaults_record(bundle: str, seed: int, test_iou: float, elsewhere_iou: float | None = None) -> dict:
    test = {m: test_iou for m in ("iou", "dice", "iou_native", "dice_native")}
    elsewhere = (
        []
        if elsewhere_iou is None
        else [
            {
                "dataset": "cvc-clinicdb",
                "images": 14,
                "iou": elsewhere_iou,
                "dice": 0.5,
                "commands": [f"eval cvc seed {seed}"],
            }
        ]
    )
    return {
        "bundle": bundle,
        "seed": seed,
        "best_val_iou": 0.7,
        "best_epoch": 40,
        "train_seconds": 2400.0,
        "commit": "abc1234",
        "test": {"test": test},
        "elsewhere": elsewhere,
        "commands": [f"train {bundle} seed {seed}", f"eval {bundle} seed {seed}"],
    }


def test_defaults_table_pools_seeds_per_bundle_and_reports_the_other_dataset(tmp_path):
    records = [
        _defaults_record("kvasir_seg", 0, 0.60, 0.40),
        _defaults_record("kvasir_seg", 1, 0.64, 0.30),
        _defaults_record("glas", 1, 0.78),
    ]
    text = defaults.defaults_table(records)
    assert "| glas | 1 | 0.7000 | 0.7800 | 0.7800 | 0.7800 | — | 40.0 |" in text  # one seed: the mean alone
    assert "| kvasir_seg | 2 | 0.7000 ± 0.0000 | 0.6200 ± 0.0283 |" in text
    assert "cvc-clinicdb 0.3500 ± 0.0707 (14)" in text
    assert (
        "| kvasir_seg | 1 | 40 | 0.7000 | 0.6400 | 0.6400 | — | cvc-clinicdb 0.3000 / 0.5000 | 40.0 | abc1234 |" in text
    )
    assert "eval cvc seed 0" in text and "train glas seed 1" in text and "train kvasir_seg seed 1" not in text


def test_reports_write_their_blocks_into_results_md_only(tmp_path):
    """Every study's report targets RESULTS.md by default; the defaults report leaves the bundles' docs alone."""
    import pretrain
    import semi

    for study in (ablation, defaults, recipes, semi, pretrain):
        assert study.parse_args(["report"]).markdown == [RESULTS_MD], study.__name__
    docs = {path: path.read_bytes() for path in (REPO / "bundles").glob("*/docs/README.md")}
    assert docs
    results, md = tmp_path / "defaults.jsonl", tmp_path / "RESULTS.md"
    records = [_defaults_record("glas", 0, 0.78), _defaults_record("kvasir_seg", 0, 0.60, 0.40)]
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    defaults.main(["report", "--results", str(results), "--markdown", str(md)])
    block = _block(md.read_text(), "defaults")
    assert "| glas | 1 | 0.7000 | 0.7800 |" in block and "| kvasir_seg | 1 | 0.7000 | 0.6000 |" in block
    assert {path: path.read_bytes() for path in docs} == docs


@pytest.mark.slow  # about a minute: one semi-supervised and one reference run at toy size
def test_semi_study_runs_records_and_reports(tmp_path):
    import semi

    demo = make_glas_demo(tmp_path / "glas", n_train=10, n_test_a=2, n_test_b=2, size=(64, 48))
    results, md = tmp_path / "semi.jsonl", tmp_path / "RESULTS.md"
    common = [
        "--epochs",
        "1",
        "--val-interval",
        "1",
        "--image-size",
        "32",
        "32",
        "--dataset-dir",
        str(demo),
        "--work-dir",
        str(tmp_path / "runs"),
        "--results",
        str(results),
        "--seeds",
        "0",
        "--fractions",
        "0.5",
    ]
    semi.main(["run", "--arms", "semi", "full-supervised", *common])
    semi.main(["run", "--arms", "semi", *common])  # recorded: skipped
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["arm"], r["label_fraction"]) for r in records] == [("semi", 0.5), ("full-supervised", 1.0)]
    assert "semi_train.json" in records[0]["commands"][0] and "--label_fraction 0.5" in records[0]["commands"][0]
    assert {r["defaults"] for r in records} == {bundle_runs.BUNDLE_DEFAULTS}
    semi.main(["report", *common, "--markdown", str(md)])
    block = _block(md.read_text(), "semi-glas")
    assert "| semi | 0.5 | 1 |" in block and "| full-supervised | 1.0 | 1 |" in block


@pytest.mark.parametrize("bundle", ["glas", "kvasir_seg"])
def test_every_semi_arm_merges_existing_bundle_configs_with_mim_last(bundle):
    import semi

    for arm in semi.ARMS:
        assert all((REPO / path).is_file() for path in semi.configs(bundle, arm)), arm
    assert semi.configs(bundle, "semi-mim")[-2:] == [
        f"bundles/{bundle}/configs/semi_train.json",
        f"bundles/{bundle}/configs/semi_mim.json",
    ]
