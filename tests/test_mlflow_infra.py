"""MLflow against real servers: PostgreSQL backend store, ``mlflow server`` REST API and the web UI.

The servers come from session fixtures in ``conftest.py``; this module logs one run and registers one model
version once (module fixture ``registered``), and each test checks one side of it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from servers import (
    check_model_page,
    group_members,
    mlflow_server,
    pid_alive,
    port_open,
    postgres_server,
    require,
)

from masksup_med.tracking.registry import using_store

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("servers")]  # one PostgreSQL and MLflow server per run

EXPERIMENT = "masksup-infra"
MODEL_NAME = "masksup-infra-conv"
ALIAS = "candidate"
PARAM = ("loss", "dice_ce")
METRIC = ("val_dice", [0.25, 0.5, 0.75])
ARTIFACT = "notes/summary.txt"
ARTIFACT_TEXT = "masksup infra check\n"


_global_tracking_uri = using_store  # MLflow store for a block, global state and environment restored


@pytest.fixture(scope="module")
def registered(mlflow_tracking_server: str, tmp_path_factory) -> dict:
    """One run (param, metric history, artifact, tiny PyTorch model); version 1 of MODEL_NAME, aliased."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    client = mlflow.MlflowClient(tracking_uri=mlflow_tracking_server, registry_uri=mlflow_tracking_server)
    experiment_id = client.create_experiment(EXPERIMENT)
    run = client.create_run(experiment_id, run_name="infra-check")
    run_id = run.info.run_id
    client.log_param(run_id, *PARAM)
    for step, value in enumerate(METRIC[1]):
        client.log_metric(run_id, METRIC[0], value, step=step)
    local = tmp_path_factory.mktemp("artifact") / Path(ARTIFACT).name
    local.write_text(ARTIFACT_TEXT)
    client.log_artifact(run_id, str(local), artifact_path=str(Path(ARTIFACT).parent))

    model = torch.nn.Conv2d(3, 1, 1).eval()
    example = np.zeros((1, 3, 8, 8), dtype=np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    with _global_tracking_uri(mlflow_tracking_server):
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                # MLflow 3.17 saves PyTorch models as torch.export "pt2" by default, which traces the
                # model on the input example.
                model,
                name="model",
                signature=signature,
                input_example=example,
                pip_requirements=["torch"],
            )
        version = mlflow.register_model(info.model_uri, MODEL_NAME)
    client.set_registered_model_alias(MODEL_NAME, ALIAS, version.version)
    client.set_terminated(run_id)
    return {
        "server": mlflow_tracking_server,
        "run_id": run_id,
        "experiment_id": experiment_id,
        "version": str(version.version),
        "model_uri": info.model_uri,
    }


def _api(server: str, endpoint: str, **params) -> dict:
    import requests

    resp = requests.get(f"{server}/api/2.0/{endpoint}", params=params, timeout=30)
    assert resp.status_code == 200, f"GET {endpoint} {params} -> {resp.status_code}: {resp.text[:500]}"
    return resp.json()


def test_backend_store_is_postgres(postgres_uri: str, mlflow_tracking_server: str):
    import requests

    assert postgres_uri.startswith("postgresql+psycopg2://postgres@127.0.0.1:")
    assert mlflow_tracking_server.startswith("http://127.0.0.1:")
    assert requests.get(f"{mlflow_tracking_server}/health", timeout=10).status_code == 200
    # The experiment the server created lives in PostgreSQL's ``mlflow`` database.
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres_uri)
    try:
        with engine.connect() as conn:
            names = {row[0] for row in conn.execute(sqlalchemy.text("SELECT name FROM experiments"))}
    finally:
        engine.dispose()
    assert "Default" in names


def test_run_through_rest_api(registered: dict):
    server, run_id = registered["server"], registered["run_id"]

    run = _api(server, "mlflow/runs/get", run_id=run_id)["run"]
    assert run["info"]["experiment_id"] == registered["experiment_id"]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params[PARAM[0]] == PARAM[1]

    history = _api(server, "mlflow/metrics/get-history", run_id=run_id, metric_key=METRIC[0])["metrics"]
    assert [m["value"] for m in sorted(history, key=lambda m: m["step"])] == METRIC[1]

    top = _api(server, "mlflow/artifacts/list", run_id=run_id)["files"]
    assert {"path": "notes", "is_dir": True} in [{k: f[k] for k in ("path", "is_dir")} for f in top]
    inner = _api(server, "mlflow/artifacts/list", run_id=run_id, path="notes")["files"]
    assert [f["path"] for f in inner] == [ARTIFACT]

    import requests

    # The file itself, through the server's artifact proxy.
    resp = requests.get(f"{server}/get-artifact", params={"run_id": run_id, "path": ARTIFACT}, timeout=30)
    assert resp.status_code == 200 and resp.text == ARTIFACT_TEXT


def test_registered_model_and_alias_through_rest_api(registered: dict):
    server = registered["server"]

    model = _api(server, "mlflow/registered-models/get", name=MODEL_NAME)["registered_model"]
    assert model["name"] == MODEL_NAME
    assert {"alias": ALIAS, "version": registered["version"]} in model.get("aliases", [])

    by_alias = _api(server, "mlflow/registered-models/alias", name=MODEL_NAME, alias=ALIAS)["model_version"]
    assert by_alias["version"] == registered["version"] == "1"
    assert by_alias["run_id"] == registered["run_id"]
    assert ALIAS in by_alias.get("aliases", [])

    version = _api(server, "mlflow/model-versions/get", name=MODEL_NAME, version="1")["model_version"]
    assert version["status"] == "READY"

    # The model itself loads back from the server (artifacts proxied to the server's artifact store).
    import mlflow
    import torch

    with _global_tracking_uri(server):
        loaded = mlflow.pytorch.load_model(f"models:/{MODEL_NAME}@{ALIAS}")
    with torch.no_grad():
        out = loaded(torch.zeros(1, 3, 8, 8))  # the traced (input example's) shape
    assert tuple(out.shape) == (1, 1, 8, 8)


def test_registered_model_page_in_headless_chromium(registered: dict, chromium, artifacts_dir: Path):
    server, version_label = registered["server"], f"Version {registered['version']}"
    shot = artifacts_dir / "mlflow-registered-model.png"
    check_model_page(chromium, server, MODEL_NAME, version_label, ALIAS, shot)


# ------------------------------------------------------------------------------- teardown guarantees
def _wait_gone(predicate, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_postgres_stopped_after_interrupt():
    seen = {}
    with pytest.raises(KeyboardInterrupt), postgres_server() as uri:
        seen.update(pid=uri.pid, port=uri.port, data_dir=uri.data_dir)
        assert seen["pid"] is not None and pid_alive(seen["pid"])
        assert port_open(seen["port"])
        raise KeyboardInterrupt  # what Ctrl-C in the middle of a test looks like
    assert _wait_gone(lambda: not pid_alive(seen["pid"])), "postmaster still running"
    assert not port_open(seen["port"])
    assert not seen["data_dir"].exists()


def test_mlflow_server_stopped_after_failure(postgres_uri: str, tmp_path: Path):
    seen = {}
    with (
        pytest.raises(RuntimeError, match="test failed"),
        mlflow_server(postgres_uri, tmp_path / "artifacts") as url,
    ):
        seen.update(pid=url.pid, port=url.port)
        assert port_open(url.port)
        assert len(group_members(url.pid)) >= 2  # launcher + uvicorn worker
        raise RuntimeError("test failed")
    assert _wait_gone(lambda: not group_members(seen["pid"])), f"left: {group_members(seen['pid'])}"
    assert not pid_alive(seen["pid"])
    assert not port_open(seen["port"])
    assert "Uvicorn running" in (tmp_path / "mlflow-server.log").read_text()


def test_missing_binary_skips_locally_but_fails_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require(False, "no such tool")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no such tool"):
        require(False, "no such tool")
    require(True, "present")  # no-op
