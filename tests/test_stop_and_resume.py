"""A kill never costs a trained model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser

from masksup_med.errors import OutputDirError, UnreadableFileError
from masksup_med.run.output_dir import claim, release_lock
from masksup_med.tracking.registry import load_checkpoint

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
