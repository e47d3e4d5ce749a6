"""Each bundle passes MONAI's metadata and network checks offline, and exports to TorchScript and ONNX
with the same masks as the checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from masksup_med.bundles import bundle_dirs

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "bundles" / "schema" / "meta_schema.json"
BUNDLES = tuple(p.name for p in bundle_dirs(REPO / "bundles"))


class Bundle:
    """Paths and declared input size of one bundle."""

    def __init__(self, name: str) -> None:
        self.configs = REPO / "bundles" / name / "configs"
        self.train = self.configs / "train.json"
        self.meta = self.configs / "metadata.json"
        image = json.loads(self.meta.read_text())["network_data_format"]["inputs"]["image"]
        self.input_shape = [image["num_channels"], *image["spatial_shape"]]

    def network(self) -> torch.nn.Module:
        parser = ConfigParser()
        parser.read_config(str(self.train))
        return parser.get_parsed_content("network_def")


@pytest.fixture(scope="module", params=BUNDLES)
def bundle(request) -> Bundle:
    return Bundle(request.param)


def monai_bundle(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.fixture(scope="module")
def checkpoint(bundle, tmp_path_factory) -> Path:
    """A checkpoint of the bundle's network (random weights, BatchNorm statistics moved off their defaults)."""
    network = bundle.network()
    network.train()
    with torch.no_grad():
        for _ in range(2):
            network(torch.rand(2, *bundle.input_shape))
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(network.state_dict(), path)
    return path


def reference_logits(bundle: Bundle, checkpoint: Path, x: torch.Tensor) -> torch.Tensor:
    network = bundle.network()
    network.load_state_dict(torch.load(checkpoint, weights_only=True))
    with torch.no_grad():
        return network.eval()(x)


def test_metadata_verifies_offline_against_the_schema_kept_in_the_repository(bundle):
    result = monai_bundle("verify_metadata", "--meta_file", str(bundle.meta), "--filepath", str(SCHEMA))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "metadata is verified with no error" in result.stdout + result.stderr


def test_metadata_missing_a_required_field_is_refused(bundle, tmp_path):
    text = bundle.meta.read_text().replace('"task":', '"not_the_task":')
    broken = tmp_path / "metadata.json"
    broken.write_text(text)
    result = monai_bundle("verify_metadata", "--meta_file", str(broken), "--filepath", str(SCHEMA))
    assert result.returncode != 0 and "task" in result.stderr


def test_network_matches_its_declared_input_and_output(bundle):
    result = monai_bundle(
        "verify_net_in_out", "network_def", "--meta_file", str(bundle.meta), "--config_file", str(bundle.train)
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_torchscript_export_gives_the_checkpoints_masks(bundle, checkpoint, tmp_path):
    exported = tmp_path / "model.ts"
    result = monai_bundle(
        "ckpt_export",
        "network_def",
        "--filepath",
        str(exported),
        "--ckpt_file",
        str(checkpoint),
        "--meta_file",
        str(bundle.meta),
        "--config_file",
        str(bundle.train),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    x = torch.rand(2, *bundle.input_shape)
    with torch.no_grad():
        scripted = torch.jit.load(str(exported)).eval()(x)
    expected = reference_logits(bundle, checkpoint, x)
    assert torch.allclose(scripted, expected, atol=1e-4)
    flipped = (scripted > 0) != (expected > 0)
    assert bool((expected[flipped].abs() < 1e-3).all())  # masks agree except at logits of ~0


@pytest.mark.slow
def test_onnx_export_gives_the_checkpoints_masks(bundle, checkpoint, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    exported = tmp_path / "model.onnx"
    result = monai_bundle(
        "onnx_export",
        "network_def",
        "--filepath",
        str(exported),
        "--ckpt_file",
        str(checkpoint),
        "--meta_file",
        str(bundle.meta),
        "--config_file",
        str(bundle.train),
        "--input_shape",
        str([1, *bundle.input_shape]),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    x = torch.rand(1, *bundle.input_shape)
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    expected = reference_logits(bundle, checkpoint, x).numpy()
    assert np.allclose(onnx_logits, expected, atol=1e-4)
    flipped = (onnx_logits > 0) != (expected > 0)
    assert bool((np.abs(expected[flipped]) < 1e-3).all())  # masks agree except at logits of ~0
