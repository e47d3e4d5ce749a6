"""``benchmarks/tta.py`` end to end at toy size: an untrained Kvasir-SEG run on synthetic data, 32 x 32."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from masksup_med.data import make_kvasir_seg_demo
from masksup_med.tracking.model_format import build_network, network_definition

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import tta  # noqa: E402


@pytest.mark.slow  # two evaluations of one test image at toy size (about 30 s)
def test_tta_benchmark_scores_and_times_both_arms_and_writes_its_block(tmp_path):
    demo = make_kvasir_seg_demo(tmp_path / "demo", n_images=5, size=(48, 40))
    run = tmp_path / "run"
    torch.manual_seed(0)
    network = build_network(network_definition(REPO / "bundles" / "kvasir_seg" / "configs" / "train.json"))
    (run / "models").mkdir(parents=True)
    torch.save(network.state_dict(), run / "models" / "model.pt")
    out, md = tmp_path / "tta.json", tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nhand-written notes\n")
    argv = ["--output-dir", str(run), "--dataset-dir", str(demo), "--image-size", "32", "32"]
    argv += ["--images", "1", "--rounds", "2", "--num-workers", "0", "--output", str(out), "--markdown", str(md)]
    tta.main(argv)

    data = json.loads(out.read_text())
    assert set(data["arms"]) == {"plain", "flips"}
    for arm in data["arms"].values():
        assert arm["images"] == 1 and arm["model_source"] == str(run / "models" / "model.pt")
        assert all(0.0 <= arm["test"][m] <= 1.0 for m in ("iou", "dice", "iou_native", "dice_native"))
        assert math.isfinite(arm["images_per_second"]) and arm["images_per_second"] > 0
        assert len(arm["round_seconds"]) == 2
    assert "--tta_flips True" in data["arms"]["flips"]["command"]
    assert "--tta_flips False" in data["arms"]["plain"]["command"]
    summaries = {arm: json.loads((run / "eval-tta" / arm / "summary.json").read_text()) for arm in ("plain", "flips")}
    assert summaries["plain"]["images"] == summaries["flips"]["images"] == 1
    assert summaries["flips"]["tta_flips"] is True and summaries["plain"]["tta_flips"] is False
    text = md.read_text()
    assert text.startswith("# Results\n\nhand-written notes\n")
    block = text.split("<!-- tta:begin -->", 1)[1].split("<!-- tta:end -->", 1)[0]
    assert "| plain |" in block and "| flips |" in block and "images/s (CPU)" in block
    assert "python benchmarks/tta.py --output-dir" in block
