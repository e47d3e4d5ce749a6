"""Masked-reconstruction pretraining: its data, tile selection, the maskers, the loss, the figures, pretrained
weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.networks.nets import UNet
from PIL import Image
from torch import nn

from masksup_med.data import pretraining_images
from masksup_med.methods.pretraining import (
    MaskedReconstructionLoss,
    SelectiveTileMasker,
    pick_masker,
    select_tiles,
    tile_losses,
    tiles_to_pixels,
)
from masksup_med.run.pretrained import load_pretrained_weights
from masksup_med.tracking.figures import ReconstructionFigureHandler
from masksup_med.transforms import RandPatchMask


def test_pretraining_data_is_the_training_images_only_without_masks(tmp_path):
    datalist = {
        split: [{"image": f"{split}_{i}.png", "label": f"{split}_{i}_anno.png", "id": f"{split}_{i}"} for i in range(3)]
        for split in ("train", "validation", "test", "testA")
    }
    extra = tmp_path / "extra"
    extra.mkdir()
    Image.new("RGB", (8, 8)).save(extra / "slide.png")
    data = pretraining_images(datalist)
    assert list(data) == ["train"]
    assert data["train"] == [
        {"image": f"train_{i}.png", "id": f"train_{i}"} for i in range(3)
    ]  # no label, no held-out image
    with_extra = pretraining_images(datalist, str(extra))
    assert [item["id"] for item in with_extra["train"]] == ["train_0", "train_1", "train_2", "unlabelled/slide"]
    held_out = {item["image"] for split in ("validation", "test", "testA") for item in datalist[split]}
    assert not held_out & {item["image"] for item in with_extra["train"]}


@pytest.mark.parametrize(
    ("masking", "expected"), [("random", "random"), ("selective", "random"), ("per_batch", "per_batch")]
)
def test_pick_masker_gives_the_batch_masker_of_each_masking(masking, expected):
    assert pick_masker(masking, "random", "per_batch") == expected


def test_pick_masker_refuses_anything_else():
    with pytest.raises(ValueError, match="pretrain_masking must be one of random, selective, per_batch, got 'maybe'"):
        pick_masker("maybe", "random", "per_batch")


def test_select_tiles_picks_exactly_the_highest_loss_tiles():
    losses = torch.tensor([[[0.1, 0.9, 0.3], [0.8, 0.2, 0.7]], [[5.0, 4.0, 3.0], [2.0, 1.0, 0.0]]])
    chosen = select_tiles(losses, 0.5)
    assert chosen[0].tolist() == [[False, True, False], [True, False, True]]
    assert chosen[1].tolist() == [[True, True, True], [False, False, False]]
    assert select_tiles(losses, 1 / 6).sum(dim=(1, 2)).tolist() == [1, 1]


def test_tile_losses_and_pixels_round_trip_with_edge_tiles():
    error = torch.zeros(1, 20, 36)
    error[:, 16:, 32:] = 2.0  # the cut corner tile
    losses = tile_losses(error, 16)
    assert (
        losses.shape == (1, 2, 3)
        and losses[0, 1, 2].item() == pytest.approx(2.0)
        and losses.sum().item() == pytest.approx(2.0)
    )
    pixels = tiles_to_pixels(losses > 1, (20, 36), 16)
    assert pixels.shape == (1, 20, 36) and torch.equal(pixels, error > 1)


class _Zeros(nn.Module):
    """Reconstructs every pixel as 0: its error is the image itself, so bright tiles are the worst."""

    def forward(self, x):
        return torch.zeros_like(x) + 0 * x


def test_selective_masker_masks_the_worst_reconstructed_tiles_and_the_fraction():
    images = torch.full((2, 3, 64, 64), 0.1)
    bright = [(0, 0), (1, 3), (2, 2), (3, 1), (0, 3), (2, 0), (1, 1), (3, 3)]  # 8 of 16 tiles
    for row, col in bright:
        images[0, :, row * 16 : (row + 1) * 16, col * 16 : (col + 1) * 16] = 0.9
    masker = SelectiveTileMasker(tile_size=16, ratio=0.5, partitions=4, fill=0.5).set_random_state(0)
    masked, holes = masker.mask_batch(images, _Zeros())
    expected = torch.zeros(4, 4, dtype=torch.bool)
    for row, col in bright:
        expected[row, col] = True
    assert torch.equal(holes[0, ::16, ::16], expected)
    assert holes.float().mean(dim=(1, 2)).tolist() == [0.5, 0.5]
    assert torch.all(masked[holes[:, None].expand_as(masked)] == 0.5)


def test_selective_masker_is_reproducible_with_a_seed():
    torch.manual_seed(0)
    net = UNet(2, 3, 3, channels=(4, 8), strides=(2,), num_res_units=0)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    runs = [SelectiveTileMasker(partitions=3, refresh_every=2).set_random_state(s) for s in (5, 5, 6)]
    holes = [[m.mask_batch(images, net)[1] for _ in range(2)] for m in runs]  # a ranked batch, then a random one
    assert all(torch.equal(a, b) for a, b in zip(holes[0], holes[1]))
    assert not torch.equal(holes[0][1], holes[2][1])


def test_reconstruction_loss_is_zero_when_the_masked_part_is_right_and_grows_with_the_error():
    loss = MaskedReconstructionLoss()
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    holes = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    holes[..., 16:48, 16:48] = True
    wrong_outside = torch.where(holes, image, torch.zeros_like(image))
    assert loss(wrong_outside, image, holes)["total"].item() == pytest.approx(0.0, abs=1e-6)
    small, large = (loss(torch.where(holes, image + e, image), image, holes)["total"].item() for e in (0.05, 0.3))
    assert 0 < small < large
    big = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))  # large enough for MS-SSIM
    big_holes = torch.zeros(1, 1, 256, 256, dtype=torch.bool)
    big_holes[..., :128, :] = True
    terms = loss(torch.where(big_holes, big * 0.5, big), big, big_holes)
    assert terms["ssim"].item() > 0 and terms["l1"].item() == pytest.approx(
        (big[..., :128, :] * 0.5).mean().item(), rel=1e-4
    )


def _unet(out_channels):
    torch.manual_seed(out_channels)
    return UNet(2, 3, out_channels, channels=(4, 8), strides=(2,), num_res_units=0)


def test_pretrained_weights_load_what_matches_and_reinitialise_the_head(tmp_path):
    pretrained = _unet(3)
    path = tmp_path / "pretrained.pt"
    torch.save({"model": pretrained.state_dict()}, path)
    network = _unet(1)
    head_before = {k: v.clone() for k, v in network.state_dict().items()}
    report = load_pretrained_weights(network, path)
    assert report["loaded"] and report["reinitialised"]
    for name, value in network.state_dict().items():
        if name in report["loaded"]:
            assert torch.equal(value, pretrained.state_dict()[name]), name
        else:
            assert torch.equal(value, head_before[name]), name
    assert load_pretrained_weights(network, None) == {"loaded": [], "reinitialised": [], "unused": []}


def test_pretrained_weights_that_match_nothing_or_are_missing_are_refused_naming_the_file(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ValueError, match=f"pretrained_weights {other} matches no weight of UNet"):
        load_pretrained_weights(_unet(1), other)
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        load_pretrained_weights(_unet(1), tmp_path / "missing.pt")


def test_a_figure_that_cannot_be_drawn_warns_and_leaves_training_and_the_network_mode_alone(caplog):
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            raise RuntimeError("boom")

    network = Broken()
    network.train()
    dataset = [{"image": torch.rand(3, 32, 32)}]
    handler = ReconstructionFigureHandler(
        dataset,
        network,
        RandPatchMask(patch_size=16, ratio_range=0.5),
        tile_size=16,
        tracking_uri="sqlite:///unused.db",
        experiment_name="e",
        run_name="r",
    )
    engine = type("Engine", (), {"state": type("State", (), {"epoch": 3})()})()
    with caplog.at_level("WARNING"):
        handler.__call__(engine)  # must not raise
    assert "could not draw figure figures/reconstruction_epoch_0003.png: RuntimeError: boom" in caplog.text
    assert network.training and handler.logged == []


@pytest.mark.parametrize(
    "masker",
    [SelectiveTileMasker(tile_size=16, ratio=0.5, partitions=3), RandPatchMask(patch_size=16, ratio_range=0.5)],
    ids=["selective", "random"],
)
def test_reconstruction_figure_rows_show_masked_tiles_their_loss_and_leave_the_training_masker_alone(masker):
    network = _unet(3)
    dataset = [{"image": torch.rand(3, 64, 48, generator=torch.Generator().manual_seed(i))} for i in range(4)]
    masker.set_random_state(7)
    before = masker.R.get_state()[1].copy()
    handler = ReconstructionFigureHandler(
        dataset,
        network,
        masker,
        tile_size=16,
        tracking_uri="sqlite:///unused.db",
        experiment_name="e",
        run_name="r",
        num_images=2,
        seed=3,
    )
    rows = handler.rows(torch.device("cpu"))
    assert (masker.R.get_state()[1] == before).all()  # the handler masks with its own copy
    assert [sorted(row) for row in rows] == [["image", "image_masked", "reconstruction", "tile_loss"]] * 2
    for row, item in zip(rows, dataset):
        assert torch.equal(row["image"], item["image"]) and row["reconstruction"].shape == (3, 64, 48)
        hidden = (row["image_masked"] != row["image"]).any(dim=0)
        heat = row["tile_loss"][0]
        assert heat.shape == (64, 48) and hidden.float().mean().item() == pytest.approx(0.5, abs=0.1)
        assert torch.isfinite(heat[hidden]).all() and (heat[hidden] >= 0).all()
        assert torch.isnan(heat[~(tiles_to_pixels(tile_losses(hidden[None].float(), 16) > 0.5, (64, 48), 16)[0])]).all()
    again = handler.rows(torch.device("cpu"))  # reseeded every time: the same masks each epoch
    assert all(torch.equal(a["image_masked"], b["image_masked"]) for a, b in zip(rows, again))
    expected = tile_losses((rows[0]["reconstruction"] - rows[0]["image"]).abs().mean(dim=0)[None], 16)[0]
    tiles = rows[0]["tile_loss"][0, ::16, ::16]
    assert torch.allclose(tiles[~torch.isnan(tiles)], expected[~torch.isnan(tiles)])


def test_pretraining_data_takes_every_unmasked_image_but_never_a_held_out_one_even_copied(tmp_path):
    def image(path, value):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (value, value, value)).save(path)
        return str(path)

    datalist = {
        "train": [{"image": image(tmp_path / "ds" / "train0.png", 10), "label": "m0.png", "id": "train0"}],
        "unlabelled": [{"image": image(tmp_path / "ds" / "train1.png", 20), "id": "train1", "source": "train"}],
        "validation": [{"image": image(tmp_path / "ds" / "val0.png", 30), "label": "m.png", "id": "val0"}],
        "test": [{"image": image(tmp_path / "ds" / "test0.png", 40), "label": "m.png", "id": "test0"}],
    }
    other = tmp_path / "other_dataset"
    image(other / "a.png", 50)
    image(other / "copy_of_test.png", 40)  # the same file content as a test image
    (other / "copy_of_test.png").write_bytes((tmp_path / "ds" / "test0.png").read_bytes())
    extra = tmp_path / "extra"
    image(extra / "b.png", 60)
    (extra / "train0.png").write_bytes((tmp_path / "ds" / "train0.png").read_bytes())
    data = pretraining_images(datalist, str(extra), [str(other), str(tmp_path / "ds")])
    ids = [item["id"] for item in data["train"]]
    # the dataset folder itself (pretrain1) adds nothing: its training images are there already, the rest is held out
    assert ids == ["train0", "train1", "unlabelled/b", "unlabelled/train0", "pretrain0/a"]
    held_out = {datalist[s][0]["image"] for s in ("validation", "test")}
    pretrained_on = [item["image"] for item in data["train"]]
    assert not held_out & set(pretrained_on)  # not the files ...
    contents = {open(p, "rb").read() for p in pretrained_on}
    assert not {open(p, "rb").read() for p in held_out} & contents  # ... nor copies of them
    assert len(pretrained_on) == len({str(Path(p).resolve()) for p in pretrained_on})  # each file once
    assert all("label" not in item for item in data["train"])
