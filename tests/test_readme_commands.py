"""The README's own commands run as written on demo data: set up aside, then train, evaluate and infer.

The quickstart line and the evaluate / predict block are read from README.md itself, so the test
fails when the README changes into something that does not run. The set-up part of the quickstart
(venv, pip) is what CI itself does; the commands after it run from a scratch folder holding a link
to ``bundles/``, as in a fresh clone.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def shell_blocks(text: str) -> list[str]:
    """The contents of the README's ```bash blocks, continuation lines joined."""
    return [block.replace("\\\n", " ") for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)]


def readme_commands() -> dict[str, list[str]]:
    """``{"demo", "training", "evaluating", "inferring"}``: the first README command of each kind."""
    found: dict[str, list[str]] = {}
    for block in shell_blocks(README.read_text()):
        for line in block.splitlines():
            for command in line.split(" && "):
                words = shlex.split(command, comments=True)
                if words[:3] == ["masksup-med", "data", "demo"]:
                    found.setdefault("demo", words)
                elif words[:4] == ["python", "-m", "monai.bundle", "run"]:
                    found.setdefault(words[4], words)
    return found


def as_run_here(words: list[str]) -> list[str]:
    """The command with this interpreter for ``python`` and ``masksup-med``."""
    if words[0] == "masksup-med":
        return [sys.executable, "-m", "masksup_med", *words[1:]]
    return [sys.executable, *words[1:]]


def test_the_readme_has_the_commands_a_newcomer_runs():
    assert {"demo", "training", "evaluating", "inferring"} <= set(readme_commands())


@pytest.mark.slow
def test_readme_demo_train_evaluate_and_infer_run_as_written(tmp_path):
    (tmp_path / "bundles").symlink_to(REPO / "bundles")
    commands = readme_commands()
    for kind in ("demo", "training", "evaluating", "inferring"):
        result = subprocess.run(
            as_run_here(commands[kind]), cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False
        )
        assert result.returncode == 0, (
            f"{kind}: {shlex.join(commands[kind])}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    out = tmp_path / "outputs" / "glas"
    assert (out / "models" / "model.pt").is_file()
    assert (out / "eval" / "test" / "summary.json").is_file() or any((out / "eval").rglob("summary.json"))
    inputs = sorted((tmp_path / "data" / "demo" / "glas").glob("*.bmp"))
    masks = list((out / "predictions").rglob("*"))
    assert len([m for m in masks if m.is_file() and "overlay" not in m.name]) >= len(inputs)
