"""Synthetic GLaS look-alike generator."""

import hashlib
import time

import numpy as np
import pytest
from PIL import Image

from masksup_med.data import find_glas_pairs, make_glas_demo, split_glas


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_glas_demo(tmp_path_factory.mktemp("glas_demo"), n_train=12, n_test_a=4, n_test_b=2, seed=0)


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _load(pair):
    return np.asarray(Image.open(pair["image"])), np.asarray(Image.open(pair["label"]))


def test_layout_matches_official_release(demo):
    names = {p.name for p in demo.iterdir()}
    assert len(names) == 2 * (12 + 4 + 2)
    assert {"train_1.bmp", "train_1_anno.bmp", "train_12.bmp", "testA_4_anno.bmp", "testB_2.bmp"} <= names
    splits = split_glas(demo, val_fraction=0.25, seed=0)
    assert [len(splits[k]) for k in ("train", "validation", "testA", "testB")] == [9, 3, 4, 2]


def test_byte_identical_for_same_seed(tmp_path, demo):
    again = make_glas_demo(tmp_path / "again", n_train=12, n_test_a=4, n_test_b=2, seed=0)
    assert _digests(again) == _digests(demo)


def test_different_seed_and_index_give_different_images(tmp_path, demo):
    other = make_glas_demo(tmp_path / "other", n_train=2, n_test_a=0, n_test_b=0, seed=1)
    assert (other / "train_1.bmp").read_bytes() != (demo / "train_1.bmp").read_bytes()
    digests = _digests(demo)
    images = [d for name, d in digests.items() if not name.endswith("_anno.bmp")]
    assert len(set(images)) == len(images)


def test_images_and_instance_labels(demo):
    n_instances = []
    for pair in find_glas_pairs(demo):
        image, label = _load(pair)
        assert image.dtype == np.uint8 and image.shape == (120, 160, 3)
        assert Image.open(pair["image"]).mode == "RGB"
        assert label.dtype == np.uint8 and label.shape == image.shape[:2]
        ids = np.unique(label)
        assert ids[0] == 0 and list(ids) == list(range(len(ids)))  # 0 then consecutive instance ids
        n_instances.append(len(ids) - 1)
    assert min(n_instances) >= 2 and max(n_instances) <= 6
    assert max(n_instances) > 2


def test_some_glands_touch_the_border(demo):
    touching = 0
    for pair in find_glas_pairs(demo):
        label = _load(pair)[1]
        touching += bool(label[0].any() or label[-1].any() or label[:, 0].any() or label[:, -1].any())
    assert 0 < touching


def test_glands_differ_from_background(demo):
    inside, outside = [], []
    for pair in find_glas_pairs(demo):
        image, label = _load(pair)
        grey = image.astype(float).mean(axis=2)
        inside.append(grey[label > 0].mean())
        outside.append(grey[label == 0].mean())
    assert abs(np.mean(inside) - np.mean(outside)) > 15


def test_custom_size_and_validation(tmp_path):
    out = make_glas_demo(tmp_path / "s", n_train=1, n_test_a=0, n_test_b=0, size=(64, 48))
    assert Image.open(out / "train_1.bmp").size == (64, 48)
    with pytest.raises(ValueError, match="size"):
        make_glas_demo(tmp_path / "t", size=(8, 8))
    with pytest.raises(ValueError, match="non-negative"):
        make_glas_demo(tmp_path / "t", n_train=-1)


def test_default_set_is_fast(tmp_path):
    start = time.perf_counter()
    make_glas_demo(tmp_path / "default")
    assert time.perf_counter() - start < 5
    assert not [p for p in (tmp_path / "default").iterdir() if p.suffix == ".tmp"]
