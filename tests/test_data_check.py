"""`masksup-med data check`: every bad input is found, in one pass, with the offending file named."""

import subprocess
import sys

import numpy as np
import pytest
import tifffile
from _datasets import make_cvc, make_glas, make_kvasir, make_pranet, mask, rgb, save, truncate

from masksup_med.cli import main
from masksup_med.data import DatasetError, get_dataset


def check(capsys, dataset, folder, *options):
    code = main(["data", "check", dataset, str(folder), *options])
    out = capsys.readouterr()
    return code, out.out, out.err


def problem_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("problem: ")]


@pytest.mark.parametrize(
    "dataset, make",
    [("glas", make_glas), ("cvc-clinicdb", make_cvc), ("kvasir-seg", make_kvasir), ("pranet", make_pranet)],
)
def test_clean_datasets_pass(tmp_path, capsys, dataset, make):
    make(tmp_path)
    code, out, err = check(capsys, dataset, tmp_path)
    assert code == 0, err
    assert "OK:" in out and "RGB 8-bit" in out and "splits: train" in out and not problem_lines(err)


@pytest.mark.parametrize("make_folder", [False, True], ids=["missing", "empty"])
def test_missing_or_empty_folder(tmp_path, capsys, make_folder):
    folder = tmp_path / "kvasir"
    if make_folder:
        (folder / "images").mkdir(parents=True)
        (folder / "masks").mkdir()
    code, _, err = check(capsys, "kvasir-seg", folder)
    assert code == 1 and str(folder) in err and "Simula" in err
    assert len(problem_lines(err)) == 1


def test_unpaired_files_both_ways(tmp_path, capsys):
    make_kvasir(tmp_path)
    (tmp_path / "masks" / "cju0a.jpg").unlink()
    (tmp_path / "images" / "cju0b.jpg").unlink()
    code, _, err = check(capsys, "kvasir-seg", tmp_path)
    lines = problem_lines(err)
    assert code == 1 and len(lines) == 2
    assert "cju0a.jpg: image has no label" in lines[0] and "cju0b.jpg: label has no image" in lines[1]


@pytest.mark.parametrize("target", ["loop", "missing"])
def test_a_dead_link_is_named_as_such_and_its_partner_is_not_called_unpaired(tmp_path, capsys, target):
    make_kvasir(tmp_path)
    image = tmp_path / "images" / "cju0a.jpg"
    image.unlink()
    image.symlink_to(image.name if target == "loop" else tmp_path / "gone.jpg")
    code, _, err = check(capsys, "kvasir-seg", tmp_path)
    (line,) = problem_lines(err)
    assert code == 1 and f"{image}: a symbolic link whose target is missing or loops back to itself" in line
    assert "has no image" not in err


def test_an_image_saved_in_an_unsupported_format_is_named_once_and_stops_training(tmp_path, capsys):
    make_glas(tmp_path)
    image = next(tmp_path.glob("train_*[0-9].bmp"))
    jpeg = image.with_suffix(".jpg")
    save(rgb(40, 50)[..., 0], jpeg)  # a grey JPEG: GLaS takes BMP or PNG
    image.unlink()
    code, _, err = check(capsys, "glas", tmp_path)
    (line,) = problem_lines(err)
    assert code == 1 and f"{jpeg}: unsupported extension '.jpg' (expected bmp|png)" in line
    assert f"its label {image.stem}_anno.bmp is left without a pair" in line
    with pytest.raises(DatasetError, match="unsupported extension"):
        get_dataset("glas").split(tmp_path)


def test_size_mismatch_names_label_and_image(tmp_path, capsys):
    make_cvc(tmp_path)
    save(mask(20, 32), tmp_path / "Ground Truth" / "60.tif")
    code, _, err = check(capsys, "cvc-clinicdb", tmp_path)
    (line,) = problem_lines(err)
    assert code == 1 and "Ground Truth/60.tif" in line and "20x32" in line and "24x32" in line


@pytest.mark.parametrize(
    "dataset, make, relative",
    [
        ("glas", make_glas, "train_2.png"),
        ("cvc-clinicdb", make_cvc, "Original/30.tif"),
        ("kvasir-seg", make_kvasir, "images/cju0c.jpg"),
        ("pranet", make_pranet, "TrainDataset/mask/3.png"),
    ],
)
def test_truncated_file(tmp_path, capsys, dataset, make, relative):
    make(tmp_path / "d", **({"ext": ".png"} if dataset == "glas" else {}))
    path = tmp_path / "d" / relative
    if dataset != "cvc-clinicdb":  # small random images compress badly; grow them so half a file is broken
        save(rgb(200, 300) if "mask" not in relative else mask(200, 300), path)
        save(mask(200, 300), path.parent.parent / "mask" / "3.png") if dataset == "pranet" else None
    truncate(path)
    code, _, err = check(capsys, dataset, tmp_path / "d")
    lines = problem_lines(err)
    assert code == 1 and any(str(path) in line and "corrupt or truncated" in line for line in lines), err


def test_corrupt_and_zero_byte_files(tmp_path, capsys):
    make_kvasir(tmp_path)
    (tmp_path / "images" / "cju0a.jpg").write_bytes(b"this is not a JPEG" * 10)
    (tmp_path / "masks" / "cju0b.jpg").write_bytes(b"")
    code, _, err = check(capsys, "kvasir-seg", tmp_path)
    lines = problem_lines(err)
    assert code == 1 and len(lines) == 2
    assert "cju0a.jpg: cannot be read" in lines[0] and "cju0b.jpg: empty file (0 bytes)" in lines[1]


def test_unsupported_extension(tmp_path, capsys):
    make_kvasir(tmp_path)
    (tmp_path / "images" / "cju0z.gif").write_bytes(b"GIF89a")
    code, _, err = check(capsys, "kvasir-seg", tmp_path)
    (line,) = problem_lines(err)
    assert code == 1 and "cju0z.gif: unsupported extension '.gif'" in line


@pytest.mark.parametrize(
    "array, what",
    [
        (np.dstack([rgb(), np.full((24, 32), 255, np.uint8)]), "RGBA 8-bit"),
        (rgb().astype(np.uint16) * 200, "RGB 16-bit"),
        (rgb()[..., 0], "grey 8-bit"),
    ],
    ids=["rgba", "16bit", "grey"],
)
def test_non_rgb_images_are_refused(tmp_path, capsys, array, what):
    make_cvc(tmp_path)
    tifffile.imwrite(
        tmp_path / "Original" / "100.tif",
        array,
        photometric="rgb" if array.ndim == 3 else "minisblack",
        extrasamples=["unassalpha"] if array.ndim == 3 and array.shape[-1] == 4 else None,
    )
    code, _, err = check(capsys, "cvc-clinicdb", tmp_path)
    (line,) = problem_lines(err)
    assert code == 1 and "Original/100.tif" in line and what in line and "refused, not converted" in line


def test_grey_png_image_refused_too(tmp_path, capsys):
    make_glas(tmp_path, ext=".png")
    save(rgb()[..., 0], tmp_path / "testA_1.png")
    code, _, err = check(capsys, "glas", tmp_path)
    assert code == 1 and "testA_1.png: image is grey 8-bit" in err


def test_label_values(tmp_path, capsys):
    make_cvc(tmp_path)
    soft = mask()
    soft[6, 8:24] = 100  # soft edge: a few mid-grey pixels are fine
    save(soft, tmp_path / "Ground Truth" / "1.tif")
    grey = np.full((24, 32), 128, np.uint8)  # mostly mid-grey: ambiguous
    save(grey, tmp_path / "Ground Truth" / "30.tif")
    save(mask(high=1), tmp_path / "Ground Truth" / "60.tif")  # 0/1 where 0/255 is expected
    save(np.zeros((24, 32), np.uint8), tmp_path / "Ground Truth" / "100.tif")  # all background: warning
    code, _, err = check(capsys, "cvc-clinicdb", tmp_path)
    lines = problem_lines(err)
    assert code == 1 and len(lines) == 2
    assert "30.tif: label is ambiguous: 100.0% of its pixels are mid-grey" in lines[0]
    assert "60.tif: label values are 0/1" in lines[1]
    assert "warning: " in err and "100.tif: label is all background" in err


def test_glas_colour_labels_and_instance_ids_are_fine(tmp_path, capsys):
    make_glas(tmp_path, ext=".png")
    colour = np.zeros((24, 32, 3), np.uint8)
    colour[2:8, 2:8] = (255, 0, 0)
    colour[10:20, 10:20] = (0, 128, 64)
    save(colour, tmp_path / "train_1_anno.png")
    code, out, _ = check(capsys, "glas", tmp_path)
    assert code == 0 and "RGB 8-bit (1)" in out.split("labels (H x W):")[1]


def test_all_background_is_only_a_warning(tmp_path, capsys):
    make_kvasir(tmp_path)
    save(np.zeros((24, 32), np.uint8), tmp_path / "masks" / "cju0a.jpg")
    code, _, err = check(capsys, "kvasir-seg", tmp_path)
    assert code == 0 and "warning: " in err and "cju0a.jpg: label is all background" in err


def test_alpha_label_refused(tmp_path, capsys):
    make_pranet(tmp_path)
    save(np.dstack([mask()] * 3 + [np.full((24, 32), 255, np.uint8)]), tmp_path / "TrainDataset" / "mask" / "2.png")
    code, _, err = check(capsys, "pranet", tmp_path)
    assert code == 1 and "mask/2.png: label has 4 channels" in err


def test_stray_files_ignored(tmp_path, capsys):
    make_kvasir(tmp_path)
    for folder in ("images", "masks"):
        (tmp_path / folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (tmp_path / folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
        (tmp_path / folder / "._cju0a.jpg").write_bytes(b"\0\5\26\7")
    code, out, err = check(capsys, "kvasir-seg", tmp_path)
    assert code == 0, err and "pairs: 5" in out


def test_same_stem_two_extensions(tmp_path, capsys):
    make_kvasir(tmp_path)
    save(rgb(), tmp_path / "images" / "cju0a.png")
    code, _, err = check(capsys, "kvasir-seg", tmp_path)
    (line,) = problem_lines(err)
    assert code == 1 and "cju0a.jpg" in line and "cju0a.png" in line and "keep only one" in line


def test_paths_with_spaces_and_non_ascii(tmp_path, capsys):
    folder = tmp_path / "my data" / "Kvasir-SEG ünïcödé 息肉"
    make_kvasir(folder, names=("polyp 1", "pólipo_2", "息肉3"))
    code, out, err = check(capsys, "kvasir-seg", folder)
    assert code == 0, err
    assert "pairs: 3" in out


def test_all_problems_in_one_pass(tmp_path, capsys):
    make_glas(tmp_path, ext=".png", n=4)
    (tmp_path / "train_1_anno.png").unlink()  # image without label
    (tmp_path / "testA_1.png").write_bytes(b"")  # zero bytes
    save(mask(10, 10), tmp_path / "testB_2_anno.png")  # size mismatch
    save(rgb(), tmp_path / "train_2.jpg")  # unsupported extension
    code, out, err = check(capsys, "glas", tmp_path)
    lines = problem_lines(err)
    assert code == 1 and len(lines) == 4, err
    for name in ("train_1.png", "testA_1.png", "testB_2_anno.png", "train_2.jpg"):
        assert sum(name in line for line in lines) == 1, name
    assert "FAILED: 4 problem(s)" in out


@pytest.mark.slow  # a fresh interpreter importing torch and MONAI takes 10-20 s on a small CI machine
def test_check_as_a_process(tmp_path):
    make_kvasir(tmp_path)
    (tmp_path / "masks" / "cju0e.jpg").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "masksup_med", "data", "check", "kvasir-seg", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "problem: " in result.stderr and "cju0e.jpg: image has no label" in result.stderr


def test_cvc_frame_outside_sequence_table(tmp_path, capsys):
    make_cvc(tmp_path)
    save(rgb(), tmp_path / "Original" / "frame 7b.tif")
    save(mask(), tmp_path / "Ground Truth" / "frame 7b.tif")
    code, _, err = check(capsys, "cvc-clinicdb", tmp_path)
    (line,) = problem_lines(err)
    assert code == 1 and "cannot split" in line and "frame 7b.tif: frame not in the sequence table" in line
    code, out, err = check(capsys, "cvc-clinicdb", tmp_path, "--by", "frame", "--seed", "3")
    assert code == 0 and "leakage" in err and "splits: train 5, validation 1, test 1" in out
