"""Semi-supervised pieces on hand-made values: EMA update, confidence, ramp-up, multi-scale average,
the confident pseudo-label loss, the labelled fraction, one MaskMatch step, the pseudo-label figure,
and DDP's gradients when the student runs twice before one backward."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _semi_batches import semi_batches
from ignite.engine import Events
from monai.networks.nets import UNet
from PIL import Image
from torch import nn

from masksup_med.data import DatasetError, DatasetNotFoundError, UnreadableFileError, with_unlabelled
from masksup_med.methods.losses import ConfidentPseudoLabelLoss, MaskSupLoss, confidence_mask
from masksup_med.methods.maskmatch import MaskMatchTrainer
from masksup_med.methods.teacher import (
    burn_in_momentum,
    ema_update,
    make_teacher,
    multiscale_probabilities,
    sigmoid_rampup,
)
from masksup_med.tracking.figures import PseudoLabelFigureHandler, pseudo_label_image


def test_ema_update_averages_parameters_and_copies_the_students_buffers():
    student, teacher = nn.BatchNorm2d(2), nn.BatchNorm2d(2)
    with torch.no_grad():
        student.weight.fill_(1.0)
        teacher.weight.fill_(0.0)
        student.running_mean.fill_(2.0)
        teacher.running_mean.fill_(4.0)
    student.num_batches_tracked.fill_(7)
    ema_update(teacher, student, momentum=0.9)
    torch.testing.assert_close(teacher.weight, torch.full((2,), 0.1))  # 0.9 * 0 + 0.1 * 1
    torch.testing.assert_close(teacher.running_mean, student.running_mean)  # statistics copied, not averaged
    assert int(teacher.num_batches_tracked) == 7
    ema_update(teacher, student, momentum=0.0)
    torch.testing.assert_close(teacher.weight, student.weight)
    with pytest.raises(ValueError, match="momentum"):
        ema_update(teacher, student, momentum=1.5)


def test_make_teacher_is_a_frozen_copy():
    student = nn.Linear(3, 1)
    teacher = make_teacher(student)
    assert teacher is not student and not any(p.requires_grad for p in teacher.parameters())
    torch.testing.assert_close(teacher.weight, student.weight)


def test_confidence_mask_binary_and_multiclass():
    probs = torch.tensor([0.97, 0.5, 0.02, 0.9]).reshape(1, 1, 2, 2)
    assert confidence_mask(probs, 0.95).flatten().tolist() == [True, False, True, False]
    softmax = torch.tensor([[0.96, 0.3], [0.02, 0.4], [0.02, 0.3]]).reshape(1, 3, 1, 2)
    assert confidence_mask(softmax, 0.95).flatten().tolist() == [True, False]


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 5) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(2.5, 5) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(5, 5) == 1.0 and sigmoid_rampup(9, 5) == 1.0 and sigmoid_rampup(0, 0) == 1.0


class _Halves(nn.Module):
    """Logit +4 on the left half of the input, -4 on the right, at any size: a scale-dependent toy."""

    def forward(self, x):
        out = torch.full((x.shape[0], 1, *x.shape[2:]), -4.0)
        out[..., : x.shape[-1] // 2] = 4.0
        return out + x[:, :1] * 0


def test_multiscale_probabilities_average_back_at_the_input_size():
    images = torch.zeros(2, 3, 32, 32)
    single = multiscale_probabilities(_Halves(), images, (1.0,))
    averaged = multiscale_probabilities(_Halves(), images, (0.5, 1.0, 1.5))
    assert averaged.shape == (2, 1, 32, 32)
    torch.testing.assert_close(single[..., 0], torch.full((2, 1, 32), torch.sigmoid(torch.tensor(4.0)).item()))
    torch.testing.assert_close(averaged[..., :8], single[..., :8])  # far from the border all scales agree

    class Scale(nn.Module):  # probability = the input's mean brightness, whatever the size
        def forward(self, x):
            return torch.logit(x[:, :1].clamp(0.01, 0.99))

    flat = torch.full((1, 3, 32, 32), 0.7)
    torch.testing.assert_close(multiscale_probabilities(Scale(), flat, (0.5, 2.0)), torch.full((1, 1, 32, 32), 0.7))


def test_confident_pseudo_label_loss_counts_confident_pixels_only():
    loss = ConfidentPseudoLabelLoss(threshold=0.9, dice_weight=0.0)
    teacher = torch.tensor([0.95, 0.6, 0.05, 0.5]).reshape(1, 1, 2, 2)
    student = torch.tensor([2.0, -3.0, -1.0, 5.0]).reshape(1, 1, 2, 2)
    value, confident = loss(student, teacher)
    bce = nn.functional.binary_cross_entropy_with_logits
    expected = (bce(torch.tensor(2.0), torch.tensor(1.0)) + bce(torch.tensor(-1.0), torch.tensor(0.0))) / 4
    assert value.item() == pytest.approx(expected.item()) and confident.item() == 0.5
    nowhere, none = loss(student, torch.full_like(teacher, 0.5))
    assert nowhere.item() == 0.0 and none.item() == 0.0
    better, _ = loss(torch.tensor([9.0, 0.0, -9.0, 0.0]).reshape(1, 1, 2, 2), teacher)
    assert better < value  # agreeing with the teacher's confident pixels lowers it
    with pytest.raises(ValueError, match="threshold"):
        ConfidentPseudoLabelLoss(threshold=0.3)


def _datalist(n=8):
    items = [{"image": f"/d/train_{i}.png", "label": f"/d/train_{i}_anno.png", "id": f"train_{i}"} for i in range(n)]
    return {
        "train": items,
        "validation": [{"image": "/d/v.png", "label": "/d/v_anno.png", "id": "v"}],
        "test": [{"image": "/d/t.png", "label": "/d/t_anno.png", "id": "t"}],
    }


def test_with_unlabelled_keeps_a_seeded_fraction_and_leaves_held_out_splits():
    out = with_unlabelled(_datalist(), 0.25, seed=0)
    assert len(out["train"]) == 2 and len(out["unlabelled"]) == 6
    assert all("label" not in item for item in out["unlabelled"])
    assert {i["id"] for i in out["train"]}.isdisjoint(i["id"] for i in out["unlabelled"])
    assert out["validation"] == _datalist()["validation"] and out["test"] == _datalist()["test"]
    shuffled = _datalist()
    shuffled["train"].reverse()
    assert with_unlabelled(shuffled, 0.25, seed=0)["train"] == out["train"]  # independent of file order
    assert with_unlabelled(_datalist(), 0.25, seed=1)["train"] != out["train"]


@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.1])
def test_label_fraction_outside_the_range_names_the_value(fraction):
    with pytest.raises(DatasetError, match=f"label_fraction must lie in \\(0, 1\\], got {fraction}"):
        with_unlabelled(_datalist(), fraction, seed=0)


def test_label_fraction_labelling_no_image_and_no_unlabelled_images_fail():
    with pytest.raises(DatasetError, match="labels none"):
        with_unlabelled(_datalist(4), 0.1, seed=0)
    with pytest.raises(DatasetError, match="no unlabelled images"):
        with_unlabelled(_datalist(4), 1.0, seed=0)


def test_unlabelled_dir_is_read_checked_and_missing_or_empty_is_named(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    with pytest.raises(DatasetNotFoundError, match=f"unlabelled_dir {folder} holds no images"):
        with_unlabelled(_datalist(), 1.0, seed=0, unlabelled_dir=folder)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        with_unlabelled(_datalist(), 1.0, seed=0, unlabelled_dir=tmp_path / "missing")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    (folder / ".DS_Store").write_bytes(b"\0")
    out = with_unlabelled(_datalist(), 1.0, seed=0, unlabelled_dir=folder)
    assert len(out["train"]) == 8 and [i["image"] for i in out["unlabelled"]] == [str(folder / "a.png")]
    (folder / "b.png").write_bytes(b"")
    with pytest.raises(UnreadableFileError, match="b.png"):
        with_unlabelled(_datalist(), 1.0, seed=0, unlabelled_dir=folder)


def test_maskmatch_step_trains_the_student_and_moves_the_teacher_by_ema():
    torch.manual_seed(0)
    net = UNet(2, 3, 1, channels=(4, 8), strides=(2,), num_res_units=0)
    teacher = make_teacher(net)
    before_teacher = [p.clone() for p in teacher.parameters()]
    trainer = MaskMatchTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=semi_batches(3, 0),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=MaskSupLoss(a2=0.0, a3=0.0),
        unlabelled_loader=semi_batches(2, 1, labelled=False),
        teacher=teacher,
        ema_momentum=0.5,
        ema_burn_in_epochs=0,
        unsup_loss=ConfidentPseudoLabelLoss(threshold=0.5),
        rampup_epochs=0,
        teacher_scales=(1.0,),
        decollate=False,
    )
    momenta = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: momenta.append(e.current_ema_momentum()))
    trainer.run()
    output = trainer.state.output
    assert momenta == [0.5, 0.5, 0.5]  # no burn-in: the configured momentum from the first step
    assert trainer.state.iteration == 3  # the 2-batch unlabelled loader was cycled
    assert output["confident_fraction"] == 1.0  # threshold 0.5: every pixel counts
    assert output["loss"].item() == pytest.approx(output["loss_seg"].item() + output["loss_unsup"].item(), rel=1e-5)
    # (a conv bias before a norm layer gets no gradient, only float noise: it does not count as moved)
    moved = [not torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(before_teacher, teacher.parameters())]
    assert sum(moved) >= len(moved) // 2
    for changed, t, s in zip(moved, teacher.parameters(), net.parameters()):
        assert not changed or not torch.equal(t, s)  # following the student, not a copy of it


def test_a_teacher_activation_other_than_the_student_loss_one_is_refused_at_start():
    net = UNet(2, 3, 1, channels=(4, 8), strides=(2,), num_res_units=0)
    with pytest.raises(ValueError, match="activation 'softmax' but unsup_loss uses 'sigmoid'"):
        MaskMatchTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=semi_batches(1, 0),
            network=net,
            optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
            loss_function=MaskSupLoss(activation="softmax"),
            unlabelled_loader=semi_batches(1, 1, labelled=False),
        )


def test_ema_momentum_is_zero_during_the_burn_in_then_the_configured_value():
    assert [burn_in_momentum(step, 2, 0.99) for step in (1, 2, 3, 500)] == [0.0, 0.0, 0.99, 0.99]
    torch.manual_seed(0)
    net = UNet(2, 3, 1, channels=(4, 8), strides=(2,), num_res_units=0, norm="batch")
    teacher = make_teacher(net)
    trainer = MaskMatchTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=semi_batches(4, 0),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=MaskSupLoss(a2=0.0, a3=0.0),
        unlabelled_loader=semi_batches(2, 1, labelled=False),
        teacher=teacher,
        ema_momentum=0.99,
        ema_burn_in_epochs=0.5,  # 2 of the 4 steps
        decollate=False,
    )
    copies = []

    def compare(engine):
        same = [torch.equal(t, s) for t, s in zip(teacher.state_dict().values(), net.state_dict().values())]
        copies.append((engine.current_ema_momentum(), all(same)))

    trainer.add_event_handler(Events.ITERATION_COMPLETED, compare)
    trainer.run()
    # burn-in: the teacher is the network (parameters and BatchNorm buffers), never an average with the random start
    assert copies == [(0.0, True), (0.0, True), (0.99, False), (0.99, False)]


def test_best_network_selector_keeps_whichever_network_scores_best(tmp_path):
    from types import SimpleNamespace

    from masksup_med.methods.maskmatch import BestNetworkSelectionHandler

    teacher, student = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(2.0)
    evaluators = {name: SimpleNamespace(state=SimpleNamespace(metrics={}, epoch=0)) for name in ("teacher", "student")}
    path = tmp_path / "models" / "model.pt"
    selector = BestNetworkSelectionHandler(
        str(path),
        evaluators,
        {"teacher": teacher, "student": student},
        {"teacher": "val_mean_iou", "student": "val_student_mean_iou"},
    )

    def round_(name, metric, score, epoch):
        evaluators[name].state.metrics[metric], evaluators[name].state.epoch = score, epoch
        return selector.consider(name, evaluators[name])

    assert round_("teacher", "val_mean_iou", 0.4, 1) and round_("student", "val_student_mean_iou", 0.5, 1)
    assert not round_("teacher", "val_mean_iou", 0.45, 2)  # better than its own best, not than the student's
    assert torch.load(path, weights_only=True)["weight"].flatten().tolist() == [2.0, 2.0]
    assert selector.tags() == {"selected_network": "student", "best_val_mean_iou": "0.5000", "best_epoch": "1"}
    restored = BestNetworkSelectionHandler(
        str(path),
        evaluators,
        {"teacher": teacher, "student": student},
        {"teacher": "val_mean_iou", "student": "val_student_mean_iou"},
    )
    restored.load_state_dict(selector.state_dict())
    assert restored.tags() == selector.tags()


def test_pseudo_label_image_shows_the_class_where_confident_and_grey_or_red_elsewhere():
    binary = torch.tensor([[[0.99, 0.97, 0.5], [0.03, 0.01, 0.965]]])  # 1 channel, 2 x 3
    assert pseudo_label_image(binary, 0.96).tolist() == [[[1.0, 1.0, 0.5], [0.0, 0.0, 1.0]]]
    # max(p, 1 - p) >= 0.98: 0.97 and 0.965 (fore) and 0.03 (back) are no longer confident
    assert pseudo_label_image(binary, 0.98).tolist() == [[[1.0, 0.5, 0.5], [0.5, 0.0, 0.5]]]
    three = torch.tensor([[[0.9, 0.2]], [[0.05, 0.3]], [[0.05, 0.5]]])  # 3 classes, 1 x 2: class 0 sure, class 2 not
    shown = pseudo_label_image(three, 0.8)
    assert shown.shape == (3, 1, 2)
    assert shown[:, 0, 0].tolist() == [0.0, 0.0, 0.0]  # class 0: black
    assert shown[:, 0, 1].tolist() == [1.0, 0.0, 0.0]  # not confident: red (grey levels are classes)


def test_pseudo_label_figure_rows_repeat_each_round_and_leave_the_student_as_it_was():
    from monai.transforms import CopyItemsd, RandScaleIntensityd

    from masksup_med.transforms import RandPatchMask

    torch.manual_seed(0)
    student = UNet(2, 3, 1, channels=(4, 8), strides=(2,), num_res_units=0)
    teacher = make_teacher(student)
    g = torch.Generator().manual_seed(1)
    dataset = [{"image": torch.rand(3, 32, 32, generator=g), "label": torch.ones(1, 32, 32)} for _ in range(3)]
    strong = [
        CopyItemsd(keys="image", names="image_strong"),
        RandScaleIntensityd(keys="image_strong", prob=1.0, factors=0.5),
    ]
    masker = RandPatchMask(0.5, patch_size=8)
    handler = PseudoLabelFigureHandler(
        dataset,
        teacher,
        student,
        strong,
        masker,
        "sqlite:///unused.db",
        "e",
        "r",
        threshold=0.5,
        scales=(1.0,),
        num_images=2,
    )
    student.train()
    first, second = handler.rows(torch.device("cpu")), handler.rows(torch.device("cpu"))
    assert student.training  # put back in training mode
    assert len(first) == 2
    assert list(first[0]) == ["image", "label", "pseudo_label", "student_input", "student_pred"]
    for key in first[0]:
        assert first[0][key].shape[1:] == (32, 32), key
        assert all(torch.equal(a[key], b[key]) for a, b in zip(first, second)), key  # reseeded every round
    assert set(first[0]["pseudo_label"].unique().tolist()) <= {0.0, 1.0}  # threshold 0.5: confident everywhere
    assert not torch.equal(first[0]["student_input"], first[0]["image"])  # strong view, masked
    assert strong[1].R is not handler.strong.transforms[1].R  # training's transforms are copies, left alone

    # Pseudo-labels as training makes them: the source in training-mode normalisation, its statistics untouched.
    source = nn.Sequential(nn.Conv2d(3, 1, 1), nn.BatchNorm2d(1)).eval()
    before = source[1].running_mean.clone()
    drawn = PseudoLabelFigureHandler(dataset, source, student, strong, masker, "sqlite:///u.db", "e", "r",
                                     threshold=0.5, num_images=2).rows(torch.device("cpu"))  # fmt: skip
    images = torch.stack([item["image"] for item in dataset[:2]])
    with torch.no_grad():
        batch_stats = F.batch_norm(source[0](images), None, None, source[1].weight, source[1].bias, training=True)
    for row, probs in zip(drawn, torch.sigmoid(batch_stats)):
        assert torch.equal(row["pseudo_label"], pseudo_label_image(probs, 0.5))
    assert not source.training and torch.equal(source[1].running_mean, before)


@pytest.mark.slow  # two processes starting torch
def test_ddp_averages_gradients_of_a_network_run_twice_before_one_backward():
    """MaskMatch under DDP runs the student on the labelled batch and on the masked strong view, then one
    backward: autograd sums both uses of a parameter before DDP's hook reduces it once. (And an epoch
    length that differs between processes is refused at start, on every process.)"""
    import torch.multiprocessing as mp
    from _ddp_worker import free_port, two_forwards_and_a_check

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(two_forwards_and_a_check, args=(2, free_port(), results), nprocs=2, join=True)
        outcome = dict(results)
    for difference, refusal in outcome.values():
        assert difference == pytest.approx(0.0, abs=1e-6)
        assert refusal.startswith("epoch_length differs between the DDP processes ([3, 4], by rank)")
