"""Writing benchmark figures down: JSON files under ``benchmarks/results`` and generated blocks in Markdown.

A generated block sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in a Markdown file
(``benchmarks/RESULTS.md``; the bundles' docs hold no generated blocks); everything outside the
markers is hand-written and kept as it is.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

BENCHMARKS_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCHMARKS_DIR / "results"
RESULTS_MD = BENCHMARKS_DIR / "RESULTS.md"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def code_version() -> str:
    """The git commit the figures were measured with, ``+dirty`` when tracked code or configs were modified.

    Results and Markdown are left out of the check: a study appends to them while it runs.
    """

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=BENCHMARKS_DIR.parent, capture_output=True, text=True, check=False
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (
        "+dirty"
        if git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)*.md", ":(exclude)*/results/*")
        else ""
    )


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically (a kill never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as tmp:
        json.dump(data, tmp, indent=2)
        tmp.write("\n")
    os.chmod(tmp.name, 0o644)  # NamedTemporaryFile creates owner-only files; results are for everyone to read
    os.replace(tmp.name, path)


def replace_block(markdown_file: Path, name: str, body: str) -> None:
    """Replace the generated block ``name`` in ``markdown_file`` with ``body`` (appended when absent)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = markdown_file.read_text(encoding="utf-8") if markdown_file.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    markdown_file.write_text(text, encoding="utf-8")


def save_result(result: Any, output: Path, markdown: str, block: str, body: str, echo: bool = False) -> None:
    """Write a benchmark's ``result`` to the JSON file ``output`` and ``body`` into the Markdown file
    ``markdown``'s ``block`` (skipped when ``markdown`` is ``none``); ``echo``: print ``body`` too."""
    write_json(output, result)
    if str(markdown).lower() != "none":
        replace_block(Path(markdown), block, body)
    if echo:
        print(body)


def provenance(command: str) -> dict[str, Any]:
    """Where a benchmark's figures come from: the ``machine``, the code's ``commit`` and the ``command``."""
    return {"machine": machine(), "commit": code_version(), "command": command}
