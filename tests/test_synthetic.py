"""Synthetic GLaS and CVC-ClinicDB look-alike generators."""

import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from masksup_med.data import (
    DatasetError,
    check_dataset,
    find_cvc_clinicdb_pairs,
    find_glas_pairs,
    get_dataset,
    make_cvc_clinicdb_demo,
    make_glas_demo,
    split_glas,
)
from masksup_med.data.cvc_clinicdb import assign_cvc_clinicdb, builtin_sequence_table, sequence_of
from masksup_med.data.synthetic import CVC_MIN_FRAMES, cvc_clinicdb_demo_frames, render_cvc_clinicdb_like

REAL_CVC = Path(__file__).resolve().parents[2] / "shared" / "data" / "cvc-clinicdb-sample"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_glas_demo(tmp_path_factory.mktemp("glas_demo"), n_train=12, n_test_a=4, n_test_b=2, seed=0)


def _digests(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


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


def test_default_set_leaves_no_temporary_files(tmp_path):
    make_glas_demo(tmp_path / "default")
    assert not [p for p in (tmp_path / "default").iterdir() if p.suffix == ".tmp"]


# --- CVC-ClinicDB -------------------------------------------------------------------------------

CVC_SMALL = (96, 72)


@pytest.fixture(scope="module")
def cvc(tmp_path_factory):
    return make_cvc_clinicdb_demo(tmp_path_factory.mktemp("cvc_demo"), n_frames=8, size=CVC_SMALL, seed=0)


def _sequence(frame):
    return sequence_of(str(frame), builtin_sequence_table())


def _cvc_files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_cvc_frame_ids_are_real_and_spread_over_sequences():
    assert cvc_clinicdb_demo_frames(24) == [
        7,
        19,
        70,
        76,
        109,
        121,
        183,
        194,
        211,
        222,
        283,
        293,
        324,
        336,
        390,
        402,
        433,
        443,
        485,
        497,
        533,
        542,
        597,
        607,
    ]
    assert cvc_clinicdb_demo_frames(612) == list(range(1, 613))
    for n in (3, 4, 5, 24, 57, 58, 59, 100, 611):
        frames = cvc_clinicdb_demo_frames(n)
        assert len(frames) == len(set(frames)) == n and frames == sorted(frames)
        per_sequence = np.bincount([_sequence(f) for f in frames], minlength=30)[1:]
        assert np.count_nonzero(per_sequence) == min(29, max(3, -(-n // 2)))
        if n <= 58:
            assert per_sequence.max() <= 2
        lengths = np.array([last - first + 1 for first, last, _ in builtin_sequence_table()])
        used = per_sequence > 0
        not_full = used & (per_sequence < lengths)
        if not_full.any():  # round robin: a sequence with room has at most one frame less than any other
            assert per_sequence[used].max() <= per_sequence[not_full].min() + 1


@pytest.mark.parametrize("n_frames", range(CVC_MIN_FRAMES, 60))
def test_cvc_sequence_split_has_every_part(n_frames):
    items = [
        {"id": str(f), "image": f"Original/{f}.tif", "label": f"Ground Truth/{f}.tif", "sequence": _sequence(f)}
        for f in cvc_clinicdb_demo_frames(n_frames)
    ]
    for seed in range(3):
        splits = assign_cvc_clinicdb(items, seed=seed)
        sequences = [{it["sequence"] for it in part} for part in splits.values()]
        assert all(sequences), (n_frames, seed, {k: len(v) for k, v in splits.items()})
        assert sum(len(s) for s in sequences) == len(set().union(*sequences))  # no sequence in two parts


def test_cvc_layout_matches_official_release(cvc):
    frames = cvc_clinicdb_demo_frames(8)
    expected = [f"Ground Truth/{f}.tif" for f in frames] + [f"Original/{f}.tif" for f in frames] + ["README.txt"]
    assert _cvc_files(cvc) == sorted(expected)
    pairs = find_cvc_clinicdb_pairs(cvc)
    assert [int(p["id"]) for p in sorted(pairs, key=lambda p: int(p["id"]))] == frames
    assert all(p["sequence"] == _sequence(p["id"]) for p in pairs)
    readme = (cvc / "README.txt").read_text()
    assert "SYNTHETIC" in readme and "592 to 612" in readme


def test_cvc_adapter_check_and_default_split(cvc):
    report = check_dataset("cvc-clinicdb", cvc)
    assert report.ok and not report.warnings, (report.problems, report.warnings)
    assert report.pairs == 8 and "README.txt" in report.layout  # the README's table was parsed
    splits = get_dataset("cvc-clinicdb").split(cvc)
    assert [len(splits[k]) for k in ("train", "validation", "test")] == [4, 2, 2]
    sequences = [{it["sequence"] for it in part} for part in splits.values()]
    assert all(sequences) and not (
        sequences[0] & sequences[1] or sequences[0] & sequences[2] or sequences[1] & sequences[2]
    )


def test_cvc_smallest_demo_splits_into_three_parts(tmp_path):
    out = make_cvc_clinicdb_demo(tmp_path / "min", n_frames=CVC_MIN_FRAMES, size=(48, 32), seed=4)
    splits = get_dataset("cvc-clinicdb").split(out)
    assert [len(splits[k]) for k in ("train", "validation", "test")] == [1, 1, 1]


def test_cvc_files_are_stored_like_the_release(tmp_path):
    out = make_cvc_clinicdb_demo(tmp_path / "full", n_frames=CVC_MIN_FRAMES, seed=0)  # real size, 384x288
    reference = {"Original": ((288, 384, 3), "YXS"), "Ground Truth": ((288, 384), "YX")}
    for folder, (shape, axes) in reference.items():
        paths = sorted((out / folder).iterdir())
        if REAL_CVC.is_dir():
            paths.append(REAL_CVC / folder / "1.tif")
        for path in paths:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages.first
                assert (page.shape, page.axes, page.dtype) == (shape, axes, np.dtype(np.uint8)), path
                # the release stores RGB frames as 'min-is-black' with 3 samples (Pillow refuses them)
                assert page.photometric == tifffile.PHOTOMETRIC.MINISBLACK, path
                assert page.planarconfig == tifffile.PLANARCONFIG.CONTIG and page.bitspersample == 8, path
                assert page.compression == tifffile.COMPRESSION.NONE and len(tif.pages) == 1, path


def test_cvc_images_and_masks(cvc):
    for pair in find_cvc_clinicdb_pairs(cvc):
        image, mask = tifffile.imread(pair["image"]), tifffile.imread(pair["label"])
        assert image.dtype == np.uint8 and image.shape == (CVC_SMALL[1], CVC_SMALL[0], 3)
        assert mask.dtype == np.uint8 and mask.shape == image.shape[:2]
        assert np.isin(mask, (0, 255)).mean() > 0.97  # a 0/255 mask with a thin soft edge
        assert ((mask >= 64) & (mask <= 191)).mean() < 0.05  # the adapter's ambiguity rule
        assert 0.01 < (mask > 127).mean() < 0.3
        assert (image[mask > 127].mean(axis=0) > (100, 40, 30)).all()  # a lit, reddish polyp
        assert image[0, 0].max() < 40 and image[-1, -1].max() < 40  # dark frame outside the field of view


def test_cvc_polyps_stand_out():
    contrasts, tints = [], []
    for frame in cvc_clinicdb_demo_frames(12):
        image, mask = render_cvc_clinicdb_like(frame, CVC_SMALL, seed=1)
        polyp = mask > 127
        ring = ndimage.binary_dilation(polyp, iterations=3) & ~polyp
        contrasts.append(np.linalg.norm(image[polyp].mean(axis=0) - image[ring].mean(axis=0)))
        away = ~ndimage.binary_dilation(polyp, iterations=6) & (image.max(axis=2) > 40)  # lit mucosa
        chroma = image / (image.sum(axis=2, keepdims=True) + 1.0)
        tints.append(np.abs(chroma[polyp].mean(axis=0) - chroma[away].mean(axis=0)).sum())
    assert min(contrasts) > 15  # edge: rim shadow, shading
    assert np.mean(tints) > 0.03  # colour: polyps are redder or paler than the mucosa (same colour: ~0.01)


def test_cvc_frames_of_a_sequence_look_alike():
    frames = cvc_clinicdb_demo_frames(16)
    rendered = {f: render_cvc_clinicdb_like(f, CVC_SMALL, seed=2) for f in frames}
    by_sequence = {}
    for f in frames:
        by_sequence.setdefault(_sequence(f), []).append(f)
    pairs = list(by_sequence.values())
    assert all(len(p) == 2 for p in pairs)

    def difference(a, b):
        return np.abs(rendered[a][0].astype(float) - rendered[b][0].astype(float)).mean()

    within = [difference(a, b) for a, b in pairs]
    between = [difference(p[0], q[0]) for p, q in itertools.pairwise(pairs)]
    assert np.mean(within) < 0.8 * np.mean(between)
    for a, b in pairs:
        assert rendered[a][0].tobytes() != rendered[b][0].tobytes()  # the camera and polyp moved
        first, second = rendered[a][1] > 127, rendered[b][1] > 127
        assert (first & second).sum() > 0.2 * (first | second).sum()  # the same polyp, slightly moved


def test_cvc_byte_identical_for_same_seed(tmp_path, cvc):
    again = make_cvc_clinicdb_demo(tmp_path / "again", n_frames=8, size=CVC_SMALL, seed=0)
    assert _digests(again) == _digests(cvc)


def test_cvc_frame_depends_only_on_seed_and_number(tmp_path, cvc):
    other = make_cvc_clinicdb_demo(tmp_path / "other", n_frames=8, size=CVC_SMALL, seed=1)
    frames = cvc_clinicdb_demo_frames(8)
    for f in frames:
        assert (other / "Original" / f"{f}.tif").read_bytes() != (cvc / "Original" / f"{f}.tif").read_bytes()
    image, mask = render_cvc_clinicdb_like(frames[3], CVC_SMALL, seed=0)  # alone, outside any demo
    assert np.array_equal(image, tifffile.imread(cvc / "Original" / f"{frames[3]}.tif"))
    assert np.array_equal(mask, tifffile.imread(cvc / "Ground Truth" / f"{frames[3]}.tif"))
    images = [d for name, d in _digests(cvc).items() if name.startswith("Original")]
    assert len(set(images)) == len(images)


def test_cvc_argument_validation(tmp_path):
    for n_frames in (0, CVC_MIN_FRAMES - 1, 613, 4.5, True):
        with pytest.raises(ValueError, match="n_frames must be an integer from 3 to 612"):
            make_cvc_clinicdb_demo(tmp_path / "t", n_frames=n_frames)
    with pytest.raises(ValueError, match="size"):
        make_cvc_clinicdb_demo(tmp_path / "t", size=(384, 16))
    with pytest.raises(ValueError, match="seed"):
        make_cvc_clinicdb_demo(tmp_path / "t", seed=-1)
    with pytest.raises(ValueError, match="frame number"):
        render_cvc_clinicdb_like(613)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(DatasetError, match="not a folder"):
        make_cvc_clinicdb_demo(blocker)
    assert not (tmp_path / "t").exists()  # nothing written before the arguments are checked


def test_cvc_full_size_frames_leave_no_temporary_files(tmp_path):
    make_cvc_clinicdb_demo(tmp_path / "speed", n_frames=6, seed=0)  # full 384x288 frames
    assert not [p for p in (tmp_path / "speed").rglob("*") if p.name.endswith(".tmp")]


# --- Kvasir-SEG look-alike ---------------------------------------------------------------------


def test_kvasir_demo_is_in_the_release_layout_with_sizes_of_its_own(tmp_path):
    from masksup_med.data import make_kvasir_seg_demo
    from masksup_med.data.synthetic import kvasir_seg_demo_sizes

    out = make_kvasir_seg_demo(tmp_path / "kvasir", n_images=6, size=(96, 80), seed=3)
    names = [f"synthetic_{i:04d}.jpg" for i in range(1, 7)]
    assert (
        sorted(p.name for p in (out / "images").iterdir()) == names == sorted(p.name for p in (out / "masks").iterdir())
    )
    assert "SYNTHETIC" in (out / "README.txt").read_text()
    sizes = kvasir_seg_demo_sizes(6, (96, 80), seed=3)
    assert len(set(sizes)) > 1  # sizes vary, as the release's do
    for name, (w, h) in zip(names, sizes):
        image, mask = np.asarray(Image.open(out / "images" / name)), np.asarray(Image.open(out / "masks" / name))
        assert image.shape == (h, w, 3) and mask.shape == (h, w, 3)  # an RGB JPEG mask, like the release's
        assert 0.01 < (mask.max(axis=-1) > 127).mean() < 0.4
    report = check_dataset("kvasir-seg", out)
    assert report.ok and report.splits == {"train": 4, "validation": 1, "test": 1}, report.problems
    again = make_kvasir_seg_demo(tmp_path / "again", n_images=6, size=(96, 80), seed=3)
    assert _digests(again) == _digests(out)
    with pytest.raises(ValueError, match="n_images must be an integer >= 3"):
        make_kvasir_seg_demo(tmp_path / "few", n_images=2)
