"""Docker HEALTHCHECK of the masksup-med image (standard library only: slim images have no curl).

When the container runs ``masksup-med serve`` (its main process, PID 1, has ``serve`` among its
arguments), ask the MLflow scoring server for ``/ping`` on the port given by ``--port`` (default 8080)
and exit 0 when it answers 200, 1 otherwise. Any other job (train, evaluate, predict) reports healthy:
the check is about serving.

    python healthcheck.py                       # what the image runs
    python healthcheck.py --url http://127.0.0.1:8080/ping   # check this URL, whatever runs
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request

DEFAULT_PORT = 8080


def serve_port(argv: list[str]) -> int | None:
    """The port ``masksup-med serve`` listens on, from its arguments; None when ``argv`` is not a serve."""
    if "serve" not in argv:
        return None
    port = DEFAULT_PORT
    for i, arg in enumerate(argv):
        if arg == "--port" and i + 1 < len(argv):
            port = int(argv[i + 1])
        elif arg.startswith("--port="):
            port = int(arg.split("=", 1)[1])
    return port


def read_cmdline(path: str) -> list[str]:
    """The arguments of a process from ``/proc/PID/cmdline`` (NUL-separated)."""
    with open(path, "rb") as fh:
        return [part.decode(errors="replace") for part in fh.read().split(b"\0") if part]


def check(url: str, timeout: float) -> bool:
    """Whether ``url`` answers HTTP 200 within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="check this URL instead of finding the serving port of PID 1")
    parser.add_argument("--cmdline", default="/proc/1/cmdline", help="the main process's cmdline file")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    url = args.url
    if url is None:
        try:
            port = serve_port(read_cmdline(args.cmdline))
        except (OSError, ValueError):
            return 1
        if port is None:
            return 0  # not serving: nothing to check
        url = f"http://127.0.0.1:{port}/ping"
    return 0 if check(url, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
