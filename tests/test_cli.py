"""The masksup-med command line, run in-process and as ``python -m masksup_med``."""

import subprocess
import sys

import pytest

from masksup_med.cli import main
from masksup_med.data import find_glas_pairs


def test_demo_glas_writes_files(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["data", "demo", "glas", str(out), "--n-train", "3", "--n-test-a", "2", "--n-test-b", "1",
                 "--size", "64", "48", "--seed", "5"])
    assert code == 0
    pairs = find_glas_pairs(out)
    assert [p["split"] for p in pairs].count("train") == 3 and len(pairs) == 6
    printed = capsys.readouterr().out.strip()
    assert len(printed.splitlines()) == 1 and str(out) in printed


def test_unknown_dataset_is_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["data", "demo", "nosuchdata", str(tmp_path)])
    assert info.value.code == 2
    assert "nosuchdata" in capsys.readouterr().err


def test_dataset_error_exit_code(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["data", "demo", "glas", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(blocker) in err


def test_python_dash_m(tmp_path):
    out = tmp_path / "m"
    result = subprocess.run(
        [sys.executable, "-m", "masksup_med", "data", "demo", "glas", str(out), "--n-train", "1",
         "--n-test-a", "0", "--n-test-b", "0"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["train_1.bmp", "train_1_anno.bmp"]
