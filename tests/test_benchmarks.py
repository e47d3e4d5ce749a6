"""Smoke tests of the benchmark scripts: ``report.replace_block`` and ``speed.py`` end to end at toy size."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import speed
from report import replace_block

SPEED_MEASURES = (
    "masksup_over_plain_step",
    "masking_share",
    "mask_batch_share",
    "inference_masksup_over_plain",
    "flops_fraction_of_peak",
    "peak_memory_mib",
)


def _block(text: str, name: str) -> str:
    """Body between the markers of block ``name`` (exactly one such block must exist)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1, text
    return text.split(begin, 1)[1].split(end, 1)[0].strip()


def test_replace_block_replaces_existing_block_and_keeps_surrounding_text(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nintro\n\n<!-- speed:begin -->\nold figures\n<!-- speed:end -->\n\noutro\n")
    replace_block(md, "speed", "new figures\n")
    text = md.read_text()
    assert _block(text, "speed") == "new figures"
    assert "old figures" not in text
    assert text.startswith("# Results\n\nintro\n\n<!-- speed:begin -->")
    assert text.endswith("<!-- speed:end -->\n\noutro\n")


def test_replace_block_appends_when_absent_and_leaves_other_blocks(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\n<!-- ablation:begin -->\nablation table\n<!-- ablation:end -->\n")
    replace_block(md, "speed", "speed table")
    text = md.read_text()
    assert _block(text, "ablation") == "ablation table"
    assert _block(text, "speed") == "speed table"
    assert text.index("ablation:end") < text.index("speed:begin")


def test_replace_block_creates_missing_file(tmp_path):
    md = tmp_path / "new.md"
    replace_block(md, "speed", "first")
    replace_block(md, "speed", "second")
    assert md.read_text() == "<!-- speed:begin -->\nsecond\n<!-- speed:end -->\n"


@pytest.mark.slow  # about 30-60 s: most of it the memory measurement's fresh interpreter
def test_speed_benchmark_smoke(tmp_path, capsys):
    out, md = tmp_path / "speed.json", tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nhand-written notes\n")
    argv = ["--image-size", "32", "32", "--batch-size", "2", "--rounds", "2", "--device", "cpu",
            "--matmul-size", "128", "--output", str(out), "--markdown", str(md)]
    speed.main(argv)

    data = json.loads(out.read_text())
    assert set(data["measures"]) == set(SPEED_MEASURES)
    for key in SPEED_MEASURES:
        value = data["measures"][key]["value"]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert data["settings"]["image_size"] == [32, 32] and data["settings"]["batch_size"] == 2
    assert data["settings"]["device"] == "cpu"
    assert all(len(times) == 2 for times in data["details"]["train_seconds"].values())
    memory = data["details"]["memory"]
    assert 0 < memory["rss_before_training_mib"] <= memory["rss_peak_mib"] == data["measures"]["peak_memory_mib"]["value"]
    flops = data["details"]["step_flops"]
    assert flops["masksup"] == 2 * flops["plain"] > 0  # two passes of the same network, same batch
    assert data["machine"]["cpu_count"] >= 1
    assert data["command"].startswith("python benchmarks/speed.py --image-size 32 32")

    text = md.read_text()
    assert text.startswith("# Results\n\nhand-written notes\n")
    block = _block(text, "speed")
    assert "| measure | value | goal | met |" in block
    for key in SPEED_MEASURES:
        assert data["measures"][key]["label"] in block
    assert f"`{data['command']}`" in block
    assert "MaskSup training step / plain step" in capsys.readouterr().out
