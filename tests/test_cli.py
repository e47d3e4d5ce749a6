"""The masksup-med command line, run in-process and as ``python -m masksup_med``."""

import subprocess
import sys

import pytest

from masksup_med.cli import main
from masksup_med.data import find_cvc_clinicdb_pairs, find_glas_pairs


def test_demo_glas_writes_files(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(
        [
            "data",
            "demo",
            "glas",
            str(out),
            "--n-train",
            "3",
            "--n-test-a",
            "2",
            "--n-test-b",
            "1",
            "--size",
            "64",
            "48",
            "--seed",
            "5",
        ]
    )
    assert code == 0
    pairs = find_glas_pairs(out)
    assert [p["split"] for p in pairs].count("train") == 3 and len(pairs) == 6
    printed = capsys.readouterr().out.strip()
    assert len(printed.splitlines()) == 1 and str(out) in printed


def test_demo_cvc_clinicdb_writes_checkable_files(tmp_path, capsys):
    out = tmp_path / "cvc demo"
    assert main(["data", "demo", "cvc-clinicdb", str(out), "--n-frames", "5", "--size", "64", "48", "--seed", "5"]) == 0
    printed = capsys.readouterr().out.strip()
    assert len(printed.splitlines()) == 1 and str(out) in printed
    assert "5 synthetic CVC-ClinicDB" in printed and "3 video sequences" in printed and "64x48" in printed
    assert len(find_cvc_clinicdb_pairs(out)) == 5
    assert sorted(p.name for p in out.iterdir()) == ["Ground Truth", "Original", "README.txt"]
    assert main(["data", "check", "cvc-clinicdb", str(out)]) == 0
    captured = capsys.readouterr()
    assert "OK: 5 pairs usable" in captured.out and "problem:" not in captured.err
    assert "sequences: train 1, validation 1, test 1" in captured.out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cvc-clinicdb", "--n-frames", "2"], "--n-frames: expected a frame count (an integer from 3 to 612), got '2'"),
        (["cvc-clinicdb", "--n-frames", "613"], "--n-frames: expected a frame count (an integer from 3 to 612)"),
        (["cvc-clinicdb", "--n-frames", "many"], "--n-frames: expected a frame count"),
        (["cvc-clinicdb", "--seed", "-1"], "--seed: expected a seed (an integer >= 0), got '-1'"),
        (["glas", "--seed", "-1"], "--seed: expected a seed (an integer >= 0), got '-1'"),
        (["cvc-clinicdb", "--size", "384", "16"], "--size: expected an image side in pixels (an integer >= 32)"),
    ],
)
def test_demo_bad_arguments_are_argparse_errors(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as info:
        main(["data", "demo", argv[0], str(out), *argv[1:]])
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unknown_dataset_is_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["data", "demo", "nosuchdata", str(tmp_path)])
    assert info.value.code == 2
    assert "nosuchdata" in capsys.readouterr().err


@pytest.mark.parametrize("dataset", ["glas", "cvc-clinicdb"])
def test_dataset_error_exit_code(tmp_path, capsys, dataset):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["data", "demo", dataset, str(blocker)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(blocker) in err


def test_python_dash_m(tmp_path):
    out = tmp_path / "m"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "masksup_med",
            "data",
            "demo",
            "glas",
            str(out),
            "--n-train",
            "1",
            "--n-test-a",
            "0",
            "--n-test-b",
            "0",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["train_1.bmp", "train_1_anno.bmp"]


def test_data_check_and_prepare_report_labelled_and_unlabelled_counts(tmp_path, capsys):
    import json

    import numpy as np
    from PIL import Image

    demo = tmp_path / "glas"
    main(
        [
            "data",
            "demo",
            "glas",
            str(demo),
            "--n-train",
            "10",
            "--n-test-a",
            "1",
            "--n-test-b",
            "1",
            "--size",
            "64",
            "48",
        ]
    )
    frames = tmp_path / "frames"
    frames.mkdir()
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(frames / "f.png")
    capsys.readouterr()
    assert main(["data", "check", "glas", str(demo), "--label-fraction", "0.25", "--unlabelled-dir", str(frames)]) == 0
    assert (
        "labelled 2 of 8 training images; unlabelled 7 (6 from train, 1 from the unlabelled folder)"
        in capsys.readouterr().out
    )
    out = tmp_path / "datalist.json"
    assert main(["data", "prepare", "glas", str(demo), "--label-fraction", "0.5", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert (len(written["train"]), len(written["unlabelled"])) == (4, 4)
    assert main(["data", "prepare", "glas", str(demo), "--label-fraction", "0", "--out", str(tmp_path / "x.json")]) == 2
    assert "label_fraction must lie in (0, 1], got 0.0" in capsys.readouterr().err


def test_demo_kvasir_seg_writes_checkable_files(tmp_path, capsys):
    out = tmp_path / "kvasir demo"
    assert main(["data", "demo", "kvasir-seg", str(out), "--n-images", "5", "--size", "64", "48"]) == 0
    printed = capsys.readouterr().out.strip()
    assert "5 synthetic Kvasir-SEG" in printed and str(out) in printed
    assert main(["data", "check", "kvasir-seg", str(out)]) == 0
    assert "OK: 5 pairs usable" in capsys.readouterr().out
