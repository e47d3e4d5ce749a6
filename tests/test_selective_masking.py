"""The paper's selective masking: the partition schedule, tile scores averaged over random masks, fixed masks per
part (chosen, attached to the image, used by the trainer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

from masksup_med.methods.pretraining import MaskedReconstructionLoss, RandomTileMasker, ReconstructionTrainer
from masksup_med.methods.selective_masking import (
    FIXED_KEY,
    AttachTileMaskd,
    FixedTileMasks,
    PartitionRoundsHandler,
    PartitionSampler,
    PartitionSchedule,
    score_tiles,
)
from masksup_med.methods.tiles import random_tiles


def test_partition_schedule_splits_the_images_into_disjoint_seeded_parts_first_random_then_fixed():
    schedule = PartitionSchedule(num_items=10, rounds=3, seed=4)
    parts = [schedule.items(k) for k in range(3)]
    assert sorted(len(p) for p in parts) == [3, 3, 4]
    assert sorted(i for p in parts for i in p) == list(range(10))  # every image in exactly one part
    assert parts == [PartitionSchedule(10, 3, seed=4).items(k) for k in range(3)]
    assert parts != [PartitionSchedule(10, 3, seed=5).items(k) for k in range(3)]
    assert [schedule.fixed_masks(k) for k in range(3)] == [False, True, True]
    with pytest.raises(IndexError, match="round 3 is outside the schedule's 3 rounds"):
        schedule.items(3)


def test_unpartitioned_schedule_trains_every_round_on_every_image_with_random_masks():
    schedule = PartitionSchedule(num_items=5, rounds=4, partitioned=False)
    assert all(schedule.items(k) == list(range(5)) and not schedule.fixed_masks(k) for k in range(4))


def test_partition_schedule_refuses_more_parts_than_images():
    with pytest.raises(ValueError, match="cannot split 3 pretraining images into 4 parts"):
        PartitionSchedule(num_items=3, rounds=4)


def test_partition_sampler_draws_the_round_budget_from_the_current_part_only():
    schedule = PartitionSchedule(num_items=9, rounds=3, seed=0)
    sampler = PartitionSampler(schedule, batches_per_round=4, batch_size=2)
    for k in range(3):
        sampler.set_epoch(k)
        drawn = list(sampler)
        assert len(drawn) == len(sampler) == 8
        assert set(drawn) == set(schedule.items(k))  # every image of the part, nothing else


class _Constants(nn.Module):
    """Its k-th call reconstructs every pixel as ``values[k]``."""

    def __init__(self, values):
        super().__init__()
        self.values, self.calls, self.modes = list(values), 0, []

    def forward(self, x):
        self.modes.append(self.training)
        value = self.values[self.calls]
        self.calls += 1
        return torch.full_like(x, value)


def _constant_score(prediction: float, image: float) -> float:
    """L1 + (1 - SSIM) of two constant images, by hand (their variances and covariance are 0)."""
    c1 = 0.01**2
    return abs(prediction - image) + 1 - (2 * prediction * image + c1) / (prediction**2 + image**2 + c1)


def test_tile_scores_are_l1_plus_one_minus_ssim_averaged_over_the_passes():
    images = torch.full((2, 3, 32, 32), 0.5)
    network = _Constants([0.5, 0.0, 0.2])
    network.train()
    scores = score_tiles(network, images, tile_size=16, ratio=1.0, passes=3, R=np.random.RandomState(0))
    expected = (_constant_score(0.5, 0.5) + _constant_score(0.0, 0.5) + _constant_score(0.2, 0.5)) / 3
    assert scores.shape == (2, 2, 2)
    assert torch.allclose(scores, torch.full_like(scores, expected), atol=1e-5)
    assert network.modes == [False] * 3 and network.training  # scored in eval mode, mode restored


def test_a_tile_score_averages_only_the_passes_that_hid_it():
    images = torch.full((1, 1, 16, 32), 0.5)
    values = [0.5, 0.0, 0.3, 0.0, 0.5, 0.1]
    scores = score_tiles(_Constants(values), images, tile_size=16, ratio=0.5, passes=6, R=np.random.RandomState(1))
    R = np.random.RandomState(1)  # the same draws: which of the two tiles each pass hid
    hidden = [random_tiles(R, 1, (1, 2), 0.5)[0, 0] for _ in values]
    for col in range(2):
        own = [_constant_score(v, 0.5) for v, tiles in zip(values, hidden) if tiles[col]]
        assert own and scores[0, 0, col].item() == pytest.approx(sum(own) / len(own), abs=1e-3)  # float32 SSIM
    assert scores[0, 0, 0].item() != pytest.approx(scores[0, 0, 1].item())


class _Zeros(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.zeros_like(x) + 0 * self.weight


def _bright_quadrant_dataset(n: int) -> list[dict]:
    """``n`` 16 x 16 images of 8 px tiles, image ``i`` bright in quadrant ``i % 4``."""
    items = []
    for i in range(n):
        image = torch.full((3, 16, 16), 0.1)
        row, col = divmod(i % 4, 2)
        image[:, row * 8 : (row + 1) * 8, col * 8 : (col + 1) * 8] = 0.9
        items.append({"image": image, "id": f"img{i}"})
    return items


def test_each_later_part_gets_fixed_masks_from_the_model_and_the_first_part_none():
    dataset = _bright_quadrant_dataset(6)
    schedule = PartitionSchedule(num_items=6, rounds=2, seed=1)
    sampler = PartitionSampler(schedule, batches_per_round=1, batch_size=2)
    masks = FixedTileMasks(tile_size=8)
    rounds = PartitionRoundsHandler(
        schedule, sampler, masks, dataset, _Zeros(), tile_size=8, ratio=0.25, score_passes=16
    )
    rounds.start_round(0)
    assert masks.masks == {} and sampler.round_index == 0  # part 0: random masks
    rounds.start_round(1)
    part = schedule.items(1)
    assert sorted(masks.masks) == sorted(f"img{i}" for i in part) and sampler.round_index == 1
    for i in part:
        expected = np.zeros((2, 2), bool)
        expected[divmod(i % 4, 2)] = True  # the bright tile, worst reconstructed by zeros
        assert (masks.masks[f"img{i}"] == expected).all(), i


def test_attached_fixed_mask_covers_its_tiles_and_flags_items_without_one():
    masks = FixedTileMasks(tile_size=8)
    masks.replace({"a": np.array([[False, True], [False, False]])})
    attach = AttachTileMaskd(keys="image", masks=masks)
    with_mask = attach({"image": torch.zeros(3, 16, 12), "id": "a"})
    assert with_mask[FIXED_KEY].item() == 1.0 and with_mask["holes"].shape == (1, 16, 12)
    expected = torch.zeros(16, 12)
    expected[:8, 8:] = 1
    assert torch.equal(with_mask["holes"][0], expected)  # the edge tile is cut by the border
    without = attach({"image": torch.zeros(3, 16, 12), "id": "b"})
    assert without[FIXED_KEY].item() == 0.0 and without["holes"].sum() == 0
    with pytest.raises(ValueError, match=r"fixed mask of a has \(2, 2\) tiles, its image \(3, 2\)"):
        attach({"image": torch.zeros(3, 24, 12), "id": "a"})


def test_trainer_hides_the_fixed_mask_of_flagged_items_and_random_tiles_of_the_others():
    torch.manual_seed(0)
    network = UNet(2, 3, 3, channels=(4, 8), strides=(2,), num_res_units=0)
    images = torch.rand(2, 3, 32, 32)
    holes = torch.zeros(2, 1, 32, 32)
    holes[0, :, :16, :16] = 1
    batch = {"image": images, "holes": holes, FIXED_KEY: torch.tensor([1.0, 0.0])}
    fill = [0.2, 0.4, 0.6]
    trainer = ReconstructionTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[batch],
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.0),
        loss_function=MaskedReconstructionLoss(normalise_targets_tile=16),
        masker=RandomTileMasker(tile_size=16, ratio=0.5, fill=fill),
        encoder_masking="encoder",
    )
    trainer.run()
    masked = trainer.state.output["image_masked"]
    hidden = (masked != images).any(dim=1)
    assert torch.equal(hidden[0], holes[0, 0] > 0)  # exactly the fixed mask
    assert hidden[1].float().mean().item() == pytest.approx(0.5)  # two random tiles of four
    assert torch.allclose(masked[0, :, 0, 0], torch.tensor(fill))  # holes hold the dataset's mean colour
