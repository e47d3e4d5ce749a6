"""Test-set evaluation report: per-image IoU, Dice and HD95 at network and native resolution.

mIoU is the paper's definition: foreground IoU of each image (threshold 0.5), averaged over images.
The report writes ``per_image.csv`` and ``summary.json``, prints a table, and, when the evaluated model
came from the MLflow registry, records the summary as tags of that model version. Where the images come
from video sequences (CVC-ClinicDB), it also summarises each sequence and draws ``per_sequence.png``.
Each file is written whole or not at all (to a temporary name in its folder, then renamed).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

from masksup_med.data.splits import natural_key
from masksup_med.run.files import atomic_path
from masksup_med.tracking.figures import per_group_figure

__all__ = ["SegmentationReportHandler", "format_table", "image_scores", "registered_version", "summarize"]

logger = logging.getLogger(__name__)

METRICS = ("iou", "dice", "hd95")


def image_scores(pred: torch.Tensor, label: torch.Tensor) -> dict[str, float]:
    """Foreground IoU, Dice and 95th-percentile Hausdorff distance (pixels) of one ``1, *spatial`` mask pair.

    An image where both masks are empty scores IoU = Dice = 1 and HD95 = 0; HD95 is NaN when exactly
    one of them is empty.
    """
    p = torch.as_tensor(pred).detach().float().cpu()[None] > 0.5
    y = torch.as_tensor(label).detach().float().cpu()[None] > 0.5
    if p.shape != y.shape:
        raise ValueError(f"prediction {tuple(p.shape[1:])} and label {tuple(y.shape[1:])} differ in shape")
    if not p.any() and not y.any():
        return {"iou": 1.0, "dice": 1.0, "hd95": 0.0}
    p, y = p.float(), y.float()
    iou = float(compute_iou(p, y, include_background=True, ignore_empty=False))
    dice = float(compute_dice(p, y, include_background=True, ignore_empty=False))
    hd95 = (
        float(compute_hausdorff_distance(p, y, include_background=True, percentile=95))
        if p.any() and y.any()
        else math.nan
    )
    return {"iou": iou, "dice": dice, "hd95": hd95}


def summarize(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation of each column over rows (NaNs ignored) and the row count."""
    summary: dict[str, dict[str, float]] = {}
    for column in columns:
        values = np.array([float(r[column]) for r in rows], dtype=float)
        finite = values[np.isfinite(values)]
        summary[column] = {
            "mean": float(finite.mean()) if finite.size else math.nan,
            "std": float(finite.std()) if finite.size else math.nan,
            "n": int(finite.size),
        }
    return summary


def format_table(summaries: Mapping[str, Mapping[str, Mapping[str, float]]], columns: Sequence[str]) -> str:
    """A plain-text table: one line per group, ``mean ± std`` per column."""
    width = max([10, *(len(group) for group in summaries)])
    header = f"{'split':<{width}} {'images':>6}  " + "  ".join(f"{c:>17}" for c in columns)
    lines = [header, "-" * len(header)]
    for group, summary in summaries.items():
        n = max((s["n"] for s in summary.values()), default=0)
        cells = "  ".join(f"{summary[c]['mean']:>8.4f} ± {summary[c]['std']:<6.4f}" for c in columns)
        lines.append(f"{group:<{width}} {n:>6}  {cells}")
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    """A batch value as a plain Python value (a collated 0-d tensor back to its number)."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value


def registered_version(model_source: str, tracking_uri: str | None) -> tuple[str, str] | None:
    """(name, version) for ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``; None for a file."""
    if not str(model_source).startswith("models:/"):
        return None
    ref = str(model_source)[len("models:/") :]
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, str(client.get_model_version_by_alias(name, alias).version)
    name, version = ref.rsplit("/", 1)
    return name, version


class SegmentationReportHandler:
    """Evaluator handler: score every image, then write the CSV / JSON report and print the table.

    Reads ``pred`` / ``label`` (network resolution) from the decollated output and
    ``pred_native`` / ``label_native`` (each image's own size, prediction inverted back) from the
    output and batch items; ``id`` and ``group_key`` (e.g. GLaS ``split``: testA / testB) come from the batch.

    Args:
        output_dir: where ``per_image.csv`` and ``summary.json`` go.
        split: name of the evaluated split (recorded in the summary and in tag names).
        model_source: checkpoint path or ``models:/…`` URI of the evaluated model.
        tracking_uri: MLflow store holding ``model_source`` when it is a registry URI.
        group_key: batch key giving each image's group, summarised separately (None: no groups).
        sequence_key: batch key giving each image's video sequence, where the dataset has them: each
            sequence is summarised in ``summary.json`` (``per_sequence``) and drawn in ``per_sequence.png``.
        dataset: name of the evaluated dataset (recorded in the summary). When a registered model was
            trained on another dataset (its version tag ``dataset``), its test tags are named
            ``test_<dataset>_<group>_<metric>``, so an evaluation on each dataset keeps its own.
        tta_flips: whether the evaluator averaged over flipped copies (test-time flips); recorded in the
            summary and the printed title, and a registered model's tags are then ``test_flips_…``.
    """

    def __init__(
        self,
        output_dir: str | Path,
        split: str,
        model_source: str | Path,
        tracking_uri: str | None = None,
        group_key: str | None = "split",
        sequence_key: str | None = "sequence",
        dataset: str | None = None,
        tta_flips: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.tta_flips = bool(tta_flips)
        self.split = split
        self.model_source = str(model_source)
        self.tracking_uri = tracking_uri
        self.group_key = group_key
        self.sequence_key = sequence_key
        self.dataset = dataset
        self.rows: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}

    def attach(self, engine: Engine) -> None:
        """Score at every iteration, report when the evaluation completes."""
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.score_batch)
        engine.add_event_handler(Events.COMPLETED, self.report)

    def score_batch(self, engine: Engine) -> None:
        """Score each image of the current (decollated) batch at both resolutions."""
        for item, out in zip(engine.state.batch, engine.state.output):
            native_label = out.get("label_native", item.get("label_native"))
            row: dict[str, Any] = {"id": item.get("id", f"image_{len(self.rows)}")}
            if self.group_key:
                row["group"] = _plain(item.get(self.group_key, self.split))
            if self.sequence_key and item.get(self.sequence_key) not in (None, ""):  # "": this image has none
                row["sequence"] = _plain(item[self.sequence_key])
            row.update(image_scores(out["pred"], out["label"]))
            row.update({f"{k}_native": v for k, v in image_scores(out["pred_native"], native_label).items()})
            row["native_size"] = "x".join(str(s) for s in tuple(native_label.shape[1:])[::-1])  # H x W
            self.rows.append(row)

    def report(self, engine: Engine | None = None) -> dict[str, Any]:
        """Write ``per_image.csv`` and ``summary.json``, print the table, tag the registered model."""
        columns = [*METRICS, *(f"{m}_native" for m in METRICS)]
        groups: dict[str, list[dict]] = {self.split: self.rows}
        if self.group_key:
            for name in sorted({r["group"] for r in self.rows}):
                if name != self.split:
                    groups[name] = [r for r in self.rows if r["group"] == name]
        summaries = {name: summarize(rows, columns) for name, rows in groups.items()}
        self.summary = {
            "dataset": self.dataset,
            "split": self.split,
            "model_source": self.model_source,
            "tta_flips": self.tta_flips,
            "images": len(self.rows),
            "summary": summaries,
        }
        sequences = sorted({r["sequence"] for r in self.rows if "sequence" in r}, key=lambda s: natural_key(str(s)))
        per_sequence = {
            f"sequence {s}": summarize([r for r in self.rows if r.get("sequence") == s], columns) for s in sequences
        }
        if per_sequence:
            self.summary["per_sequence"] = per_sequence

        self.output_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.output_dir / "per_image.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.rows[0]) if self.rows else ["id"])
            writer.writeheader()
            writer.writerows(self.rows)
        with atomic_path(self.output_dir / "summary.json") as tmp:
            tmp.write_text(json.dumps(self.summary, indent=2) + "\n", encoding="utf-8")
        table = format_table(summaries, columns)
        if per_sequence:
            table += "\n\n" + format_table(per_sequence, columns)
            fig = per_group_figure(
                per_sequence,
                ("iou_native", "dice_native"),
                f"{self.split}: each video sequence, at the images' own size",
            )
            with atomic_path(self.output_dir / "per_sequence.png") as tmp:
                fig.savefig(tmp, dpi=100, format="png")
            plt.close(fig)
        flips = " with test-time flips" if self.tta_flips else ""
        title = f"Evaluation of {self.model_source}{flips} on {self.split} (mean ± std over images)"
        print(f"\n{title}\n{table}\n", flush=True)
        logger.info(f"evaluation report written to {self.output_dir}")
        self._tag_registered_model(summaries)
        return self.summary

    def _tag_registered_model(self, summaries: Mapping[str, Mapping[str, Mapping[str, float]]]) -> None:
        version = registered_version(self.model_source, self.tracking_uri)
        if version is None:
            return
        name, number = version
        client = mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        trained_on = client.get_model_version(name, number).tags.get("dataset")
        prefix = "test_" if not self.dataset or trained_on in (None, self.dataset) else f"test_{self.dataset}_"
        prefix += "flips_" if self.tta_flips else ""  # a flipped evaluation keeps the plain one's tags
        for group, summary in summaries.items():
            for metric, stats in summary.items():
                client.set_model_version_tag(name, number, f"{prefix}{group}_{metric}", f"{stats['mean']:.4f}")
        logger.info(f"test metrics recorded on MLflow model {name} version {number}")
