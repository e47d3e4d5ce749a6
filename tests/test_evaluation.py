"""The evaluation report: per-image rows, group and per-sequence summaries, the per-sequence figure."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest
import torch

from masksup_med.evaluation import SegmentationReportHandler


def _engine(sequences: list) -> SimpleNamespace:
    """One evaluated batch: image i predicts its 4 x 4 square exactly when i is even (IoU 1), else misses it."""
    batch, output = [], []
    for i, sequence in enumerate(sequences):
        label = torch.zeros(1, 8, 6)
        label[:, :4, :4] = 1
        pred = label.clone() if i % 2 == 0 else torch.zeros(1, 8, 6)
        item = {"id": f"frame{i}", "label_native": label}
        if sequence is not None:
            item["sequence"] = torch.tensor(sequence)  # as a batch decollates it
        batch.append(item)
        output.append({"pred": pred, "label": label, "pred_native": pred})
    return SimpleNamespace(state=SimpleNamespace(batch=batch, output=output))


def test_images_of_video_sequences_are_summarised_and_drawn_per_sequence(tmp_path, capsys):
    report = SegmentationReportHandler(tmp_path, "test", "model.pt")
    report.score_batch(_engine([3, 3, 7, 12]))
    summary = report.report()
    with open(tmp_path / "per_image.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["sequence"] for r in rows] == ["3", "3", "7", "12"] and rows[0]["native_size"] == "6x8"
    per_sequence = summary["per_sequence"]
    assert list(per_sequence) == ["sequence 3", "sequence 7", "sequence 12"]  # in the sequences' order
    assert per_sequence["sequence 3"]["iou"] == {"mean": 0.5, "std": 0.5, "n": 2}
    assert (
        per_sequence["sequence 7"]["iou_native"]["mean"] == 1.0 and per_sequence["sequence 12"]["dice"]["mean"] == 0.0
    )
    written = json.loads((tmp_path / "summary.json").read_text())["per_sequence"]
    assert list(written) == list(per_sequence) and written["sequence 3"]["iou"] == per_sequence["sequence 3"]["iou"]
    assert (tmp_path / "per_sequence.png").stat().st_size > 0
    assert "sequence 12" in capsys.readouterr().out  # in the printed table


@pytest.mark.parametrize("sequences", [[None, None], [1, None]], ids=["none", "unknown"])
def test_images_without_sequences_get_no_sequence_summary(tmp_path, sequences):
    report = SegmentationReportHandler(tmp_path, "test", "model.pt")
    report.score_batch(_engine(sequences))
    summary = report.report()
    assert ("per_sequence" in summary) == any(s is not None for s in sequences)
    assert (tmp_path / "per_sequence.png").exists() == any(s is not None for s in sequences)


@pytest.mark.parametrize("tta_flips", [False, True])
def test_the_report_says_whether_test_time_flips_were_used(tmp_path, capsys, tta_flips):
    report = SegmentationReportHandler(tmp_path, "test", "model.pt", tta_flips=tta_flips)
    report.score_batch(_engine([None, None]))
    report.report()
    assert json.loads((tmp_path / "summary.json").read_text())["tta_flips"] is tta_flips
    assert ("Evaluation of model.pt with test-time flips on test" in capsys.readouterr().out) is tta_flips
