"""The pieces of MaskMatch's unlabelled branches on hand-made tensors: BatchNorm statistics left alone by the
masked, strong and perturbed passes, CutMix of image and pseudo-label alike, the ignore-mask Dice, feature
dropout, and one trainer step per pseudo-label source checked against a single clean pass."""

from __future__ import annotations

import copy

import pytest
import torch
from _semi_batches import semi_batches
from monai.networks.nets import UNet
from torch import nn

from masksup_med.errors import ConfigError
from masksup_med.methods.losses import ConfidentPseudoLabelLoss, MaskSupLoss
from masksup_med.methods.maskmatch import MaskMatchTrainer, check_semi_settings
from masksup_med.methods.perturbation import FeatureDropout
from masksup_med.methods.teacher import frozen_norm_statistics, make_teacher, training_mode_probabilities
from masksup_med.transforms import RandCutMix


def _batch_norm_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 1, 1))


def _buffers(module):
    return {name: value.clone() for name, value in module.named_buffers()}


def test_frozen_norm_statistics_normalise_by_the_batch_and_update_nothing():
    net = _batch_norm_net()
    norm = net[1]
    images = torch.tensor([0.0, 2.0, 4.0, 6.0]).reshape(4, 1, 1, 1)
    net.train()
    before = _buffers(net)
    with frozen_norm_statistics(net):
        inside = net[:2](images)
    assert all(torch.equal(before[k], v) for k, v in net.named_buffers())  # means, variances, batch counter
    torch.testing.assert_close(inside, net[:2](images))  # batch statistics, as an ordinary training pass
    assert norm.track_running_stats and int(norm.num_batches_tracked) == 1  # back on: the pass above counted
    with pytest.raises(RuntimeError, match="boom"), frozen_norm_statistics(net):
        raise RuntimeError("boom")
    assert norm.track_running_stats  # restored on the way out of an error too


def test_teacher_pseudo_labels_use_batch_statistics_and_leave_the_teacher_as_it_was():
    teacher = _batch_norm_net()
    with torch.no_grad():
        teacher[1].running_mean.fill_(100.0)  # running statistics far from the batch: eval mode would saturate
    teacher.eval()
    before = _buffers(teacher)
    images = torch.rand(4, 1, 8, 8)
    probs = training_mode_probabilities(teacher, images)
    assert not teacher.training and all(torch.equal(before[k], v) for k, v in teacher.named_buffers())
    reference = copy.deepcopy(teacher).train()
    torch.testing.assert_close(probs, torch.sigmoid(reference(images)))


def test_cutmix_pastes_the_same_box_of_the_previous_sample_into_image_and_pseudo_label():
    images = torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 3, 32, 32)  # sample i is all i
    probs = images[:, :1] / 10
    cutmix = RandCutMix(prob=1.0, area_range=(0.1, 0.3))
    cutmix.set_random_state(0)
    (mixed, mixed_probs), boxes = cutmix(images, probs)
    partner = torch.tensor([3.0, 0.0, 1.0, 2.0]).reshape(4, 1, 1, 1)  # the previous sample, wrapping round
    own = torch.arange(4.0).reshape(4, 1, 1, 1)
    torch.testing.assert_close(mixed, torch.where(boxes, partner, own).expand(4, 3, 32, 32))
    torch.testing.assert_close(mixed_probs, torch.where(boxes, partner, own) / 10)
    areas = boxes.flatten(1).float().mean(1)
    assert bool(((areas > 0.08) & (areas < 0.32)).all())  # 10-30 % of the image, up to rounding
    assert not torch.equal(boxes[0], boxes[1])
    again = RandCutMix(prob=1.0, area_range=(0.1, 0.3))
    again.set_random_state(0)
    assert torch.equal(again(images)[1], boxes)  # seeded: reproducible
    never = RandCutMix(prob=0.0)
    assert not never(images)[1].any()
    assert not cutmix(images[:1])[1].any()  # one sample has no partner
    with pytest.raises(ValueError, match="area_range"):
        RandCutMix(area_range=(0.5, 0.2))
    with pytest.raises(ValueError, match="one batch and size"):
        cutmix(images, probs[:2])


def test_pseudo_label_dice_counts_the_confident_pixels_only():
    source = torch.tensor([0.99, 0.01, 0.6, 0.99]).reshape(1, 1, 2, 2)  # threshold 0.9: pixel 2 ignored
    student = torch.logit(torch.tensor([0.8, 0.3, 0.9, 0.6])).reshape(1, 1, 2, 2)
    dice = ConfidentPseudoLabelLoss(threshold=0.9, ce_weight=0.0, dice_weight=1.0)
    value, confident = dice(student, source)
    foreground = 1 - 2 * (0.8 + 0.6) / ((0.8 + 0.3 + 0.6) + 2)  # pseudo-label 1, 0, -, 1
    background = 1 - 2 * 0.7 / ((0.2 + 0.7 + 0.4) + 1)
    assert value.item() == pytest.approx((foreground + background) / 2, rel=1e-4)
    assert confident.item() == 0.75
    ignored_changed = student.clone()
    ignored_changed[0, 0, 1, 0] = -7.0
    assert dice(ignored_changed, source)[0].item() == pytest.approx(value.item(), rel=1e-6)
    agreeing = torch.logit(torch.tensor([1.0, 0.0, 0.5, 1.0]).clamp(1e-6, 1 - 1e-6)).reshape(1, 1, 2, 2)
    assert dice(agreeing, source)[0].item() == pytest.approx(0.0, abs=1e-4)
    assert dice(student, torch.full_like(source, 0.5))[0].item() == 0.0  # confident nowhere: nothing to learn
    both = ConfidentPseudoLabelLoss(threshold=0.9)
    ce_only = ConfidentPseudoLabelLoss(threshold=0.9, dice_weight=0.0)
    assert both(student, source)[0].item() == pytest.approx(ce_only(student, source)[0].item() + value.item(), 1e-5)
    softmax = ConfidentPseudoLabelLoss(threshold=0.9, activation="softmax", ce_weight=0.0)
    three = torch.tensor([[0.95, 0.02, 0.03], [0.4, 0.3, 0.3]]).T.reshape(1, 3, 1, 2)
    sure = torch.log(torch.tensor([[0.999, 0.0005, 0.0005], [0.1, 0.1, 0.8]]).T.reshape(1, 3, 1, 2))
    assert softmax(sure, three)[0].item() == pytest.approx(0.0, abs=0.01)  # the unsure pixel's wrong class ignored
    with pytest.raises(ValueError, match="not both 0"):
        ConfidentPseudoLabelLoss(ce_weight=0.0, dice_weight=0.0)


def test_feature_dropout_perturbs_only_while_applied_and_names_what_it_cannot_find():
    torch.manual_seed(0)
    net = UNet(2, 3, 1, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    images = torch.rand(2, 3, 16, 16)
    plain = net(images)
    dropout = FeatureDropout(0.5)
    with dropout.applied_to(net):
        perturbed = net(images)
    assert not torch.allclose(perturbed, plain)
    torch.testing.assert_close(net(images), plain)  # hooks removed
    named = FeatureDropout(0.5, module_names=["model.1"])
    assert named.modules(net) == [net.model[1]]
    with pytest.raises(ValueError, match="no MONAI SkipConnection"):
        dropout.modules(nn.Conv2d(3, 1, 1))
    with pytest.raises(ValueError, match=r"no submodule named \['encoder'\]"):
        FeatureDropout(module_names=["encoder"]).modules(net)
    with pytest.raises(ValueError, match="p must lie"):
        FeatureDropout(1.0)


def _trainer(net, source, **kwargs):
    return MaskMatchTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=semi_batches(1, 0),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=kwargs.pop("loss_function", MaskSupLoss(a2=0.0, a3=0.0)),
        unlabelled_loader=semi_batches(1, 1, labelled=False),
        pseudo_label_source=source,
        cutmix=RandCutMix(prob=1.0),
        decollate=False,
        **kwargs,
    )


@pytest.mark.parametrize("source", ["online", "teacher"])
def test_a_step_updates_batch_norm_statistics_with_the_clean_pass_alone(source):
    """After one step the network's running statistics are exactly those of one training-mode pass on the
    clean images (labelled + weak view for the online source, labelled alone for the teacher): the masked
    labelled pass, the CutMixed strong view, the feature-perturbed and the masked strong views left them alone."""
    torch.manual_seed(0)
    net = UNet(2, 3, 1, channels=(4, 8), strides=(2,), num_res_units=0, norm="batch")
    reference = copy.deepcopy(net).train()
    labelled, unlabelled = semi_batches(1, 0)[0], semi_batches(1, 1, labelled=False)[0]
    clean = torch.cat([labelled["image"], unlabelled["image"]]) if source == "online" else labelled["image"]
    with torch.no_grad():
        reference(clean)
    masksup = MaskSupLoss(a2=1.0, a3=1.0)  # the labelled batch's masked pass runs too
    from masksup_med.transforms import RandPatchMask

    trainer = _trainer(net, source, loss_function=masksup, batch_masker=RandPatchMask(0.5, patch_size=8))
    trainer.run()
    out = trainer.state.output
    assert {"loss_unsup_strong", "loss_unsup_feature", "loss_unsup_masked"} <= set(out)
    for name, value in reference.named_buffers():
        torch.testing.assert_close(dict(net.named_buffers())[name], value, msg=name)
    assert 0.0 <= out["pseudo_foreground_fraction"].item() <= 1.0
    weights = trainer.branch_weights
    mean = sum(weights[b] * out[f"loss_unsup_{b}"] for b in weights) / sum(weights.values())
    assert out["loss_unsup"].item() == pytest.approx(mean.item(), rel=1e-5)


def test_branches_of_weight_zero_do_not_run_and_online_scales_are_refused():
    net = UNet(2, 3, 1, channels=(4, 8), strides=(2,), num_res_units=0, norm="batch")
    trainer = _trainer(net, "teacher", feature_weight=0.0, masked_weight=0.0, teacher=make_teacher(net))
    trainer.run()
    assert "loss_unsup_strong" in trainer.state.output and "loss_unsup_masked" not in trainer.state.output
    assert trainer.state.output["loss_unsup"].item() == pytest.approx(trainer.state.output["loss_unsup_strong"].item())
    with pytest.raises(ValueError, match="only apply to pseudo_label_source 'teacher'"):
        _trainer(net, "online", teacher_scales=(0.75, 1.0))
    with pytest.raises(ValueError, match="pseudo_label_source must be one of"):
        _trainer(net, "oracle")
    with pytest.raises(ValueError, match="not all 0"):
        _trainer(net, "online", strong_weight=0.0, feature_weight=0.0, masked_weight=0.0)
    with pytest.raises(ValueError, match="single_pass"):
        _trainer(net, "online", single_pass=True)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"pseudo_label_source": "oracle"}, "pseudo_label_source must be one of"),
        ({"ema_momentum": 1.5}, "ema_momentum must lie in"),
        ({"ema_burn_in_epochs": -1}, "ema_burn_in_epochs must be >= 0"),
        ({"branch_weights": [1.0, 1.0]}, "must hold one weight per branch"),
        ({"branch_weights": [1.0, -1.0, 1.0]}, "must be >= 0 and not all 0"),
        ({"pseudo_label_source": "online", "teacher_scales": [0.75, 1.0]}, "only apply to pseudo_label_source"),
    ],
)
def test_semi_settings_check_refuses_each_setting_that_cannot_run(settings, message):
    valid = {
        "pseudo_label_source": "teacher",
        "ema_momentum": 0.99,
        "ema_burn_in_epochs": 1,
        "branch_weights": [1.0, 1.0, 1.0],
        "teacher_scales": [1.0],
    }
    check_semi_settings(**valid)  # the defaults pass
    with pytest.raises(ConfigError, match=message):
        check_semi_settings(**{**valid, **settings})
