"""GLaS adapter and split helpers, on tiny files written to tmp_path."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from masksup_med.data import (
    DatasetError,
    DatasetNotFoundError,
    carve_validation,
    find_glas_pairs,
    read_datalist,
    split_glas,
    write_datalist,
)

REAL_GLAS = Path(__file__).parents[1] / ".." / "shared" / "data" / "glas"


def _write_pair(folder: Path, name: str, ext: str = ".bmp", anno_ext: str | None = None) -> None:
    Image.fromarray(np.full((4, 5, 3), 200, np.uint8)).save(folder / f"{name}{ext}")
    Image.fromarray(np.eye(4, 5, dtype=np.uint8)).save(folder / f"{name}_anno{anno_ext or ext}")


def _glas_folder(folder: Path, n_train=10, n_a=4, n_b=3, ext=".bmp") -> Path:
    for split, n in (("train", n_train), ("testA", n_a), ("testB", n_b)):
        for i in range(1, n + 1):
            _write_pair(folder, f"{split}_{i}", ext)
    return folder


@pytest.mark.parametrize("ext", [".bmp", ".png", ".BMP", ".Png"])
def test_pairs_both_layouts(tmp_path, ext):
    _glas_folder(tmp_path, 2, 1, 1, ext)
    pairs = find_glas_pairs(tmp_path)
    assert [p["id"] for p in pairs] == ["testA_1", "testB_1", "train_1", "train_2"]
    first = pairs[2]
    assert first == {
        "image": str(tmp_path / f"train_1{ext}"),
        "label": str(tmp_path / f"train_1_anno{ext}"),
        "id": "train_1",
        "split": "train",
    }
    assert {p["split"] for p in pairs} == {"train", "testA", "testB"}


def test_natural_sort_and_strays_ignored(tmp_path):
    for i in (10, 2, 1):
        _write_pair(tmp_path, f"train_{i}")
    strays = (".DS_Store", "Thumbs.db", "Grade.csv", "train_3.jpg", "notes_anno.bmp", ".train_4.bmp.1.tmp")
    for stray in strays:
        (tmp_path / stray).write_bytes(b"x")
    (tmp_path / "train_5.bmp").mkdir()  # a folder named like an image is not an image
    assert [p["id"] for p in find_glas_pairs(tmp_path)] == ["train_1", "train_2", "train_10"]


def test_mixed_extensions_pair_by_name(tmp_path):
    _write_pair(tmp_path, "train_1", ".bmp", ".png")
    assert find_glas_pairs(tmp_path)[0]["label"].endswith("train_1_anno.png")


def test_missing_folder_message(tmp_path):
    missing = tmp_path / "no_such_glas"
    with pytest.raises(DatasetNotFoundError) as info:
        find_glas_pairs(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "masksup-med data demo glas" in message
    assert "Warwick QU Dataset (Released 2016_07_08)" in message
    assert "http" not in message
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


def test_empty_folder_message(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DatasetNotFoundError) as info:
        find_glas_pairs(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "masksup-med data demo glas" in str(info.value)


def test_image_without_annotation_names_file(tmp_path):
    _glas_folder(tmp_path, 2, 1, 1)
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "train_7.bmp")
    with pytest.raises(DatasetError, match="train_7.bmp") as info:
        find_glas_pairs(tmp_path)
    assert not isinstance(info.value, DatasetNotFoundError)


def test_annotation_without_image_names_file(tmp_path):
    _glas_folder(tmp_path, 2, 1, 1, ".png")
    (tmp_path / "testB_1.png").unlink()
    with pytest.raises(DatasetError, match="testB_1_anno.png"):
        find_glas_pairs(tmp_path)


def test_duplicate_image_extensions_rejected(tmp_path):
    _glas_folder(tmp_path, 1, 0, 0, ".bmp")
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "train_1.png")
    with pytest.raises(DatasetError, match="train_1"):
        find_glas_pairs(tmp_path)


def test_split_sizes_and_disjointness(tmp_path):
    splits = split_glas(_glas_folder(tmp_path), val_fraction=0.2, seed=0)
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes == {"train": 8, "validation": 2, "testA": 4, "testB": 3, "test": 7}
    ids = {k: {it["id"] for it in v} for k, v in splits.items()}
    assert not ids["validation"] & ids["train"]
    assert not ids["validation"] & ids["test"]
    assert all(i.startswith("train_") for i in ids["validation"])
    assert ids["test"] == ids["testA"] | ids["testB"]


def test_split_determinism(tmp_path):
    folder = _glas_folder(tmp_path, n_train=30)
    assert split_glas(folder, seed=3) == split_glas(folder, seed=3)
    vals = {tuple(it["id"] for it in split_glas(folder, seed=s)["validation"]) for s in range(5)}
    assert len(vals) > 1


def test_carve_validation_ignores_input_order():
    items = [{"id": f"x_{i}", "image": f"{i}.png"} for i in range(20)]
    forward = carve_validation(items, 0.25, seed=7)
    backward = carve_validation(items[::-1], 0.25, seed=7)
    assert forward == backward
    assert len(forward[1]) == 5 and len(forward[0]) == 15


@pytest.mark.parametrize("n, fraction, n_val", [(2, 0.01, 1), (1, 0.5, 0), (5, 0.0, 0), (3, 0.99, 2), (0, 0.2, 0)])
def test_carve_validation_counts(n, fraction, n_val):
    train, val = carve_validation([{"id": str(i)} for i in range(n)], fraction, seed=0)
    assert len(val) == n_val and len(train) == n - n_val


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan")])
def test_carve_validation_rejects_fraction(fraction):
    with pytest.raises(ValueError, match=repr(fraction)):
        carve_validation([{"id": "a"}, {"id": "b"}], fraction, seed=0)


def test_datalist_roundtrip(tmp_path):
    splits = {"train": [{"image": tmp_path / "a.png", "id": "a"}], "validation": []}
    out = write_datalist(splits, tmp_path / "runs" / "x" / "datalist.json")
    assert out.is_file()
    assert [p.name for p in out.parent.iterdir()] == ["datalist.json"]  # no temp file left behind
    assert read_datalist(out) == {"train": [{"image": str(tmp_path / "a.png"), "id": "a"}], "validation": []}


def test_read_datalist_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="missing.json"):
        read_datalist(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"train": [1, 2]}')
    with pytest.raises(DatasetError, match="bad.json"):
        read_datalist(bad)


@pytest.mark.real_data
def test_real_glas_pairs_and_split():
    if not REAL_GLAS.is_dir():
        pytest.skip(f"real GLaS data not found at {REAL_GLAS}")
    pairs = find_glas_pairs(REAL_GLAS)
    assert len(pairs) == 165
    counts = {s: sum(p["split"] == s for p in pairs) for s in ("train", "testA", "testB")}
    assert counts == {"train": 85, "testA": 60, "testB": 20}
    splits = split_glas(REAL_GLAS, val_fraction=0.2, seed=0)
    assert len(splits["train"]) + len(splits["validation"]) == 85
    assert len(splits["validation"]) == 17
    assert len(splits["test"]) == 80
    assert not {p["id"] for p in splits["validation"]} & {p["id"] for p in splits["test"]}
