"""MaskSupTrainer: outputs, both passes trained, call counts, baseline equivalence, errors."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.networks.nets import UNet
from monai.transforms import Compose
from monai.utils import set_determinism
from torch import nn

from masksup_med.methods.losses import MaskSupLoss
from masksup_med.methods.masksup import MaskSupKeys, MaskSupTrainer, loss_terms
from masksup_med.transforms import RandFreeFormMask, RandFreeFormMaskd, RandMaskBank, RandPatchMask

TERMS = ("loss", "loss_seg", "loss_context", "loss_tasksim")


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        label = torch.zeros(1, 32, 32)
        r, c = torch.randint(4, 20, (2,), generator=g).tolist()
        label[:, r : r + 10, c : c + 10] = 1.0
        image = torch.rand(3, 32, 32, generator=g) * 0.3 + label * 0.6
        out.append({"image": image, "label": label})
    return out


def _loader(data, masking=True, seed=0, batch_size=2):
    transforms = [RandFreeFormMaskd(keys="image")] if masking else []
    pipeline = Compose(transforms)
    pipeline.set_random_state(seed)
    return DataLoader(Dataset(data, pipeline), batch_size=batch_size, shuffle=False, num_workers=0)


def _net(seed=0):
    torch.manual_seed(seed)
    return UNet(spatial_dims=2, in_channels=3, out_channels=1, channels=(4, 8), strides=(2,), num_res_units=0)


def _trainer(net, loader, loss=None, lr=0.1, **kw):
    return MaskSupTrainer(
        device="cpu",
        max_epochs=kw.pop("max_epochs", 1),
        train_data_loader=loader,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=lr),
        loss_function=loss if loss is not None else MaskSupLoss(),
        **kw,
    )


def _params(net):
    return [p.detach().clone() for p in net.parameters()]


def _changed(before, net):
    return any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


class _CallRecorder:
    """Forward pre-hook that records the input of every network call."""

    def __init__(self, net):
        self.inputs: list[torch.Tensor] = []
        self.handle = net.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.inputs.append(args[0].detach().clone())


def test_trainer_runs_outputs_terms_and_updates_weights():
    net = _net()
    before = _params(net)
    trainer = _trainer(net, _loader(_data()))
    trainer.run()
    assert trainer.state.iteration == 2
    output = trainer.state.output
    # SupervisedTrainer decollates: a list of per-sample dicts, scalars repeated in each
    assert isinstance(output, list) and len(output) == 2
    for sample in output:
        for key in TERMS:
            assert key in sample
    terms = loss_terms(output)
    assert set(terms) == set(TERMS)
    assert all(isinstance(v, float) and math.isfinite(v) for v in terms.values())
    assert terms["loss"] == pytest.approx(terms["loss_seg"] + terms["loss_context"] + terms["loss_tasksim"], rel=1e-5)
    assert terms["loss_tasksim"] > 0
    assert _changed(before, net)


def test_loss_terms_on_undecollated_output():
    net = _net()
    trainer = _trainer(net, _loader(_data()), decollate=False)
    trainer.run()
    output = trainer.state.output
    assert isinstance(output, dict)
    assert not output[MaskSupKeys.SEG].requires_grad
    assert output["loss"].requires_grad  # the total is the tensor that was back-propagated
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a logging transform must not warn on every iteration
        terms = loss_terms(output)
    assert set(terms) == set(TERMS)
    assert all(isinstance(v, float) for v in terms.values())


def test_output_terms_match_loss_recomputed_on_the_batch():
    """Second pass sees the batch's image_masked; the logged terms are the loss's own terms."""
    net = _net()
    loss = MaskSupLoss(a1=1.0, a2=0.7, a3=3.0)
    trainer = _trainer(net, _loader(_data(2)), loss=loss, lr=0.0, decollate=False)
    recorder = _CallRecorder(net)
    trainer.run()
    batch = trainer.state.batch
    assert len(recorder.inputs) == 2
    assert torch.equal(recorder.inputs[0], batch["image"])
    assert torch.equal(recorder.inputs[1], batch["image_masked"])
    assert not torch.equal(recorder.inputs[0], recorder.inputs[1])
    recorder.handle.remove()
    net.train()
    with torch.no_grad():
        expected = loss(net(batch["image"]), net(batch["image_masked"]), batch["label"])
    out = trainer.state.output
    torch.testing.assert_close(out["loss"].detach(), expected.total)
    torch.testing.assert_close(out["loss_seg"], expected.seg)
    torch.testing.assert_close(out["loss_context"], expected.context)
    torch.testing.assert_close(out["loss_tasksim"], expected.tasksim)


def test_gradient_flows_through_masked_pass_only_context():
    net = _net()
    before = _params(net)
    loader = _loader(_data(2))
    trainer = _trainer(net, loader, loss=MaskSupLoss(a1=0.0, a2=1.0, a3=0.0))
    trainer.run()
    assert trainer.state.iteration == 1
    assert _changed(before, net)

    # and it is the masked pass that drives it: same start, training on the full image gives other weights
    other = _net()
    _trainer(other, _loader(_data(2)), loss=MaskSupLoss(a1=1.0, a2=0.0, a3=0.0)).run()
    assert any(not torch.allclose(a, b) for a, b in zip(net.parameters(), other.parameters()))


def test_gradient_flows_through_tasksim_only():
    net = _net()
    before = _params(net)
    _trainer(net, _loader(_data(2)), loss=MaskSupLoss(a1=0.0, a2=0.0, a3=1.0), lr=10.0).run()
    assert _changed(before, net)


@pytest.mark.parametrize("a2,a3,calls", [(1.0, 1.0, 2), (1.0, 0.0, 2), (0.0, 1.0, 2), (0.0, 0.0, 1)])
def test_network_calls_per_iteration(a2, a3, calls):
    net = _net()
    count = []
    net.register_forward_hook(lambda *_: count.append(1))
    trainer = _trainer(net, _loader(_data(4)), loss=MaskSupLoss(a2=a2, a3=a3))
    trainer.run()
    assert trainer.state.iteration == 2
    assert len(count) == calls * 2


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_baseline_equivalence_with_supervised_trainer(optimizer):
    """a2 = a3 = 0: the same weights as MONAI's plain SupervisedTrainer with seg_loss."""
    set_determinism(seed=0)
    data = _data(6)
    net_a = _net(1)
    net_b = copy.deepcopy(net_a)

    def make_opt(net):
        if optimizer == "adam":
            return torch.optim.Adam(net.parameters(), lr=1e-2)
        return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)

    seg_loss = nn.BCEWithLogitsLoss()
    # no masking transform at all: with a2 = a3 = 0 the batch needs no image_masked
    masksup = MaskSupTrainer(
        device="cpu",
        max_epochs=2,
        train_data_loader=_loader(data, masking=False),
        network=net_a,
        optimizer=make_opt(net_a),
        loss_function=MaskSupLoss(seg_loss=seg_loss, a2=0.0, a3=0.0),
    )
    plain = SupervisedTrainer(
        device="cpu",
        max_epochs=2,
        train_data_loader=_loader(data, masking=False),
        network=net_b,
        optimizer=make_opt(net_b),
        loss_function=seg_loss,
    )
    before = _params(net_a)
    masksup.run()
    plain.run()
    set_determinism(seed=None)
    assert masksup.state.iteration == plain.state.iteration == 6
    assert _changed(before, net_a)
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert loss_terms(masksup.state.output)["loss"] == pytest.approx(float(plain.state.output[0]["loss"]), abs=1e-6)
    assert loss_terms(masksup.state.output)["loss_context"] == 0.0


@pytest.mark.parametrize("masker", [RandFreeFormMask(), RandPatchMask(patch_size=8)], ids=["free_form", "patch"])
def test_batch_masker_without_image_masked(masker):
    net = _net()
    before = _params(net)
    recorder = _CallRecorder(net)
    trainer = _trainer(net, _loader(_data(4), masking=False), batch_masker=masker, decollate=False)
    trainer.run()
    assert trainer.state.iteration == 2
    assert "image_masked" not in trainer.state.batch
    assert _changed(before, net)
    assert len(recorder.inputs) == 4
    for full, masked in zip(recorder.inputs[0::2], recorder.inputs[1::2]):
        hidden = (masked != full).any(1) & (masked == 0.5).all(1)
        frac = hidden.float().mean().item()
        assert 0.3 < frac < 0.7, frac
        assert torch.equal(masked[:, :, ~hidden[0]][0], full[:, :, ~hidden[0]][0])


def test_missing_image_masked_raises_key_error():
    net = _net()
    trainer = _trainer(net, _loader(_data(2), masking=False))
    with pytest.raises(KeyError) as excinfo:
        trainer.run()
    message = str(excinfo.value)
    assert "image_masked" in message and "RandFreeFormMaskd" in message


def test_custom_masked_key():
    data = _data(2)
    pipeline = Compose([RandFreeFormMaskd(keys="image", masked_keys="img_m")])
    loader = DataLoader(Dataset(data, pipeline), batch_size=2, shuffle=False)
    net = _net()
    recorder = _CallRecorder(net)
    trainer = _trainer(net, loader, masked_key="img_m", decollate=False)
    trainer.run()
    assert torch.equal(recorder.inputs[1], trainer.state.batch["img_m"])
    with pytest.raises(KeyError, match="image_masked"):
        _trainer(_net(), loader).run()


def test_plain_torch_loss_raises_type_error():
    net = _net()
    with pytest.raises(TypeError, match="MaskSupLoss"):
        _trainer(net, _loader(_data(2)), loss=nn.BCEWithLogitsLoss())


@pytest.mark.parametrize("kw,match", [({"accumulation_steps": 2}, "accumulation"), ({"compile": True}, "compile")])
def test_unsupported_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        _trainer(_net(), _loader(_data(2)), **kw)


def test_single_pass_matches_two_passes_and_calls_the_network_once():
    """One forward on [image; masked] (for DDP) trains like two passes when normalisation is per sample."""
    data = _data()
    nets = {mode: _net() for mode in (False, True)}
    calls = {mode: 0 for mode in nets}
    for mode, net in nets.items():

        def count(*_, mode=mode):
            calls[mode] += 1

        net.register_forward_hook(count)
        torch.manual_seed(5)  # MONAI's DataLoader reseeds the masking from the global RNG: same masks for both
        _trainer(net, _loader(data, seed=3), single_pass=mode).run()
    assert calls == {False: 4, True: 2}  # 2 iterations
    for (name, a), (_, b) in zip(nets[False].named_parameters(), nets[True].named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


class _LossWithAreaTerm(MaskSupLoss):
    """MaskSup plus one more named term: the gap between predicted and true foreground fractions."""

    def forward(self, pred, pred_masked, target):
        terms = super().forward(pred, pred_masked, target)._asdict()
        area = (torch.sigmoid(pred).mean() - target.mean()).abs()
        terms["area"] = area
        terms["total"] = terms["total"] + 0.5 * area
        return terms


def test_extra_named_loss_term_reaches_the_output_and_the_epoch_averages():
    from masksup_med.methods.handlers import LossTermAveragesHandler

    trainer = _trainer(_net(), _loader(_data()), loss=_LossWithAreaTerm(), max_epochs=2)
    averages = LossTermAveragesHandler()
    per_epoch: list[dict] = []
    averages.attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: per_epoch.append(dict(e.state.metrics)))
    seen: list[float] = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: seen.append(loss_terms(e.state.output)["loss_area"])
    )
    trainer.run()
    assert set(loss_terms(trainer.state.output)) == {*TERMS, "loss_area"}
    assert len(per_epoch) == 2 and set(per_epoch[1]) == {f"train_{k}" for k in (*TERMS, "loss_area")}
    assert per_epoch[1]["train_loss_area"] == pytest.approx(sum(seen[2:]) / 2)  # this epoch's two iterations only


def test_loss_term_averages_work_for_monai_plain_supervised_trainer():
    from masksup_med.methods.handlers import LossTermAveragesHandler

    net = _net()
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=_loader(_data(), masking=False),
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=torch.nn.BCEWithLogitsLoss(),
    )
    LossTermAveragesHandler().attach(trainer)
    trainer.run()
    assert set(trainer.state.metrics) == {"train_loss"} and math.isfinite(trainer.state.metrics["train_loss"])


def test_named_terms_requires_a_total():
    from masksup_med.methods.handlers import named_terms

    assert set(named_terms(torch.tensor(1.0))) == {"total"}
    with pytest.raises(KeyError, match="'total'"):
        named_terms({"seg": torch.tensor(1.0)})


def test_bank_batch_masker_is_seeded_from_torch_so_seeded_runs_repeat():
    def run(seed):
        net = _net()  # seeds torch itself: the run's seed comes after
        set_determinism(seed=seed)
        recorder = _CallRecorder(net)
        _trainer(net, _loader(_data(), masking=False), batch_masker=RandMaskBank(bank_size=8)).run()
        recorder.handle.remove()
        return recorder.inputs[1::2]  # the masked passes

    first, second, other = run(0), run(0), run(1)
    set_determinism(seed=None)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, c) for a, c in zip(first, other))


def test_bf16_autocast_step_on_cpu_matches_fp32_within_tolerance():
    """The AMP path (bf16 on CPU) computes the same MaskSup step as fp32, up to bf16 rounding."""
    losses = {}
    for amp in (False, True):
        net = _net()
        trainer = _trainer(
            net, _loader(_data(), seed=1), amp=amp, amp_kwargs={"dtype": torch.bfloat16}, decollate=False
        )
        trainer.run()
        losses[amp] = float(trainer.state.output["loss"])
    assert math.isfinite(losses[True]) and losses[True] == pytest.approx(losses[False], rel=0.05)


@pytest.mark.parametrize(("max_epochs", "interval", "rounds"), [(3, 5, [3]), (4, 2, [2, 4]), (5, 2, [2, 4, 5])])
def test_final_validation_runs_when_the_schedule_skipped_the_last_epoch(max_epochs, interval, rounds):
    from monai.handlers import ValidationHandler

    from masksup_med.methods.handlers import FinalValidationHandler

    validated: list[int] = []
    from monai.engines import SupervisedEvaluator

    validator = SupervisedEvaluator(device="cpu", val_data_loader=[None], network=nn.Identity())
    validator.run = lambda epoch: validated.append(epoch)  # records when it is asked to validate
    trainer = _trainer(_net(), _loader(_data(n=2)), max_epochs=max_epochs)
    ValidationHandler(interval=interval, validator=validator, epoch_level=True).attach(trainer)
    FinalValidationHandler(validator, interval).attach(trainer)
    trainer.run()
    assert validated == rounds
