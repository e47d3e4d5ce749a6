"""Model registry, tracking start-up checks and the registry command line, on a real SQLite MLflow store."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from pathlib import Path

import mlflow
import pytest
import torch
from ignite.engine import Engine
from monai.networks.nets import UNet

from masksup_med.cli import main
from masksup_med.registry import (
    ModelRegistrationHandler,
    load_network,
    manual_register_command,
    register_checkpoint,
    using_store,
)
from masksup_med.tracking import check_tracking_server, resolve_tracking_uri, run_params

REPO = Path(__file__).resolve().parents[1]
GLAS_TRAIN = REPO / "bundles" / "glas" / "configs" / "train.json"


def tiny_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(spatial_dims=2, in_channels=3, out_channels=1, channels=(4, 8), strides=(2,), num_res_units=0, norm="batch")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def checkpoint(tmp_path) -> tuple[Path, dict]:
    """A checkpoint in the format MONAI's CheckpointSaver writes (``{"model": state_dict}``)."""
    trained = tiny_unet()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "models" / "model.pt"
    path.parent.mkdir()
    torch.save({"model": trained.state_dict()}, path)
    return path, trained.state_dict()


@pytest.fixture
def sqlite_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_registered_model_loads_by_alias_and_predicts_like_the_checkpoint(checkpoint, sqlite_uri):
    path, state = checkpoint
    before = digest(path)
    global_uri = mlflow.get_tracking_uri()
    version = register_checkpoint(path, tiny_unet(), "masksup-test", sqlite_uri, (3, 32, 32),
                                  tags={"dataset": "glas", "best_val_mean_iou": "0.5"})
    assert mlflow.get_tracking_uri() == global_uri  # the caller's MLflow settings are left alone
    assert str(version.version) == "1"
    assert digest(path) == before  # the checkpoint is only read

    client = mlflow.MlflowClient(tracking_uri=sqlite_uri, registry_uri=sqlite_uri)
    by_alias = client.get_model_version_by_alias("masksup-test", "candidate")
    assert str(by_alias.version) == "1"
    assert by_alias.tags["dataset"] == "glas" and by_alias.tags["checkpoint"] == str(path.resolve())

    loaded = load_network("models:/masksup-test@candidate", tiny_unet(), "cpu", tracking_uri=sqlite_uri)
    assert not loaded.training
    reference = tiny_unet()
    reference.load_state_dict(state)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), reference.eval()(x), atol=1e-6)
    with using_store(sqlite_uri):
        model_info = mlflow.models.get_model_info("models:/masksup-test@candidate")
    assert model_info.signature is not None and model_info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 3, 32, 32)


def test_failed_registration_keeps_checkpoint_and_says_how_to_register_by_hand(checkpoint, tmp_path, caplog):
    path, _ = checkpoint
    before = digest(path)
    unreachable = "sqlite:////nonexistent-folder/for/sure/mlflow.db"
    handler = ModelRegistrationHandler(path, GLAS_TRAIN, tiny_unet(), "masksup-test", unreachable, "exp", "run-x",
                                       (3, 32, 32))
    with caplog.at_level(logging.ERROR):
        handler(Engine(lambda e, b: None))  # must not raise: the training result is on disk
    assert handler.version is None
    assert digest(path) == before
    assert "masksup-med registry register" in caplog.text and str(path) in caplog.text


def test_missing_checkpoint_is_reported_not_raised(tmp_path, sqlite_uri, caplog):
    handler = ModelRegistrationHandler(tmp_path / "models" / "model.pt", GLAS_TRAIN, tiny_unet(), "m", sqlite_uri,
                                       "exp", "run", (3, 32, 32))
    with caplog.at_level(logging.ERROR):
        handler(Engine(lambda e, b: None))
    assert "no best checkpoint" in caplog.text


def test_manual_command_quotes_paths_with_spaces():
    command = manual_register_command(Path("/data/my runs/model.pt"), "bundles/glas/configs/train.json", "masksup-glas",
                                      "sqlite:////x/mlflow.db", "abc")
    assert "'/data/my runs/model.pt'" in command and "--run-id abc" in command


def test_unreachable_tracking_server_fails_fast_with_the_uri():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        check_tracking_server(uri, timeout=2)
    assert check_tracking_server("sqlite:///x.db") == "sqlite:///x.db"  # local stores need no check


def test_tracking_uri_defaults_to_sqlite_in_output_dir_unless_env_says_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_registry_cli_register_list_promote_show(checkpoint, sqlite_uri, tmp_path, capsys):
    path, _ = checkpoint
    config = tmp_path / "train.json"  # the bundle config with the tiny network, as a user's edited copy
    content = json.loads(GLAS_TRAIN.read_text())
    content["network_def"].update(channels=[4, 8], strides=[2], num_res_units=0)
    content["image_size"] = [32, 32]
    config.write_text(json.dumps(content))

    assert main(["registry", "--tracking-uri", sqlite_uri, "register", str(path), "--config", str(config),
                 "--name", "masksup-glas"]) == 0
    assert main(["registry", "--tracking-uri", sqlite_uri, "list"]) == 0
    listed = capsys.readouterr().out
    assert "masksup-glas" in listed and "candidate=v1" in listed

    assert main(["registry", "--tracking-uri", sqlite_uri, "promote", "masksup-glas", "1", "--alias", "champion"]) == 0
    assert main(["registry", "--tracking-uri", sqlite_uri, "show", "masksup-glas"]) == 0
    shown = capsys.readouterr().out
    assert "version 1  aliases: candidate, champion" in shown


def test_registry_cli_without_tracking_store_explains(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit, match="--tracking-uri"):
        main(["registry", "list"])


def test_run_params_log_split_options_key_by_key():
    from masksup_med.losses import MaskSupLoss
    from masksup_med.transforms import RandFreeFormMaskd

    network = UNet(2, 3, 1, channels=(4, 8), strides=(2,))
    params = run_params(network, {"loss": MaskSupLoss(a2=0.0), "masking": RandFreeFormMaskd(keys="image")},
                        split={"seed": 3, "val_fraction": 0.1, "by": "sequence"}, dataset="cvc-clinicdb")
    assert (params["split_seed"], params["split_val_fraction"], params["split_by"]) == ("3", "0.1", "sequence")
    assert params["a2"] == "0.0" and params["dataset"] == "cvc-clinicdb" and params["masking"] == "RandFreeFormMaskd"
    assert all(isinstance(v, str) for v in params.values())  # MLflow params are strings


def test_run_params_describe_any_component_and_know_no_method():
    from monai.losses import DiceLoss

    network = UNet(2, 3, 1, channels=(4, 8), strides=(2,))
    params = run_params(network, {"loss": DiceLoss(sigmoid=True), "masking": None}, seed=1)
    assert (params["loss"], params["masking"], params["seed"]) == ("DiceLoss", "none", "1")
    assert "a1" not in params  # MaskSup's weights come from MaskSupLoss itself, not from the tracking code
