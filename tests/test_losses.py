"""MaskSupLoss against hand computations, weights, validation and gradient flow; the structure loss."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss
from torch import nn

from masksup_med.methods.losses import MaskSupLoss, MaskSupTerms, StructureLoss


def _bce_with_logits(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Numerically stable BCE-with-logits, written out."""
    return torch.mean(torch.clamp(x, min=0) - x * y + torch.log1p(torch.exp(-x.abs())))


def _binary(seed=0, shape=(2, 1, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    pred_m = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    target = (torch.rand(shape, generator=g) > 0.5).double()
    return pred, pred_m, target


def test_default_terms_match_hand_computation():
    pred, pred_m, target = _binary()
    terms = MaskSupLoss()(pred, pred_m, target)
    assert isinstance(terms, MaskSupTerms)
    seg = _bce_with_logits(pred, target)
    context = _bce_with_logits(pred_m, target)
    tasksim = torch.mean((torch.sigmoid(pred) - torch.sigmoid(pred_m)) ** 2)
    torch.testing.assert_close(terms.seg, seg)
    torch.testing.assert_close(terms.context, context)
    torch.testing.assert_close(terms.tasksim, tasksim)
    torch.testing.assert_close(terms.total, seg + context + tasksim)
    assert terms.total.ndim == 0
    # the three terms are genuinely different numbers
    assert len({round(float(v), 6) for v in (terms.seg, terms.context, terms.tasksim)}) == 3


def test_weights_applied_and_terms_unweighted():
    pred, pred_m, target = _binary(1)
    terms = MaskSupLoss(a1=0.3, a2=2.0, a3=5.0)(pred, pred_m, target)
    seg = _bce_with_logits(pred, target)
    context = _bce_with_logits(pred_m, target)
    tasksim = torch.mean((torch.sigmoid(pred) - torch.sigmoid(pred_m)) ** 2)
    torch.testing.assert_close(terms.seg, seg)
    torch.testing.assert_close(terms.context, context)
    torch.testing.assert_close(terms.tasksim, tasksim)
    torch.testing.assert_close(terms.total, 0.3 * seg + 2.0 * context + 5.0 * tasksim)


def test_separate_context_loss():
    pred, pred_m, target = _binary(2)
    loss = MaskSupLoss(seg_loss=nn.BCEWithLogitsLoss(), context_loss=nn.MSELoss(), a1=1, a2=1, a3=0)
    terms = loss(pred, pred_m, target)
    torch.testing.assert_close(terms.seg, _bce_with_logits(pred, target))
    torch.testing.assert_close(terms.context, torch.mean((pred_m - target) ** 2))
    torch.testing.assert_close(terms.total, terms.seg + terms.context)


def test_seg_loss_reduced_to_mean():
    pred, pred_m, target = _binary(3)
    loss = MaskSupLoss(seg_loss=nn.BCEWithLogitsLoss(reduction="none"))
    terms = loss(pred, pred_m, target)
    assert terms.seg.ndim == 0 and terms.context.ndim == 0
    torch.testing.assert_close(terms.seg, _bce_with_logits(pred, target))


def test_softmax_multiclass_with_cross_entropy():
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    pred_m = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 6, 6), generator=g)
    terms = MaskSupLoss(seg_loss=nn.CrossEntropyLoss(), activation="softmax", a1=1.0, a2=0.5, a3=2.0)(
        pred, pred_m, target
    )

    def ce(x, y):
        logp = x - torch.logsumexp(x, dim=1, keepdim=True)
        return -logp.gather(1, y.unsqueeze(1)).mean()

    p, pm = (
        torch.exp(pred) / torch.exp(pred).sum(1, keepdim=True),
        torch.exp(pred_m) / torch.exp(pred_m).sum(1, keepdim=True),
    )
    tasksim = torch.mean((p - pm) ** 2)
    torch.testing.assert_close(terms.seg, ce(pred, target))
    torch.testing.assert_close(terms.context, ce(pred_m, target))
    torch.testing.assert_close(terms.tasksim, tasksim)
    torch.testing.assert_close(terms.total, ce(pred, target) + 0.5 * ce(pred_m, target) + 2.0 * tasksim)
    # sigmoid would give a different task-similarity number
    sig = torch.mean((torch.sigmoid(pred) - torch.sigmoid(pred_m)) ** 2)
    assert not torch.allclose(terms.tasksim, sig)


def test_no_masked_pass_is_exactly_seg_loss():
    pred, pred_m, target = _binary(5)
    plain = nn.BCEWithLogitsLoss()(pred, target)
    loss = MaskSupLoss(a2=0.0, a3=0.0)
    assert not loss.uses_masked_pass
    with_masked = loss(pred, pred_m, target)
    without = loss(pred, None, target)
    assert torch.equal(with_masked.total, plain)
    assert torch.equal(without.total, plain)
    assert torch.equal(without.seg, plain)
    assert float(without.context) == 0.0 and float(without.tasksim) == 0.0
    assert MaskSupLoss(a2=0.0, a3=0.1).uses_masked_pass and MaskSupLoss(a2=0.1, a3=0.0).uses_masked_pass


@pytest.mark.parametrize("a2,a3", [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_pred_masked_none_with_masked_weights_raises(a2, a3):
    pred, _, target = _binary()
    with pytest.raises(ValueError, match="pred_masked"):
        MaskSupLoss(a2=a2, a3=a3)(pred, None, target)


def test_shape_mismatch_raises():
    pred, pred_m, target = _binary()
    with pytest.raises(ValueError, match="shape"):
        MaskSupLoss()(pred, pred_m[:, :, :4], target)


@pytest.mark.parametrize("kw", [{"a1": -1.0}, {"a2": -0.1}, {"a3": -1e-6}])
def test_negative_weight_raises(kw):
    with pytest.raises(ValueError, match="weights"):
        MaskSupLoss(**kw)


def test_unknown_activation_raises():
    with pytest.raises(ValueError, match="activation"):
        MaskSupLoss(activation="relu")


def test_gradient_flows_to_both_predictions():
    pred, pred_m, target = _binary(6)
    pred.requires_grad_(True)
    pred_m.requires_grad_(True)
    MaskSupLoss()(pred, pred_m, target).total.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert pred_m.grad is not None and pred_m.grad.abs().sum() > 0


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_tasksim_alone_gives_gradients_on_both_sides(activation):
    g = torch.Generator().manual_seed(7)
    pred = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    pred_m = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    target = (torch.rand(2, 3, 5, 5, generator=g) > 0.5).double()
    terms = MaskSupLoss(a1=0.0, a2=0.0, a3=1.0, activation=activation)(pred, pred_m, target)
    torch.testing.assert_close(terms.total, terms.tasksim)
    terms.total.backward()
    assert pred.grad.abs().sum() > 0 and pred_m.grad.abs().sum() > 0
    # symmetric MSE: the gradient on one side pulls opposite to the other, through the same Jacobian form
    probs = (lambda x: torch.sigmoid(x)) if activation == "sigmoid" else (lambda x: torch.softmax(x, 1))
    p, pm = probs(pred.detach()), probs(pred_m.detach())
    if activation == "sigmoid":
        n = p.numel()
        torch.testing.assert_close(pred.grad, 2 * (p - pm) * p * (1 - p) / n)
        torch.testing.assert_close(pred_m.grad, -2 * (p - pm) * pm * (1 - pm) / n)


def test_gradient_through_shared_network_both_passes():
    torch.manual_seed(0)
    net = nn.Conv2d(3, 1, 3, padding=1)
    x = torch.rand(2, 3, 8, 8)
    x_m = x.clone()
    x_m[..., :4, :] = 0.5
    y = (torch.rand(2, 1, 8, 8) > 0.5).float()
    # only the masked pass contributes
    MaskSupLoss(a1=0.0, a2=1.0, a3=0.0)(net(x).detach(), net(x_m), y).total.backward()
    assert net.weight.grad.abs().sum() > 0


def test_dice_ce_as_seg_loss():
    pred, pred_m, target = _binary(8)
    dice_ce = DiceCELoss(sigmoid=True)
    terms = MaskSupLoss(seg_loss=dice_ce)(pred, pred_m, target)
    torch.testing.assert_close(terms.seg, dice_ce(pred, target))
    torch.testing.assert_close(terms.context, dice_ce(pred_m, target))
    torch.testing.assert_close(terms.total, terms.seg + terms.context + terms.tasksim)
    assert torch.isfinite(terms.total)


def _square_mask(size: int = 64) -> torch.Tensor:
    mask = torch.zeros(2, 1, size, size)
    mask[:, :, 20:40, 20:40] = 1.0
    return mask


def test_structure_loss_is_near_zero_for_a_confident_match_and_large_for_its_opposite():
    mask = _square_mask()
    loss = StructureLoss()
    assert loss(mask * 20 - 10, mask).item() < 1e-3
    assert loss(10 - mask * 20, mask).item() > 5.0
    assert 0.5 < loss(torch.zeros_like(mask), mask).item() < 2.0


def test_structure_loss_weighs_an_error_at_the_boundary_more_than_one_far_from_it():
    """One wrong pixel on the square's edge costs more than one wrong pixel in the far background."""
    mask = _square_mask()
    confident = mask * 20 - 10
    at_edge, far_away = confident.clone(), confident.clone()
    at_edge[:, :, 20, 30] = -10.0  # inside the square, on its top edge
    far_away[:, :, 60, 2] = 10.0  # background, 20+ pixels from the square
    loss = StructureLoss()
    assert loss(at_edge, mask) > loss(far_away, mask)
    plain = StructureLoss(boundary_weight=0.0)  # no boundary weight: the two errors cost about the same
    assert plain(at_edge, mask).item() == pytest.approx(plain(far_away, mask).item(), rel=0.05)


def test_structure_loss_gives_gradients_and_refuses_bad_shapes():
    mask = _square_mask(32)
    logits = torch.zeros_like(mask, requires_grad=True)
    StructureLoss()(logits, mask).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="one-channel logits"):
        StructureLoss()(torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8, 8))
    with pytest.raises(ValueError, match="odd"):
        StructureLoss(kernel_size=4)
