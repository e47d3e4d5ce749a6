"""A kill never costs a trained model, a SIGTERM stops a run with a checkpoint to resume from, and a resumed
run continues its MLflow run and keeps no more epoch checkpoints than asked for."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser

from masksup_med.data import make_glas_demo
from masksup_med.errors import OutputDirError, UnreadableFileError
from masksup_med.run.output_dir import claim, release_lock
from masksup_med.tracking.registry import load_checkpoint
from masksup_med.tracking.run import RunTrackingHandler

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "bundles" / "glas" / "configs" / "train.json"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def validated(score: float, epoch: int) -> Engine:
    """An evaluator that has just scored ``score`` (what the best-model saver reads)."""
    evaluator = Engine(lambda engine, batch: None)
    evaluator.state.metrics, evaluator.state.key_metric_name = {"val_mean_iou": score}, "val_mean_iou"
    evaluator.state.epoch, evaluator.state.iteration = epoch, epoch
    return evaluator


@pytest.mark.parametrize("killed_in", ["torch.save", "os.replace"])
def test_a_kill_while_the_best_model_is_written_leaves_the_previous_one(tmp_path, monkeypatch, killed_in):
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser.update({"output_dir": str(tmp_path), "device": "cpu"})
    saver, network = parser.get_parsed_content("validate#checkpoint_saver"), parser.get_parsed_content("network")
    model = tmp_path / "models" / "model.pt"
    saver.metrics_completed(validated(0.5, 1))
    before = {k: v.clone() for k, v in network.state_dict().items()}
    with torch.no_grad():
        for p in network.parameters():
            p.add_(1.0)

    def save_cut_short(obj, f, *args, **kwargs):  # the process dies while writing: part of the file is there
        f.write(b"PK cut short") if hasattr(f, "write") else Path(f).write_bytes(b"PK cut short")
        raise KeyboardInterrupt

    def replace_never_reached(src, dst):  # the process dies after writing the file, before renaming it
        raise KeyboardInterrupt

    if killed_in == "torch.save":
        monkeypatch.setattr(torch, "save", save_cut_short)
    else:
        monkeypatch.setattr(os, "replace", replace_never_reached)
    with pytest.raises(KeyboardInterrupt):
        saver.metrics_completed(validated(0.7, 2))
    monkeypatch.undo()

    kept = torch.load(model, map_location="cpu", weights_only=True)
    assert all(torch.equal(kept[k], before[k]) for k in before)  # the previous best model, whole
    assert sorted(p.name for p in model.parent.iterdir()) == ["model.pt"]  # no temporary file left


def test_a_model_file_that_does_not_load_is_named_with_what_to_do(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    model = models / "model.pt"
    torch.save({"w": torch.ones(1000)}, model)
    model.write_bytes(model.read_bytes()[:600])  # cut short by a kill, as the in-place write left it
    with pytest.raises(OutputDirError, match=r"holds a model file that does not load: .*model\.pt .*--overwrite true"):
        claim(tmp_path, None, best_model_file=model)
    with pytest.raises(UnreadableFileError, match=rf"checkpoint {model} does not load \("):
        load_checkpoint(torch.nn.Linear(2, 2), model)

    debris = models / f".model.pt.{dead_pid()}.0123abcd.tmp"  # a run killed (SIGKILL) between write and rename
    debris.write_bytes(b"partial")
    mine = models / f".model.pt.{os.getpid()}.0123abcd.tmp"  # a live process's is left alone
    mine.write_bytes(b"partial")
    release_lock(claim(tmp_path, None, best_model_file=model, overwrite=True))
    assert not debris.exists() and mine.exists()


def _tracked_run(uri: str, run_file: Path, resuming: bool, epochs: int, fail: bool = False) -> RunTrackingHandler:
    """An engine tracked by RunTrackingHandler (as the bundles' trainer is) run for ``epochs`` epochs."""
    trainer = Engine(lambda engine, batch: {"loss": 1.0})
    name = f"run-{time.monotonic_ns()}"  # each start names its run anew, as the bundles do
    tracking = RunTrackingHandler(
        uri, "resume", name, {"max_epochs": str(epochs)}, run_file=run_file, resuming=resuming
    )
    tracking.attach(trainer)
    trainer.set_data([0, 1])
    trainer.state.max_epochs, trainer.state.epoch_length = epochs, 2
    if fail:  # killed outright after its first epoch: the run is left RUNNING
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: engine.terminate(skip_completed=True))
    tracking.run(trainer)
    return tracking


def test_a_resumed_run_continues_its_mlflow_run_and_a_fresh_one_ends_a_stale_one(tmp_path):
    uri, run_file = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "models" / "mlflow_run.json"
    client = mlflow.MlflowClient(tracking_uri=uri)
    first = _tracked_run(uri, run_file, resuming=False, epochs=2, fail=True)
    run_id = json.loads(run_file.read_text())["run_id"]
    assert client.get_run(run_id).info.status == "RUNNING"

    resumed = _tracked_run(uri, run_file, resuming=True, epochs=3)
    assert resumed.where["run_name"] == first.where["run_name"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["max_epochs"] == "2"
    assert run.data.tags["resumed_max_epochs"] == "3"  # the changed value, next to the one the run started with
    assert len(client.search_runs([run.info.experiment_id])) == 1

    client.set_terminated(run_id, "RUNNING")  # as a kill leaves it
    _tracked_run(uri, run_file, resuming=False, epochs=1)  # a fresh run into the folder
    assert client.get_run(run_id).info.status == "KILLED"
    assert json.loads(run_file.read_text())["run_id"] != run_id


def _command(demo: Path, out: Path, *extra: str, workers: int = 0) -> list[str]:
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        str(TRAIN),
        "--dataset_dir",
        str(demo),
        "--output_dir",
        str(out),
        "--num_workers",
        str(workers),
        "--image_size",
        "[32,32]",
        "--batch_size",
        "1",
        "--max_epochs",
        "4",
        "--val_interval",
        "1",
        *extra,
    ]


def _logged_iterations(out: Path) -> int:
    """The last training iteration the run in ``out`` has logged to its MLflow store (0 before any)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{out / 'mlflow.db'}?mode=ro", uri=True)) as db:
            (step,) = db.execute("SELECT MAX(step) FROM metrics WHERE key = 'loss'").fetchone()
    except sqlite3.Error:  # no store or no table yet
        return 0
    return step or 0


def _start_and_stop(command: list[str], ready: Callable[[], bool], how: int, group: bool = False) -> subprocess.Popen:
    """Start ``command``, send it ``how`` (to its whole process group with ``group``, as torchrun and SLURM
    do) as soon as ``ready()``, and wait for it to end."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=group
    )
    try:
        deadline = time.monotonic() + 300
        while not ready():
            assert proc.poll() is None, "training ended before it could be stopped: " + proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "not ready to be stopped within 300 s"
            time.sleep(0.05)
        if group:
            os.killpg(proc.pid, how)
        else:
            proc.send_signal(how)
        proc.stdout_text, proc.stderr_text = proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    return proc


@pytest.mark.slow
def test_sigterm_mid_epoch_then_two_resumes_continue_one_mlflow_run_with_two_checkpoints(tmp_path):
    demo = make_glas_demo(tmp_path / "demo", n_train=6, n_test_a=1, n_test_b=1, size=(40, 32))  # 5 iterations
    out, models = tmp_path / "out", tmp_path / "out" / "models"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")

    # SIGTERM in epoch 2, to the trainer and its DataLoader workers: the run stops after the iteration under
    # way, saves it, is marked KILLED, exits 143
    first = _command(demo, out, workers=2)
    in_epoch_2 = lambda: (models / "checkpoint_epoch=1.pt").exists() and _logged_iterations(out) >= 6  # noqa: E731
    stopped = _start_and_stop(first, in_epoch_2, signal.SIGTERM, group=True)
    assert stopped.returncode == 143, stopped.stderr_text[-3000:]
    last_line = stopped.stderr_text.strip().splitlines()[-1]
    assert last_line.startswith("masksup-med: training stopped by SIGTERM in epoch 2 after iteration "), last_line
    assert f"its state is in {models / 'checkpoint_epoch=2.pt'}" in last_line and "--resume true" in last_line
    trainer = torch.load(models / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=True)["trainer"]
    assert 5 < trainer["iteration"] < 10 and trainer["epoch_length"] == 5  # mid-epoch 2
    (run,) = client.search_runs([client.get_experiment_by_name("masksup-glas").experiment_id])
    assert run.info.status == "KILLED" and f"MLflow run {run.info.run_id} marked KILLED" in last_line

    # the first resume finishes epoch 2 and is killed outright (SIGKILL) once epoch 3 is saved
    epoch_3_saved = (models / "checkpoint_epoch=3.pt").exists
    killed = _start_and_stop(_command(demo, out, "--resume", "true"), epoch_3_saved, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert "epoch 2 stopped after iteration" in killed.stderr_text + killed.stdout_text

    # the second resume completes: the same MLflow run, FINISHED, each epoch once; two epoch checkpoints
    result = subprocess.run(
        _command(demo, out, "--resume", "true"), cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (finished,) = client.search_runs([client.get_experiment_by_name("masksup-glas").experiment_id])
    assert finished.info.run_id == run.info.run_id and finished.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3, 4]
    assert json.loads((models / "mlflow_run.json").read_text())["run_id"] == run.info.run_id
    assert sorted(p.name for p in models.glob("*checkpoint_epoch=*")) == [
        "checkpoint_epoch=3.pt",
        "checkpoint_epoch=4.pt",
    ]
    final = torch.load(models / "checkpoint_epoch=4.pt", map_location="cpu", weights_only=True)["trainer"]
    assert final["iteration"] == 4 * 5
    assert not list(models.glob(".*.tmp"))
