"""A run that cannot start ends with the project's message: the last line of stderr says what is wrong.

Each case runs a bundle (or the ``masksup-med`` command) as a user does, makes one thing wrong, and
checks the exit code, that the last line of stderr is ``error: ...`` with the project's message (not
MONAI's ``Failed to evaluate ConfigExpression``), and that nothing was written to the output folder.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from masksup_med.data import make_glas_demo
from masksup_med.run.output_dir import LOCK_NAME

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "glas" / "configs"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_glas_demo(tmp_path_factory.mktemp("demo") / "glas", n_train=6, n_test_a=1, n_test_b=1, size=(64, 48))


def bundle_run(
    run_id: str, configs: list[str], *overrides: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    config_file = str(CONFIGS / configs[0]) if len(configs) == 1 else str([str(CONFIGS / c) for c in configs])
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        run_id,
        "--config_file",
        config_file,
        "--num_workers",
        "0",
        "--image_size",
        "[64,64]",
        "--max_epochs",
        "1",
        *overrides,
    ]
    inherited = {k: v for k, v in os.environ.items() if k != "MASKSUP_MED_TRACEBACK"}
    env = {**inherited, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env, check=False)


def train(dataset_dir: Path, output_dir: Path, *overrides: str, **kwargs) -> subprocess.CompletedProcess:
    return bundle_run(
        "training",
        ["train.json"],
        "--dataset_dir",
        str(dataset_dir),
        "--output_dir",
        str(output_dir),
        *overrides,
        **kwargs,
    )


def error_block(result: subprocess.CompletedProcess) -> str:
    """The report that ends stderr: from its last ``error: `` line to the end."""
    stderr = result.stderr.rstrip()
    start = stderr.rfind("\nerror: ") + 1 if "\nerror: " in stderr else (0 if stderr.startswith("error: ") else -1)
    assert start >= 0, f"stderr does not end with an error report:\n{stderr[-3000:]}"
    return stderr[start:]


def assert_stopped_with(result: subprocess.CompletedProcess, *phrases: str) -> str:
    """The run failed, and the last lines of stderr are the project's report holding ``phrases``."""
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    block = error_block(result)
    for phrase in phrases:
        assert phrase in block, block
    assert "Failed to evaluate ConfigExpression" not in result.stderr
    assert "Traceback" not in result.stderr
    return block


def written(output_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob("*")) if output_dir.exists() else []


def test_missing_dataset_dir(tmp_path):
    result = train(tmp_path / "nowhere", tmp_path / "out")
    assert_stopped_with(result, f"GLaS dataset folder {tmp_path / 'nowhere'} does not exist", "masksup-med data demo")
    assert written(tmp_path / "out") == []


def test_misspelt_override_names_the_key_and_the_id_meant(demo, tmp_path):
    result = train(demo, tmp_path / "out", "--max_epoch", "3")
    assert_stopped_with(result, "unknown override --max_epoch", "did you mean --max_epochs?")
    assert written(tmp_path / "out") == []


def test_image_size_the_network_cannot_take(demo, tmp_path):
    result = train(demo, tmp_path / "out", "--image_size", "[60,60]")
    assert_stopped_with(result, "image_size [60, 60] does not suit UNet", '--image_size "[64, 64]"')


def test_unreachable_tracking_server(demo, tmp_path):
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = train(demo, tmp_path / "out", env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    assert_stopped_with(result, f"MLflow tracking server http://127.0.0.1:{port} is not reachable")
    assert written(tmp_path / "out") == []


def test_output_dir_that_cannot_be_written(demo, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = train(demo, blocker / "out")
    assert_stopped_with(result, f"output_dir {blocker / 'out'} cannot be written")


def test_output_dir_in_use_by_a_live_run(demo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": "now", "command": "pytest"}
    (out / LOCK_NAME).write_text(json.dumps(holder))
    result = train(demo, out)
    assert_stopped_with(result, f"output_dir {out} is in use by another run (pid {os.getpid()}")
    assert written(out) == [LOCK_NAME]
    assert json.loads((out / LOCK_NAME).read_text()) == holder  # the holder's lock is untouched


def test_resume_with_no_checkpoint_stops_instead_of_starting_over(demo, tmp_path):
    result = train(demo, tmp_path / "out", "--resume", "true")
    assert_stopped_with(
        result, "--resume true, but", "holds no usable epoch checkpoint (none found)", "run without --resume true"
    )
    assert not (tmp_path / "out" / "models" / "model.pt").exists()


def test_planted_pickle_checkpoint_is_refused_and_its_code_never_runs(demo, tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "pwned"))

    models = tmp_path / "out" / "models"
    models.mkdir(parents=True)
    with open(models / "checkpoint_epoch=99.pt", "wb") as f:
        pickle.dump({"model": Payload()}, f)
    result = train(demo, tmp_path / "out", "--resume", "true")
    assert_stopped_with(result, "holds no usable epoch checkpoint (unreadable: checkpoint_epoch=99.pt")
    assert not marker.exists()


def test_fresh_run_does_not_replace_an_earlier_model_unasked(demo, tmp_path):
    models = tmp_path / "out" / "models"
    models.mkdir(parents=True)
    torch.save({"weights": torch.zeros(1)}, models / "model.pt")
    before = (models / "model.pt").read_bytes()
    result = train(demo, tmp_path / "out")
    assert_stopped_with(result, "already holds a trained model", "--overwrite true")
    assert (models / "model.pt").read_bytes() == before


def test_broken_training_files_are_all_named_before_anything_is_written(demo, tmp_path):
    broken = tmp_path / "glas"
    broken.mkdir()
    for f in demo.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "train_1.bmp").write_bytes(b"")
    Image.open(broken / "train_2.bmp").convert("RGBA").save(broken / "train_2.png")
    (broken / "train_2.bmp").unlink()
    Image.open(broken / "train_3_anno.bmp").resize((20, 10)).save(broken / "train_3_anno.bmp")
    result = train(broken, tmp_path / "out")
    block = assert_stopped_with(result, "Fix or remove these files")
    assert block.splitlines()[-1].startswith("Fix or remove these files")
    assert "the training data has 3 problem(s)" in block
    assert f"{broken / 'train_1.bmp'}: empty file" in block
    assert f"{broken / 'train_2.png'}: image is RGBA 8-bit" in block
    assert f"{broken / 'train_3_anno.bmp'}: label is 10x20 but its image train_3.bmp is 48x64" in block
    assert written(tmp_path / "out") == []


def test_label_fraction_that_labels_nothing(demo, tmp_path):
    result = bundle_run(
        "training",
        ["train.json", "semi_train.json"],
        "--dataset_dir",
        str(demo),
        "--output_dir",
        str(tmp_path / "out"),
        "--label_fraction",
        "0",
    )
    assert_stopped_with(result, "label_fraction must be a number in (0, 1], got 0")


def test_semi_supervised_setting_the_trainer_refuses_ends_on_its_own_message(demo, tmp_path):
    out = tmp_path / "out"
    args = ["--dataset_dir", str(demo), "--output_dir", str(out), "--pseudo_label_source", "nonsense"]
    result = bundle_run("training", ["train.json", "semi_train.json"], *args)
    assert_stopped_with(result, "pseudo_label_source must be one of ('online', 'teacher'), got 'nonsense'")
    assert not out.exists() or not any(out.iterdir())  # stopped before the output folder was claimed


def test_pretrained_weights_that_fit_no_layer(demo, tmp_path):
    weights = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3)}, weights)
    result = train(demo, tmp_path / "out", "--pretrained_weights", str(weights))
    assert_stopped_with(result, f"pretrained_weights {weights} matches no weight of UNet")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_on_a_machine_without_cuda(demo, tmp_path):
    result = train(demo, tmp_path / "out", "--device", "cuda")
    assert_stopped_with(result, "'cuda' was requested but CUDA is not available")


def test_evaluate_with_a_misspelt_override(demo, tmp_path):
    result = bundle_run(
        "evaluating",
        ["train.json", "evaluate.json"],
        "--dataset_dir",
        str(demo),
        "--output_dir",
        str(tmp_path / "out"),
        "--model_sorce",
        "x.pt",
    )
    assert_stopped_with(result, "unknown override --model_sorce", "did you mean --model_source?")


def test_masksup_med_train_command_ends_with_the_same_message(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "masksup_med",
        "train",
        "glas",
        "--dataset_dir",
        str(tmp_path / "nowhere"),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert_stopped_with(result, "does not exist")


def test_masksup_med_data_check_names_a_missing_folder_on_its_last_line(tmp_path):
    cmd = [sys.executable, "-m", "masksup_med", "data", "check", "glas", str(tmp_path / "nowhere")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert result.stderr.splitlines()[-1].startswith(
        f"problem: GLaS dataset folder {tmp_path / 'nowhere'} does not exist"
    )
    assert result.stdout.splitlines()[-1].startswith("FAILED: 1 problem(s)")
    assert "Traceback" not in result.stderr


def test_full_traceback_on_request(tmp_path):
    result = train(tmp_path / "nowhere", tmp_path / "out", env={"MASKSUP_MED_TRACEBACK": "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "does not exist" in result.stderr


def test_the_saved_traceback_is_named_and_holds_the_chain(tmp_path):
    cache = tmp_path / "cache"
    result = train(tmp_path / "nowhere", tmp_path / "out", env={"MASKSUP_MED_CACHE_DIR": str(cache)})
    saved = Path(result.stderr.split("full traceback in ")[1].split(";")[0])
    assert saved.parent == cache / "error-reports"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600 and stat.S_IMODE(saved.parent.stat().st_mode) == 0o700
    text = saved.read_text()
    assert "Traceback" in text and "DatasetNotFoundError" in text


@pytest.mark.parametrize(
    ("override", "value", "message"),
    [
        ("--batch_size", "0", "batch_size must be a whole number >= 1, got 0"),
        ("--learning_rate", "-1", "learning_rate must be a number > 0, got -1"),
        ("--val_fraction", "1.5", "val_fraction must be a number between 0 and 1 (both excluded), got 1.5"),
    ],
)
def test_numeric_option_out_of_range_is_refused_before_anything_is_written(demo, tmp_path, override, value, message):
    result = train(demo, tmp_path / "out", override, value)
    assert_stopped_with(result, message, f"e.g. {override}")
    assert written(tmp_path / "out") == []
