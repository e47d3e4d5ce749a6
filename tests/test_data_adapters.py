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
    assert available_datasets() == ["cvc-clinicdb", "glas", "kvasir-seg", "pranet"]
    assert get_dataset("GLaS").label_threshold == 0 and get_dataset("kvasir-seg").label_threshold == 127
    assert "by" in get_dataset("cvc-clinicdb").split_options
    with pytest.raises(ValueError, match="cvc-clinicdb, glas"):
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
        "train": 4, "validation": 1, "test": 4, "test_CVC-300": 2, "test_Kvasir": 2}
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
