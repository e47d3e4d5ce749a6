"""The REST server of ``masksup-med serve``: MLflow's scoring server app behind a guard of our own.

MLflow 3.17's scoring server is a FastAPI app (``mlflow.pyfunc.scoring_server.init``: ``/ping``,
``/health``, ``/version``, ``/invocations``) that uvicorn runs. It reads any body whole, answers a
request without ``Content-Type`` with a 500, and puts the Python stack trace in its error bodies.
:class:`RequestGuard` wraps that app (ASGI) and

- refuses a body over ``max_body_bytes`` with 413, from its ``Content-Length`` before keeping any of
  it, else while reading it (never more than the limit is held); the rest of such a body is read and
  dropped (bounded in bytes and seconds) so that a client sending it whole gets the 413 rather than
  a reset connection;
- refuses an empty body (400) and a body without ``Content-Type`` (415) before MLflow sees them;
- parses a JSON body once itself: one that is not JSON, or not one of the scoring server's layouts,
  gets a 400 at once (MLflow would quote the whole body in its error and take seconds and hundreds of
  MB on a large one), and one holding more than ``max_images`` images a 413;
- answers every error as ``{"error_code": …, "message": …}``: the message a refused image got
  (:class:`~masksup_med.serving.limits.RequestRejected`, with its status), else a fixed message for
  the status. No error body quotes the request: MLflow's own messages (which do) go to the log only.

The image limits are checked by the served model itself (:mod:`masksup_med.serving.model`); all limits
travel in its model config. :func:`server_command` starts ``uvicorn`` on :func:`create_app`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["MODEL_DIR_ENV", "RequestGuard", "clean_error", "create_app", "server_command"]

MODEL_DIR_ENV = "MASKSUP_SERVE_MODEL_DIR"
TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"  # read by MLflow's scoring server
MAX_MESSAGE_CHARS = 1000
MAX_LOGGED_CHARS = 300  # of MLflow's own error message, in the server's log
# reading the rest of a body refused for its size, so that the client gets the 413 (see RequestGuard._discard_rest)
DRAIN_FACTOR = 4  # at most this many times the body limit, or DRAIN_MIN_BYTES (a larger declared body: not at all)
DRAIN_MIN_BYTES = 64 << 20
DRAIN_SECONDS = 10.0
DRAIN_IDLE_SECONDS = 1.0
ERROR_CODES = {
    400: "BAD_REQUEST",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "REQUEST_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    500: "INTERNAL_ERROR",
    504: "TIMEOUT",
}
EXAMPLE = '{"dataframe_records": [{"image": "<base64 of a PNG, JPEG, BMP, TIFF, NIfTI or DICOM file>"}]}'
LAYOUTS = ("dataframe_split", "dataframe_records", "instances", "inputs")  # MLflow's JSON layouts
IMAGE_COLUMN = "image"
FIXED_MESSAGES = {
    400: f"the request was refused: send a JSON body such as {EXAMPLE}",
    404: "no such path: the server answers POST /invocations and GET /ping, /health, /version",
    405: "method not allowed: POST /invocations, GET /ping, /health, /version",
    415: (
        "unsupported content type: the server takes content types application/json, text/csv and "
        "application/vnd.apache.parquet; send the JSON body with Content-Type: application/json"
    ),
    504: (
        "the request took longer than the server allows (serve --timeout, default 60 s); "
        "send fewer or smaller images per request"
    ),
}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

logger = logging.getLogger(__name__)


def clean_error(status: int, body: bytes) -> tuple[int, dict[str, str]]:
    """The status and JSON body a client gets for an error response of MLflow's app (or our model).

    Our model's refusals (:class:`~masksup_med.serving.limits.RequestRejected`) keep their message and
    status: those messages say what was wrong without quoting the request. Any other error gets a fixed
    message for its status, since MLflow's own messages quote the request body.
    """
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and "masksup_message" in parsed:  # our model refused the request
        status = int(parsed.get("masksup_status") or status)
        message = str(parsed["masksup_message"]).split("Traceback (most recent call last)")[0].strip()
        message = message or "request refused"
    elif status >= 500 and status != 504:
        message = "internal server error; the server's log has the details"
    else:
        message = FIXED_MESSAGES.get(status, "request refused")
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + " …"
    default = "BAD_REQUEST" if status < 500 else "INTERNAL_ERROR"
    return status, {"error_code": ERROR_CODES.get(status, default), "message": message}


def _logged(body: bytes) -> str:
    """The start of an error body of MLflow's app, on one line, for the server's log."""
    text = " ".join(body[: MAX_LOGGED_CHARS * 4].decode("utf-8", errors="replace").split())
    return text[:MAX_LOGGED_CHARS] + (" …" if len(text) > MAX_LOGGED_CHARS else "")


def count_images(payload: Any) -> int | None:
    """How many images a parsed JSON body in one of MLflow's layouts holds; None when it does not say."""
    (layout,) = [key for key in LAYOUTS if key in payload]
    value = payload[layout]
    if layout == "dataframe_split":
        value = value.get("data") if isinstance(value, dict) else None
    elif isinstance(value, dict):  # instances / inputs as columns: {"image": [...]}
        column = value.get(IMAGE_COLUMN)
        return len(column) if isinstance(column, list) else 1
    return len(value) if isinstance(value, list) else None


def inspect_json(body: bytes, max_images: int) -> tuple[int, str] | None:
    """The refusal of a JSON body that is not JSON, not one of MLflow's layouts, or holds too many images;
    None when it may go on to MLflow. The message says what is wrong without quoting the body."""
    from masksup_med.serving.limits import RequestRejected

    try:
        payload = json.loads(body)
    except UnicodeDecodeError as e:
        return 400, f"the request body is not valid JSON: not UTF-8 (at byte {e.start:,}); send JSON such as {EXAMPLE}"
    except json.JSONDecodeError as e:
        return 400, (
            f"the request body is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
            f"send JSON such as {EXAMPLE}"
        )
    layouts = [key for key in LAYOUTS if key in payload] if isinstance(payload, dict) else []
    if len(layouts) != 1:
        found = (
            f"a JSON {type(payload).__name__}"
            if not isinstance(payload, dict)
            else f"an object with {len(layouts)} of these keys"
        )
        return 400, (
            f"the request body must be a JSON object with exactly one of the keys {', '.join(LAYOUTS)}; "
            f"got {found}. Send JSON such as {EXAMPLE}"
        )
    count = count_images(payload)
    if count is not None and count > max_images:
        refused = RequestRejected.too_many_images(count, max_images)
        return refused.status, refused.reason
    return None


async def _send_json(send: Send, status: int, payload: dict[str, str], close: bool = False) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _CleanErrors:
    """An ASGI ``send`` that passes successful responses on and rewrites error responses (:func:`clean_error`)."""

    def __init__(self, send: Send, where: str) -> None:
        self.send = send
        self.where = where
        self.start: Message | None = None
        self.parts: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            self.start = message
            return
        if message["type"] == "http.response.body" and self.start is not None:
            self.parts.append(message.get("body", b""))
            if message.get("more_body"):
                return
            original = b"".join(self.parts)
            status, payload = clean_error(self.start["status"], original)
            logger.warning("%s: %d %s", self.where, status, payload["message"])
            if b'"masksup_message"' not in original and status < 500:
                logger.warning("%s: the scoring server said: %s", self.where, _logged(original))
            await _send_json(self.send, status, payload)
            return
        await self.send(message)


class RequestGuard:
    """ASGI middleware in front of MLflow's scoring server app: body limit, JSON layout, image count, clean errors.

    Args:
        app: the scoring server's ASGI app.
        max_body_bytes: the largest ``/invocations`` body read (larger: 413).
        max_images: the most images one JSON request may hold (more: 413).
    """

    def __init__(self, app: Callable, max_body_bytes: int, max_images: int = 16) -> None:
        self.app = app
        self.max_body_bytes = int(max_body_bytes)
        self.max_images = int(max_images)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        where = f"{scope.get('method')} {scope.get('path')}"
        if scope.get("method") == "POST" and scope.get("path") == "/invocations":
            refusal, body = await self._read_body(scope, receive)
            if refusal is not None:
                status, message = refusal
                logger.warning("%s: %d %s", where, status, message)
                await _send_json(
                    send, status, {"error_code": ERROR_CODES[status], "message": message}, close=status == 413
                )
                return
            if body is None:  # the client went away
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, _CleanErrors(send, where))

    def _too_large(self, size: str) -> tuple[int, str]:
        return 413, (
            f"request body is {size}; the limit is {self.max_body_bytes:,} bytes (serve --max-body-bytes). "
            "Send fewer or smaller images per request."
        )

    async def _discard_rest(self, receive: Receive, declared: int | None, read: int) -> None:
        """Read and drop the rest of a body being refused, so that the client gets its 413.

        A client that sends its whole body before reading the answer (most do, unless they ask for
        ``Expect: 100-continue``) would otherwise have the connection reset under it when the server
        closes it with the body unread, and never see the 413. Bounded: nothing when more than
        ``DRAIN_FACTOR`` x the limit (at least ``DRAIN_MIN_BYTES``) is declared, at most ``DRAIN_SECONDS``
        in all and ``DRAIN_IDLE_SECONDS`` without data; nothing is kept.
        """
        budget = max(DRAIN_FACTOR * self.max_body_bytes, DRAIN_MIN_BYTES)
        if declared is not None and declared > budget:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_SECONDS
        while read <= budget:
            remaining = min(DRAIN_IDLE_SECONDS, deadline - loop.time())
            if remaining <= 0:
                return
            try:
                message = await asyncio.wait_for(receive(), remaining)
            except TimeoutError:
                return
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return
            read += len(message.get("body", b""))

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[tuple[int, str] | None, bytes | None]:
        """``(refusal, None)``, ``(None, body)``, or ``(None, None)`` when the client disconnected."""
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope.get("headers", [])}
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return (400, "bad Content-Length header: not a number of bytes"), None
            if int(declared) > self.max_body_bytes:
                if "100-continue" not in headers.get("expect", "").lower():
                    await self._discard_rest(receive, int(declared), 0)
                return self._too_large(f"{int(declared):,} bytes"), None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                chunks.clear()
                if message.get("more_body", False):
                    await self._discard_rest(receive, None, size)
                return self._too_large("over the limit"), None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if not body.strip():
            return (400, f"empty request body; send JSON such as {EXAMPLE}"), None
        content_type = headers.get("content-type", "").strip()
        if not content_type:
            return (415, "no Content-Type header; send the JSON body with Content-Type: application/json"), None
        if content_type.split(";")[0].strip().lower() == "application/json":
            refusal = await asyncio.to_thread(inspect_json, body, self.max_images)
            if refusal is not None:
                return refusal, None
        return None, body


def _replay(body: bytes, receive: Receive) -> Receive:
    """An ASGI ``receive`` that hands over ``body`` (already read) once, then listens to the client again."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # the body is consumed: what comes next is the disconnect

    return replay


def create_app() -> RequestGuard:
    """The guarded scoring-server app for the pyfunc folder in ``$MASKSUP_SERVE_MODEL_DIR`` (a uvicorn factory)."""
    import mlflow
    from mlflow.pyfunc import scoring_server
    from PIL import Image

    from masksup_med.serving.limits import InputLimits

    model_dir = os.environ.get(MODEL_DIR_ENV, "").strip()
    if not model_dir:
        raise RuntimeError(f"${MODEL_DIR_ENV} is not set: start the server with `masksup-med serve`")
    model = mlflow.pyfunc.load_model(model_dir)
    limits = InputLimits.from_config(model.model_config)
    Image.MAX_IMAGE_PIXELS = limits.max_pixels  # Pillow's own decompression-bomb check, behind ours
    return RequestGuard(scoring_server.init(model), limits.max_body_bytes, limits.max_images)


def server_command(
    model_dir: str | os.PathLike, host: str, port: int, workers: int = 1, timeout: int | None = None
) -> tuple[list[str], dict[str, str]]:
    """The ``uvicorn`` command (in this Python) serving a folder written by ``build_serving_model``, and its
    extra environment."""
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        f"{__name__}:create_app",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--no-server-header",
    ]
    env = {MODEL_DIR_ENV: os.fspath(model_dir)}
    if timeout:
        env[TIMEOUT_ENV] = str(timeout)
    return cmd, env
