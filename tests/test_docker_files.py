"""docker/: the Dockerfiles lint clean, the compose files are valid Compose, and the deployment rules hold.

Fast checks without a Docker engine: hadolint on the Dockerfiles, the Compose specification's JSON
schema on the compose files, loopback-only ports, secrets kept out of git, what the Dockerfile copies
is in the build context, the image installs from the wheelhouse only, pinned versions agree with
pyproject.toml, and the image's health check script. The images themselves are built and run in CI by
``.ci/docker-check`` (after the test suite): train, predict, serve and the compose stack, in Docker.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
POSTGRES_DOCKERFILE = DOCKER / "postgres" / "Dockerfile"
BUILD_SCRIPT = DOCKER / "build-image.sh"
WHEELHOUSE = "docker/wheels"  # made by docker/build-image.sh wheelhouse, never committed
COMPOSE_FILES = [DOCKER / "compose.yaml", DOCKER / "compose.gpu.yaml"]
LOOPBACK = "127.0.0.1"

sys.path.insert(0, str(DOCKER))
import healthcheck


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def tool(name: str) -> str:
    """Path of a console script installed with the dev extra (next to this Python), or on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        reason = f"{name} not installed (pip install -e '.[dev]')"
        if in_ci():
            pytest.fail(f"CI=true but {reason}", pytrace=False)
        pytest.skip(reason)
    return found


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


# ------------------------------------------------------------------------------------------ Dockerfile
@pytest.mark.parametrize("path", [DOCKERFILE, POSTGRES_DOCKERFILE], ids=lambda p: p.relative_to(DOCKER).as_posix())
def test_hadolint_reports_nothing(path):
    result = subprocess.run(
        check=False,
        args=[tool("hadolint"), "--no-color", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_final_stage_runs_as_non_root_with_healthcheck_and_entrypoint():
    stage = final_stage()
    users = [args for word, args in stage if word == "USER"]
    assert users, "final stage sets no USER (would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users
    assert "useradd --uid 10001" in " ".join(args for word, args in stage if word == "RUN")
    assert user == "10001"
    healthchecks = [args for word, args in stage if word == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/opt/masksup/healthcheck.py" in healthchecks[0]
    assert ("ENTRYPOINT", '["masksup-med"]') in stage
    assert any(word == "EXPOSE" and args == "8080" for word, args in stage)
    # no compilers, apt or pip caches in the final stage: nothing is installed there at all
    assert not any(word == "RUN" and re.search(r"\b(apt-get|apt|pip|gcc|make)\b", args) for word, args in stage)


def test_multi_stage_installs_from_the_wheelhouse_only():
    """The build fetches nothing: pip reads the wheelhouse only, with the pins of constraints.txt."""
    assert not DOCKERFILE.read_text().startswith("# syntax="), "BuildKit would fetch the frontend from a registry"
    instructions = dockerfile_instructions()
    froms = [args for word, args in instructions if word == "FROM"]
    assert froms == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE} AS runtime"]
    args = dict(a.split("=", 1) for word, a in instructions if word == "ARG" and "=" in a)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", args["BASE_IMAGE"]), args["BASE_IMAGE"]
    assert args["TORCH_VERSION"] == pins()["torch"]
    assert ("COPY", f"{WHEELHOUSE} /wheels") in instructions
    assert ("COPY", "docker/constraints.txt /src/constraints.txt") in instructions
    runs = " ".join(a for word, a in instructions if word == "RUN")
    for flag in ("--no-index", "--find-links /wheels", "--no-cache-dir", "--constraint /src/constraints.txt"):
        assert flag in runs, flag
    assert "--index-url" not in runs and "TORCH_INDEX" not in DOCKERFILE.read_text()


def test_build_script_defaults_to_cpu_torch_and_builds_without_network():
    script = BUILD_SCRIPT.read_text()
    assert re.search(r"^torch_index=https://download\.pytorch\.org/whl/cpu$", script, flags=re.MULTILINE)
    assert "DOCKER_BUILDKIT=0 docker build --network none" in script  # the image build cannot download
    assert '--constraint "$CONSTRAINTS"' in script
    for path in (BUILD_SCRIPT, DOCKER / "postgres" / "entrypoint.sh", REPO / ".ci" / "docker-check"):
        assert os.access(path, os.X_OK), f"{path} is not executable"
        result = subprocess.run(check=False, args=["bash", "-n", str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr


def test_ci_runs_the_docker_check_after_the_tests():
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert lines.index("python -m pytest") < lines.index("bash .ci/docker-check")


def dockerignore_allows(path: str) -> bool:
    """Whether the root .dockerignore (an allowlist: ``*``, then ``!path`` lines) lets ``path`` into the context."""
    allowed = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!")
        if pattern == "*" or path == pattern or path.startswith(pattern.rstrip("/") + "/"):
            allowed = negate
    return allowed


def test_everything_the_dockerfile_copies_exists_and_is_in_the_build_context():
    """The legacy builder reads the root .dockerignore only: it must let in what the Dockerfile copies."""
    assert not (DOCKER / "Dockerfile.dockerignore").exists(), "the legacy builder would not read it"
    for kept_out in (".venv", "data", "outputs", "mlruns", "docker/.env", "masksup_med"):
        assert not dockerignore_allows(kept_out), kept_out
    for word, args in dockerfile_instructions():
        if word != "COPY" or args.startswith("--from"):
            continue
        *sources, _dest = args.split()
        for source in sources:
            assert source == WHEELHOUSE or (REPO / source).exists(), f"COPY source {source} missing"
            assert dockerignore_allows(source), f"{source} is not let into the build context by .dockerignore"
    if shutil.which("git") and (REPO / ".git").exists():
        ignored = subprocess.run(check=False, args=["git", "check-ignore", "-q", f"{WHEELHOUSE}/x.whl"], cwd=REPO)
        assert ignored.returncode == 0, f"{WHEELHOUSE} is not ignored by git"


# ---------------------------------------------------------------------------------------- constraints
def pins() -> dict[str, str]:
    out = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.strip().split("==")
            out[canonicalize_name(name)] = version
    return out


def test_constraints_pin_every_runtime_requirement_of_pyproject():
    """docker/constraints.txt (docker/make_constraints.py) must follow pyproject.toml's dependencies."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pinned = pins()
    for line in project["dependencies"] + project["optional-dependencies"]["server"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is not pinned in docker/constraints.txt: rerun docker/make_constraints.py"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"docker/constraints.txt pins {name}=={pinned[name]}, pyproject.toml wants {req.specifier}"
        )


# -------------------------------------------------------------------------------------------- compose
@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_validates_against_the_compose_specification(path):
    result = subprocess.run(
        check=False,
        args=[tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_rejects_a_broken_file(tmp_path):
    broken = compose()
    broken["services"]["serving"]["portz"] = ["8080:8080"]
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = subprocess.run(
        check=False,
        args=[tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "portz" in result.stdout


def published_ports() -> list[tuple[str, object]]:
    return [
        (name, port)
        for path in COMPOSE_FILES
        for name, service in (yaml.safe_load(path.read_text()).get("services") or {}).items()
        for port in service.get("ports", [])
    ]


def test_ports_bind_to_loopback_only():
    ports = published_ports()
    assert {name for name, _ in ports} == {"mlflow", "serving"}
    for name, port in ports:
        assert isinstance(port, str) and port.startswith(f"{LOOPBACK}:"), (name, port)
    assert ("mlflow", "127.0.0.1:${MASKSUP_MLFLOW_PORT:-5000}:5000") in ports
    assert ("serving", "127.0.0.1:${MASKSUP_SERVING_PORT:-8080}:8080") in ports


def test_services_volumes_profiles_and_networks():
    spec = compose()
    assert "name" not in spec, "Debian's docker-compose 1.29 rejects a top-level name: (use COMPOSE_PROJECT_NAME)"
    services = spec["services"]
    assert set(services) == {"postgres", "mlflow", "trainer", "serving"}
    # every image is built locally by docker/build-image.sh: no build sections, nothing pulled
    assert not any("build" in service for service in services.values())
    major = re.search(r"^ARG PG_MAJOR=(\d+)$", POSTGRES_DOCKERFILE.read_text(), flags=re.MULTILINE).group(1)
    assert services["postgres"]["image"] == f"${{MASKSUP_POSTGRES_IMAGE:-masksup-postgres:{major}}}"
    assert f"postgres_tag=masksup-postgres:{major}" in BUILD_SCRIPT.read_text()
    assert {services[name]["image"] for name in ("mlflow", "trainer", "serving")} == {
        "${MASKSUP_IMAGE:-masksup-med:0.1.0}"
    }
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert services["postgres"]["networks"] == ["db"] and spec["networks"]["db"]["internal"] is True
    assert "ports" not in services["postgres"]

    command = services["mlflow"]["command"]
    assert services["mlflow"]["entrypoint"] == ["mlflow"] and command[0] == "server"
    assert command[command.index("--backend-store-uri") + 1].startswith("postgresql+psycopg2://")
    assert command[command.index("--app-name") + 1] == "basic-auth"
    assert command[command.index("--artifacts-destination") + 1] == "/mlflow-artifacts"
    assert "mlflow-artifacts:/mlflow-artifacts" in services["mlflow"]["volumes"]
    assert set(spec["volumes"]) == {"postgres-data", "mlflow-artifacts", "mlflow-auth"}

    assert services["trainer"]["profiles"] == ["train"] and services["trainer"]["command"][0] == "train"
    assert services["serving"]["command"][0] == "serve"
    for name in ("trainer", "serving"):
        assert services[name]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    trainer_mounts = {re.sub(r":(ro|rw)$", "", v).rsplit(":", 1)[1] for v in services["trainer"]["volumes"]}
    assert trainer_mounts == {"/data", "/outputs"}


def test_every_variable_compose_reads_is_documented_in_env_example():
    example = (DOCKER / ".env.example").read_text()
    defined = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", example, flags=re.MULTILINE))
    used = set()
    for path in COMPOSE_FILES:
        used |= set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", path.read_text()))
    assert used, "compose files read no variables?"
    assert used <= defined, f"not in docker/.env.example: {sorted(used - defined)}"
    # secrets have no default in compose: a missing docker/.env fails loudly instead of using a known password
    text = (DOCKER / "compose.yaml").read_text()
    for secret in ("POSTGRES_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD"):
        assert f"${{{secret}:?" in text


def test_env_file_is_gitignored_and_example_is_not():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(check=False, args=["git", "check-ignore", "-q", "docker/.env"], cwd=REPO)
    assert ignored.returncode == 0, "docker/.env is not ignored by git"
    example = subprocess.run(check=False, args=["git", "check-ignore", "-q", "docker/.env.example"], cwd=REPO)
    assert example.returncode == 1, "docker/.env.example must be committed"


def test_auth_config_holds_no_secret_and_keeps_users_on_a_volume(monkeypatch):
    from mlflow.server.auth.config import read_auth_config

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(DOCKER / "mlflow-auth.ini"))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "from-env")
    config = read_auth_config()
    assert config.database_uri == "sqlite:////mlflow-auth/basic_auth.db"
    assert config.admin_password == "from-env"
    assert "admin_password" not in (DOCKER / "mlflow-auth.ini").read_text().replace("# ", "")


# ------------------------------------------------------------------------------------- health check
def test_healthcheck_port_from_the_main_process_arguments(tmp_path):
    assert healthcheck.serve_port(["python", "/opt/venv/bin/masksup-med", "train", "glas"]) is None
    assert healthcheck.serve_port(["masksup-med", "serve", "--model", "models:/m@a"]) == 8080
    assert healthcheck.serve_port(["masksup-med", "serve", "--port", "9000"]) == 9000
    assert healthcheck.serve_port(["masksup-med", "serve", "--port=9001"]) == 9001
    assert healthcheck.serve_port(["mlflow", "server", "--port", "5000"]) is None


class _Ping(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/ping" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_healthcheck_against_a_server(tmp_path):
    server = http.server.HTTPServer((LOOPBACK, 0), _Ping)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cmdline = tmp_path / "cmdline"
        cmdline.write_bytes(b"\0".join([b"python", b"masksup-med", b"serve", b"--port", str(port).encode()]))
        assert healthcheck.main(["--cmdline", str(cmdline)]) == 0
        assert healthcheck.main(["--url", f"http://{LOOPBACK}:{port}/missing"]) == 1
        cmdline.write_bytes(b"\0".join([b"python", b"masksup-med", b"train", b"glas"]))
        assert healthcheck.main(["--cmdline", str(cmdline)]) == 0  # not serving: healthy
    finally:
        server.shutdown()
        server.server_close()
    cmdline.write_bytes(b"\0".join([b"masksup-med", b"serve", b"--port", str(port).encode()]))
    assert healthcheck.main(["--cmdline", str(cmdline), "--timeout", "2"]) == 1  # nobody answers any more
