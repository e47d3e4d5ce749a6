"""Model registry, tracking start-up checks and the registry command line, on a real SQLite MLflow store."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import socket
from pathlib import Path
from urllib.parse import urlparse

import _models
import mlflow
import pytest
import torch
from ignite.engine import Engine
from monai.networks.nets import UNet

from masksup_med.cli import main
from masksup_med.tracking.model_format import UnsafeModelError, load_model, network_definition
from masksup_med.tracking.registry import (
    ModelRegistrationHandler,
    load_network,
    manual_register_command,
    register_checkpoint,
    using_store,
)
from masksup_med.tracking.store import check_tracking_server, resolve_tracking_uri, run_params

REPO = Path(__file__).resolve().parents[1]
GLAS_TRAIN = REPO / "bundles" / "glas" / "configs" / "train.json"


TINY_UNET = {**_models.TINY_UNET, "norm": "batch"}


def tiny_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(**{k: v for k, v in TINY_UNET.items() if k != "_target_"})


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
    version = register_checkpoint(
        path,
        TINY_UNET,
        "masksup-test",
        sqlite_uri,
        (3, 32, 32),
        tags={"dataset": "glas", "best_val_mean_iou": "0.5"},
        bundle="glas",
        config_file=GLAS_TRAIN,
    )
    assert mlflow.get_tracking_uri() == global_uri  # the caller's MLflow settings are left alone
    assert str(version.version) == "1"
    assert digest(path) == before  # the checkpoint is only read

    client = mlflow.MlflowClient(tracking_uri=sqlite_uri, registry_uri=sqlite_uri)
    by_alias = client.get_model_version_by_alias("masksup-test", "candidate")
    assert str(by_alias.version) == "1"
    assert by_alias.tags["dataset"] == "glas" and by_alias.tags["checkpoint"] == str(path.resolve())
    assert (by_alias.tags["bundle"], by_alias.tags["input_shape"], by_alias.tags["threshold"]) == (
        "glas",
        "3,32,32",
        "0.5",
    )

    loaded = load_network("models:/masksup-test@candidate", tiny_unet(), "cpu", tracking_uri=sqlite_uri)
    assert not loaded.training
    reference = tiny_unet()
    reference.load_state_dict(state)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), reference.eval()(x), atol=1e-6)
    with using_store(sqlite_uri):
        model_info = mlflow.models.get_model_info("models:/masksup-test@candidate")
        pyfunc = mlflow.pyfunc.load_model("models:/masksup-test@candidate")  # MLflow's own loader, through ours
    assert model_info.signature is not None and model_info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (
        -1,
        3,
        32,
        32,
    )
    assert "pytorch" not in model_info.flavors and model_info.flavors["masksup_med"]["bundle"] == "glas"
    assert pyfunc.predict(x.numpy()).shape == (2, 1, 32, 32)

    files = {
        p.relative_to(model_dir(client, "masksup-test")).as_posix()
        for p in model_dir(client, "masksup-test").rglob("*")
        if p.is_file()
    }
    assert {"MLmodel", "weights.pt", "network.json", "bundle/train.json"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pth"))]  # weights and JSON, no pickled code
    assert json.loads((model_dir(client, "masksup-test") / "network.json").read_text())["channels"] == [4, 8]


def model_dir(client: mlflow.MlflowClient, name: str, version: str = "1") -> Path:
    """The local artifact folder of a registered version's model (a SQLite store keeps files on disk)."""
    location = client.get_model_version_download_uri(name, version)
    return Path(urlparse(location).path if location.startswith("file:") else location)


def plant_marker(path: str) -> None:
    """What the malicious pickle below runs when unpickled: leave a file behind."""
    Path(path).write_text("the payload ran")


class MaliciousWeights:
    """Unpickles by calling :func:`plant_marker`: the kind of object a pickled model file can hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return plant_marker, (self.marker,)


def test_planted_pickle_in_a_registered_model_is_refused_and_never_runs(checkpoint, sqlite_uri, tmp_path):
    path, _ = checkpoint
    register_checkpoint(path, TINY_UNET, "masksup-test", sqlite_uri, (3, 32, 32))
    client = mlflow.MlflowClient(tracking_uri=sqlite_uri, registry_uri=sqlite_uri)
    weights = model_dir(client, "masksup-test") / "weights.pt"
    assert weights.is_file()

    proof = tmp_path / "plain-pickle-runs-it"
    pickle.loads(pickle.dumps(MaliciousWeights(proof)))
    assert proof.is_file()  # the payload is real: plain unpickling runs it

    marker = tmp_path / "payload-ran"
    torch.save({"model": MaliciousWeights(marker)}, weights)  # someone with write access to the artifact store
    with pytest.raises(UnsafeModelError) as refused:
        load_network("models:/masksup-test@candidate", tiny_unet(), "cpu", tracking_uri=sqlite_uri)
    message = str(refused.value)
    assert "models:/masksup-test@candidate (weights.pt)" in message and "plant_marker" in message
    assert not marker.exists()

    # the same file handed to the loader as a local model folder
    with pytest.raises(UnsafeModelError, match="weights.pt"):
        load_model(weights.parent)
    assert not marker.exists()


def test_network_definition_names_only_network_classes(checkpoint, sqlite_uri, tmp_path):
    path, _ = checkpoint
    register_checkpoint(path, TINY_UNET, "masksup-test", sqlite_uri, (3, 32, 32))
    client = mlflow.MlflowClient(tracking_uri=sqlite_uri, registry_uri=sqlite_uri)
    network_file = model_dir(client, "masksup-test") / "network.json"
    marker = tmp_path / "ran"
    network_file.write_text(json.dumps({"_target_": "pathlib.Path.touch", "self": str(marker)}))
    with pytest.raises(UnsafeModelError, match="only classes of monai.networks.nets"):
        load_model("models:/masksup-test@candidate", tracking_uri=sqlite_uri)
    network_file.write_text(json.dumps({**TINY_UNET, "_target_": "monai.networks.nets.torch"}))
    with pytest.raises(UnsafeModelError, match="not a network class"):
        load_model("models:/masksup-test@candidate", tracking_uri=sqlite_uri)
    assert not marker.exists()


def test_a_pickled_pytorch_version_is_not_loaded_and_the_error_says_what_to_do(sqlite_uri):
    with using_store(sqlite_uri):
        with mlflow.start_run():
            info = mlflow.pytorch.log_model(tiny_unet(), name="model", serialization_format="pickle")
        mlflow.register_model(info.model_uri, "old-format")
    with pytest.raises(ValueError, match="not a masksup-med model .*pytorch.*masksup-med registry register"):
        load_model("models:/old-format/1", tracking_uri=sqlite_uri)


def test_network_definition_resolves_the_bundle_config():
    definition = network_definition(GLAS_TRAIN)
    assert definition["_target_"] == "monai.networks.nets.unet.UNet"
    assert definition["channels"] == [16, 32, 64, 128, 256] and definition["in_channels"] == 3
    json.dumps(definition)  # plain JSON


def test_registration_refuses_a_config_that_does_not_build_the_trained_network(checkpoint, sqlite_uri, caplog):
    path, _ = checkpoint
    client = mlflow.MlflowClient(tracking_uri=sqlite_uri)
    experiment = client.create_experiment("exp")
    client.create_run(experiment, run_name="run-x")
    # trained: the tiny UNet; GLAS_TRAIN's network_def: the bundle's own, larger one
    handler = ModelRegistrationHandler(
        path, GLAS_TRAIN, tiny_unet(), "masksup-test", sqlite_uri, "exp", "run-x", (3, 32, 32)
    )
    with caplog.at_level(logging.ERROR):
        handler(Engine(lambda e, b: None))
    assert handler.version is None
    assert (
        "does not build the network that was trained" in caplog.text and "masksup-med registry register" in caplog.text
    )


def test_failed_registration_keeps_checkpoint_and_says_how_to_register_by_hand(checkpoint, tmp_path, caplog):
    path, _ = checkpoint
    before = digest(path)
    unreachable = "sqlite:////nonexistent-folder/for/sure/mlflow.db"
    handler = ModelRegistrationHandler(
        path, GLAS_TRAIN, tiny_unet(), "masksup-test", unreachable, "exp", "run-x", (3, 32, 32)
    )
    with caplog.at_level(logging.ERROR):
        handler(Engine(lambda e, b: None))  # must not raise: the training result is on disk
    assert handler.version is None
    assert digest(path) == before
    assert "masksup-med registry register" in caplog.text and str(path) in caplog.text


def test_missing_checkpoint_is_reported_not_raised(tmp_path, sqlite_uri, caplog):
    handler = ModelRegistrationHandler(
        tmp_path / "models" / "model.pt", GLAS_TRAIN, tiny_unet(), "m", sqlite_uri, "exp", "run", (3, 32, 32)
    )
    with caplog.at_level(logging.ERROR):
        handler(Engine(lambda e, b: None))
    assert "no best checkpoint" in caplog.text


def test_manual_command_quotes_paths_with_spaces():
    command = manual_register_command(
        Path("/data/my runs/model.pt"),
        "bundles/glas/configs/train.json",
        "masksup-glas",
        "sqlite:////x/mlflow.db",
        "abc",
    )
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

    register = ["registry", "--tracking-uri", sqlite_uri, "register", str(path), "--config", str(config)]
    register += ["--name", "masksup-glas"]
    assert main(register) == 0
    assert main(["registry", "--tracking-uri", sqlite_uri, "list"]) == 0
    listed = capsys.readouterr().out
    assert "masksup-glas" in listed and "candidate=v1" in listed

    assert main(["registry", "--tracking-uri", sqlite_uri, "promote", "masksup-glas", "1", "--alias", "champion"]) == 0
    assert main(["registry", "--tracking-uri", sqlite_uri, "show", "masksup-glas"]) == 0
    shown = capsys.readouterr().out
    assert "version 1  aliases: candidate, champion" in shown
    assert "input_shape: 3,32,32" in shown and "bundle:" not in shown  # a config outside a bundle names none

    assert main([*register, "--bundle", "glas"]) == 0
    loaded = load_model("models:/masksup-glas/2", tracking_uri=sqlite_uri)
    assert next(m.out_channels for m in loaded.modules() if isinstance(m, torch.nn.Conv2d)) == 4


def test_registry_cli_without_tracking_store_explains(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit, match="--tracking-uri"):
        main(["registry", "list"])


def test_run_params_log_split_options_key_by_key():
    from masksup_med.methods.losses import MaskSupLoss
    from masksup_med.transforms import RandFreeFormMaskd

    network = UNet(2, 3, 1, channels=(4, 8), strides=(2,))
    params = run_params(
        network,
        {"loss": MaskSupLoss(a2=0.0), "masking": RandFreeFormMaskd(keys="image")},
        split={"seed": 3, "val_fraction": 0.1, "by": "sequence"},
        dataset="cvc-clinicdb",
    )
    assert (params["split_seed"], params["split_val_fraction"], params["split_by"]) == ("3", "0.1", "sequence")
    assert params["a2"] == "0.0" and params["dataset"] == "cvc-clinicdb" and params["masking"] == "RandFreeFormMaskd"
    assert all(isinstance(v, str) for v in params.values())  # MLflow params are strings


def test_run_params_describe_any_component_and_know_no_method():
    from monai.losses import DiceLoss

    network = UNet(2, 3, 1, channels=(4, 8), strides=(2,))
    params = run_params(network, {"loss": DiceLoss(sigmoid=True), "masking": None}, seed=1)
    assert (params["loss"], params["masking"], params["seed"]) == ("DiceLoss", "none", "1")
    assert "a1" not in params  # MaskSup's weights come from MaskSupLoss itself, not from the tracking code


def test_moving_the_alias_to_a_version_that_validated_worse_says_so(checkpoint, sqlite_uri, caplog):
    path, _ = checkpoint
    same_data = {"dataset": "glas", "dataset_dir": "/data/glas"}
    register_checkpoint(
        path,
        TINY_UNET,
        "masksup-test",
        sqlite_uri,
        (3, 32, 32),
        tags={**same_data, "best_val_mean_iou": "0.894"},
        config_file=GLAS_TRAIN,
    )
    with caplog.at_level(logging.WARNING, logger="masksup_med.tracking.registry"):
        register_checkpoint(
            path,
            TINY_UNET,
            "masksup-test",
            sqlite_uri,
            (3, 32, 32),
            tags={**same_data, "best_val_mean_iou": "0.866"},
            config_file=GLAS_TRAIN,
        )
    assert "moves from version 1 (best_val_mean_iou 0.8940) to version 2 (best_val_mean_iou 0.8660)" in caplog.text
    assert "masksup-med registry promote masksup-test 1 --alias candidate" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="masksup_med.tracking.registry"):  # better, or other data: no warning
        register_checkpoint(
            path,
            TINY_UNET,
            "masksup-test",
            sqlite_uri,
            (3, 32, 32),
            tags={**same_data, "best_val_mean_iou": "0.9"},
            config_file=GLAS_TRAIN,
        )
        register_checkpoint(
            path,
            TINY_UNET,
            "masksup-test",
            sqlite_uri,
            (3, 32, 32),
            tags={"dataset": "glas", "dataset_dir": "/other", "best_val_mean_iou": "0.1"},
            config_file=GLAS_TRAIN,
        )
    assert "moves from" not in caplog.text
