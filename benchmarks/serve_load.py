"""A short load test of ``masksup-med serve`` on 127.0.0.1: mixed valid, malformed and oversized requests.

The server runs as shipped (``masksup-med serve``, its default limits, ``--device cpu`` unless told
otherwise) on an untrained network in the registered-model format: the GLaS bundle's UNet at its
shipped size (384 x 256), random weights, registered in a temporary SQLite store (no training; the
masks are meaningless, the work per image is the real one). ``--network tiny`` serves a 2-level UNet
at 32 x 32 instead, to time the server without the network.

``--requests`` requests (default 200) go out over ``--clients`` concurrent connections (default 4),
each kind drawn with a fixed seed in these proportions:

    valid          one 8-bit RGB PNG of 256 x 192 pixels                                  expect 200
    valid-batch    four such images in one request                                         expect 200
    not-json       200 KB of random bytes sent as application/json                         expect 400
    not-an-image   base64 of a text file in the image column                               expect 400
    pixel-bomb     a 140 KB grey PNG of 12000 x 12000 pixels (144 MB decoded)             expect 413
    too-many       17 small images in one request (the default limit is 16)               expect 413
    oversized      a real JSON body 1 MiB over the 32 MiB body limit, sent whole           expect 413

It records the status codes per kind (and any request that got no answer), the latency of each
request (median and 95th percentile, overall and per kind) and the server process's peak resident
set size (``VmHWM`` of the uvicorn process, from ``/proc``) before and after the load. No 5xx is
expected. The run is bounded: it stops sending after ``--time-limit`` seconds.

Run from the repository root (about half a minute on 2 CPU cores, most of it starting the server)::

    python benchmarks/serve_load.py                 # writes results/serve_load.json and the "serve-load" block
    python benchmarks/serve_load.py --requests 40 --network tiny --markdown none
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import io
import json
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle_runs import shown_command
from report import BENCHMARKS_DIR, RESULTS_DIR, RESULTS_MD, code_version, machine, save_result

REPO = BENCHMARKS_DIR.parent
LOOPBACK = "127.0.0.1"
MODEL = "models:/serve-load@candidate"
KINDS = {  # kind: (weight, expected status)
    "valid": (40, 200),
    "valid-batch": (15, 200),
    "not-json": (15, 400),
    "not-an-image": (10, 400),
    "pixel-bomb": (10, 413),
    "too-many": (5, 413),
    "oversized": (5, 413),
}
TINY_UNET = {
    "_target_": "UNet",
    "spatial_dims": 2,
    "in_channels": 3,
    "out_channels": 1,
    "channels": [4, 8],
    "strides": [2],
    "num_res_units": 0,
}
NO_TELEMETRY = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PYTHONWARNINGS": "ignore"}


# ------------------------------------------------------------------------------------------ the model
def register_untrained(root: Path, network: str) -> tuple[str, dict[str, Any]]:
    """Register an untrained network (``bundle``: the GLaS bundle's UNet at its size; ``tiny``) in a SQLite store
    in ``root``; its URI and what was registered."""
    import torch
    from monai.bundle import ConfigParser

    from masksup_med.tracking.model_format import build_network
    from masksup_med.tracking.registry import register_checkpoint

    if network == "tiny":
        network_def, size = TINY_UNET, [32, 32]
    else:
        parser = ConfigParser()
        parser.read_config(str(REPO / "bundles" / "glas" / "configs" / "train.json"))
        network_def, size = parser.get("network_def"), list(parser.get("image_size"))
    torch.manual_seed(0)
    checkpoint = root / "model.pt"
    torch.save({"model": build_network(network_def).state_dict()}, checkpoint)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with contextlib.chdir(root):  # the artifacts go next to the store
        register_checkpoint(checkpoint, network_def, "serve-load", uri, (3, *size), bundle="glas")
    return uri, {"network": network, "network_def": network_def, "image_size": size}


# ------------------------------------------------------------------------------------------ requests
def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid 8-bit grey PNG of ``width`` x ``height`` black pixels (~140 KB for 12000 x 12000)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + width)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _records(*files: bytes) -> bytes:
    return json.dumps({"dataframe_records": [{"image": base64.b64encode(f).decode("ascii")} for f in files]}).encode()


def request_bodies(max_body_bytes: int, max_images: int) -> dict[str, bytes]:
    """One body per kind (the same bytes each time a kind is drawn)."""
    rng = np.random.default_rng(0)
    image = _png(rng.integers(0, 256, (192, 256, 3), dtype=np.uint8))
    small = _png(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    filler = base64.b64encode(rng.integers(0, 256, max_body_bytes, dtype=np.uint8).tobytes()).decode("ascii")
    oversized = json.dumps({"dataframe_records": [{"image": filler[: max_body_bytes + (1 << 20)]}]}).encode()
    return {
        "valid": _records(image),
        "valid-batch": _records(image, image, image, image),
        "not-json": rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes(),
        "not-an-image": _records(b"a text file, not an image\n" * 10),
        "pixel-bomb": _records(png_bomb(12000, 12000)),
        "too-many": _records(*[small] * (max_images + 1)),
        "oversized": oversized,
    }


def post(port: int, body: bytes, timeout: float) -> tuple[int | str, float]:
    """POST ``body`` to /invocations; ``(status or what went wrong, seconds)``."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        connection.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status, time.perf_counter() - started
    except (OSError, http.client.HTTPException) as e:
        return f"no answer ({type(e).__name__})", time.perf_counter() - started
    finally:
        connection.close()


# ------------------------------------------------------------------------------------------ the server
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak) of process ``pid``, in KiB."""
    found = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
    return found


def uvicorn_pid(serve_pid: int) -> int:
    """The uvicorn process ``masksup-med serve`` started (its one child)."""
    children = _children(serve_pid)
    if len(children) != 1:
        raise RuntimeError(f"expected one server process under masksup-med serve ({serve_pid}), got {children}")
    return children[0]


@contextlib.contextmanager
def serving(store: str, port: int, device: str, log: Path, timeout: float = 300):
    """``masksup-med serve`` on 127.0.0.1:``port`` in its own process group; yields its process once /ping answers."""
    env = {**os.environ, **NO_TELEMETRY, "MLFLOW_TRACKING_URI": store}
    command = [sys.executable, "-m", "masksup_med", "serve", "--model", MODEL, "--port", str(port), "--device", device]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"masksup-med serve exited with {proc.returncode}; see {log}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                connection = http.client.HTTPConnection(LOOPBACK, port, timeout=2)
                connection.request("GET", "/ping")
                if connection.getresponse().status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"masksup-med serve did not answer /ping in {timeout:.0f}s; see {log}")
            time.sleep(0.5)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ------------------------------------------------------------------------------------------ the run
def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, linear between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency(values: Sequence[float]) -> dict[str, float]:
    return {
        "count": len(values),
        "median_ms": round(1000 * statistics.median(values), 1) if values else None,
        "p95_ms": round(1000 * percentile(values, 0.95), 1) if values else None,
    }


def run_load(args: argparse.Namespace, port: int, server_pid: int) -> dict[str, Any]:
    """Send the requests; the figures."""
    from masksup_med.data.limits import InputLimits

    limits = InputLimits()
    bodies = request_bodies(limits.max_body_bytes, limits.max_images)
    drawn = random.Random(args.seed).choices(list(KINDS), weights=[w for w, _ in KINDS.values()], k=args.requests)
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + args.time_limit
    peak = {"rss_kib": 0}

    def one(kind: str) -> None:
        if time.monotonic() > deadline:
            return
        status, seconds = post(port, bodies[kind], args.request_timeout)
        rss = memory_kib(server_pid).get("VmRSS", 0)
        with lock:
            results.append({"kind": kind, "status": status, "seconds": seconds})
            peak["rss_kib"] = max(peak["rss_kib"], rss)

    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(one, drawn))
    wall = time.perf_counter() - started

    by_kind = {
        kind: {
            "expected": expected,
            "statuses": dict(Counter(str(r["status"]) for r in results if r["kind"] == kind)),
            **latency([r["seconds"] for r in results if r["kind"] == kind]),
        }
        for kind, (_, expected) in KINDS.items()
    }
    unexpected = sum(1 for r in results if r["status"] != KINDS[r["kind"]][1])
    server_errors = sum(1 for r in results if isinstance(r["status"], int) and r["status"] >= 500)
    no_answer = sum(1 for r in results if not isinstance(r["status"], int))
    return {
        "sent": len(results),
        "drawn": len(drawn),
        "wall_seconds": round(wall, 1),
        "requests_per_second": round(len(results) / wall, 2) if wall else None,
        "statuses": dict(Counter(str(r["status"]) for r in results)),
        "server_errors": server_errors,
        "no_answer": no_answer,
        "unexpected": unexpected,
        "latency_all": latency([r["seconds"] for r in results]),
        "latency_valid": latency([r["seconds"] for r in results if KINDS[r["kind"]][1] == 200]),
        "latency_refused": latency([r["seconds"] for r in results if KINDS[r["kind"]][1] != 200]),
        "by_kind": by_kind,
        "rss_sampled_peak_mib": round(peak["rss_kib"] / 1024, 1),
    }


# ------------------------------------------------------------------------------------------ report
def _ms(figures: dict[str, Any]) -> str:
    return f"{figures['median_ms']:.0f} / {figures['p95_ms']:.0f}" if figures["count"] else "—"


def text_report(result: dict[str, Any]) -> str:
    load, memory = result["load"], result["memory"]
    lines = [
        f"{load['sent']} requests ({load['drawn']} drawn), {result['settings']['clients']} clients, "
        f"{load['wall_seconds']} s, {load['requests_per_second']} requests/s",
        f"status codes: {load['statuses']}; 5xx: {load['server_errors']}, no answer: {load['no_answer']}, "
        f"not the expected status: {load['unexpected']}",
        f"latency median / p95 (ms): all {_ms(load['latency_all'])}, valid {_ms(load['latency_valid'])}, "
        f"refused {_ms(load['latency_refused'])}",
        f"server peak RSS: {memory['peak_before_mib']} MiB after start, {memory['peak_after_mib']} MiB after the load",
    ]
    for kind, figures in load["by_kind"].items():
        lines.append(f"  {kind:13s} expect {figures['expected']}: {figures['statuses']}  {_ms(figures)} ms")
    return "\n".join(lines)


def markdown_body(result: dict[str, Any]) -> str:
    """The generated "serve-load" block of RESULTS.md."""
    load, memory, settings, info = result["load"], result["memory"], result["settings"], result["machine"]
    where = info["cuda"] or f"{info['processor']}, {info['cpu_count']} CPUs"
    model = (
        f"the GLaS bundle's UNet, untrained, at {settings['image_size'][0]} x {settings['image_size'][1]}"
        if settings["network"] == "bundle"
        else f"a 2-level UNet at {settings['image_size'][0]} x {settings['image_size'][1]}"
    )
    rows = [
        "| request | share | expected | status codes | median / p95 latency (ms) |",
        "|---|---|---|---|---|",
    ]
    for kind, figures in load["by_kind"].items():
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(figures["statuses"].items())) or "—"
        share = KINDS[kind][0]
        rows.append(f"| {kind} | {share} % | {figures['expected']} | {statuses} | {_ms(figures)} |")
    summary = (
        f"`masksup-med serve` with its default limits on 127.0.0.1, device {settings['device']} ({where}), "
        f"serving {model}; {load['sent']} requests over {settings['clients']} concurrent clients in "
        f"{load['wall_seconds']} s ({load['requests_per_second']} requests/s), code `{result['code']}`."
    )
    totals = (
        f"- Status codes: {', '.join(f'{c}: {n}' for c, n in sorted(load['statuses'].items()))}; "
        f"**5xx: {load['server_errors']}**, no answer: {load['no_answer']}, "
        f"not the expected status: {load['unexpected']}.\n"
        f"- Latency, median / p95: all {_ms(load['latency_all'])} ms; valid requests {_ms(load['latency_valid'])} ms; "
        f"refused requests {_ms(load['latency_refused'])} ms.\n"
        f"- Server process (uvicorn) peak resident set size (`VmHWM`): {memory['peak_before_mib']} MiB after start, "
        f"{memory['peak_after_mib']} MiB after the load."
    )
    return "\n".join([summary, "", *rows, "", totals, "", f"Command: `{result['command']}`"])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="requests to send (default 200)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent connections (default 4)")
    parser.add_argument("--time-limit", type=float, default=300, help="stop sending after this many seconds")
    parser.add_argument("--request-timeout", type=float, default=120, help="seconds one request may take")
    parser.add_argument("--network", choices=["bundle", "tiny"], default="bundle", help="untrained network served")
    parser.add_argument("--device", default="cpu", help="serve --device (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "serve_load.json")
    parser.add_argument("--markdown", default=str(RESULTS_MD), help="Markdown file whose block is replaced, or none")
    parser.add_argument("--block", default="serve-load", help="name of the Markdown block (default: serve-load)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="masksup-serve-load-") as tmp:
        store, registered = register_untrained(Path(tmp), args.network)
        port = free_port()
        with serving(store, port, args.device, Path(tmp) / "serve.log") as proc:
            server = uvicorn_pid(proc.pid)
            before = memory_kib(server)
            load = run_load(args, port, server)
            after = memory_kib(server)
            alive = proc.poll() is None
        log_tail = (Path(tmp) / "serve.log").read_text(errors="replace")[-2000:]
    if not alive:
        raise RuntimeError(f"the server died under load; its log ends:\n{log_tail}")
    result = {
        "load": load,
        "memory": {
            "peak_before_mib": round(before.get("VmHWM", 0) / 1024, 1),
            "peak_after_mib": round(after.get("VmHWM", 0) / 1024, 1),
            "rss_after_mib": round(after.get("VmRSS", 0) / 1024, 1),
            "rss_sampled_peak_mib": load.pop("rss_sampled_peak_mib"),
        },
        "settings": {
            "requests": args.requests,
            "clients": args.clients,
            "time_limit": args.time_limit,
            "device": args.device,
            "seed": args.seed,
            "kinds": {kind: {"weight_percent": w, "expected": e} for kind, (w, e) in KINDS.items()},
            "network": registered["network"],
            "image_size": registered["image_size"],
        },
        "machine": machine(),
        "code": code_version(),
        "command": shown_command([sys.executable, "benchmarks/serve_load.py", *argv]),
    }
    print(text_report(result))
    save_result(result, args.output, args.markdown, args.block, markdown_body(result))
    return result


if __name__ == "__main__":
    main()
