"""CVC-ClinicDB, Kvasir-SEG and PraNet adapters, the registry, group splits and `data prepare`."""

import itertools
import json

import pytest
from _datasets import make_cvc, make_glas, make_kvasir, make_pranet, rgb, save

from masksup_med.cli import main
from masksup_med.data import (
    DatasetError,
    DatasetNotFoundError,
    available_datasets,
    find_cvc_clinicdb_pairs,
    find_pranet_pairs,
    get_dataset,
    split_cvc_clinicdb,
    split_groups,
    split_kvasir_seg,
    split_pranet,
)
from masksup_med.data.cvc_clinicdb import builtin_sequence_table, parse_sequence_table, sequence_of


def test_registry_names():
    assert available_datasets() == ["cvc-clinicdb", "folder", "glas", "kvasir-cvc", "kvasir-seg", "pranet"]
    assert get_dataset("GLaS").label_threshold == 0 and get_dataset("kvasir-seg").label_threshold == 127
    assert "by" in get_dataset("cvc-clinicdb").split_options
    with pytest.raises(ValueError, match="cvc-clinicdb, folder, glas"):
        get_dataset("nosuch")


def test_builtin_sequence_table_covers_612_frames():
    table = builtin_sequence_table()
    assert len(table) == 29 and table[0] == (1, 25, 1) and table[-1] == (592, 612, 29)
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(table))
    assert sequence_of("205", table) == 10 and sequence_of("613", table) is None and sequence_of("x", table) is None
    assert parse_sequence_table("|    547 to 571    |27\t|\n|  1 to  25 |\t 1\t|") == [(1, 25, 1), (547, 571, 27)]


@pytest.mark.parametrize("png", [False, True], ids=["tif", "png"])
def test_cvc_layouts_and_sequences(tmp_path, png):
    make_cvc(tmp_path, png=png)
    pairs = find_cvc_clinicdb_pairs(tmp_path)
    assert [p["id"] for p in pairs] == ["1", "30", "60", "100", "150", "200"]
    assert [p["sequence"] for p in pairs] == [1, 2, 3, 5, 7, 10]
    assert pairs[0]["image"].endswith("Original/1.png" if png else "Original/1.tif")
    assert get_dataset("cvc-clinicdb").scan(tmp_path).layout.startswith("PNG" if png else "official")


def test_cvc_readme_table_is_used_and_builtin_is_fallback(tmp_path):
    make_cvc(tmp_path, frames=(206, 300))  # the test README puts 206..612 in sequence 11
    assert {p["sequence"] for p in find_cvc_clinicdb_pairs(tmp_path)} == {11}
    (tmp_path / "README.txt").unlink()
    assert [p["sequence"] for p in find_cvc_clinicdb_pairs(tmp_path)] == [11, 15]
    assert "built-in" in get_dataset("cvc-clinicdb").scan(tmp_path).layout


def test_cvc_split_by_sequence_never_leaks_and_is_seeded(tmp_path):
    frames = [f for s in range(1, 200, 10) for f in (s, s + 1, s + 2)]
    make_cvc(tmp_path, frames=frames, readme=False)
    splits = split_cvc_clinicdb(tmp_path, val_fraction=0.1, test_fraction=0.2, seed=1)
    seqs = {k: {p["sequence"] for p in v} for k, v in splits.items()}
    assert not (seqs["train"] & seqs["test"]) and not (seqs["train"] & seqs["validation"])
    assert not (seqs["validation"] & seqs["test"])
    assert (len(seqs["test"]), len(seqs["validation"])) == (2, 1)  # of 9 sequences
    assert sum(len(v) for v in splits.values()) == len(frames)
    assert splits == split_cvc_clinicdb(tmp_path, seed=1)
    assert any(split_cvc_clinicdb(tmp_path, seed=s)["test"] != splits["test"] for s in range(2, 6))


def test_cvc_few_sequences_fall_back_with_warning(tmp_path):
    make_cvc(tmp_path, frames=(1, 2, 30, 31))  # two sequences
    with pytest.warns(UserWarning, match="validation split is left empty"):
        splits = split_cvc_clinicdb(tmp_path)
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (2, 0, 2)


def test_cvc_frame_split_warns_about_leakage(tmp_path):
    make_cvc(tmp_path, frames=tuple(range(1, 11)))
    with pytest.warns(UserWarning, match="leakage"):
        splits = split_cvc_clinicdb(tmp_path, by="frame")
    assert [len(v) for v in splits.values()] == [7, 1, 2]


def test_cvc_unknown_frame_name_refuses_sequence_split(tmp_path):
    make_cvc(tmp_path, frames=(1, 30))
    save(rgb(), tmp_path / "Original" / "extra.tif")
    save(rgb()[..., 0], tmp_path / "Ground Truth" / "extra.tif")
    with pytest.raises(DatasetError, match="extra.tif"):
        split_cvc_clinicdb(tmp_path)


def test_kvasir_split_sizes_and_nested_folder(tmp_path):
    make_kvasir(tmp_path / "Kvasir-SEG", names=[f"img{i}" for i in range(10)])
    splits = split_kvasir_seg(tmp_path, seed=3)
    assert {k: len(v) for k, v in splits.items()} == {"train": 7, "validation": 1, "test": 2}
    assert len({p["id"] for v in splits.values() for p in v}) == 10


def test_a_split_option_of_another_dataset_is_left_out_with_a_warning(tmp_path):
    """A CVC-ClinicDB bundle's ``by="sequence"`` evaluating on Kvasir-SEG: ignored, named, the split as without it."""
    make_kvasir(tmp_path, names=[f"img{i}" for i in range(10)])
    with pytest.warns(UserWarning, match=r"split option\(s\) by do not apply to dataset kvasir-seg"):
        splits = get_dataset("kvasir-seg").split(tmp_path, seed=3, val_fraction=0.1, test_fraction=0.2, by="sequence")
    assert splits == split_kvasir_seg(tmp_path, seed=3)


def test_pranet_train_and_named_test_sets(tmp_path):
    make_pranet(tmp_path)
    pairs = find_pranet_pairs(tmp_path)
    assert len({p["id"] for p in pairs}) == len(pairs) == 9
    splits = split_pranet(tmp_path, val_fraction=0.2, seed=0)
    assert {k: len(v) for k, v in splits.items()} == {
        "train": 4,
        "validation": 1,
        "test": 4,
        "test_CVC-300": 2,
        "test_Kvasir": 2,
    }
    assert {p["test_set"] for p in splits["test_Kvasir"]} == {"Kvasir"}


def test_pranet_missing_test_folder(tmp_path):
    make_pranet(tmp_path)
    for path in sorted((tmp_path / "TestDataset").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (tmp_path / "TestDataset").rmdir()
    with pytest.raises(DatasetNotFoundError, match="TestDataset"):
        find_pranet_pairs(tmp_path)


def test_split_groups_rejects_bad_fractions():
    with pytest.raises(ValueError, match="leave some training"):
        split_groups([{"id": "a", "g": 1}], "g", 0.6, 0.5, seed=0)


def test_prepare_writes_datalist(tmp_path, capsys):
    make_cvc(tmp_path / "cvc")
    out = tmp_path / "run" / "datalist.json"
    assert main(["data", "prepare", "cvc-clinicdb", str(tmp_path / "cvc"), "--out", str(out), "--seed", "2"]) == 0
    splits = json.loads(out.read_text())
    assert {k: len(v) for k, v in splits.items()} == {"train": 4, "validation": 1, "test": 1}
    assert str(out) in capsys.readouterr().out


def test_prepare_glas_and_option_that_does_not_apply(tmp_path, capsys):
    make_glas(tmp_path / "g")
    out = tmp_path / "d.json"
    assert main(["data", "prepare", "glas", str(tmp_path / "g"), "--out", str(out), "--by", "frame"]) == 2
    assert "--by does not apply to dataset glas" in capsys.readouterr().err and not out.exists()
    assert main(["data", "prepare", "glas", str(tmp_path / "g"), "--out", str(out), "--val-fraction", "0.34"]) == 0
    assert [len(v) for v in json.loads(out.read_text()).values()] == [2, 1, 3, 3, 6]


def test_prepare_refuses_broken_data_and_writes_nothing(tmp_path, capsys):
    make_kvasir(tmp_path / "k")
    (tmp_path / "k" / "images" / "cju0a.jpg").write_bytes(b"")
    out = tmp_path / "d.json"
    assert main(["data", "prepare", "kvasir-seg", str(tmp_path / "k"), "--out", str(out)]) == 1
    assert "cju0a.jpg" in capsys.readouterr().err and not out.exists()


# --- the PraNet protocol on the original releases (kvasir-cvc) ---------------------------------


def _both_releases(root, kvasir=True, cvc=True):
    if kvasir:
        make_kvasir(root / "Kvasir-SEG", names=[f"cju{i}" for i in range(6)])
    if cvc:
        make_cvc(root / "CVC-ClinicDB", frames=(1, 30, 60, 100, 150, 200))
    return root


def test_pranet_protocol_trains_on_the_listed_images_and_tests_on_the_rest(tmp_path):
    root = _both_releases(tmp_path / "polyps")
    listed = tmp_path / "train.txt"
    listed.write_text("# PraNet-style list\ncju0.png\ncju1\ncju2.jpg\ncju3\n1.png\n30\n60.tif\n100\n")
    splits = get_dataset("kvasir-cvc").split(root, train_list=listed, val_fraction=0.25, seed=0)
    assert {k: len(v) for k, v in splits.items()} == {
        "train": 6,
        "validation": 2,
        "test": 4,
        "test_kvasir-seg": 2,
        "test_cvc-clinicdb": 2,
    }
    assert {it["id"] for it in splits["test"]} == {
        "kvasir-seg/cju4",
        "kvasir-seg/cju5",
        "cvc-clinicdb/150",
        "cvc-clinicdb/200",
    }
    assert {it["split"] for it in splits["test_cvc-clinicdb"]} == {"test_cvc-clinicdb"}  # the report's groups
    assert all(it["sequence"] for it in splits["test_cvc-clinicdb"])  # CVC-ClinicDB frames keep their sequence
    for part in ("train", "test"):  # the same keys in a part: its batches may mix the two datasets
        assert len({frozenset(it) for it in splits[part]}) == 1, part
    # a folder of the training images (PraNet's TrainDataset/image) is the same list
    folder = tmp_path / "TrainDataset" / "image"
    for name in ("cju0", "cju1", "cju2", "cju3", "1", "30", "60", "100"):
        save(rgb(8, 8), folder / f"{name}.png")
    assert get_dataset("kvasir-cvc").split(root, train_list=folder, val_fraction=0.25, seed=0) == splits


def test_pranet_protocol_names_what_is_missing_or_wrong(tmp_path):
    root = _both_releases(tmp_path / "polyps")
    with pytest.raises(DatasetError, match="needs train_list.*does not ship PraNet's lists"):
        get_dataset("kvasir-cvc").split(root)
    listed = tmp_path / "train.txt"
    listed.write_text("cju0\nnot_an_image\n")
    with pytest.raises(DatasetError, match=r"train.txt: 1 name\(s\) match no image .* 'not_an_image'"):
        get_dataset("kvasir-cvc").split(root, train_list=listed)
    with pytest.raises(DatasetNotFoundError, match="neither a Kvasir-SEG nor a CVC-ClinicDB folder"):
        get_dataset("kvasir-cvc").split(tmp_path / "polyps" / "Kvasir-SEG" / "images", train_list=listed)


def test_pranet_protocol_with_one_release_says_so_at_start(tmp_path, capsys):
    root = _both_releases(tmp_path / "polyps", cvc=False)
    listed = tmp_path / "train.txt"
    listed.write_text("cju0\ncju1\ncju2\n1\n30\n")  # CVC-ClinicDB names: that release is not there
    with pytest.warns(UserWarning, match="only kvasir-seg found, no cvc-clinicdb: .* not comparable"):
        splits = get_dataset("kvasir-cvc").split(root, train_list=listed, val_fraction=0.0)
    assert len(splits["train"]) == 3 and len(splits["test"]) == 3 and "test_cvc-clinicdb" not in splits
    assert main(["data", "check", "kvasir-cvc", str(root), "--train-list", str(listed)]) == 0
    captured = capsys.readouterr()
    assert "only kvasir-seg found" in captured.err and "OK: 6 pairs usable" in captured.out
    assert "split by video sequence" not in captured.out  # split by the list, not by sequence
