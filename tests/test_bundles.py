"""End-to-end runs of both bundles through `python -m monai.bundle run ...`, as users run them.

Every config of each bundle (train, evaluate, inference, multi_gpu_train) runs on demo data; the
GLaS bundle also covers what is the same code for both (registered-model evaluation, NIfTI output,
resuming a killed run).
"""

from __future__ import annotations

import base64
import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from monai.bundle import ConfigParser
from PIL import Image

from masksup_med.bundles import bundle_dirs
from masksup_med.data import make_cvc_clinicdb_demo, make_glas_demo, make_kvasir_seg_demo, read_array
from masksup_med.tracking.model_format import build_network, load_model, network_definition

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "glas" / "configs"
TRAIN_CONFIG = CONFIGS / "train.json"
REAL_GLAS = REPO.parent / "shared" / "data" / "glas"
REAL_CVC = REPO.parent / "shared" / "data" / "cvc-clinicdb-sample"


@dataclass(frozen=True)
class BundleCase:
    """One bundle and what its demo data looks like."""

    name: str
    dataset: str
    test_groups: frozenset[str]
    where_to_get: str  # a word of the missing-data message

    @property
    def configs(self) -> Path:
        return REPO / "bundles" / self.name / "configs"

    @property
    def model_name(self) -> str:
        return f"masksup-{self.dataset}"

    def config(self, *names: str) -> list[Path]:
        return [self.configs / "train.json", *(self.configs / n for n in names)]

    def make_demo(self, folder: Path) -> Path:
        return DEMOS[self.name](folder)


DEMOS = {  # a small demo of each bundle's dataset, 64 x 48 pixels (Kvasir-SEG: sizes vary around it)
    "glas": lambda folder: make_glas_demo(folder, n_train=10, n_test_a=2, n_test_b=2, size=(64, 48)),
    "cvc_clinicdb": lambda folder: make_cvc_clinicdb_demo(folder, n_frames=14, size=(64, 48)),
    "kvasir_seg": lambda folder: make_kvasir_seg_demo(folder, n_images=12, size=(64, 48)),
}
ONE_TINY_EPOCH = ("--max_epochs", "1", "--val_interval", "1", "--image_size", "[64,64]")  # the smallest run

CASES = {
    "glas": BundleCase("glas", "glas", frozenset({"test", "testA", "testB"}), "Warwick"),
    "cvc_clinicdb": BundleCase("cvc_clinicdb", "cvc-clinicdb", frozenset({"test"}), "CVC-ClinicDB"),
    "kvasir_seg": BundleCase("kvasir_seg", "kvasir-seg", frozenset({"test"}), "Kvasir-SEG"),
}


def test_every_bundle_has_a_case():
    assert set(CASES) == {p.name for p in bundle_dirs(REPO / "bundles")}


def demo_images(folder: Path, count: int = 2) -> list[Path]:
    """The first ``count`` images (not masks) of a demo dataset folder."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix in (".bmp", ".tif", ".jpg")
        and "anno" not in p.name
        and "Ground Truth" not in str(p)
        and p.parent.name != "masks"
    )[:count]


@pytest.fixture(
    scope="module", params=[pytest.param(name, marks=pytest.mark.xdist_group(f"bundle-{name}")) for name in CASES]
)
def case(request) -> BundleCase:
    return CASES[request.param]


@pytest.fixture(scope="module")
def demo(case, tmp_path_factory) -> Path:
    return case.make_demo(tmp_path_factory.mktemp("demo") / case.name)


def run_bundle(
    run_id: str, configs: list[Path], *overrides: str, env: dict | None = None, cwd: Path = REPO, num_workers: int = 0
) -> subprocess.CompletedProcess:
    """Run one workflow of the bundle with the documented command (from the repository root by default)."""
    config_file = str(configs[0]) if len(configs) == 1 else str([str(c) for c in configs])
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        run_id,
        "--config_file",
        config_file,
        "--num_workers",
        str(num_workers),
        *overrides,
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def run_training(
    dataset_dir: Path,
    output_dir: Path,
    *overrides: str,
    config: Path | list[Path] = TRAIN_CONFIG,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run a bundle's training (GLaS by default; a list of configs is merged in order), as the README does."""
    configs = config if isinstance(config, list) else [config]
    return run_bundle(
        "training", configs, "--dataset_dir", str(dataset_dir), "--output_dir", str(output_dir), *overrides, env=env
    )


@pytest.mark.slow
def test_one_epoch_on_demo_data_saves_checkpoint_split_and_mlflow_run(case, demo, tmp_path):
    out = tmp_path / "out"
    result = run_training(
        demo,
        out,
        *ONE_TINY_EPOCH,
        "--batch_size",
        "4",
        config=case.configs / "train.json",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # the per-epoch summary on the console shows each MaskSup term and the validation metrics
    assert "train_loss_tasksim" in result.stdout and "val_mean_iou" in result.stdout

    # best checkpoint by validation mIoU loads into the bundle's network
    state = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert any(k.endswith("weight") for k in state)

    # the split is written with the run: validation carved out of the training data, tests untouched
    splits = json.loads((out / "datalist.json").read_text())
    assert {p["id"] for p in splits["validation"]}.isdisjoint(p["id"] for p in splits["train"])
    if case.name == "glas":
        assert len(splits["train"]) + len(splits["validation"]) == 10
        assert len(splits["testA"]) == 2 and len(splits["testB"]) == 2
    else:  # no image in two parts; CVC-ClinicDB's split is by video sequence: no sequence in two parts either
        key = "sequence" if case.name == "cvc_clinicdb" else "id"
        parts = [{p[key] for p in splits[k]} for k in ("train", "validation", "test")]
        assert all(parts) and sum(len(p) for p in parts) == len(set().union(*parts))

    # MLflow (embedded SQLite store in the output folder) has params, per-term losses and metrics
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(case.model_name)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name.startswith(f"{case.dataset}-")
    assert run.data.params["a2"] == "1.0" and run.data.params["masking"] == "RandMaskBank"
    assert run.data.params["mask_source"] == "RandFreeFormMask"  # free-form strokes, drawn once into a bank
    assert run.data.params["dataset_dir"] == str(demo)
    for metric in (
        "train_loss",
        "train_loss_seg",
        "train_loss_context",
        "train_loss_tasksim",
        "val_mean_iou",
        "val_mean_dice",
    ):
        assert metric in run.data.metrics, metric
    assert 0.0 <= run.data.metrics["val_mean_iou"] <= 1.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"datalist.json", "figures/validation_epoch_0001.png", "figures/learning_curves.png"} <= artifacts

    # the best checkpoint is registered with the run's settings and validation score, alias "candidate"
    version = client.get_model_version_by_alias(case.model_name, "candidate")
    assert version.run_id == run.info.run_id
    assert version.tags["masking"] == "RandMaskBank" and version.tags["dataset"] == case.dataset
    assert float(version.tags["best_val_mean_iou"]) == pytest.approx(run.data.metrics["val_mean_iou"], abs=1e-4)


def _epoch_losses(output_dir: Path, experiment: str) -> list[float]:
    """``train_loss`` of each epoch of the one run in ``output_dir``'s MLflow store."""
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{output_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)]


@pytest.mark.slow
def test_same_seed_gives_the_same_run_and_another_seed_does_not(tmp_path):
    """Network initialisation, masks, augmentation (in DataLoader workers) and the split all follow ``seed``."""
    case = CASES["cvc_clinicdb"]
    demo = case.make_demo(tmp_path / "demo")
    losses = {}
    for name, seed in (("first", "0"), ("again", "0"), ("other", "1")):
        result = run_bundle(
            "training",
            case.config(),
            "--dataset_dir",
            str(demo),
            "--output_dir",
            str(tmp_path / name),
            "--max_epochs",
            "2",
            "--val_interval",
            "2",
            "--image_size",
            "[64,64]",
            "--batch_size",
            "4",
            "--seed",
            seed,
            num_workers=2,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        losses[name] = _epoch_losses(tmp_path / name, case.model_name)
    assert len(losses["first"]) == 2
    assert losses["again"] == pytest.approx(losses["first"], rel=1e-6, abs=1e-7)
    assert losses["other"][0] != pytest.approx(losses["first"][0], rel=1e-6, abs=1e-7)


@pytest.mark.slow
def test_baseline_arm_runs_through_the_same_bundle(tmp_path):
    out = tmp_path / "out"
    result = run_training(
        CASES["glas"].make_demo(tmp_path / "demo"),
        out,
        *ONE_TINY_EPOCH,
        "--loss_weights",
        "{'a1': 1.0, 'a2': 0.0, 'a3': 0.0}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("masksup-glas").experiment_id])
    assert run.data.metrics["train_loss_context"] == 0.0 and run.data.metrics["train_loss_tasksim"] == 0.0
    assert run.data.metrics["train_loss"] == pytest.approx(run.data.metrics["train_loss_seg"])


@pytest.mark.slow
def test_a_copy_of_the_bundle_folder_trains_evaluates_and_infers_from_another_directory(case, demo, tmp_path):
    """A bundle is self-contained: its folder alone (links dereferenced), run from an unrelated directory."""
    bundle = tmp_path / "copied" / case.name
    shutil.copytree(REPO / "bundles" / case.name, bundle, symlinks=False)
    workdir = tmp_path / "somewhere else"
    workdir.mkdir()
    images = tmp_path / "images"
    images.mkdir()
    for frame in demo_images(demo):
        shutil.copy(frame, images / frame.name)  # CVC-ClinicDB TIFF frames too: inference reads them with tifffile
    configs = bundle / "configs"
    common = [
        "--bundle_root",
        str(bundle),
        "--dataset_dir",
        str(demo),
        "--output_dir",
        "out",
        "--image_size",
        "[64,64]",
    ]
    steps = (
        ("training", [configs / "train.json"], ["--max_epochs", "1", "--val_interval", "1"]),
        ("evaluating", [configs / "train.json", configs / "evaluate.json"], []),
        ("inferring", [configs / "train.json", configs / "inference.json"], ["--input_dir", str(images)]),
    )
    for run_id, files, extra in steps:
        result = run_bundle(run_id, files, *common, *extra, cwd=workdir)
        assert result.returncode == 0, run_id + result.stdout[-3000:] + result.stderr[-3000:]
    out = workdir / "out"
    assert (out / "models" / "model.pt").is_file() and (out / "eval" / case.dataset / "test" / "summary.json").is_file()
    assert len(list((out / "predictions").glob("*_mask.png"))) == 2
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    assert client.get_model_version_by_alias(case.model_name, "candidate").tags["dataset"] == case.dataset


@pytest.mark.slow
def test_semi_supervised_config_trains_with_a_label_fraction_and_an_unlabelled_folder(tmp_path):
    demo = CASES["glas"].make_demo(tmp_path / "demo")
    frames = tmp_path / "hospital frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for name in ("frame 1.png", "frame_2.jpg"):  # a hospital's own frames, not from the dataset
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(frames / name)
    out = tmp_path / "out"
    result = run_training(
        demo,
        out,
        *ONE_TINY_EPOCH,
        "--batch_size",
        "2",
        "--label_fraction",
        "0.25",
        "--unlabelled_dir",
        str(frames),
        config=[TRAIN_CONFIG, CONFIGS / "semi_train.json"],
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    splits = json.loads((out / "datalist.json").read_text())
    assert len(splits["train"]) == 2 and len(splits["unlabelled"]) == 6 + 2  # 8 training images, 2 frames
    assert all("label" not in item for item in splits["unlabelled"])
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("masksup-glas").experiment_id])
    for metric in ("train_loss_unsup", "train_confident_fraction", "val_mean_iou", "val_student_mean_iou"):
        assert metric in run.data.metrics, metric
    assert run.data.params["label_fraction"] == "0.25"
    version = client.get_model_version_by_alias("masksup-glas", "candidate")
    assert version.run_id == run.info.run_id
    kept = {"teacher": "val_mean_iou", "student": "val_student_mean_iou"}[version.tags["selected_network"]]
    assert float(version.tags["best_val_mean_iou"]) == pytest.approx(run.data.metrics[kept], abs=1e-4)  # one round
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert "figures/pseudo_labels_epoch_0001.png" in figures  # teacher's pseudo-labels next to the ground truth
    model = load_model("models:/masksup-glas@candidate", tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    assert tuple(model(torch.zeros(1, 3, 64, 64)).shape) == (1, 1, 64, 64)
    checkpoint = torch.load(out / "models" / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=False)
    assert "teacher" in checkpoint  # resuming restores the teacher too


@pytest.mark.parametrize(
    ("override", "value", "message"),
    [
        ("--label_fraction", "0", "label_fraction must be a number in (0, 1], got 0"),
        ("--label_fraction", "0.01", "label_fraction 0.01 of the 8 training images labels none"),
        ("--unlabelled_dir", "EMPTY", "holds no images"),
    ],
)
def test_semi_supervised_bad_input_fails_at_start_naming_the_value(tmp_path, override, value, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    result = run_training(
        CASES["glas"].make_demo(tmp_path / "demo"),
        out,
        override,
        str(empty) if value == "EMPTY" else value,
        "--max_epochs",
        "1",
        config=[TRAIN_CONFIG, CONFIGS / "semi_train.json"],
    )
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not (out / "models").exists()


@pytest.mark.slow
def test_mixed_precision_bf16_trains_one_epoch_on_cpu(tmp_path):
    out = tmp_path / "out"
    result = run_training(
        CASES["glas"].make_demo(tmp_path / "demo"),
        out,
        *ONE_TINY_EPOCH,
        "--amp",
        "True",
        "--amp_dtype",
        "bfloat16",
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("masksup-glas").experiment_id])
    assert all(math.isfinite(run.data.metrics[k]) for k in ("train_loss", "train_loss_tasksim", "val_mean_iou"))
    assert (out / "models" / "model.pt").is_file()


@pytest.mark.slow
def test_supervised_baseline_is_a_short_config_over_the_same_pipeline(tmp_path):
    """configs/supervised.json swaps MaskSup for MONAI's plain SupervisedTrainer; run from another directory."""
    bundle = REPO / "bundles" / "glas"
    out = tmp_path / "out"
    result = run_bundle(
        "training",
        [bundle / "configs" / "train.json", bundle / "configs" / "supervised.json"],
        "--bundle_root",
        str(bundle),
        "--dataset_dir",
        str(CASES["glas"].make_demo(tmp_path / "demo")),
        "--output_dir",
        str(out),
        *ONE_TINY_EPOCH,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("masksup-glas").experiment_id])
    assert run.data.params["loss"] == "DiceCELoss" and "masking" not in run.data.params
    assert "train_loss" in run.data.metrics and not any(m.startswith("train_loss_") for m in run.data.metrics)
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert "figures/validation_epoch_0001.png" in figures  # figures without a masked view
    assert client.get_model_version_by_alias("masksup-glas", "candidate").run_id == run.info.run_id


@pytest.mark.slow
def test_a_third_method_trains_from_a_short_merge_file(tmp_path):
    """A new loss with one more named term, and patch masking, from a merge file of a few lines: its term
    is logged per iteration and epoch, its settings recorded, and the model registered, with no pipeline change."""
    toy = Path(__file__).parent / "toy_method"
    merge_file = toy / "area_masksup.json"
    assert len(merge_file.read_text().splitlines()) <= 40
    out = tmp_path / "out"
    result = run_training(
        CASES["glas"].make_demo(tmp_path / "demo"),
        out,
        "--max_epochs",
        "2",
        "--val_interval",
        "1",
        "--image_size",
        "[64,64]",
        config=[TRAIN_CONFIG, merge_file],
        env={"PYTHONPATH": os.pathsep.join([str(toy), os.environ.get("PYTHONPATH", "")])},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "train_loss_area" in result.stdout  # the console's epoch summary
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("masksup-glas").experiment_id])
    assert (run.data.params["loss"], run.data.params["area_weight"]) == ("AreaMaskSupLoss", "0.5")
    assert run.data.params["masking"] == "RandPatchMask" and run.data.params["mask_patch_size"] == "8"
    epochs = client.get_metric_history(run.info.run_id, "train_loss_area")
    assert [m.step for m in epochs] == [1, 2] and all(m.value >= 0 for m in epochs)
    assert len(client.get_metric_history(run.info.run_id, "loss_area")) >= 2  # per iteration
    version = client.get_model_version_by_alias("masksup-glas", "candidate")
    assert version.run_id == run.info.run_id and version.tags["loss"] == "AreaMaskSupLoss"


@pytest.mark.parametrize("make_folder", [False, True], ids=["missing", "empty"])
def test_missing_or_empty_dataset_dir_fails_at_start_with_instructions(case, tmp_path, make_folder):
    dataset_dir = tmp_path / "no_data_here"
    if make_folder:
        dataset_dir.mkdir()
    out = tmp_path / "out"
    result = run_training(dataset_dir, out, "--max_epochs", "1", config=case.configs / "train.json")
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert str(dataset_dir) in message
    assert f"masksup-med data demo {case.dataset}" in message
    assert case.where_to_get in message
    assert not (out / "models").exists()  # failed before any training or checkpointing


@pytest.mark.parametrize("config", ["train.json", "evaluate.json", "inference.json"])
def test_image_size_the_network_cannot_take_fails_at_start_with_a_size_that_works(tmp_path, config):
    configs = CASES["glas"].config(*([] if config == "train.json" else [config]))
    run_id = {"train.json": "training", "evaluate.json": "evaluating", "inference.json": "inferring"}[config]
    inputs = ["--input_dir", str(tmp_path)] if config == "inference.json" else []
    result = run_bundle(
        run_id,
        configs,
        "--dataset_dir",
        str(tmp_path / "unused"),
        *inputs,
        "--output_dir",
        str(tmp_path / "out"),
        "--image_size",
        "[120,160]",
    )
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert "multiple of 16" in message and '--image_size "[128, 160]"' in message
    assert not (tmp_path / "out" / "models").exists()


def test_check_image_size_accepts_multiples_and_networks_without_strides():
    from monai.networks.nets import UNet

    from masksup_med.run.runtime import check_image_size

    unet = UNet(2, 3, 1, channels=(4, 8, 16), strides=(2, (2, 4)))  # downsamples by 4 along H, 8 along W
    check_image_size([36, 96], unet)
    with pytest.raises(ValueError, match=r"multiple of \[4, 8\] .*\[36, 104\]"):
        check_image_size([36, 100], unet)
    check_image_size([63, 101], torch.nn.Conv2d(3, 1, 3))  # nothing to check


def test_rotation_by_90_degrees_is_refused_for_unequal_sides_and_off_in_the_glas_bundle():
    from monai.transforms import RandFlipd, RandRotate90, RandRotate90d

    from masksup_med.run.runtime import check_augmentation_keeps_size

    rotate = RandRotate90d(["image", "label"], prob=0.5)
    check_augmentation_keeps_size([RandFlipd("image", prob=0.5), rotate], [256, 256])
    check_augmentation_keeps_size([RandRotate90d("image", prob=0.0)], [384, 256])
    check_augmentation_keeps_size(
        [RandRotate90(prob=1.0, spatial_axes=(0, 1))], [32, 32, 16]
    )  # rotates the square plane
    with pytest.raises(ValueError, match=r"RandRotate90d\(prob=0.5, spatial_axes=\(0, 1\)\) swaps sides 384 and 256"):
        check_augmentation_keeps_size([rotate], [384, 256])

    parser = ConfigParser()
    parser.read_config([str(c) for c in CASES["glas"].config()])
    parser["image_size"] = [384, 256]
    rotations = [t for t in parser.get_parsed_content("augmentation") if isinstance(t, RandRotate90d)]
    assert [t.prob for t in rotations] == [0.0]  # the bundle turns its 90-degree rotation off for a non-square size


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.skipif(not REAL_GLAS.is_dir(), reason=f"real GLaS copy not found at {REAL_GLAS}")
def test_trains_on_real_glas_copy(tmp_path):
    out = tmp_path / "out"
    result = run_training(
        REAL_GLAS, out, "--max_epochs", "1", "--val_interval", "1", "--image_size", "[64,64]", "--batch_size", "16"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    splits = json.loads((out / "datalist.json").read_text())
    assert (len(splits["train"]), len(splits["validation"])) == (68, 17)
    assert (out / "models" / "model.pt").is_file()


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.skipif(not REAL_CVC.is_dir(), reason=f"real CVC-ClinicDB sample not found at {REAL_CVC}")
def test_trains_on_real_cvc_clinicdb_sample(tmp_path):
    out = tmp_path / "out"
    result = run_training(
        REAL_CVC,
        out,
        "--max_epochs",
        "1",
        "--val_interval",
        "1",
        "--image_size",
        "[64,96]",
        config=CASES["cvc_clinicdb"].configs / "train.json",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    splits = json.loads((out / "datalist.json").read_text())
    assert sum(len(v) for v in splits.values()) == 14
    assert (out / "models" / "model.pt").is_file()


@pytest.fixture(scope="module")
def trained(case, demo, tmp_path_factory) -> Path:
    """One short training run whose checkpoint and registered model the evaluate / inference tests use."""
    out = tmp_path_factory.mktemp("trained")
    result = run_training(
        demo,
        out,
        "--max_epochs",
        "2",
        "--val_interval",
        "1",
        "--image_size",
        "[64,64]",
        config=case.configs / "train.json",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_evaluate_reports_per_image_and_summary_at_both_resolutions(case, demo, trained):
    result = run_bundle(
        "evaluating",
        case.config("evaluate.json"),
        "--dataset_dir",
        str(demo),
        "--output_dir",
        str(trained),
        "--image_size",
        "[64,64]",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "iou_native" in result.stdout  # the printed table

    report = trained / "eval" / case.dataset / "test"  # kept per dataset
    with open(report / "per_image.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    splits = json.loads((trained / "datalist.json").read_text())
    tested = {item["id"]: item for item in splits.get("test", []) + splits.get("testA", []) + splits.get("testB", [])}
    assert sorted(row["id"] for row in rows) == sorted(tested)
    for row in rows:  # native size H x W of each image file
        width, height = read_array(tested[row["id"]]["image"]).shape[:2]  # the reader's axes: width first
        assert row["native_size"] == f"{height}x{width}", row
    summary = json.loads((report / "summary.json").read_text())
    assert set(summary["summary"]) == case.test_groups
    for group in summary["summary"].values():
        for metric in ("iou", "dice", "iou_native", "dice_native"):
            assert 0.0 <= group[metric]["mean"] <= 1.0


@pytest.mark.slow
def test_evaluate_registered_model_records_test_metrics_on_its_version(case, demo, trained):
    if case.name != "glas":
        pytest.skip("the same shared evaluate config; run once, on the GLaS bundle")
    result = run_bundle(
        "evaluating",
        case.config("evaluate.json"),
        "--dataset_dir",
        str(demo),
        "--output_dir",
        str(trained),
        "--image_size",
        "[64,64]",
        "--eval_split",
        "testA",
        "--model_source",
        "models:/masksup-glas@candidate",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    uri = f"sqlite:///{trained / 'mlflow.db'}"
    version = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(
        "masksup-glas", "candidate"
    )
    summary = json.loads((trained / "eval" / "glas" / "testA" / "summary.json").read_text())
    assert float(version.tags["test_testA_iou"]) == pytest.approx(summary["summary"]["testA"]["iou"]["mean"], abs=1e-4)


@pytest.mark.slow
def test_a_model_is_evaluated_on_another_dataset_with_one_override_and_each_report_kept(case, demo, trained, tmp_path):
    """A CVC-ClinicDB model on Kvasir-SEG's test split (``--dataset``, ``--dataset_dir``), then on its own: both
    reports kept (``eval/<dataset>/test``), CVC-ClinicDB's per video sequence, each dataset's tags on the version."""
    if case.name != "cvc_clinicdb":
        pytest.skip(
            "the same shared evaluate config; run once, from the CVC-ClinicDB bundle (its split options differ)"
        )
    kvasir = CASES["kvasir_seg"].make_demo(tmp_path / "kvasir")
    model = "models:/masksup-cvc-clinicdb@candidate"
    for dataset, folder in (("kvasir-seg", kvasir), ("cvc-clinicdb", demo)):
        result = run_bundle(
            "evaluating",
            case.config("evaluate.json"),
            "--dataset",
            dataset,
            "--dataset_dir",
            str(folder),
            "--output_dir",
            str(trained),
            "--image_size",
            "[64,64]",
            "--model_source",
            model,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    other, own = (
        json.loads((trained / "eval" / d / "test" / "summary.json").read_text()) for d in ("kvasir-seg", "cvc-clinicdb")
    )
    assert other["dataset"] == "kvasir-seg" and other["images"] == 2 and "per_sequence" not in other
    assert own["dataset"] == "cvc-clinicdb" and own["per_sequence"]  # CVC-ClinicDB frames belong to video sequences
    assert (trained / "eval" / "cvc-clinicdb" / "test" / "per_sequence.png").is_file()
    uri = f"sqlite:///{trained / 'mlflow.db'}"
    tags = (
        mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        .get_model_version_by_alias(case.model_name, "candidate")
        .tags
    )
    assert float(tags["test_kvasir-seg_test_iou"]) == pytest.approx(other["summary"]["test"]["iou"]["mean"], abs=1e-4)
    assert float(tags["test_test_iou"]) == pytest.approx(own["summary"]["test"]["iou"]["mean"], abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("output_ext", [".png", ".nii.gz"])
def test_inference_writes_masks_of_each_input_size_and_overlays(case, demo, trained, tmp_path, output_ext):
    if case.name != "glas" and output_ext != ".png":
        pytest.skip("the same shared inference config; NIfTI output is run once, on the GLaS bundle")
    inputs = tmp_path / "my scans é"  # spaces and non-ASCII in the path
    inputs.mkdir()
    first, second = (
        Image.fromarray(tifffile.imread(p)) if p.suffix == ".tif" else Image.open(p).convert("RGB")
        for p in demo_images(demo)
    )  # Pillow cannot read CVC-ClinicDB's TIFF frames
    first.save(inputs / "first.png")
    second.resize((80, 60)).save(inputs / "second image.jpg", quality=95)
    (inputs / ".DS_Store").write_bytes(b"\0")
    result = run_bundle(
        "inferring",
        case.config("inference.json"),
        "--input_dir",
        str(inputs),
        "--output_dir",
        str(trained),
        "--image_size",
        "[64,64]",
        "--output_ext",
        output_ext,
        "--prediction_dir",
        str(tmp_path / "pred"),
        "--save_overlays",
        "true",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stem, size in (("first", first.size), ("second image", (80, 60))):
        mask_file = tmp_path / "pred" / f"{stem}_mask{output_ext}"
        if output_ext == ".png":
            mask = np.array(Image.open(mask_file))
            assert mask.shape == size[::-1] and set(np.unique(mask)) <= {0, 255}
        else:
            mask = np.asarray(nib.load(mask_file).dataobj)
            assert mask.shape == size and set(np.unique(mask)) <= {0, 1}  # MONAI axes: W, H
        assert Image.open(tmp_path / "pred" / f"{stem}_overlay.png").size == size


CORNER_NET = """
import os

import numpy as np
import torch


class RedIsForeground(torch.nn.Module):
    \"\"\"Logits from colour alone (red is foreground); keeps the last input it saw in $NET_INPUT.\"\"\"

    def forward(self, x):
        np.save(os.environ["NET_INPUT"], x.detach().cpu().numpy())
        return 40 * (x[:, :1] - x[:, 1:2] - 0.5)
"""


@pytest.mark.slow
def test_a_landscape_image_stays_landscape_and_upright_from_file_to_network_to_mask_and_figure(tmp_path):
    """image_size is [width, height]: the CVC-ClinicDB bundle's default input of a 96 x 48 image with a red
    top-right corner is 320 wide and 240 high with the corner at (last x, first y); the mask written back
    has the image's own size with the corner in the same place; the figures show it upright."""
    from masksup_med.serving.model import decode_image
    from masksup_med.tracking.figures import _as_display

    height, width = 48, 96
    picture = np.full((height, width, 3), 128, np.uint8)
    picture[:12, 72:] = (255, 0, 0)  # the marked corner: top right
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(picture).save(inputs / "corner.png")
    (tmp_path / "corner_net.py").write_text(CORNER_NET)
    checkpoint = tmp_path / "model.pt"
    torch.save({}, checkpoint)  # the network has no weights
    seen = tmp_path / "net_input.npy"
    case = CASES["cvc_clinicdb"]
    result = run_bundle(
        "inferring",
        case.config("inference.json"),
        "--input_dir",
        str(inputs),
        "--output_dir",
        str(tmp_path / "out"),
        "--model_source",
        str(checkpoint),
        "--network_def",
        "{'_target_': 'corner_net.RedIsForeground'}",
        "--save_overlays",
        "true",
        env={"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]), "NET_INPUT": str(seen)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    image_size = json.loads((case.configs / "train.json").read_text())["image_size"]
    assert image_size == [320, 240]  # the frames' own 4:3 landscape aspect, width first
    network_input = torch.from_numpy(np.load(seen))[0]
    assert tuple(network_input.shape) == (3, *image_size)  # C, W, H
    red = (network_input[0] > 0.9) & (network_input[1] < 0.1)
    assert red[-1, 0] and not red[0, -1] and not red[0, 0]  # at the largest x, the smallest y: top right
    assert red.float().mean() == pytest.approx(0.25 * 0.25, abs=0.02)

    mask = np.array(Image.open(tmp_path / "out" / "predictions" / "corner_mask.png"))
    assert mask.shape == (height, width)  # written back at the image's own size, rows first as Pillow reads it
    assert (mask[1:11, 74:] == 255).all() and (mask[14:] == 0).all() and (mask[:, :70] == 0).all()
    overlay = np.array(Image.open(tmp_path / "out" / "predictions" / "corner_overlay.png"))
    assert overlay.shape == (height, width, 3) and (overlay[5, 90] != picture[5, 90]).any()  # the tint, top right
    assert (overlay[30, 10] == picture[30, 10]).all()

    shown = _as_display(network_input)  # what the validation figures draw with imshow: rows are y
    assert shown.shape == (image_size[1], image_size[0], 3) and shown[0, -1, 0] > 0.9 and shown[-1, 0, 0] < 0.6
    served = decode_image(base64.b64encode((inputs / "corner.png").read_bytes()))  # serving reads it the same way
    assert served.shape == (3, width, height) and served[0, -1, 0] == 255 and served[0, 0, -1] == 128


def test_inference_on_empty_folder_names_it(tmp_path):
    empty = tmp_path / "nothing here"
    empty.mkdir()
    result = run_bundle(
        "inferring",
        [TRAIN_CONFIG, CONFIGS / "inference.json"],
        "--input_dir",
        str(empty),
        "--output_dir",
        str(tmp_path / "out"),
    )
    assert result.returncode != 0
    assert str(empty) in result.stdout + result.stderr


@pytest.mark.slow
def test_training_killed_midway_resumes_without_repeating_or_losing_epochs(tmp_path):
    demo_glas = CASES["glas"].make_demo(tmp_path / "demo")
    out = tmp_path / "out"
    common = ["--max_epochs", "6", "--val_interval", "1", "--image_size", "[96,96]", "--batch_size", "2"]
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        str(TRAIN_CONFIG),
        "--dataset_dir",
        str(demo_glas),
        "--output_dir",
        str(out),
        "--num_workers",
        "0",
        *common,
    ]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out / "models" / "checkpoint_epoch=2.pt").exists():
            assert first.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no epoch checkpoint within 300 s"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    assert not (out / "models" / "checkpoint_epoch=6.pt").exists()

    result = run_training(demo_glas, out, *common, "--resume", "true")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    resumed_from = int(re.search(r"resuming from \S+ \(epoch (\d+)\)", log).group(1))
    assert resumed_from >= 1
    epochs_run = [int(e) for e in re.findall(r"Epoch\[(\d+)\] Metrics -- train_loss", result.stdout)]
    assert epochs_run == list(range(resumed_from + 1, 7))  # every remaining epoch once, none repeated

    final = torch.load(out / "models" / "checkpoint_epoch=6.pt", map_location="cpu", weights_only=False)
    assert final["trainer"]["iteration"] == 6 * final["trainer"]["epoch_length"]  # ignite stores iterations
    assert {"model", "optimizer", "lr_scheduler", "best_metric"} <= set(final)
    assert final["best_metric"]["best_metric_epoch"] >= 1

    # a checkpoint written by an older config (no lr_scheduler) is refused before any epoch runs
    older = out / "models" / "checkpoint_epoch=7.pt"
    torch.save({k: v for k, v in final.items() if k != "lr_scheduler"}, older)
    result = run_training(demo_glas, out, *common, "--resume", "true")
    assert result.returncode != 0
    assert f"checkpoint {older} cannot resume this run: it has no lr_scheduler" in result.stdout + result.stderr
    assert "Epoch[" not in result.stdout


def run_torchrun(
    configs: list[Path], dataset_dir: Path, output_dir: Path, *overrides: str
) -> subprocess.CompletedProcess:
    """Train with torchrun, 2 CPU processes (gloo): one epoch at 64x64, batches of 2 per process."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        str([str(c) for c in configs]),
        "--dataset_dir",
        str(dataset_dir),
        "--output_dir",
        str(output_dir),
        "--num_workers",
        "0",
        *ONE_TINY_EPOCH,
        "--batch_size",
        "2",
        *overrides,
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_two_process_ddp_training_on_cpu(case, demo, tmp_path):
    """torchrun with 2 CPU processes (gloo): one epoch, rank 0 alone checkpoints, tracks and registers.

    ``--val_fraction 0.1`` leaves the GLaS demo one validation image for two processes (the real
    CVC-ClinicDB sample's case): the validation sampler pads instead of failing.
    """
    out = tmp_path / "out"
    result = run_torchrun(case.config("multi_gpu_train.json"), demo, out, "--val_fraction", "0.1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "models" / "model.pt").is_file()
    if case.name == "glas":
        assert len(json.loads((out / "datalist.json").read_text())["validation"]) == 1  # fewer than the processes
    state = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert not any(key.startswith("module.") for key in state)  # saved unwrapped: loads into the plain network
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(case.model_name).experiment_id])
    assert len(runs) == 1  # only rank 0 tracks
    assert client.get_model_version_by_alias(case.model_name, "candidate").run_id == runs[0].info.run_id


@pytest.mark.slow
def test_two_process_ddp_semi_supervised_training_on_cpu_and_resuming(tmp_path):
    """The issue's command, train + semi_train + multi_gpu_train, under torchrun with 2 CPU processes.

    Each process takes its own share of the unlabelled images (DistributedSampler), so both take the
    same number of steps; rank 0 alone tracks, writes the pseudo-label figure and registers; the
    teacher follows the unwrapped network, so every checkpoint loads into the plain network.
    """
    demo_glas = CASES["glas"].make_demo(tmp_path / "demo")
    out = tmp_path / "out"
    configs = CASES["glas"].config("semi_train.json", "multi_gpu_train.json")
    result = run_torchrun(configs, demo_glas, out, "--label_fraction", "0.25")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    splits = json.loads((out / "datalist.json").read_text())
    assert len(splits["train"]) == 2 and len(splits["unlabelled"]) == 6
    checkpoint = torch.load(out / "models" / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=False)
    # per process: 1 of the 2 labelled images (one batch) and 3 of the 6 unlabelled ones (two batches of 2)
    assert checkpoint["trainer"]["epoch_length"] == 2
    assert set(checkpoint["teacher"]) == set(checkpoint["model"])  # same names: the teacher copies the plain network
    assert not any(key.startswith("module.") for key in checkpoint["teacher"])
    state = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert set(state) == set(checkpoint["model"])

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("masksup-glas").experiment_id])  # rank 0 only
    for metric in ("val_mean_iou", "val_student_mean_iou", "train_loss_unsup", "train_confident_fraction"):
        assert metric in run.data.metrics, metric
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"figures/pseudo_labels_epoch_0001.png", "figures/validation_epoch_0001.png"} <= figures
    (version,) = client.search_model_versions("name = 'masksup-glas'")  # registered once, by rank 0
    assert version.run_id == run.info.run_id
    assert version.tags["selected_network"] in ("teacher", "student")

    # resume: the teacher, the selection and the unlabelled sampler pick up where the run stopped
    result = run_torchrun(configs, demo_glas, out, "--label_fraction", "0.25", "--max_epochs", "2", "--resume", "true")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming from" in result.stdout + result.stderr
    final = torch.load(out / "models" / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=False)
    assert final["trainer"]["iteration"] == 4 and final["best_metric"]["best_metric_epoch"] >= 1
    assert not torch.equal(
        final["teacher"]["model.0.conv.unit0.conv.weight"], checkpoint["teacher"]["model.0.conv.unit0.conv.weight"]
    )


@pytest.mark.slow
def test_a_network_changed_by_an_override_is_registered_as_trained(tmp_path):
    demo_glas = CASES["glas"].make_demo(tmp_path / "demo")
    out = tmp_path / "out"
    result = run_training(
        demo_glas,
        out,
        *ONE_TINY_EPOCH,
        "--network_def#channels",
        "[8,16,32,64,128]",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    model = load_model("models:/masksup-glas@candidate", tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    trained = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in trained.items()}
    default = build_network(network_definition(TRAIN_CONFIG))  # channels 16..256
    assert sum(v.numel() for v in model.state_dict().values()) < sum(v.numel() for v in default.state_dict().values())
