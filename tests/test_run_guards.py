"""What keeps a run from losing work: the output-folder lock, resume modes, override checks, the cached
training-data check, a failed run marked FAILED in MLflow, and ``data check``'s summary."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import mlflow
import monai.bundle.__main__ as bundle_main
import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.handlers import StatsHandler
from PIL import Image

from masksup_med.data import DatasetError, check_dataset, check_training_data, make_glas_demo, preflight, split_glas
from masksup_med.data.checks import CheckReport
from masksup_med.errors import ConfigError, OutputDirError
from masksup_med.run.output_dir import LOCK_NAME, acquire_lock, claim, release_lock
from masksup_med.run.overrides import check_overrides
from masksup_med.run.resume import latest_checkpoint, resume_mode
from masksup_med.tracking.run import RunTrackingHandler

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "bundles" / "glas" / "configs" / "train.json")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------- lock


def test_lock_names_its_holder_and_refuses_a_second_claim(tmp_path):
    lock = acquire_lock(tmp_path)
    holder = json.loads(lock.read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(OutputDirError, match=f"in use by another run \\(pid {os.getpid()}"):
        acquire_lock(tmp_path)
    release_lock(lock)
    assert not lock.exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING):
        lock = acquire_lock(tmp_path)
    assert "stale lock" in caplog.text
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    release_lock(lock)


def test_a_lock_held_on_another_host_is_not_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host": "another-host"}))
    with pytest.raises(OutputDirError, match="another-host"):
        acquire_lock(tmp_path)


def test_the_lock_goes_when_its_process_exits(tmp_path):
    code = f"from masksup_med.run.output_dir import acquire_lock; acquire_lock({str(tmp_path)!r}); print('held')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "held"
    assert not (tmp_path / LOCK_NAME).exists()


def test_release_leaves_another_processs_lock_alone(tmp_path):
    other = {"pid": os.getpid() + 1, "host": socket.gethostname()}
    (tmp_path / LOCK_NAME).write_text(json.dumps(other))
    release_lock(tmp_path / LOCK_NAME)
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == other


def test_claim_keeps_an_earlier_model_unless_resuming_or_overwriting(tmp_path):
    model = tmp_path / "models" / "model.pt"
    model.parent.mkdir()
    torch.save({"w": torch.ones(1)}, model)  # an earlier model that loads (one that does not: test_stop_and_resume)
    with pytest.raises(OutputDirError, match="already holds a trained model"):
        claim(tmp_path, None, best_model_file=model)
    assert not (tmp_path / LOCK_NAME).exists()  # refused: the lock is not kept
    for resume_from, overwrite in ((str(tmp_path / "checkpoint_epoch=1.pt"), False), (None, "true")):
        release_lock(claim(tmp_path, resume_from, best_model_file=model, overwrite=overwrite))
    with pytest.raises(ConfigError, match="overwrite must be true or false, got 'maybe'"):
        claim(tmp_path, None, best_model_file=model, overwrite="maybe")
    assert not (tmp_path / LOCK_NAME).exists()


# ----------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    ("value", "mode"),
    [(False, "never"), ("false", "never"), (True, "always"), ("true", "always"), ("auto", "auto"), ("AUTO", "auto")],
)
def test_resume_values(value, mode):
    assert resume_mode(value) == mode


def test_resume_value_that_means_nothing_is_refused():
    with pytest.raises(ConfigError, match="resume must be true, false or auto, got 'yes please'"):
        resume_mode("yes please")


def test_resume_auto_starts_fresh_and_true_stops_when_nothing_reads_back(tmp_path):
    assert latest_checkpoint(tmp_path, "auto") is None
    (tmp_path / "checkpoint_epoch=3.pt").write_bytes(b"cut short")
    assert latest_checkpoint(tmp_path, "auto") is None
    with pytest.raises(ConfigError, match=r"unreadable: checkpoint_epoch=3\.pt"):
        latest_checkpoint(tmp_path, "true")
    torch.save({"model": {"w": torch.ones(1)}}, tmp_path / "checkpoint_epoch=2.pt")
    assert latest_checkpoint(tmp_path, "true") == str(tmp_path / "checkpoint_epoch=2.pt")
    assert latest_checkpoint(tmp_path, "false") is None


# -------------------------------------------------------------------------------------- overrides


def bundle_argv(*args: str) -> list[str]:
    return [bundle_main.__file__, "run", "training", "--config_file", TRAIN, *args]


def test_known_ids_nested_ids_and_merge_keys_pass():
    checked = check_overrides(
        bundle_argv(
            "--max_epochs", "2", "--train#dataloader#num_workers=0", "--+recipe", "{}", "--logging_file", "x.conf"
        )
    )
    assert checked == ["max_epochs", "train#dataloader#num_workers", "+recipe"]


def test_unknown_ids_are_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"--leanring_rate \(did you mean --learning_rate\?\), --train#nope"):
        check_overrides(bundle_argv("--leanring_rate", "0.1", "--train#nope", "1"))


def test_other_programs_are_not_checked():
    assert check_overrides(["pytest", "--no_such_key", "1"]) == []


def test_ids_of_every_merged_config_count():
    semi = str(REPO / "bundles" / "glas" / "configs" / "semi_train.json")
    argv = [bundle_main.__file__, "run", "training", "--config_file", str([TRAIN, semi]), "--label_fraction", "0.5"]
    assert check_overrides(argv) == ["label_fraction"]
    with pytest.raises(ConfigError):
        check_overrides(bundle_argv("--label_fraction", "0.5"))  # train.json alone has no label_fraction


# ------------------------------------------------------------------------------ training data check


@pytest.fixture
def demo(tmp_path) -> Path:
    return make_glas_demo(tmp_path / "glas", n_train=6, n_test_a=1, n_test_b=1, size=(40, 32))


def test_data_check_is_cached_and_sees_a_changed_file(demo, tmp_path, caplog):
    cache = tmp_path / "cache.json"
    datalist = split_glas(demo)
    with caplog.at_level(logging.INFO):
        assert check_training_data(datalist, "glas", cache_file=cache) == 6
        assert check_training_data(datalist, "glas", cache_file=cache) == 6
    assert "(6 read, 0 unchanged" in caplog.text and "(0 read, 6 unchanged" in caplog.text
    assert len(json.loads(cache.read_text())) == 6

    changed = datalist["train"][0]["image"]
    Image.new("L", (40, 32)).save(changed, format="BMP")  # grey: refused
    with pytest.raises(DatasetError, match=f"{changed}: image is grey 8-bit") as error:
        check_training_data(datalist, "glas", cache_file=cache)
    assert "1 problem(s); nothing was trained or written" in str(error.value)


def test_data_check_of_unlabelled_images_reads_the_image_alone(demo, tmp_path):
    grey = tmp_path / "grey.png"
    Image.new("L", (8, 8)).save(grey)
    datalist = {"train": [], "unlabelled": [{"image": str(grey), "id": "u"}], "test": [{"image": "not checked"}]}
    with pytest.raises(DatasetError, match="grey.png: image is grey 8-bit"):
        check_training_data(datalist, "glas", cache_file=tmp_path / "cache.json")


# ---------------------------------------------------------------------------------- MLflow status


def test_a_run_that_fails_midway_is_marked_failed_in_mlflow(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def step(engine, batch):
        if engine.state.iteration == 2:
            raise RuntimeError("the second batch broke")
        return {"loss": 1.0}

    trainer = Engine(step)
    tracking = RunTrackingHandler(uri, "guards", "failing-run")
    tracking.attach(trainer)
    StatsHandler(iteration_log=False).attach(trainer)  # re-raises, as in the bundles
    trainer.set_data([0, 1, 2])
    trainer.state.max_epochs, trainer.state.epoch_length = 1, 3
    with pytest.raises(RuntimeError, match="second batch broke"):
        tracking.run(trainer)
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("guards").experiment_id])[0]
    assert run.info.run_name == "failing-run" and run.info.status == "FAILED"


# ------------------------------------------------------------------------------------ data check


def test_summary_of_many_sizes_fits_one_line():
    report = CheckReport("x", Path("."))
    report.images = Counter({f"{h}x{2 * h} RGB 8-bit": h % 7 + 1 for h in range(100, 400)})
    line = next(line for line in report.summary(0.5) if line.startswith("images"))
    assert line.startswith("images (H x W): 300 distinct, from 100x200 RGB 8-bit to 399x798 RGB 8-bit; most common:")
    assert line.count(";") == 5 and len(line) < 250


def test_files_whose_names_do_not_follow_the_naming_are_named_as_left_out(demo):
    for stem in ("train_1", "train_1_anno"):
        (demo / f"{stem}.bmp").rename(demo / f"{stem.replace('_1', ' 1')}.bmp")
    (demo / "train_2.bmp").rename(demo / "train_é2.bmp")
    (demo / "train_2_anno.bmp").rename(demo / "train_é2_anno.bmp")
    report = check_dataset("glas", demo)
    assert report.ok and report.pairs == 6
    left_out = sorted(w.split(":")[0] for w in report.warnings if ": left out: " in w)
    assert left_out == sorted(
        str(demo / n) for n in ("train 1.bmp", "train 1_anno.bmp", "train_é2.bmp", "train_é2_anno.bmp")
    )
    assert np.all([demo.joinpath(Path(p).name).exists() for p in left_out])


# ------------------------------------------------------------------------------------- inference


def test_inference_skips_and_lists_files_it_cannot_use_and_keeps_grey_ones(tmp_path, caplog):
    from masksup_med.inference import list_images

    Image.new("RGB", (16, 8)).save(tmp_path / "a_rgb.png")
    Image.new("L", (16, 8)).save(tmp_path / "b_grey.png")
    Image.fromarray(np.zeros((8, 16), np.uint16)).save(tmp_path / "b_grey16.png")  # kept: intensities normalised
    nib.save(nib.Nifti1Image(np.zeros((16, 8, 3), np.int16), np.eye(4)), tmp_path / "c_volume.nii.gz")
    (tmp_path / "d_empty.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        items = list_images(tmp_path)
    assert [Path(i["image"]).name for i in items] == ["a_rgb.png", "b_grey.png", "b_grey16.png"]
    assert "skipping 2 of 5 files" in caplog.text
    assert "c_volume.nii.gz: the NIfTI image is a volume of shape 16 x 8 x 3" in caplog.text
    assert "d_empty.jpg: empty file" in caplog.text


def test_a_changed_file_replaces_its_cache_entry_instead_of_adding_one(demo, tmp_path):
    cache = tmp_path / "cache.json"
    datalist = split_glas(demo)
    check_training_data(datalist, "glas", cache_file=cache)
    changed = Path(datalist["train"][0]["image"])
    Image.open(changed).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed, format="BMP")
    os.utime(changed, ns=(0, 0))
    check_training_data(datalist, "glas", cache_file=cache)
    assert len(json.loads(cache.read_text())) == 6


def test_cache_entries_of_another_cache_version_are_dropped(demo, tmp_path):
    cache = tmp_path / "cache.json"
    cache.write_text(json.dumps({"v1|glas|old.bmp|12|34": ["stale"], "unversioned": {}}))
    check_training_data(split_glas(demo), "glas", cache_file=cache)
    keys = list(json.loads(cache.read_text()))
    assert keys and all(key.startswith(f"v{preflight._CACHE_VERSION}|glas|") for key in keys)
