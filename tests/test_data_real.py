"""The adapters on the real files in ../shared/data (skipped when that folder is absent)."""

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose, LoadImaged

from masksup_med.cli import main
from masksup_med.data import get_dataset
from masksup_med.data.cvc_clinicdb import builtin_sequence_table, parse_sequence_table

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GLAS, CVC, KVASIR = DATA / "glas", DATA / "cvc-clinicdb-sample", DATA / "kvasir-seg"
BUNDLES = Path(__file__).resolve().parents[1] / "bundles"

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
    load = Compose(
        [LoadImaged(["image", "label"], reader=spec.reader(items), ensure_channel_first=True), spec.label_transform()]
    )
    sample = load(items[0])
    assert sample["image"].shape == (3, 384, 288) and sample["label"].shape == (1, 384, 288)
    assert set(torch.unique(sample["label"]).tolist()) == {0.0, 1.0}


def test_real_kvasir_pairs_and_split():
    _require(KVASIR)
    scan = get_dataset("kvasir-seg").scan(KVASIR)
    assert len(scan.items) == 1000 and not scan.problems
    splits = get_dataset("kvasir-seg").split(KVASIR)
    assert {k: len(v) for k, v in splits.items()} == {"train": 700, "validation": 100, "test": 200}


def test_real_kvasir_through_the_kvasir_bundle_preprocessing():
    """The bundle's own loading and resizing on real JPEGs: 3 x 320 x 272 (width first), a binary mask."""
    _require(KVASIR)
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "kvasir_seg" / "configs" / "train.json"))
    parser["dataset_dir"] = str(KVASIR)
    preprocessing = Compose(parser.get_parsed_content("preprocessing"))
    item = parser.get_parsed_content("datalist")["test"][0]
    sample = preprocessing(item)
    assert sample["image"].shape == (3, 320, 272) and sample["label"].shape == (1, 320, 272)
    assert set(torch.unique(sample["label"]).tolist()) == {0.0, 1.0}
    width, height = sample["image"].meta["spatial_shape"]  # the file's own size, width first
    assert width > height  # the usual Kvasir-SEG image is landscape, as image_size is
