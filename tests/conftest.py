"""Shared pytest fixtures.

Real servers for the MLflow integration tests (see ``tests/servers.py``): one PostgreSQL server, one
MLflow tracking server on top of it and one headless Chromium per test session, started on first use and
stopped at the end of the session (also when tests fail or the run is interrupted).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from servers import NO_TELEMETRY_ENV, headless_chromium, mlflow_server, postgres_server

# No MLflow usage telemetry from the test process either (set before any test imports mlflow's client).
for _key, _value in NO_TELEMETRY_ENV.items():
    os.environ.setdefault(_key, _value)

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """``test-artifacts/`` in the repository root: screenshots and server logs worth keeping from a run."""
    path = REPO_ROOT / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def postgres_uri(artifacts_dir: Path) -> str:
    """SQLAlchemy URI of a throwaway PostgreSQL database ``mlflow`` on 127.0.0.1."""
    with postgres_server(keep_log=artifacts_dir / "postgres.log") as uri:
        yield uri


@pytest.fixture(scope="session")
def mlflow_tracking_server(postgres_uri: str, tmp_path_factory, artifacts_dir: Path) -> str:
    """Base URL (``http://127.0.0.1:PORT``) of an ``mlflow server`` backed by ``postgres_uri``."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(postgres_uri, root / "artifacts", log_path=artifacts_dir / "mlflow-server.log") as url:
        yield url


@pytest.fixture(scope="session")
def chromium():
    """Playwright ``BrowserContext`` of Debian's headless Chromium (``/usr/bin/chromium``)."""
    with headless_chromium() as context:
        yield context
