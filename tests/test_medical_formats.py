"""NIfTI, DICOM and MetaImage / NRRD in: reading, the ``folder`` dataset, ``data check``, training, predict, serve.

Real files come from the packages' own test data (nibabel's ``anatomical.nii`` and ``example4d.nii.gz``,
pydicom's ``CT_small.dcm`` and ``rtplan.dcm``), from SimpleITK writing MetaImage and NRRD, and, where
../shared/data is present, from the shared GLaS images written as NIfTI.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.transforms import LoadImage
from PIL import Image
from pydicom.data import get_testdata_file

from masksup_med.cli import main
from masksup_med.data import check_dataset, get_dataset
from masksup_med.data.errors import UnreadableFileError
from masksup_med.data.formats import file_stem, file_suffix, mask_suffix_for
from masksup_med.data.readers import AnyImageReader, read_image
from masksup_med.transforms import NormaliseIntensity

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "glas" / "configs"
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
CT = Path(get_testdata_file("CT_small.dcm"))
NO_PIXELS = Path(get_testdata_file("rtplan.dcm"))
REAL_GLAS = REPO.parent / "shared" / "data" / "glas"
AFFINE = np.array([[0.8, 0, 0, -30.0], [0, -0.6, 0, 20.0], [0, 0, 2.5, 5.0], [0, 0, 0, 1]])


def nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def make_nifti_folder(root: Path, n: int = 6, shape=(40, 52)) -> Path:
    """``images/caseK.nii.gz`` (int16, CT-like, X x Y x 1) + ``masks/caseK.nii.gz`` (0/1), one affine each."""
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    for k in range(n):
        affine = AFFINE.copy()
        affine[:3, 3] += k
        mask = ((x - shape[0] // 2) ** 2 + (y - shape[1] // 2) ** 2 < (6 + k) ** 2).astype(np.uint8)
        image = (rng.normal(0, 30, shape) + mask * 400.0 - 1000).astype(np.int16)
        nifti(root / "images" / f"case{k}.nii.gz", image[..., None], affine)
        nifti(root / "masks" / f"case{k}.nii.gz", mask[..., None], affine)
    return root


# ---------------------------------------------------------------------------------------------- reading


def test_suffixes_with_two_parts():
    assert file_suffix("a/case1.nii.gz") == ".nii.gz" and file_stem("a/case1.nii.gz") == "case1"
    assert file_suffix("x.PNG") == ".png" and file_stem("x.y.png") == "x.y"
    assert mask_suffix_for(["a.png", "b.tif"]) == ".png"
    assert mask_suffix_for([{"image": "a.png"}, {"image": "b.dcm"}]) == ".nii.gz"


def test_a_nifti_slice_reads_in_voxel_order_with_its_affine(tmp_path):
    volume = nib.load(NIBABEL_DATA / "anatomical.nii")
    slice_ = np.asarray(volume.dataobj)[:, :, 12:13]  # X x Y x 1: read as 2D
    path = nifti(tmp_path / "slice.nii.gz", slice_, volume.affine)
    array, meta = read_image(path)
    assert array.shape == slice_.shape[:2] and np.array_equal(array, slice_[..., 0])
    assert np.allclose(meta["affine"], volume.affine) and meta["format"] == "NIfTI"
    assert meta["source_dtype"] == "int16"


def test_the_same_picture_as_png_and_as_nifti_gives_the_network_the_same_array(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 255, (30, 40), dtype=np.uint8)  # H x W
    Image.fromarray(rgb).save(tmp_path / "p.png")
    nifti(tmp_path / "p.nii.gz", np.ascontiguousarray(rgb.T), np.eye(4))  # NIfTI i = x (columns), j = y (rows)
    load = LoadImage(reader=AnyImageReader(), ensure_channel_first=True)
    assert torch.equal(load(tmp_path / "p.png").as_tensor(), load(tmp_path / "p.nii.gz").as_tensor())


@pytest.mark.parametrize(
    ("name", "shape"), [("anatomical.nii", "33 x 41 x 25"), ("example4d.nii.gz", "128 x 96 x 24 x 2")]
)
def test_volumes_are_refused_naming_the_file_and_its_shape(name, shape):
    with pytest.raises(UnreadableFileError) as e:
        read_image(NIBABEL_DATA / name)
    assert str(e.value).startswith(str(NIBABEL_DATA / name)) and f"volume of shape {shape}" in str(e.value)
    assert "2D" in str(e.value)


def test_dicom_reads_with_its_geometry_and_one_without_pixels_is_refused():
    array, meta = read_image(CT)
    assert array.shape == (128, 128) and meta["format"] == "DICOM"
    assert np.allclose(np.abs(np.diag(meta["affine"])[:2]), 0.661468)
    with pytest.raises(UnreadableFileError, match="rtplan.dcm: DICOM file has no pixel data"):
        read_image(NO_PIXELS)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_metaimage_and_nrrd_written_by_simpleitk(tmp_path, suffix):
    rows = np.arange(30 * 20, dtype=np.uint16).reshape(30, 20)  # SimpleITK arrays are (y, x)
    image = sitk.GetImageFromArray(rows)
    image.SetSpacing((0.5, 0.7))
    image.SetOrigin((3.0, 4.0))
    sitk.WriteImage(image, str(tmp_path / f"m{suffix}"))
    array, meta = read_image(tmp_path / f"m{suffix}")
    assert np.array_equal(array, rows.T)  # (i, j) = (x, y), like PNG's (W, H)
    expected = np.diag([-0.5, -0.7, 1.0, 1.0])  # LPS -> RAS
    expected[:2, 3] = [-3.0, -4.0]
    assert np.allclose(meta["affine"], expected)


# ----------------------------------------------------------------------------------------- intensities


def test_intensity_normalisation_percentile_window_and_8bit_left_alone():
    ct = np.linspace(-1000, 1000, 201, dtype=np.float32)[None, None]
    window = NormaliseIntensity({"mode": "window", "center": 40, "width": 400})(ct, source_dtype="int16")
    assert window.min() == 0 and window.max() == 255 and np.isclose(window[0, 0, 100], (0 - (40 - 200)) * 255 / 400)
    spread = NormaliseIntensity()(ct, source_dtype="int16")
    assert spread.min() == 0 and spread.max() == 255
    eight = np.arange(256, dtype=np.float32)[None, None]
    assert NormaliseIntensity()(eight, source_dtype="uint8") is eight
    with pytest.raises(ValueError, match="'center' and 'width'"):
        NormaliseIntensity({"mode": "window"})


# ------------------------------------------------------------------------------------ folder + check


def test_check_of_a_nifti_folder_reports_formats_spacings_and_intensities(tmp_path, capsys):
    folder = make_nifti_folder(tmp_path / "ds")
    assert main(["data", "check", "folder", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "pairs: 6" in out and "images (H x W): 52x40 grey 16-bit (6)" in out
    assert "image formats: NIfTI (6)" in out and "pixel spacing (row x column, mm): 0.6 x 0.8 (6)" in out
    assert "intensities, grey int16 (6 images)" in out and "percentiles 0.5..99.5" in out
    assert "label values: 0, 1" in out and "OK: 6 pairs usable" in out


def test_mixed_formats_pair_by_name(tmp_path):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "images" / "ct.dcm").write_bytes(CT.read_bytes())
    nifti(root / "masks" / "ct.nii.gz", np.zeros((128, 128), np.uint8), read_image(CT)[1]["affine"])
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "photo.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(root / "masks" / "photo.png")
    report = check_dataset("folder", root)
    assert report.pairs == 2 and report.ok, [str(p) for p in report.problems]
    assert report.formats == {"DICOM": 1, "PNG": 1}


def test_check_names_each_bad_file(tmp_path, capsys):
    folder = make_nifti_folder(tmp_path / "ds", n=3)
    images, masks = folder / "images", folder / "masks"
    volume = np.zeros((40, 52, 3, 2), np.int16)
    nifti(images / "vol.nii.gz", volume)  # a 4D volume
    nifti(masks / "vol.nii.gz", volume[..., 0, 0].astype(np.uint8))
    (images / "plan.dcm").write_bytes(NO_PIXELS.read_bytes())  # a DICOM without pixel data
    nifti(masks / "plan.nii.gz", np.zeros((4, 4), np.uint8))
    nifti(masks / "case1.nii.gz", np.zeros((30, 52, 1), np.uint8))  # a mask of another shape
    nifti(masks / "case2.nii.gz", np.full((40, 52, 1), 7, np.uint8))  # not a 0/1 or 0/255 mask
    assert main(["data", "check", "folder", str(folder)]) == 1
    out = "".join(capsys.readouterr())  # the problems go to stderr
    assert f"{images / 'vol.nii.gz'}: NIfTI file is a volume of shape 40 x 52 x 3 x 2" in out
    assert f"{images / 'plan.dcm'}: DICOM file has no pixel data (modality RTPLAN)" in out
    assert f"{masks / 'case1.nii.gz'}: label is 52x30 but its image case1.nii.gz is 52x40 (H x W)" in out
    assert f"{masks / 'case2.nii.gz'}: label values are 7; a 0/1 or 0/255 mask expected" in out


def test_the_8bit_datasets_still_refuse_16bit_and_grey_images(tmp_path):
    spec = get_dataset("kvasir-seg")
    assert not spec.medical_formats and get_dataset("folder").medical_formats


# -------------------------------------------------------------------------- training and predict


def run_bundle(run_id: str, configs: list[Path], *overrides: str) -> subprocess.CompletedProcess:
    config = str([str(c) for c in configs])
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config, "--num_workers", "0"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MASKSUP_MED_CACHE_DIR": str(Path(overrides[-1]) / "cache")}
    return subprocess.run(
        [*cmd, *overrides], check=False, cwd=REPO, capture_output=True, text=True, timeout=600, env=env
    )


@pytest.mark.slow
def test_one_epoch_on_a_nifti_folder_then_predict_writes_masks_with_the_images_affine(tmp_path):
    folder = make_nifti_folder(tmp_path / "ds", n=8)
    out = tmp_path / "out"
    size = ["--image_size", "[32,32]"]
    train = run_bundle(
        "training",
        [CONFIGS / "train.json"],
        *["--dataset", "folder", "--dataset_dir", str(folder), "--max_epochs", "1", "--val_interval", "1"],
        *["--batch_size", "2", *size, "--output_dir", str(out)],
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("case1.nii.gz", "case2.nii.gz"):
        (inputs / name).write_bytes((folder / "images" / name).read_bytes())
    (inputs / "ct.dcm").write_bytes(CT.read_bytes())
    predictions = tmp_path / "pred"
    infer = run_bundle(
        "inferring",
        [CONFIGS / "train.json", CONFIGS / "inference.json"],
        *["--input_dir", str(inputs), "--prediction_dir", str(predictions), *size, "--output_dir", str(out)],
    )
    assert infer.returncode == 0, infer.stdout[-3000:] + infer.stderr[-3000:]
    assert sorted(p.name for p in predictions.iterdir()) == ["case1_mask.nii.gz", "case2_mask.nii.gz", "ct_mask.nii.gz"]
    for name in ("case1", "case2"):
        image, mask = nib.load(inputs / f"{name}.nii.gz"), nib.load(predictions / f"{name}_mask.nii.gz")
        assert np.allclose(mask.affine, image.affine, atol=1e-5)
        assert mask.shape[:2] == image.shape[:2] and set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    ct_mask = nib.load(predictions / "ct_mask.nii.gz")
    assert ct_mask.shape == (128, 128) and np.allclose(ct_mask.affine, read_image(CT)[1]["affine"], atol=1e-5)


# ---------------------------------------------------------------------------------------------- serve


def test_serving_header_checks_for_nifti_and_dicom(tmp_path):
    from masksup_med.serving.limits import ImageRejected, InputLimits, image_header

    data = nifti(tmp_path / "s.nii.gz", np.zeros((40, 30, 1), np.int16)).read_bytes()
    header = image_header(data)
    assert (header.suffix, header.width, header.height, header.decoded_bytes) == (".nii.gz", 40, 30, 2400)
    big = nib.Nifti1Header()
    big.set_data_shape((30000, 30000))  # a header declaring 900 M pixels, with no pixels behind it
    with pytest.raises(ImageRejected, match="30000 x 30000 = 900,000,000 pixels"):
        image_header(big.binaryblock + b"\0" * 4).check(InputLimits())
    ct = image_header(CT.read_bytes())
    assert (ct.suffix, ct.width, ct.height) == (".dcm", 128, 128)
    with pytest.raises(ImageRejected, match="volume of shape 33 x 41 x 25"):
        image_header((NIBABEL_DATA / "anatomical.nii").read_bytes())
    with pytest.raises(ImageRejected, match="no pixel data"):
        image_header(NO_PIXELS.read_bytes())


def test_serve_answers_a_nifti_body_with_a_mask_of_its_size(tmp_path):
    from masksup_med.serving.model import build_serving_model, segment_files
    from masksup_med.tracking.model_format import build_network
    from masksup_med.tracking.registry import register_checkpoint

    tiny = {"_target_": "UNet", "spatial_dims": 2, "in_channels": 3, "out_channels": 1, "channels": [4, 8]}
    tiny |= {"strides": [2], "num_res_units": 0}
    torch.manual_seed(0)
    torch.save({"model": build_network(tiny).state_dict()}, tmp_path / "model.pt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with contextlib.chdir(tmp_path):
        register_checkpoint(tmp_path / "model.pt", tiny, "tiny", uri, (3, 32, 32), bundle="glas")
        served = build_serving_model("models:/tiny@candidate", CONFIGS / "train.json", tmp_path / "m", "cpu", None, uri)
    image = nifti(tmp_path / "ct.nii.gz", (np.arange(40 * 30).reshape(40, 30) * 3 - 1000).astype(np.int16))
    answer = segment_files(served, [image]).iloc[0]
    assert (answer["width"], answer["height"]) == (40, 30)  # X voxels across, Y down
    mask = Image.open(io.BytesIO(base64.b64decode(answer["mask"])))
    assert mask.size == (40, 30)


# ------------------------------------------------------------------------------------------ real data


@pytest.mark.real_data
def test_glas_images_written_as_nifti_read_as_the_pngs_do_and_check(tmp_path, capsys):
    if not REAL_GLAS.is_dir():
        pytest.skip(f"real data not found at {REAL_GLAS}")
    load = LoadImage(reader=AnyImageReader(), ensure_channel_first=True)
    for k in (1, 2, 3):
        png = REAL_GLAS / f"train_{k}.png"
        rgb = np.asarray(Image.open(png).convert("RGB"))  # H x W x 3
        anno = np.asarray(Image.open(REAL_GLAS / f"train_{k}_anno.png"))
        vector = np.ascontiguousarray(rgb.transpose(1, 0, 2))[:, :, None, None, :]  # NIfTI's X x Y x 1 x 1 x RGB
        image = nifti(tmp_path / "ds" / "images" / f"train_{k}.nii.gz", vector)
        nifti(tmp_path / "ds" / "masks" / f"train_{k}.nii.gz", np.ascontiguousarray((anno > 0).T.astype(np.uint8)))
        assert torch.equal(load(png).as_tensor(), load(image).as_tensor())
    assert main(["data", "check", "folder", str(tmp_path / "ds")]) == 0
    out = capsys.readouterr().out
    assert "image formats: NIfTI (3)" in out and "intensities, colour uint8 (3 images)" in out and "used as is" in out
