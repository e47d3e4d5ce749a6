"""TiffReader matches PILReader's axis convention; ForegroundMaskd binarises every label encoding."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from _datasets import rgb, save, truncate
from monai.transforms import LoadImaged

from masksup_med.data import TiffReader, UnreadableFileError, loader_reader, read_array
from masksup_med.data.readers import AnyImageReader
from masksup_med.transforms import ForegroundMask, ForegroundMaskd


def _load(path: Path, reader):
    return LoadImaged("image", reader=reader, ensure_channel_first=True)({"image": str(path)})["image"]


@pytest.mark.parametrize("channels", [3, 1])
def test_png_and_tiff_load_to_identical_arrays(tmp_path, channels):
    array = rgb(30, 40) if channels == 3 else rgb(30, 40)[..., 0]
    png = _load(save(array, tmp_path / "x.png"), "PILReader")
    tif = _load(save(array, tmp_path / "x.tif"), TiffReader())
    assert png.shape == tif.shape == (channels, 40, 30)  # MONAI 2D convention: (C, W, H)
    assert torch.equal(png.as_tensor(), tif.as_tensor())
    assert list(png.meta["spatial_shape"]) == list(tif.meta["spatial_shape"]) == [40, 30]


def test_planar_tiff_reads_like_contiguous(tmp_path):
    array = rgb(12, 16)
    path = tmp_path / "planar.tiff"
    tifffile.imwrite(path, np.moveaxis(array, -1, 0), photometric="rgb", planarconfig="separate")
    assert np.array_equal(read_array(path), np.swapaxes(array, 0, 1))


def test_loader_reader_by_extension():
    assert isinstance(loader_reader([{"image": "a.tif", "label": "a.TIFF"}]), TiffReader)
    assert loader_reader([{"image": "a.png", "label": "a.jpg"}]) == "PILReader"
    assert isinstance(loader_reader([{"image": "a.png", "label": "a.tif"}]), AnyImageReader)


def test_any_image_reader_reads_each_format_with_its_own_reader_and_logs_no_failed_attempt(tmp_path, caplog):
    array = rgb(30, 40)
    paths = [save(array, tmp_path / name) for name in ("x.png", "x.bmp", "x.tif")]
    with caplog.at_level("INFO"):
        loaded = [_load(path, AnyImageReader()) for path in paths]
    assert "unable to load" not in caplog.text
    for image in loaded:
        assert image.shape == (3, 40, 30)
        assert torch.equal(image.as_tensor(), loaded[0].as_tensor())
    assert [image.meta.get("format") for image in loaded] == ["PNG", "BMP", "TIFF"]
    assert not AnyImageReader().verify_suffix("notes.txt")


def test_read_array_names_broken_tiff(tmp_path):
    path = truncate(save(rgb(64, 64), tmp_path / "cut.tif"))
    with pytest.raises(UnreadableFileError, match="cut.tif"):
        read_array(path)


def test_foreground_mask_from_colour_and_instance_labels():
    colour = np.zeros((3, 4, 5), np.uint8)
    colour[1, 0, 0] = 200  # a gland drawn in green only
    assert ForegroundMask(0)(colour).shape == (1, 4, 5)
    assert ForegroundMask(0)(colour).sum() == 1
    ids = torch.tensor([[[0, 1, 2], [3, 0, 0]]], dtype=torch.uint8)
    out = ForegroundMask(0)(ids)
    assert out.dtype == torch.float32 and out.tolist() == [[[0, 1, 1], [1, 0, 0]]]


def test_foreground_maskd_thresholds_jpeg_noise():
    noisy = torch.tensor([[[0, 3, 120, 128, 250, 255]]] * 3, dtype=torch.float32)
    out = ForegroundMaskd(keys="label", threshold=127)({"label": noisy, "image": 1})
    assert out["label"].tolist() == [[[0, 0, 0, 1, 1, 1]]] and out["image"] == 1


def test_foreground_mask_refuses_alpha():
    with pytest.raises(ValueError, match="4 channels"):
        ForegroundMask(127)(np.zeros((4, 2, 2), np.uint8))
