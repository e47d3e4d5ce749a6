"""The GLaS bundle against a real MLflow tracking server (PostgreSQL backend), end to end.

One short training run (module fixture ``trained``) goes through ``python -m monai.bundle run training`` in a
subprocess with ``MLFLOW_TRACKING_URI`` pointing at the session's ``mlflow server`` (``conftest.py``). The
tests then check, through the server's REST API (plain HTTP, not MLflow's client), that the run has its
params, metrics and artifacts and that the best checkpoint is registered as ``masksup-glas@candidate``; load
that model back from the registry and compare it with the checkpoint on disk; and look at the registered
model's page in headless Chromium. Another test checks that an unreachable server stops the bundle before
training starts.

The servers are shared with ``test_mlflow_infra.py``, so nothing here assumes version numbers or that the
experiment holds only this run: the run is found by its ``dataset_dir`` param and the version by alias.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from servers import LOOPBACK, NO_TELEMETRY_ENV, check_model_page, free_port, port_open

from masksup_med.tracking.model_format import load_model
from masksup_med.tracking.registry import using_store

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("servers")]  # one PostgreSQL and MLflow server per run

REPO = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = REPO / "bundles" / "glas" / "configs" / "train.json"
EXPERIMENT = "masksup-glas"
MODEL_NAME = "masksup-glas"
ALIAS = "candidate"
IMAGE_SIZE = [64, 64]
TRAINING_TIMEOUT_S = 300

EXPECTED_PARAMS = ("a1", "a2", "a3", "masking", "dataset", "dataset_dir", "split_seed", "monai_version")
EPOCH_METRICS = (
    "train_loss",
    "train_loss_seg",
    "train_loss_context",
    "train_loss_tasksim",
    "val_mean_iou",
    "val_mean_dice",
)
ITERATION_METRIC = "loss"  # MLFlowHandler(iteration_log=True) logs the loss terms per iteration
FIGURES = ("figures/validation_epoch_0001.png", "figures/learning_curves.png")


# ------------------------------------------------------------------------------------------- helpers
def run_training(dataset_dir: Path, output_dir: Path, tracking_uri: str) -> subprocess.CompletedProcess:
    """The README's training command, one short epoch, with ``MLFLOW_TRACKING_URI`` set to ``tracking_uri``."""
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", str(TRAIN_CONFIG),
        "--dataset_dir", str(dataset_dir),
        "--output_dir", str(output_dir),
        "--max_epochs", "1",
        "--val_interval", "1",
        "--image_size", "[64,64]",
        "--num_workers", "0",
    ]  # fmt: skip
    env = {**os.environ, **NO_TELEMETRY_ENV, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONWARNINGS": "ignore"}
    env.pop("MLFLOW_REGISTRY_URI", None)  # the registry follows the tracking URI
    return subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=TRAINING_TIMEOUT_S, env=env,
        stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip


def _output(result: subprocess.CompletedProcess, n: int = 4000) -> str:
    return f"--- stdout (tail) ---\n{result.stdout[-n:]}\n--- stderr (tail) ---\n{result.stderr[-n:]}"


def _get(server: str, endpoint: str, **params) -> dict:
    import requests

    resp = requests.get(f"{server}/api/2.0/mlflow/{endpoint}", params=params, timeout=30)
    assert resp.status_code == 200, f"GET {endpoint} {params} -> {resp.status_code}: {resp.text[:500]}"
    return resp.json()


def _post(server: str, endpoint: str, body: dict) -> dict:
    import requests

    resp = requests.post(f"{server}/api/2.0/mlflow/{endpoint}", json=body, timeout=30)
    assert resp.status_code == 200, f"POST {endpoint} {body} -> {resp.status_code}: {resp.text[:500]}"
    return resp.json()


def _artifact_paths(server: str, run_id: str, path: str | None = None) -> dict[str, bool]:
    params = {"run_id": run_id} if path is None else {"run_id": run_id, "path": path}
    return {f["path"]: f.get("is_dir", False) for f in _get(server, "artifacts/list", **params).get("files", [])}


def _download_artifact(server: str, run_id: str, path: str) -> bytes:
    import requests

    resp = requests.get(f"{server}/get-artifact", params={"run_id": run_id, "path": path}, timeout=30)
    assert resp.status_code == 200, f"get-artifact {path} -> {resp.status_code}: {resp.text[:300]}"
    return resp.content


_global_tracking_uri = using_store  # MLflow store for a block, global state and environment restored


def _bundle_parser(dataset_dir: Path):
    """The bundle's train.json, parsed in this process, with the test's dataset and image size.

    ``dataset_dir`` matters: the bundle's loading transforms pick their reader from the dataset's files.
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(TRAIN_CONFIG))
    parser["dataset_dir"] = str(dataset_dir)
    parser["image_size"] = IMAGE_SIZE
    return parser


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def demo_glas(tmp_path_factory) -> Path:
    from masksup_med.data import make_glas_demo

    return make_glas_demo(tmp_path_factory.mktemp("demo") / "glas", n_train=8, n_test_a=2, n_test_b=2, size=(64, 48))


@pytest.fixture(scope="module")
def trained(mlflow_tracking_server: str, demo_glas: Path, tmp_path_factory) -> dict:
    """One epoch of the bundle tracked by the server; the run and the registered version, found by REST."""
    server = mlflow_tracking_server
    out = tmp_path_factory.mktemp("train") / "out"
    started = time.monotonic()
    result = run_training(demo_glas, out, server)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, f"training failed (exit {result.returncode})\n{_output(result)}"
    # The server was used, not a local SQLite store.
    assert not (out / "mlflow.db").exists()

    experiment = _get(server, "experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    runs = _post(
        server,
        "runs/search",
        {
            "experiment_ids": [experiment["experiment_id"]],
            "filter": f"params.dataset_dir = '{demo_glas}'",
            "max_results": 10,
        },
    ).get("runs", [])
    assert len(runs) == 1, f"expected one run with dataset_dir={demo_glas}, found {len(runs)}\n{_output(result)}"
    run_id = runs[0]["info"]["run_id"]
    version = _get(server, "registered-models/alias", name=MODEL_NAME, alias=ALIAS)["model_version"]
    return {
        "server": server,
        "out": out,
        "dataset_dir": demo_glas,
        "experiment_id": experiment["experiment_id"],
        "run_id": run_id,
        "version": version,
        "stdout": result.stdout,
        "stderr": result.stderr,
        "elapsed_s": elapsed,
    }


# --------------------------------------------------------------------------------------------- tests
def test_run_params_metrics_and_artifacts_through_rest_api(trained: dict):
    server, run_id = trained["server"], trained["run_id"]

    run = _get(server, "runs/get", run_id=run_id)["run"]
    assert run["info"]["experiment_id"] == trained["experiment_id"]
    assert run["info"]["status"] == "FINISHED"
    assert run["info"]["run_name"].startswith("glas-")

    params = {p["key"]: p["value"] for p in run["data"].get("params", [])}
    missing = [key for key in EXPECTED_PARAMS if key not in params]
    assert not missing, f"params missing: {missing}; have {sorted(params)}"
    assert (params["a1"], params["a2"], params["a3"]) == ("1.0", "1.0", "1.0")
    assert params["masking"] == "RandMaskBank"
    assert params["dataset"] == "glas"
    assert params["dataset_dir"] == str(trained["dataset_dir"])
    assert params["split_seed"] == "0"
    assert params["max_epochs"] == "1"
    import monai

    assert params["monai_version"] == monai.__version__

    metrics = {m["key"]: m["value"] for m in run["data"].get("metrics", [])}
    missing = [key for key in (*EPOCH_METRICS, ITERATION_METRIC) if key not in metrics]
    assert not missing, f"metrics missing: {missing}; have {sorted(metrics)}"
    assert 0.0 <= metrics["val_mean_iou"] <= 1.0 and 0.0 <= metrics["val_mean_dice"] <= 1.0
    for key in EPOCH_METRICS:
        history = _get(server, "metrics/get-history", run_id=run_id, metric_key=key)["metrics"]
        assert [int(m["step"]) for m in history] == [1], (key, history)  # one epoch, logged with step = epoch
    iterations = _get(server, "metrics/get-history", run_id=run_id, metric_key=ITERATION_METRIC)["metrics"]
    assert iterations and min(int(m["step"]) for m in iterations) == 1, iterations  # step = iteration

    top = _artifact_paths(server, run_id)
    assert top.get("datalist.json") is False, top
    assert top.get("figures") is True, top
    figures = _artifact_paths(server, run_id, "figures")
    assert set(FIGURES) <= set(figures), figures
    # The files themselves, through the server's artifact proxy.
    datalist = _download_artifact(server, run_id, "datalist.json")
    assert datalist == (trained["out"] / "datalist.json").read_bytes()
    for path in FIGURES:
        png = _download_artifact(server, run_id, path)
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000, path


def test_best_checkpoint_registered_with_alias_candidate(trained: dict):
    server, version = trained["server"], trained["version"]

    assert version["name"] == MODEL_NAME
    assert version["run_id"] == trained["run_id"]
    assert version["status"] == "READY"
    assert ALIAS in version.get("aliases", [])
    tags = {t["key"]: t["value"] for t in version.get("tags", [])}
    assert tags.get("run_id") == trained["run_id"]
    assert Path(tags["checkpoint"]) == (trained["out"] / "models" / "model.pt").resolve()
    assert tags.get("dataset") == "glas" and tags.get("masking") == "RandMaskBank"

    model = _get(server, "registered-models/get", name=MODEL_NAME)["registered_model"]
    assert {"alias": ALIAS, "version": version["version"]} in model.get("aliases", [])


def test_registered_model_predicts_like_the_checkpoint(trained: dict):
    import torch
    from monai.transforms import Compose
    from monai.utils import convert_to_tensor

    demo, server = trained["dataset_dir"], trained["server"]
    parser = _bundle_parser(demo)
    preprocessing = Compose(parser.get_parsed_content("preprocessing"))
    item = preprocessing({"image": str(demo / "testA_1.bmp"), "label": str(demo / "testA_1_anno.bmp")})
    image = convert_to_tensor(item["image"], dtype=torch.float32, track_meta=False)[None]  # no MetaTensor
    assert tuple(image.shape) == (1, 3, *IMAGE_SIZE)

    registered = load_model(f"models:/{MODEL_NAME}@{ALIAS}", "cpu", tracking_uri=server)  # weights, no pickled code
    assert isinstance(registered, torch.nn.Module)
    assert not registered.training, "the registered model loads in eval mode"

    # The bundle's network with the run's best checkpoint (CheckpointSaver: {"model": state_dict}).
    state = torch.load(trained["out"] / "models" / "model.pt", map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    network = parser.get_parsed_content("network_def", instantiate=True)
    network.load_state_dict(state)
    network.eval()

    with torch.no_grad():
        predicted = registered(image)
        expected = network(image)
    assert tuple(predicted.shape) == (1, 1, *IMAGE_SIZE)
    torch.testing.assert_close(predicted, expected, atol=1e-5, rtol=0)


def test_registered_model_page_in_headless_chromium(trained: dict, chromium, artifacts_dir: Path):
    server = trained["server"]
    version_label = f"Version {trained['version']['version']}"
    shot = artifacts_dir / "mlflow-masksup-glas-model.png"
    check_model_page(chromium, server, MODEL_NAME, version_label, ALIAS, shot)


def test_unreachable_tracking_server_is_reported_before_training(demo_glas: Path, tmp_path: Path):
    port = free_port()  # free a moment ago; make sure nobody took it since
    assert not port_open(port)
    uri = f"http://{LOOPBACK}:{port}"
    out = tmp_path / "out"
    started = time.monotonic()
    result = run_training(demo_glas, out, uri)
    elapsed = time.monotonic() - started
    message = result.stdout + result.stderr
    assert result.returncode != 0, _output(result)
    assert uri in message and "not reachable" in message, _output(result)
    assert not (out / "models").exists()  # failed before any training or checkpointing
    assert elapsed < 90, f"took {elapsed:.0f}s to report an unreachable server"
