"""Real servers for integration tests: PostgreSQL, an MLflow tracking server, ``masksup-med serve`` and
headless Chromium.

Each helper is a context manager that owns what it starts and tears it down in ``finally``, so a failing
test (or Ctrl-C) never leaves a process behind. Everything listens on / talks to 127.0.0.1 only.

System requirements come from ``.ci/install-system-deps`` (Debian ``postgresql`` and ``chromium``). When
one is missing, :func:`require` skips the test on a developer machine but fails it under CI (``CI=true``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"
PG_SYSTEM_USER = "postgres"  # created by Debian's postgresql-common package
PG_DB_USER = "postgres"  # superuser name given to initdb
PG_DATABASE = "mlflow"
# Name the DB-API driver in the URI: SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, while the
# project's dev extra installs psycopg2-binary.
PG_DRIVER = "psycopg2"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-breakpad",
    "--disable-domain-reliability",
    "--no-pings",
    # Any host name other than the loopback address fails to resolve: the page can reach nothing else.
    f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {LOOPBACK}",
]
MLFLOW_START_TIMEOUT_S = 90.0

# Environment for everything MLflow-related: no usage telemetry leaves the machine.
NO_TELEMETRY_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


# --------------------------------------------------------------------------------------------- helpers
class ServerAddress(str):
    """A URI/URL string that also tells which process serves it (for tests of the teardown)."""

    pid: int | None = None
    port: int | None = None
    data_dir: Path | None = None


def _address(value: str, *, pid: int | None, port: int, data_dir: Path | None = None) -> ServerAddress:
    addr = ServerAddress(value)
    addr.pid, addr.port, addr.data_dir = pid, port, data_dir
    return addr


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def require(condition: bool, reason: str) -> None:
    """Skip when ``condition`` is false, or fail when running under CI, where these tests must run."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"CI=true but {reason} (run .ci/install-system-deps)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields after the command name: state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def _tail(path: Path, n_chars: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<could not read {path}: {exc}>"
    return text[-n_chars:]


# ------------------------------------------------------------------------------------------ PostgreSQL
def find_postgres_bindir() -> Path | None:
    """Directory holding Debian's PostgreSQL server binaries (newest major version), if installed."""
    candidates = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        bindir = Path(initdb).parent
        if (bindir / "pg_ctl").is_file() and (bindir / "postgres").is_file():
            try:
                major = int(bindir.parent.name)
            except ValueError:
                major = -1
            candidates.append((major, bindir))
    return max(candidates)[1] if candidates else None


def _as_pg_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run ``cmd`` as the ``postgres`` system user."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", PG_SYSTEM_USER, "--", *cmd]


def _run(cmd: list[str], what: str, log: Path | None = None, cwd: Path | None = None, timeout: float = 120) -> None:
    proc = subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=cwd
    )
    if proc.returncode != 0:
        extra = f"\n--- {log} (tail) ---\n{_tail(log)}" if log is not None else ""
        raise RuntimeError(
            f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}{extra}"
        )


@contextlib.contextmanager
def postgres_server(
    tmp_dir: str | os.PathLike | None = None, keep_log: str | os.PathLike | None = None
) -> Iterator[ServerAddress]:
    """Start a private PostgreSQL server on 127.0.0.1 and yield its SQLAlchemy URI.

    The URI is ``postgresql+psycopg2://postgres@127.0.0.1:PORT/mlflow``.

    The cluster lives in a fresh directory created under ``tmp_dir`` (default: the system temp dir). As root
    that directory is handed to the ``postgres`` system user, who must be able to reach it: pytest's
    ``tmp_path`` (under a 0700 ``/tmp/pytest-of-root``) is not reachable, hence the default. Authentication is
    ``trust``, TCP listens on 127.0.0.1 only and the unix socket lives inside the directory. The server is
    stopped (``pg_ctl -m immediate``) and the directory removed on exit, whatever happened inside; the
    server log is first copied to ``keep_log`` when given. The yielded string also carries ``.pid`` (the
    postmaster), ``.port`` and ``.data_dir``.
    """
    bindir = find_postgres_bindir()
    require(bindir is not None, "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin")
    assert bindir is not None
    as_root = os.geteuid() == 0
    if as_root:
        require(shutil.which("runuser") is not None, "runuser not found (needed to run PostgreSQL as non-root)")
        try:
            pg_user = pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            pg_user = None
        require(pg_user is not None, f"system user {PG_SYSTEM_USER!r} not found (Debian's postgresql creates it)")
        assert pg_user is not None

    root = Path(tempfile.mkdtemp(prefix="masksup-pg-", dir=tmp_dir))
    datadir, sockdir, log = root / "data", root / "sock", root / "postgres.log"
    sockdir.mkdir()
    log.touch()
    if as_root:
        for path in (root, sockdir, log):
            os.chown(path, pg_user.pw_uid, pg_user.pw_gid)
    port = free_port()
    pg_ctl = str(bindir / "pg_ctl")
    started = False
    try:
        _run(
            _as_pg_user(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(datadir),
                    "-U",
                    PG_DB_USER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-locale",
                    "--no-sync",
                ]
            ),
            "initdb",
            cwd=root,
        )
        with open(datadir / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# masksup_med tests: private, loopback-only, throwaway server\n"
                f"listen_addresses = '{LOOPBACK}'\n"
                f"port = {port}\n"
                f"unix_socket_directories = '{sockdir}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 50\n"
            )
        started = True  # from here on, always try to stop it (a failed/timed-out start may still be running)
        _run(
            _as_pg_user([pg_ctl, "-D", str(datadir), "-l", str(log), "-w", "-t", "60", "start"]),
            "pg_ctl start",
            log=log,
            cwd=root,
        )
        _run(
            [str(bindir / "createdb"), "-h", LOOPBACK, "-p", str(port), "-U", PG_DB_USER, PG_DATABASE],
            "createdb",
            log=log,
            cwd=root,
        )
        yield _address(
            f"postgresql+{PG_DRIVER}://{PG_DB_USER}@{LOOPBACK}:{port}/{PG_DATABASE}",
            pid=_postmaster_pid(datadir),
            port=port,
            data_dir=datadir,
        )
    finally:
        if started:
            _stop_postgres(pg_ctl, datadir)
        if keep_log is not None:
            with contextlib.suppress(OSError):
                shutil.copyfile(log, keep_log)
        shutil.rmtree(root, ignore_errors=True)


def _postmaster_pid(datadir: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((datadir / "postmaster.pid").read_text().splitlines()[0])
    return None


def _stop_postgres(pg_ctl: str, datadir: Path) -> None:
    pid = _postmaster_pid(datadir)
    with contextlib.suppress(Exception):
        subprocess.run(
            _as_pg_user([pg_ctl, "-D", str(datadir), "-m", "immediate", "-w", "-t", "30", "stop"]),
            check=False,
            capture_output=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            cwd=datadir.parent,
        )
    # Belt and braces: if pg_ctl could not stop it, kill the postmaster (its children exit with it).
    if pid is not None and pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_until(lambda: not pid_alive(pid), 10)


def _wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# ----------------------------------------------------------------------------------------------- MLflow
@contextlib.contextmanager
def mlflow_server(
    backend_uri: str, artifacts_dir: str | os.PathLike, log_path: str | os.PathLike | None = None
) -> Iterator[ServerAddress]:
    """Run ``mlflow server`` on a free 127.0.0.1 port and yield its base URL ``http://127.0.0.1:PORT``.

    Artifacts are proxied by the server (``mlflow-artifacts:/``) and stored under ``artifacts_dir``. The
    server runs in its own process group (uvicorn plus any workers), which is killed on exit. Its output goes
    to ``log_path`` (default: ``artifacts_dir/../mlflow-server.log``); the tail is shown if it fails to start.
    The yielded string also carries ``.pid`` (the group leader, whose id is the process group id) and
    ``.port``.
    """
    artifacts_dir = Path(artifacts_dir)
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path) if log_path is not None else artifacts_dir.parent / "mlflow-server.log"
    port = free_port()
    base_url = f"http://{LOOPBACK}:{port}"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        str(artifacts_dir),
        "--serve-artifacts",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--workers",
        "1",
        # MLflow 3's security middleware checks the Host and Origin headers; its defaults already admit
        # loopback, but say exactly what the tests use.
        "--allowed-hosts",
        f"{LOOPBACK}:{port},localhost:{port}",
        "--cors-allowed-origins",
        base_url,
    ]
    env = {
        **os.environ,
        **NO_TELEMETRY_ENV,
        "PYTHONUNBUFFERED": "1",
        # MLflow 3 starts a job runner plus several huey consumer processes by default (GenAI jobs); the
        # tests need none, and on a 2-core machine they slow the start down a lot.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    # Work in a scratch dir so nothing (e.g. a default ./mlruns) lands in the caller's cwd.
    workdir = Path(tempfile.mkdtemp(prefix="masksup-mlflow-cwd-"))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=workdir,
            start_new_session=True,  # own process group: killpg reaches the workers too
        )
    try:
        _wait_for_health(proc, base_url, log_path, MLFLOW_START_TIMEOUT_S)
        yield _address(base_url, pid=proc.pid, port=port)
    finally:
        _kill_group(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_for_health(proc: subprocess.Popen, base_url: str, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_error = "no attempt"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args[:3]} exited with code {proc.returncode} before answering /health\n"
                f"--- {log_path} (tail) ---\n{_tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
                last_error = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            last_error = repr(exc)
        time.sleep(0.25)
    raise RuntimeError(
        f"{proc.args[:3]} did not answer {base_url}/health within {timeout:.0f}s (last: {last_error})\n"
        f"--- {log_path} (tail) ---\n{_tail(log_path)}"
    )


def _kill_group(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM the process group of ``proc`` (its leader), then SIGKILL whatever is left after ``grace``."""
    pgid = proc.pid  # start_new_session=True: the child leads its own group
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    # Also catch workers that outlive the leader.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


# ----------------------------------------------------------------------------------- masksup-med serve
def masksup_command() -> list[str]:
    """The ``masksup-med`` console script of this environment (the Docker image's ENTRYPOINT)."""
    script = Path(sys.executable).parent / "masksup-med"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "masksup_med"]


def job_env(**extra: str) -> dict[str, str]:
    """This environment without a tracking store or bundles folder of its own, no telemetry, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MASKSUP_BUNDLES_DIR")}
    return {**env, **NO_TELEMETRY_ENV, "PYTHONWARNINGS": "ignore", **extra}


@contextlib.contextmanager
def masksup_server(
    args: list[str], cwd: Path, env: dict[str, str], log_path: Path, timeout: float = 180
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``masksup-med serve ARGS`` (``--port`` among them) in its own process group: ``(base URL, process)``
    once it answers ``/health``; the whole group is killed on exit."""
    port = args[args.index("--port") + 1]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [*masksup_command(), "serve", *args],
            cwd=cwd,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    base = f"http://{LOOPBACK}:{port}"
    try:
        _wait_for_health(proc, base, log_path, timeout)
        yield base, proc
    finally:
        _kill_group(proc)


# --------------------------------------------------------------------------------------------- Chromium
@contextlib.contextmanager
def headless_chromium(executable: str = CHROMIUM) -> Iterator:
    """Yield a Playwright ``BrowserContext`` of Debian's Chromium, headless, with a fresh temp profile.

    Playwright only drives the system binary (``executable_path``); no browser is downloaded. Requests to
    anything but 127.0.0.1 are aborted (and listed in ``context.blocked_requests``). The browser is closed and
    its profile removed on exit.
    """
    require(os.path.isfile(executable) and os.access(executable, os.X_OK), f"{executable} not found")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "the playwright Python package is not installed (pip install -e '.[dev]')")
        raise

    profile = Path(tempfile.mkdtemp(prefix="masksup-chromium-"))
    # HOME/XDG dirs inside the temp profile, so nothing (e.g. crash-report databases) lands in ~/.config.
    env = {
        **os.environ,
        "HOME": str(profile),
        "XDG_CONFIG_HOME": str(profile / "xdg-config"),
        "XDG_CACHE_HOME": str(profile / "xdg-cache"),
    }
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                user_data_dir=str(profile / "user-data"),
                executable_path=executable,
                headless=True,
                args=CHROMIUM_ARGS,
                env=env,
                viewport={"width": 1400, "height": 900},
                timeout=60_000,
            )
            blocked: list[str] = []
            context.blocked_requests = blocked  # for diagnostics: what a page tried to reach elsewhere
            context.route("**/*", lambda route: _loopback_only(route, blocked))
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def _loopback_only(route, blocked: list[str]) -> None:
    from urllib.parse import urlsplit

    url = route.request.url
    parts = urlsplit(url)
    if parts.scheme in ("data", "blob", "about") or parts.hostname in (LOOPBACK, "localhost"):
        route.continue_()
    else:
        blocked.append(url)
        route.abort()


def capture_model_page(
    browser, server: str, model_name: str, version_label: str, alias: str, shot: Path
) -> tuple[str, str]:
    """Open a registered model's page in the MLflow UI, wait until ``version_label``'s row shows ``alias``,
    save a full-page screenshot to ``shot``; return the page text and that row's text."""
    page = browser.new_page()
    try:
        # The registered model's page (route ``/models/:modelName`` of the UI's hash router).
        page.goto(f"{server}/#/models/{model_name}", wait_until="domcontentloaded", timeout=60_000)
        # A React app: wait until the data has been fetched and rendered, not just for the document.
        page.get_by_role("heading", name=model_name).wait_for(timeout=60_000)
        row = page.get_by_role("row").filter(has_text=version_label)
        row.get_by_text(alias).wait_for(timeout=30_000)
        page.wait_for_timeout(500)  # let late widgets finish painting before the screenshot
        page.screenshot(path=str(shot), full_page=True)
        return page.inner_text("body"), row.inner_text()
    finally:
        page.close()


def check_model_page(browser, server: str, model_name: str, version_label: str, alias: str, shot: Path) -> None:
    """Assert the MLflow UI's page of ``model_name`` shows ``version_label`` with ``alias``, saved to ``shot``,
    and that the page asked nothing of any address but the local server."""
    text, row_text = capture_model_page(browser, server, model_name, version_label, alias, shot)
    assert model_name in text
    assert version_label in row_text and alias in row_text, row_text
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert not browser.blocked_requests, f"the page tried to leave 127.0.0.1: {browser.blocked_requests}"
