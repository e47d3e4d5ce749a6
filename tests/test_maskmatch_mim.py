"""Class-wise masked image modelling (S4MIM-style) in MaskMatch: the loss formulas on hand-made tensors,
the reconstruction head and its exact drop, one trainer step, and the three-config bundle run."""

from __future__ import annotations

import pytest
import torch
from _semi_batches import semi_batches
from monai.networks.nets import UNet
from torch import nn

from masksup_med.methods.losses import ClassWiseReconstructionLoss, FeatureAggregationLoss, MaskSupLoss, class_regions
from masksup_med.methods.maskmatch import MaskMatchTrainer
from masksup_med.methods.mim import ReconstructionHeads
from masksup_med.transforms import RandPatchMask


def _row(values):
    """A ``1, 1, 2, 4`` tensor from the first row's four values (the second row zeros)."""
    out = torch.zeros(1, 1, 2, 4)
    out[0, 0, 0] = torch.tensor(values, dtype=torch.float32)
    return out


# One image of 2 x 4 pixels. The label's foreground is pixel (0, 0) alone. The first row is masked.
LABEL = _row([1.0, 0.0, 0.0, 0.0])
HOLES = torch.zeros(1, 2, 4, dtype=torch.bool)
HOLES[0, 0] = True
TARGET = torch.zeros(1, 1, 2, 4)
# errors on the masked row: foreground 0.8, background 0.2 three times; visible pixels are wrong by 1.0
RECONSTRUCTION = _row([0.8, 0.2, 0.2, 0.2])
RECONSTRUCTION[0, 0, 1] = 1.0


def test_class_regions_of_binary_labels_and_of_softmax_probabilities():
    regions = class_regions(LABEL)
    assert regions.shape == (1, 2, 2, 4) and regions.dtype == torch.bool
    assert regions[0, 1].sum() == 1 and bool(regions[0, 1, 0, 0]) and regions[0, 0].sum() == 7
    probs = torch.tensor([[0.7, 0.1], [0.2, 0.1], [0.1, 0.8]]).reshape(1, 3, 1, 2)
    assert class_regions(probs)[0, :, 0].tolist() == [[True, False], [False, False], [False, True]]
    assert class_regions(torch.full((1, 1, 1, 1), 0.5))[0, :, 0, 0].tolist() == [True, False]  # 0.5: background


def test_class_wise_l1_averages_each_class_then_the_classes_not_the_masked_pixels():
    loss = ClassWiseReconstructionLoss()(RECONSTRUCTION, TARGET, HOLES, class_regions(LABEL))
    plain_masked_mean = (0.8 + 3 * 0.2) / 4  # 0.35: the background's three pixels dominate
    class_averaged = (0.8 + (0.2 + 0.2 + 0.2) / 3) / 2  # 0.5: the foreground's one pixel weighs as much
    assert loss.item() == pytest.approx(class_averaged) and loss.item() != pytest.approx(plain_masked_mean)


def test_class_wise_mse_uses_squared_errors():
    loss = ClassWiseReconstructionLoss("mse")(RECONSTRUCTION, TARGET, HOLES, class_regions(LABEL))
    assert loss.item() == pytest.approx((0.8**2 + 0.2**2) / 2)


def test_perfect_reconstruction_of_the_masked_pixels_costs_nothing_whatever_the_visible_ones():
    reconstruction = TARGET.clone()
    reconstruction[0, 0, 1] = torch.tensor([0.9, 0.1, 0.5, 1.0])  # wrong, but visible: ignored
    assert ClassWiseReconstructionLoss()(reconstruction, TARGET, HOLES, class_regions(LABEL)).item() == 0.0


def test_class_wise_loss_pools_a_class_over_the_batch_and_averages_channels():
    target = torch.zeros(2, 3, 1, 4)
    reconstruction = torch.zeros(2, 3, 1, 4)
    reconstruction[0, 0, 0, 0] = 2.4  # image 0: its one foreground pixel, error 2.4 / 3 channels = 0.8
    reconstruction[1, :, 0, :3] = 0.2  # image 1: three foreground pixels, error 0.2 each
    label = torch.zeros(2, 1, 1, 4)
    label[0, 0, 0, 0] = 1.0
    label[1, 0, 0, :3] = 1.0
    holes = torch.ones(2, 1, 4, dtype=torch.bool)
    loss = ClassWiseReconstructionLoss()(reconstruction, target, holes, class_regions(label))
    foreground = (0.8 + 3 * 0.2) / 4  # the foreground's four masked pixels of the batch, pooled
    background = 0.0  # four background pixels (three in image 0, one in image 1), all exact
    assert loss.item() == pytest.approx((foreground + background) / 2)


def test_class_wise_loss_counts_only_classes_with_masked_pixels_and_is_zero_without_any():
    holes = torch.zeros(1, 2, 4, dtype=torch.bool)
    holes[0, 0, 1:] = True  # the foreground pixel (0, 0) is visible
    loss_fn = ClassWiseReconstructionLoss()
    assert loss_fn(RECONSTRUCTION, TARGET, holes, class_regions(LABEL)).item() == pytest.approx(0.2)
    reconstruction = RECONSTRUCTION.clone().requires_grad_(True)
    nothing = loss_fn(reconstruction, TARGET, torch.zeros_like(holes), class_regions(LABEL))
    nothing.backward()
    assert nothing.item() == 0.0 and reconstruction.grad is not None
    with pytest.raises(ValueError, match="distance"):
        ClassWiseReconstructionLoss("ssim")


def test_feature_aggregation_compares_masked_and_visible_class_means_by_cosine_and_detaches_the_visible():
    features = torch.zeros(1, 2, 2, 4)  # two feature channels
    label = torch.zeros(1, 1, 2, 4)
    label[0, 0, :, 0] = 1.0  # foreground: column 0, pixel (0, 0) masked and (1, 0) visible
    features[0, :, 0, 0] = torch.tensor([1.0, 0.0])  # foreground masked: orthogonal to ...
    features[0, :, 1, 0] = torch.tensor([0.0, 1.0])  # ... foreground visible: distance 1
    features[0, :, 0, 1:] = 1.0  # background masked (1, 1) and visible (2, 2): same direction, distance 0
    features[0, :, 1, 1:] = 2.0
    features.requires_grad_(True)
    loss = FeatureAggregationLoss()(features, HOLES, class_regions(label))
    assert loss.item() == pytest.approx((1.0 + 0.0) / 2)
    loss.backward()
    assert features.grad[0, :, 1].abs().sum() == 0  # the visible means are targets: no gradient
    assert features.grad[0, :, 0, 0].abs().sum() > 0
    only_masked = FeatureAggregationLoss()(features, torch.ones_like(HOLES), class_regions(label))
    assert only_masked.item() == 0.0  # no class has visible pixels: nothing to compare


def _unet(out_channels=1):
    return UNet(2, 3, out_channels, channels=(4, 8, 16), strides=(2, 2), num_res_units=2, norm="batch")


def test_heads_give_segmentation_then_reconstruction_channels_and_drop_exactly():
    torch.manual_seed(0)
    unet = _unet()
    heads = ReconstructionHeads(unet, image_channels=3, hidden_channels=4).eval()
    x = torch.rand(2, 3, 32, 32)
    output = heads(x)
    assert output.shape == (2, 1 + 3, 32, 32)
    seg, reconstruction = heads.split(output)
    torch.testing.assert_close(seg, unet(x), rtol=0, atol=0)  # channel 0 is the plain network's output
    parts = heads.outputs(x)
    torch.testing.assert_close(reconstruction, parts.reconstruction)
    assert 0 <= float(reconstruction.detach().min()) and float(reconstruction.detach().max()) <= 1
    assert parts.features.shape == (2, 2 * 4, 32, 32)  # the top skip connection's output, at the input size
    dropped = heads.drop_heads()
    assert dropped is unet and set(dropped.state_dict()) == set(_unet().state_dict())
    fresh = _unet().eval()
    fresh.load_state_dict(dropped.state_dict())  # what model.pt and the registry hold: a 1-channel UNet
    assert fresh(x).shape == (2, 1, 32, 32)
    torch.testing.assert_close(fresh(x), seg)


def test_a_unet_with_extra_output_channels_could_not_be_cut_back_to_one():
    """Why the head is a wrapper: in MONAI's UNet the last block mixes its output channels."""
    torch.manual_seed(0)
    four = _unet(out_channels=4).eval()
    x = torch.rand(1, 3, 32, 32)
    before = four(x)[:, :1].clone()
    with torch.no_grad():
        four.model[-1][0].conv.weight[:, 1:] += 1.0  # touch only what feeds channels 1..3
    assert not torch.allclose(four(x)[:, :1], before)


def test_heads_refuse_a_network_without_a_sequential_model():
    with pytest.raises(TypeError, match="nn.Sequential 'model'"):
        ReconstructionHeads(nn.Conv2d(3, 1, 3))


def test_heads_refuse_a_ddp_network_saying_to_train_in_one_process(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(_unet(out_channels=1))
        with pytest.raises(TypeError, match="does not run under DistributedDataParallel yet.*train it in one process"):
            ReconstructionHeads(wrapped)
    finally:
        dist.destroy_process_group()


def _trainer(net, heads, optimizer=None, **kwargs):
    return MaskMatchTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=semi_batches(2, 0),
        network=net,
        optimizer=optimizer or torch.optim.SGD(heads.parameters(), lr=0.1),
        loss_function=MaskSupLoss(),
        batch_masker=RandPatchMask(0.5, patch_size=8),
        unlabelled_loader=semi_batches(2, 1, labelled=False),
        rampup_epochs=0,
        teacher_scales=(1.0,),
        decollate=False,
        mim_network=heads,
        **kwargs,
    )


def test_maskmatch_step_adds_the_weighted_mim_terms_and_trains_the_head():
    torch.manual_seed(0)
    net = _unet()
    heads = ReconstructionHeads(net, hidden_channels=4)
    head_before = [p.clone() for p in heads.head.parameters()]
    trainer = _trainer(net, heads, mim_weight=0.5, mim_feature_weight=0.25)
    trainer.run()
    out = trainer.state.output
    expected = (
        out["loss_seg"]
        + out["loss_context"]
        + out["loss_tasksim"]
        + out["unsup_weight"] * out["loss_unsup"]
        + 0.5 * out["loss_mim"]
        + 0.25 * out["loss_mim_feature"]
    )
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0 < out["loss_mim"].item() < 1 and 0 <= out["loss_mim_feature"].item() <= 2
    moved = [not torch.equal(a, b) for a, b in zip(head_before, heads.head.parameters())]
    assert moved[-2] and sum(moved) >= len(moved) // 2  # the output conv, and most (a bias before a norm: ~no gradient)
    assert out["pred"].shape[1] == 1  # the trainer's predictions stay segmentation only


def test_maskmatch_refuses_a_mim_network_it_would_not_train_properly():
    net = _unet()
    heads = ReconstructionHeads(net)
    with pytest.raises(ValueError, match="does not update the reconstruction head"):
        _trainer(net, heads, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="must wrap the trainer's network"):
        _trainer(net, ReconstructionHeads(_unet()), optimizer=torch.optim.SGD(heads.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="needs batch_masker"):
        MaskMatchTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=semi_batches(1, 0),
            network=net,
            optimizer=torch.optim.SGD(heads.parameters(), lr=0.1),
            loss_function=MaskSupLoss(),
            unlabelled_loader=semi_batches(1, 1, labelled=False),
            mim_network=heads,
        )


@pytest.mark.slow
def test_semi_mim_config_trains_logs_the_mim_terms_and_registers_a_one_channel_model(tmp_path):
    """train.json + semi_train.json + semi_mim.json for one epoch on demo data (pseudo-labels from the EMA teacher),
    then evaluate.json as without MIM."""
    import mlflow
    from test_bundles import CASES, CONFIGS, TRAIN_CONFIG, run_bundle, run_training

    from masksup_med.tracking.model_format import load_model

    demo = CASES["glas"].make_demo(tmp_path / "demo")
    out = tmp_path / "out"
    result = run_training(
        demo,
        out,
        "--max_epochs",
        "1",
        "--val_interval",
        "1",
        "--image_size",
        "[64,64]",
        "--batch_size",
        "2",
        "--label_fraction",
        "0.5",
        "--mim_feature_weight",
        "0.1",
        "--pseudo_label_source",
        "teacher",
        config=[TRAIN_CONFIG, CONFIGS / "semi_train.json", CONFIGS / "semi_mim.json"],
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("masksup-glas").experiment_id])
    for metric in ("train_loss_mim", "train_loss_mim_feature", "train_loss_unsup", "val_mean_iou"):
        assert metric in run.data.metrics, metric
    for branch in ("strong", "feature", "masked"):
        assert f"train_loss_unsup_{branch}" in run.data.metrics, branch
    # diagnostics: the pseudo-labels' share of foreground, and their IoU against the held-back masks
    assert 0.0 <= run.data.metrics["train_pseudo_foreground_fraction"] <= 1.0
    assert 0.0 <= run.data.metrics["pseudo_label_iou"] <= 1.0
    assert client.get_metric_history(run.info.run_id, "loss_mim")  # per iteration too
    params = run.data.params
    assert params["method"] == "MaskMatch + S4MIM-style class-wise MIM" and params["label_fraction"] == "0.5"
    assert params["mim_loss"] == "ClassWiseReconstructionLoss" and params["mim_distance"] == "l1"
    assert params["mim_feature_weight"] == "0.1" and int(params["mim_head_parameters"]) > 0
    assert params["pseudo_label_source"] == "teacher" and params["labelled_masked_terms"] == "False"
    assert params["cutmix_prob"] == "0.5" and params["feature_dropout"] == "0.5"
    model = load_model("models:/masksup-glas@candidate", tracking_uri=tracking_uri)
    assert tuple(model(torch.zeros(1, 3, 64, 64)).shape) == (1, 1, 64, 64)
    best = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert not any(key.startswith("head.") for key in best)  # the head was dropped
    checkpoint = torch.load(out / "models" / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=False)
    assert "mim_head" in checkpoint and "teacher" in checkpoint  # resuming restores the head too
    evaluated = run_bundle(
        "evaluating",
        [TRAIN_CONFIG, CONFIGS / "evaluate.json"],
        "--dataset_dir",
        str(demo),
        "--output_dir",
        str(out),
        "--image_size",
        "[64,64]",
    )
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    assert (out / "eval" / "glas" / "test" / "summary.json").is_file()
