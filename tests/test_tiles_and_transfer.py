"""Hole fill and per-tile target normalisation, hiding masked positions from the encoder, and the transfer to
fine-tuning: encoder-only, BatchNorm statistics re-estimated, scaled updates at the start."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.networks.nets import UNet
from torch import nn

from masksup_med.methods.pretraining import MaskedReconstructionLoss, channel_mean
from masksup_med.methods.tiles import RandomTileMasker, fill_holes, normalise_tiles
from masksup_med.methods.transfer import FineTuneStartHandler, UpdateScale, reestimate_batchnorm, reinitialise
from masksup_med.methods.unet_parts import (
    HiddenPositions,
    decoder_modules,
    encoder_modules,
    encoder_parameter_names,
)


def test_holes_take_one_fill_value_per_channel_and_nothing_else_changes():
    images = torch.rand(2, 3, 4, 4)
    holes = torch.zeros(2, 4, 4, dtype=torch.bool)
    holes[0, :2, :2] = True
    filled = fill_holes(images, holes, [0.1, 0.2, 0.3])
    assert torch.equal(filled[0, :, 0, 0], torch.tensor([0.1, 0.2, 0.3]))
    assert torch.equal(filled[:, :, 2:], images[:, :, 2:]) and torch.equal(filled[1], images[1])
    with pytest.raises(ValueError, match="hole fill has 2 values for images of 3 channels"):
        fill_holes(images, holes, [0.1, 0.2])


def test_channel_mean_is_the_mean_colour_of_the_first_items():
    dataset = [{"image": torch.stack([torch.full((4, 4), v), torch.zeros(4, 4)])} for v in (0.2, 0.4, 1.0)]
    assert channel_mean(dataset, max_items=2) == pytest.approx([0.3, 0.0])


def test_random_tile_masker_hides_exactly_the_ratio_of_tiles_with_the_fill():
    masker = RandomTileMasker(tile_size=8, ratio=0.5, fill=[0.25, 0.5, 0.75]).set_random_state(0)
    images = torch.rand(3, 3, 32, 32)
    masked, holes = masker.mask_batch(images)
    assert holes.float().mean(dim=(1, 2)).tolist() == [0.5] * 3
    assert torch.equal(
        masked.permute(1, 0, 2, 3)[:, holes], torch.tensor([0.25, 0.5, 0.75])[:, None].expand(3, int(holes.sum()))
    )


def test_tiles_are_normalised_to_zero_mean_and_unit_variance_and_back():
    image = torch.zeros(1, 1, 2, 4)
    image[0, 0, :, :2] = torch.tensor([[1.0, 3.0], [1.0, 3.0]])  # tile 0: mean 2, std 1
    image[0, 0, :, 2:] = 5.0  # tile 1: constant
    normalised, mean, std = normalise_tiles(image, tile_size=2, eps=0.0)
    assert normalised[0, 0, :, :2].tolist() == [[-1.0, 1.0], [-1.0, 1.0]]
    assert mean[0, 0, 0].tolist() == [2.0, 2.0, 5.0, 5.0]
    assert std[0, 0, 0, :2].tolist() == [1.0, 1.0]
    _, mean, std = normalise_tiles(image, tile_size=2)
    assert torch.allclose(normalise_tiles(image, 2)[0] * std + mean, image, atol=1e-5)


def test_loss_with_normalised_targets_is_zero_for_the_normalised_image_and_only_looks_at_holes():
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    holes = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    holes[..., :32, :] = True
    loss = MaskedReconstructionLoss(normalise_targets_tile=16)
    target = normalise_tiles(image, 16)[0]
    right = loss(torch.where(holes, target, torch.zeros_like(image)), image, holes)
    assert right["l1"].item() == pytest.approx(0.0, abs=1e-6) and right["ssim"].item() == pytest.approx(0, abs=1e-4)
    wrong = loss(torch.where(holes, target + 0.5, target), image, holes)
    assert wrong["l1"].item() == pytest.approx(0.5, abs=1e-5)
    assert torch.allclose(loss.as_image(target, image), image, atol=1e-4)


def _unet(out_channels=1, seed=0):
    torch.manual_seed(seed)
    return UNet(2, 3, out_channels, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, norm="batch")


def test_encoder_and_decoder_of_a_monai_unet():
    network = _unet()
    names = encoder_parameter_names(network)
    assert "model.0.conv.unit0.conv.weight" in names and "model.1.submodule.0.conv.unit0.conv.weight" in names
    assert "model.1.submodule.1.submodule.conv.unit0.conv.weight" in names  # the bottom
    assert not any(n.startswith("model.2.") or ".submodule.2." in n for n in names)  # up blocks
    assert len(encoder_modules(network)) == 3 and len(decoder_modules(network)) == 2
    with pytest.raises(TypeError, match="Sequential is not a MONAI UNet"):
        encoder_modules(nn.Sequential(nn.Conv2d(3, 3, 1)))


def _capture(module, store):
    return module.register_forward_hook(lambda m, args, out: store.append(out.detach().clone()))


@pytest.mark.parametrize("mode", ["encoder", "finest_skip"])
def test_hidden_positions_are_zero_in_the_encoder_features_while_open(mode):
    network = _unet(3).eval()
    holes = torch.zeros(1, 32, 32, dtype=torch.bool)
    holes[0, :16, :16] = True  # the top-left quarter: whole feature positions at every scale
    image = torch.rand(1, 3, 32, 32)
    first, skip = [], []
    with HiddenPositions(network, holes, mode):
        hooks = [_capture(network.model[0], first), _capture(network.model[1], skip)]  # run after the masking's
        hidden_out = network(image)
    for h in hooks:
        h.remove()
    plain_out = network(image)  # the masking's hooks are gone
    channels = first[0].shape[1]
    assert (skip[0][0, :channels, :8, :8] == 0).all() and skip[0][0, :channels, 8:, 8:].abs().sum() > 0
    if mode == "encoder":
        assert (first[0][0, :, :8, :8] == 0).all()
    else:
        assert first[0][0, :, :8, :8].abs().sum() > 0 and skip[0][0, channels:, :8, :8].abs().sum() > 0
    assert not torch.equal(hidden_out, plain_out) and torch.equal(plain_out, network(image))


def test_encoder_only_transfer_keeps_the_pretrained_encoder_and_reinitialises_the_decoder():
    pretrained = _unet(3, seed=1)
    network = _unet(1, seed=2)
    network.load_state_dict({k: v for k, v in pretrained.state_dict().items() if "model.2." not in k}, strict=False)
    with torch.no_grad():  # pretraining moved the BatchNorm statistics too
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.fill_(3.0)
    decoder_before = {k: v.clone() for k, v in network.state_dict().items()}
    assert reinitialise(decoder_modules(network)) > 0
    encoder = encoder_parameter_names(network)
    for name, value in network.state_dict().items():
        if name in encoder:
            assert torch.equal(value, decoder_before[name]), name  # untouched
        elif name.endswith("running_mean"):
            assert torch.equal(value, torch.zeros_like(value)), name  # fresh statistics
        elif name.endswith(".weight") and value.dim() > 1:
            assert not torch.equal(value, decoder_before[name]), name  # fresh weights


def test_batchnorm_statistics_are_re_estimated_as_the_average_over_the_batches():
    network = nn.Sequential(nn.BatchNorm2d(2))
    network[0].running_mean.fill_(9.0)
    network.eval()
    batches = [{"image": torch.full((2, 2, 2, 2), 1.0)}, {"image": torch.full((2, 2, 2, 2), 3.0)}, {"image": None}]
    batches[1]["image"][:, 1] = 5.0
    batches[0]["image"][0, 0] = 0.0  # batch 0, channel 0: values 0 and 1 (unbiased variance 2/7)
    weight_before = network[0].weight.clone()
    assert reestimate_batchnorm(network, batches, max_batches=2) == 2
    bn = network[0]
    assert bn.running_mean.tolist() == pytest.approx([(0.5 + 3.0) / 2, (1.0 + 5.0) / 2])
    assert bn.running_var.tolist() == pytest.approx([(2 / 7 + 0.0) / 2, 0.0], abs=1e-6)
    assert bn.momentum == 0.1 and not network.training and torch.equal(bn.weight, weight_before)


def test_update_scale_shrinks_each_step_by_its_factor():
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scale = UpdateScale([parameter], lambda iteration: min(1.0, iteration / 4))
    steps = []
    for iteration in range(1, 6):
        before = parameter.item()
        scale.snapshot(iteration)
        parameter.grad = torch.ones(1)
        optimizer.step()
        scale.apply(iteration)
        steps.append(before - parameter.item())
    assert steps == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_fine_tune_start_warms_up_with_a_smaller_encoder_update_and_re_estimates_batchnorm():
    network = _unet(1)
    images = [{"image": torch.rand(2, 3, 16, 16) * 4 + 2} for _ in range(3)]
    start = FineTuneStartHandler(
        network,
        "pretrained.pt",
        scope="whole",
        batches=images,
        warmup_fraction=2 / 3,
        encoder_lr_scale=0.1,
        encoder_fraction=1.0,
    )
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    encoder = network.model[0].conv.unit0.conv.weight
    decoder = network.model[2][0].conv.weight
    moves = []

    def step(engine, batch):
        before = (encoder.detach().clone(), decoder.detach().clone())
        optimizer.zero_grad()
        for p in network.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
        moves.append((before[0] - encoder.detach()).mean().item())  # the hook applies after this
        return before

    engine = Engine(step)
    start.attach(engine)
    effective = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: effective.append(e.state.output))
    engine.run([0] * 3, max_epochs=1)
    bn = network.model[0].conv.unit0.adn.N
    assert bn.running_mean.mean().item() != 0.0  # statistics from the images, not the fresh zeros
    starts = [o[0] for o in effective] + [encoder.detach()]
    encoder_steps = [(a - b).mean().item() for a, b in zip(starts, starts[1:])]
    assert encoder_steps == pytest.approx([0.1 * 0.1 * 0.5, 0.1 * 0.1 * 1.0, 0.1 * 0.1], rel=1e-4)
    with pytest.raises(ValueError, match="transfer_scope must be one of whole, encoder, got 'all'"):
        FineTuneStartHandler(network, "x.pt", scope="all")
    assert np.isfinite(moves).all()


@pytest.mark.parametrize("epochs, epoch_length, warmup, encoder", [(1, 20, 1, 2), (10, 22, 11, 22), (40, 88, 176, 352)])
def test_the_fine_tuning_schedule_is_a_fraction_of_the_run_whatever_its_length(epochs, epoch_length, warmup, encoder):
    start = FineTuneStartHandler(_unet(1), "pretrained.pt", warmup_fraction=0.05, encoder_fraction=0.1)
    engine = Engine(lambda e, b: None)
    engine.state.max_epochs, engine.state.epoch_length = epochs, epoch_length
    assert start.iterations(engine) == epochs * epoch_length
    assert (start.warmup, start.encoder_iterations) == (warmup, encoder)
    assert start.warmup_factor(warmup) == 1.0 and start.warmup_factor(warmup + 1) == 1.0
    assert start.encoder_factor(encoder) == pytest.approx(0.1) and start.encoder_factor(encoder + 1) == 1.0


def test_fine_tuning_schedule_fractions_outside_zero_to_one_are_refused():
    with pytest.raises(ValueError, match="warmup_fraction=1.5"):
        FineTuneStartHandler(_unet(1), "x.pt", warmup_fraction=1.5)
    with pytest.raises(ValueError, match="encoder_fraction=-0.1"):
        FineTuneStartHandler(_unet(1), "x.pt", encoder_fraction=-0.1)
