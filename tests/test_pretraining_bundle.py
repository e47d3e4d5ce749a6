"""pretrain.json end to end with its defaults (random tiles, encoder masking, normalised targets, a step budget),
then fine-tuning through finetune.json; a selective-masking pretraining killed outright resumes and finishes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from masksup_med.data import make_glas_demo

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "glas" / "configs"


def _command(demo: Path, out: Path, *configs: str, extra: tuple[str, ...] = ()) -> list[str]:
    files = [str(CONFIGS / name) for name in ("train.json", *configs)]
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        str(files) if configs else files[0],
        "--dataset_dir",
        str(demo),
        "--output_dir",
        str(out),
        "--image_size",
        "[64,64]",
        "--batch_size",
        "2",
        "--val_interval",
        "1",
        *extra,
    ]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)


PRETRAIN_BUDGET = ("--pretrain_steps", "4", "--pretrain_rounds", "2", "--selective_score_passes", "2")


@pytest.mark.slow
def test_pretraining_with_its_defaults_then_fine_tuning_from_it_with_finetune_defaults(tmp_path):
    demo = make_glas_demo(tmp_path / "demo", n_train=8, n_test_a=1, n_test_b=1, size=(80, 64))
    pre_out, out = tmp_path / "pretrain", tmp_path / "train"
    result = _run(_command(demo, pre_out, "pretrain.json", extra=(*PRETRAIN_BUDGET, "--num_workers", "1")))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "train_loss_l1" in log and "train_loss_ssim" in log
    # random tiles (the default, as measured): every round on every image, no fixed masks
    assert re.search(r"pretraining round 1 of 2: 0 images with fixed masks; 0 of 4 images", log), log[-3000:]
    assert re.search(r"pretraining round 2 of 2: 0 images with fixed masks; 0 of 4 images", log), log[-3000:]
    pretrained = pre_out / "models" / "pretrained.pt"
    state = torch.load(pretrained, map_location="cpu", weights_only=True)
    assert any(v.shape[0] == 3 for k, v in state.items() if k.endswith("weight"))  # an image-channel head
    splits = json.loads((pre_out / "datalist.json").read_text())
    assert set(splits) == {"train"} and all("label" not in item for item in splits["train"])
    result = _run(
        _command(
            demo,
            out,
            "finetune.json",
            extra=("--max_epochs", "1", "--pretrained_weights", str(pretrained)),
        )
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert f"pretrained weights from {pretrained}" in log
    # finetune.json's defaults, as measured (benchmarks/pretrain.py): the whole network, no warm-up, no slower encoder
    assert "from pretrained weights: whole transferred (0 decoder layers re-initialised)" in log, log[-3000:]
    assert re.search(r"BatchNorm statistics from 0 batches of unmasked images, warm-up 0 of \d+ iterations", log)
    # no held-out image of the fine-tuning dataset was pretrained on
    training_splits = json.loads((out / "datalist.json").read_text())
    held_out = {item["image"] for name, items in training_splits.items() if name != "train" for item in items}
    assert held_out and not held_out & {item["image"] for item in splits["train"]}


@pytest.mark.slow
def test_a_pretraining_killed_outright_resumes_from_its_last_round(tmp_path):
    demo = make_glas_demo(tmp_path / "demo", n_train=8, n_test_a=1, n_test_b=1, size=(80, 64))
    out = tmp_path / "pretrain"
    budget = ("--pretrain_steps", "12", "--pretrain_rounds", "3", "--selective_score_passes", "1")
    selective = ("--pretrain_masking", "selective", "--num_workers", "1")  # its masks reach the loader's worker
    command = _command(demo, out, "pretrain.json", extra=(*budget, *selective))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while not list((out / "models").glob("*checkpoint_epoch=1.pt")):
            assert proc.poll() is None, "pretraining ended before it could be killed: " + proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no round checkpoint within 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "models" / "pretrained.pt").exists()
    result = _run([*command, "--resume", "true"])
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "pretraining round 1 of 3" not in log  # round 1 was not trained again
    # the resumed round 3's images all carry the fixed masks its start chose, through the worker
    round_3 = re.search(r"pretraining round 3 of 3: (\d+) images with fixed masks; (\d+) of (\d+) images", log)
    assert round_3 and int(round_3[1]) > 0 and round_3[2] == round_3[3] != "0", log[-3000:]
    assert (out / "models" / "pretrained.pt").is_file()
