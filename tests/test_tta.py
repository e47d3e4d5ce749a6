"""Test-time flips (:class:`masksup_med.inference.FlipInferer`) on hand-made tensors, and the configs' switch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.inferers import SimpleInferer

from masksup_med.inference import FlipInferer, segmentation_inferer

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def ramp_network(x: torch.Tensor) -> torch.Tensor:
    """Not flip-equivariant: adds 0, 1, 2, ... along the width (spatial axis 0, tensor dim 2)."""
    ramp = torch.arange(x.shape[2], dtype=x.dtype).view(1, 1, -1, 1)
    return x[:, :1] + ramp


def test_flips_are_undone_so_an_equivariant_network_is_unchanged():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    inferer = FlipInferer()
    assert torch.equal(inferer(x, lambda t: t[:, :1] * 2), x[:, :1] * 2)


def test_a_network_that_is_not_flip_equivariant_gives_the_average_of_the_three_passes():
    x = torch.zeros(1, 3, 4, 2)
    x[0, :, 0, 0] = 10.0  # a bright corner: where it lands after a flip shows whether the flip was undone
    ramp = torch.arange(4.0).view(1, 1, 4, 1)
    # identity: x + r; horizontal (width) flip, undone: x + r reversed; vertical (height) flip: x + r
    expected = x[:, :1] + (2 * ramp + ramp.flip(2)) / 3
    out = FlipInferer()(x, ramp_network)
    assert torch.allclose(out, expected)
    assert out[0, 0, 0, 0] == pytest.approx(10 + 1.0)  # the corner stays where it was: every flip was undone
    assert not torch.allclose(out, SimpleInferer()(x, ramp_network))


def test_the_flips_can_be_chosen_and_extra_arguments_reach_the_network():
    x = torch.ones(1, 1, 3, 3)
    seen = []

    def network(t, scale):
        seen.append(scale)
        return ramp_network(t) * scale

    only_horizontal = FlipInferer(flips=[(0,)])(x, network, 2.0)
    assert torch.allclose(only_horizontal, (1 + torch.arange(3.0).flip(0).view(1, 1, 3, 1)) * 2)
    assert seen == [2.0]
    with pytest.raises(ValueError, match="at least one flip"):
        FlipInferer(flips=[])


def test_segmentation_inferer_is_simple_unless_flips_are_asked_for():
    assert isinstance(segmentation_inferer(False), SimpleInferer)
    assert isinstance(segmentation_inferer(True), FlipInferer)


@pytest.mark.parametrize(("config", "section"), [("evaluate.json", "evaluate"), ("inference.json", "infer")])
@pytest.mark.parametrize(("value", "expected"), [(False, SimpleInferer), ("true", FlipInferer)])
def test_the_evaluate_and_inference_configs_switch_flips_with_tta_flips(config, section, value, expected):
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / "kvasir_seg" / "configs" / name) for name in ("train.json", config)])
    assert parser.get("tta_flips") is False  # off by default
    parser["tta_flips"] = value  # "true": as typed on the command line
    parser.get_parsed_content("imports")
    assert isinstance(parser.get_parsed_content(f"{section}#inferer"), expected)
