"""End-to-end runs of the GLaS bundle through `python -m monai.bundle run training`, as users run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from masksup_med.data import make_glas_demo

REPO = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = REPO / "bundles" / "glas" / "configs" / "train.json"
REAL_GLAS = REPO.parent / "shared" / "data" / "glas"


def run_training(dataset_dir: Path, output_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Run the bundle's training from the repository root, as the README does."""
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", str(TRAIN_CONFIG),
        "--dataset_dir", str(dataset_dir),
        "--output_dir", str(output_dir),
        "--num_workers", "0",
        *overrides,
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def demo_glas(tmp_path_factory) -> Path:
    return make_glas_demo(tmp_path_factory.mktemp("demo") / "glas", n_train=10, n_test_a=2, n_test_b=2, size=(64, 48))


@pytest.mark.slow
def test_one_epoch_on_demo_data_saves_checkpoint_split_and_mlflow_run(demo_glas, tmp_path):
    out = tmp_path / "out"
    result = run_training(demo_glas, out, "--max_epochs", "1", "--val_interval", "1",
                          "--image_size", "[64,64]", "--batch_size", "4")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # the per-epoch summary on the console shows each MaskSup term and the validation metrics
    assert "train_loss_tasksim" in result.stdout and "val_mean_iou" in result.stdout

    # best checkpoint by validation mIoU loads into the bundle's network
    state = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert any(k.endswith("weight") for k in state)

    # the split is written with the run: validation carved from train, tests untouched
    splits = json.loads((out / "datalist.json").read_text())
    assert len(splits["train"]) + len(splits["validation"]) == 10
    assert {p["id"] for p in splits["validation"]}.isdisjoint(p["id"] for p in splits["train"])
    assert len(splits["testA"]) == 2 and len(splits["testB"]) == 2

    # MLflow (embedded SQLite store in the output folder) has params, per-term losses and metrics
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("masksup-glas")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name.startswith("glas-")
    assert run.data.params["a2"] == "1.0" and run.data.params["masking"] == "RandFreeFormMaskd"
    assert run.data.params["dataset_dir"] == str(demo_glas)
    for metric in ("train_loss", "train_loss_seg", "train_loss_context", "train_loss_tasksim", "val_mean_iou", "val_mean_dice"):
        assert metric in run.data.metrics, metric
    assert 0.0 <= run.data.metrics["val_mean_iou"] <= 1.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"datalist.json", "figures/validation_epoch_0001.png", "figures/learning_curves.png"} <= artifacts

    # the best checkpoint is registered with the run's settings and validation score, alias "candidate"
    version = client.get_model_version_by_alias("masksup-glas", "candidate")
    assert version.run_id == run.info.run_id
    assert version.tags["masking"] == "RandFreeFormMaskd" and version.tags["dataset"] == "glas"
    assert float(version.tags["best_val_mean_iou"]) == pytest.approx(run.data.metrics["val_mean_iou"], abs=1e-4)


@pytest.mark.slow
def test_baseline_arm_runs_through_the_same_bundle(demo_glas, tmp_path):
    out = tmp_path / "out"
    result = run_training(demo_glas, out, "--max_epochs", "1", "--val_interval", "1", "--image_size", "[64,64]",
                          "--loss_weights", "{'a1': 1.0, 'a2': 0.0, 'a3': 0.0}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("masksup-glas").experiment_id])
    assert run.data.metrics["train_loss_context"] == 0.0 and run.data.metrics["train_loss_tasksim"] == 0.0
    assert run.data.metrics["train_loss"] == pytest.approx(run.data.metrics["train_loss_seg"])


@pytest.mark.parametrize("make_folder", [False, True], ids=["missing", "empty"])
def test_missing_or_empty_dataset_dir_fails_at_start_with_instructions(tmp_path, make_folder):
    dataset_dir = tmp_path / "no_glas_here"
    if make_folder:
        dataset_dir.mkdir()
    out = tmp_path / "out"
    result = run_training(dataset_dir, out, "--max_epochs", "1")
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert str(dataset_dir) in message
    assert "masksup-med data demo glas" in message
    assert "Warwick" in message
    assert not (out / "models").exists()  # failed before any training or checkpointing


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.skipif(not REAL_GLAS.is_dir(), reason=f"real GLaS copy not found at {REAL_GLAS}")
def test_trains_on_real_glas_copy(tmp_path):
    out = tmp_path / "out"
    result = run_training(REAL_GLAS, out, "--max_epochs", "1", "--val_interval", "1",
                          "--image_size", "[64,64]", "--batch_size", "16")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    splits = json.loads((out / "datalist.json").read_text())
    assert (len(splits["train"]), len(splits["validation"])) == (68, 17)
    assert (out / "models" / "model.pt").is_file()
