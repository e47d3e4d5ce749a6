"""The adapters on the real files in ../shared/data (skipped when that folder is absent)."""

from pathlib import Path

import pytest
import torch
from monai.transforms import Compose, LoadImaged

from masksup_med.cli import main
from masksup_med.data import get_dataset
from masksup_med.data.cvc_clinicdb import builtin_sequence_table, parse_sequence_table

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GLAS, CVC = DATA / "glas", DATA / "cvc-clinicdb-sample"

pytestmark = pytest.mark.real_data


def _require(folder: Path) -> None:
    if not folder.is_dir():
        pytest.skip(f"real data not found at {folder}")


def test_check_real_glas(capsys):
    _require(GLAS)
    assert main(["data", "check", "glas", str(GLAS)]) == 0
    out = capsys.readouterr().out
    assert "pairs: 165 (train 85, testA 60, testB 20)" in out
    assert "522x775 RGB 8-bit (151)" in out and "OK: 165 pairs usable" in out


def test_check_real_cvc_sample(capsys):
    _require(CVC)
    assert main(["data", "check", "cvc-clinicdb", str(CVC)]) == 0
    out = capsys.readouterr().out
    assert "images (H x W): 288x384 RGB 8-bit (14)" in out and "labels (H x W): 288x384 grey 8-bit (14)" in out
    assert "README.txt" in out and "splits: train 10, validation 1, test 3" in out


def test_real_cvc_readme_matches_builtin_table():
    _require(CVC)
    assert parse_sequence_table((CVC / "README.txt").read_text(encoding="latin-1")) == builtin_sequence_table()


def test_real_cvc_through_the_bundle_pipeline():
    _require(CVC)
    spec = get_dataset("cvc-clinicdb")
    items = spec.split(CVC)["test"]
    load = Compose([LoadImaged(["image", "label"], reader=spec.reader(items), ensure_channel_first=True),
                    spec.label_transform()])
    sample = load(items[0])
    assert sample["image"].shape == (3, 384, 288) and sample["label"].shape == (1, 384, 288)
    assert set(torch.unique(sample["label"]).tolist()) == {0.0, 1.0}
