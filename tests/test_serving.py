"""``masksup-med serve``'s limits and error answers, on a real server on 127.0.0.1.

The server serves a tiny registered model (registered here, no training) with the GLaS bundle's
preprocessing and small limits; every refused request must get a 4xx with a JSON message and no
stack trace or file path, and the server must keep answering afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import re
import subprocess
import time
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
from _models import TINY_MODEL, png_bomb, register_tiny
from PIL import Image
from servers import LOOPBACK, free_port, job_env, masksup_command, masksup_server

from masksup_med.cli import main
from masksup_med.data.limits import ImageRejected
from masksup_med.serving.app import clean_error, inspect_json
from masksup_med.serving.limits import InputLimits, RequestRejected, image_header

MODEL = TINY_MODEL
BODY_LIMIT = 1_000_000
PIXEL_LIMIT = 4_000_000
IMAGE_LIMIT = 3
PATHS = re.compile(r"/tmp/|/home/|/work/|/usr/|site-packages|\.py\b")
DATA = re.compile(rb"[A-Za-z0-9+/=]{16,}")  # base64 payloads, random bytes: what an error body must never quote


# ------------------------------------------------------------------------------------------ images
def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def records(*files: bytes) -> bytes:
    """The request body for image files: ``{"dataframe_records": [{"image": base64}, …]}``."""
    return json.dumps({"dataframe_records": [{"image": base64.b64encode(f).decode("ascii")} for f in files]}).encode()


def picture(size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------ server
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A SQLite store with ``tiny`` version 1 (alias candidate, bundle glas, trained at 32 x 32)."""
    return register_tiny(tmp_path_factory.mktemp("serving-store"))


@pytest.fixture(scope="module")
def server(store, tmp_path_factory) -> SimpleNamespace:
    workdir = tmp_path_factory.mktemp("serve-work")
    port = free_port()
    args = [
        "--model",
        MODEL,
        "--port",
        str(port),
        "--device",
        "cpu",
        "--max-body-bytes",
        str(BODY_LIMIT),
        "--max-pixels",
        str(PIXEL_LIMIT),
        "--max-images",
        str(IMAGE_LIMIT),
    ]
    log = workdir / "serve.log"
    with masksup_server(args, workdir, job_env(MLFLOW_TRACKING_URI=store), log) as (base, proc):
        yield SimpleNamespace(base=base, port=port, proc=proc, log=log, workdir=workdir)


def post(
    server: SimpleNamespace, body: bytes, content_type: str | None = "application/json", path: str = "/invocations"
) -> tuple[int, bytes, float]:
    """POST ``body``; ``(status, response body, seconds)``."""
    connection = http.client.HTTPConnection(LOOPBACK, server.port, timeout=120)
    started = time.monotonic()
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": content_type} if content_type else {})
        response = connection.getresponse()
        return response.status, response.read(), time.monotonic() - started
    finally:
        connection.close()


def declared_only(server: SimpleNamespace, length: int) -> tuple[int, bytes]:
    """Send headers declaring a ``length``-byte body, none of it: the answer must come anyway."""
    connection = http.client.HTTPConnection(LOOPBACK, server.port, timeout=30)
    try:
        connection.putrequest("POST", "/invocations")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(length))
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def chunked_over_the_limit(server: SimpleNamespace) -> tuple[int, bytes]:
    """Stream a chunked body (no Content-Length) just over the limit, then wait for the answer."""
    connection = http.client.HTTPConnection(LOOPBACK, server.port, timeout=30)
    chunk = b" " * 65536
    try:
        connection.putrequest("POST", "/invocations")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Transfer-Encoding", "chunked")
        connection.endheaders()
        for _ in range(BODY_LIMIT // len(chunk) + 1):
            connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def assert_clean_refusal(status: int, body: bytes, expected: int, says: str, request: bytes = b"") -> None:
    """A JSON ``{"error_code", "message"}`` with ``status``, saying ``says``: no stack trace, no path, and
    nothing of the ``request`` (no run of 16 base64 characters of it)."""
    assert status == expected, body[:2000]
    payload = json.loads(body)
    assert set(payload) == {"error_code", "message"}, payload
    assert says in payload["message"], payload
    assert "Traceback" not in payload["message"] and not PATHS.search(body.decode()), payload
    echoed = [run[:16] for run in DATA.findall(request) if run[:16] in body]
    assert not echoed, f"the error body quotes the request: {echoed[:3]} in {payload}"


def grey16() -> bytes:
    return encoded(Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.uint16)))


REFUSALS = {
    # name: (body, content type, status, the message says)
    "not an image": (
        records(b"hello world"),
        "application/json",
        400,
        "not a PNG, JPEG, BMP, TIFF, NIfTI or DICOM file",
    ),
    "not base64": (b'{"dataframe_records": [{"image": "not base64 !!"}]}', "application/json", 400, "base64"),
    "declares 30000 x 30000": (records(png_bomb(30000, 30000)), "application/json", 413, "30000 x 30000"),
    "over the pixel limit": (
        records(encoded(Image.new("L", (2500, 2000)))),
        "application/json",
        413,
        "2500 x 2000 = 5,000,000 pixels; the limit is 4,000,000",
    ),
    "second image bad": (records(encoded(picture()), b"GIF89a"), "application/json", 400, "image 2 of 2: not a PNG"),
    "16-bit grey": (records(grey16()), "application/json", 400, "16-bit grey"),
    "palette": (records(encoded(picture().convert("P"))), "application/json", 400, "palette-indexed"),
    "truncated PNG": (records(encoded(picture())[:60]), "application/json", 400, "does not decode"),
    "empty body": (b"", "application/json", 400, "empty request body"),
    "empty body, no content type": (b"", None, 400, "empty request body"),
    "no content type": (records(encoded(picture())), None, 415, "no Content-Type"),
    "not JSON": (b"{not json", "application/json", 400, "valid JSON"),
    "random bytes": (b"\x89PNGrandom" + os.urandom(200_000), "application/json", 400, "not valid JSON"),
    "a JSON list": (b'[{"image": "aGVsbG8gd29ybGQgaGVsbG8="}]', "application/json", 400, "exactly one of the keys"),
    "no layout key": (b'{"rows": [{"image": "aGVsbG8gd29ybGQgaGVsbG8="}]}', "application/json", 400, "one of"),
    "too many images": (
        records(*[encoded(picture())] * (IMAGE_LIMIT + 1)),
        "application/json",
        413,
        f"the request holds {IMAGE_LIMIT + 1} images; the limit is {IMAGE_LIMIT} per request (serve --max-images)",
    ),
    "too many images, CSV": (b"image\n" + b"aGVsbG8=\n" * 4, "text/csv", 413, "the request holds 4 images"),
    "too many images, columns": (
        json.dumps({"inputs": {"image": ["aGVsbG8="] * 50}}).encode(),
        "application/json",
        413,
        "the request holds 50 images",
    ),
    "no image column": (b'{"dataframe_records": [{"img": "x"}]}', "application/json", 400, "image"),
    "plain text": (b"hello", "text/plain", 415, "content types"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REFUSALS))
def test_refused_requests_get_a_4xx_with_a_message_and_no_stack_trace(server, name):
    body, content_type, status, says = REFUSALS[name]
    got, answer, seconds = post(server, body, content_type)
    assert_clean_refusal(got, answer, status, says, request=body)
    assert seconds < 10, f"{name} took {seconds:.1f}s"  # refused from the header, nothing decoded
    assert server.proc.poll() is None


@pytest.mark.slow
def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    status, answer = declared_only(server, 200 * 1024 * 1024)  # a 200 MB body announced, none sent
    assert_clean_refusal(
        status, answer, 413, "209,715,200 bytes; the limit is 1,000,000 bytes (serve --max-body-bytes)"
    )
    status, answer = chunked_over_the_limit(server)  # no Content-Length: counted while read
    assert_clean_refusal(status, answer, 413, "the limit is 1,000,000 bytes")
    # a real 16 MB body, sent whole before the answer is read (as most clients do): the server reads and drops
    # it, else closing the connection would reset it under the client and the client would never see the 413
    body = records(os.urandom(12 * BODY_LIMIT))
    status, answer, _ = post(server, body)
    assert_clean_refusal(status, answer, 413, "the limit is 1,000,000 bytes (serve --max-body-bytes)", request=body)
    assert server.proc.poll() is None


@pytest.mark.slow
def test_server_still_answers_after_the_refusals(server):
    declared_only(server, 200 * 1024 * 1024)  # one refusal of its own, whatever ran before
    with contextlib.closing(http.client.HTTPConnection(LOOPBACK, server.port, timeout=30)) as connection:
        connection.request("GET", "/ping")
        assert connection.getresponse().status == 200
    status, answer, _ = post(server, records(encoded(picture()), encoded(picture().convert("L"))))
    assert status == 200, answer
    rows = json.loads(answer)["predictions"]
    assert [(r["width"], r["height"]) for r in rows] == [(40, 30), (40, 30)]
    log = server.log.read_text()
    assert "models:/tiny@candidate was trained with bundle glas (its version tag 'bundle')" in log
    assert f"Uvicorn running on http://{LOOPBACK}:{server.port}" in log  # loopback unless --host says otherwise
    assert "POST /invocations: 413" in log  # refusals are logged for the operator
    assert not list(server.workdir.glob("*.db"))


@pytest.mark.parametrize("command", ["serve", "predict"])
def test_without_a_store_serve_and_predict_say_so_and_create_none(command, tmp_path):
    extra = (
        ["--port", str(free_port())]
        if command == "serve"
        else ["--input", str(tmp_path), "--output", str(tmp_path / "masks")]
    )
    result = subprocess.run(
        [*masksup_command(), command, "--model", "models:/masksup-glas@champion", *extra],
        cwd=tmp_path,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode != 0
    assert "no MLflow store at" in result.stderr and "--tracking-uri" in result.stderr, result.stderr[-3000:]
    assert not list(tmp_path.rglob("*.db"))  # MLflow was not left to create an empty store


def test_serve_refuses_a_limit_that_is_not_positive():
    with pytest.raises(SystemExit, match="max_pixels must be a positive integer, got 0"):
        main(["serve", "--model", MODEL, "--max-pixels", "0"])


# ------------------------------------------------------------------------------------------ units
@pytest.mark.parametrize(
    "mode,fmt,per_pixel",
    [("L", "PNG", 1), ("RGB", "PNG", 3), ("RGBA", "PNG", 4), ("LA", "PNG", 2), ("RGB", "JPEG", 3), ("RGB", "BMP", 3)],
)
def test_image_header_reads_size_and_decoded_bytes(mode, fmt, per_pixel):
    header = image_header(encoded(Image.new(mode, (40, 30)), fmt))
    assert (header.width, header.height, header.decoded_bytes, header.eight_bit) == (40, 30, 1200 * per_pixel, True)


def test_image_header_of_tiffs():
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((30, 40, 3), dtype=np.uint8))
    assert image_header(buffer.getvalue()).check(InputLimits()).decoded_bytes == 3600
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((30, 40), dtype=np.float32))
    with pytest.raises(ImageRejected, match="1-channel float32"):
        image_header(buffer.getvalue()).check(InputLimits())


def test_header_checks_refuse_before_decoding():
    bomb = image_header(png_bomb(30000, 30000))  # parsed from the header: nothing decoded
    assert (bomb.width, bomb.height) == (30000, 30000)
    with pytest.raises(ImageRejected) as refused:
        bomb.check(InputLimits())
    assert refused.value.status == 413 and "900,000,000 pixels; the limit is 25,000,000" in str(refused.value)
    assert RequestRejected.from_image(refused.value).status == 413
    with pytest.raises(ImageRejected, match="4,800 bytes decoded") as refused:
        image_header(encoded(Image.new("RGBA", (40, 30)))).check(InputLimits(max_image_bytes=4000))
    assert refused.value.status == 413
    with pytest.raises(ImageRejected, match="empty"):
        image_header(b"")


def test_clean_error_keeps_our_message_and_gives_a_fixed_one_for_mlflows():
    mlflow_style = json.dumps(
        {
            "error_code": "INVALID_PARAMETER_VALUE",
            "message": "Failed to predict data '   image\n0  iVBORw0KGgoAAAANSUhEUgAA'. \nError: cannot open /srv/y",
            "stack_trace": 'Traceback (most recent call last):\n  File "/usr/lib/python3.11/site-packages/a.py"',
        }
    ).encode()
    status, payload = clean_error(400, mlflow_style)
    assert status == 400 and payload["error_code"] == "BAD_REQUEST"
    assert payload["message"].startswith("the request was refused: send a JSON body such as")
    assert "iVBORw0KGgoAAAANSUhEUgAA" not in payload["message"] and "/srv" not in payload["message"]
    ours = RequestRejected("the image is too big", 413).serialize_as_json().encode()
    assert clean_error(400, ours) == (413, {"error_code": "REQUEST_TOO_LARGE", "message": "the image is too big"})
    assert clean_error(500, b'{"message": "boom at /a/b.py"}')[1]["message"].startswith("internal server error")
    message = clean_error(415, b"This predictor only supports ... Got 'text/secret-token-0123456789abcdef'.")[1]
    assert "content types application/json" in message["message"] and "secret" not in message["message"]
    assert "serve --timeout" in clean_error(504, b"Request processing time exceeded limit")[1]["message"]


@pytest.mark.parametrize(
    "body,status,says",
    [
        (b"\x89PNG\r\n" + bytes(range(256)) * 40, 400, "not valid JSON: not UTF-8 (at byte 0)"),
        (b'{"dataframe_records": [', 400, "not valid JSON (Expecting value at line 1, column 24)"),
        (b'"just a string"', 400, "got a JSON str"),
        (b'{"inputs": {}, "instances": []}', 400, "got an object with 2 of these keys"),
        (json.dumps({"dataframe_records": [{"image": "x"}] * 4}).encode(), 413, "holds 4 images; the limit is 3"),
        (json.dumps({"dataframe_split": {"columns": ["image"], "data": [["x"]] * 4}}).encode(), 413, "holds 4"),
        (json.dumps({"instances": [{"image": "x"}] * 4}).encode(), 413, "holds 4"),
        (json.dumps({"inputs": {"image": ["x"] * 4}}).encode(), 413, "holds 4"),
        (json.dumps({"inputs": {"image": ["x"] * 3}}).encode(), None, ""),
        (json.dumps({"dataframe_records": [{"image": "x"}], "params": {}}).encode(), None, ""),
    ],
)
def test_the_guard_reads_json_once_and_counts_the_images(body, status, says):
    refusal = inspect_json(body, max_images=3)
    if status is None:
        assert refusal is None
    else:
        assert refusal[0] == status and says in refusal[1], refusal
        assert not DATA.search(refusal[1].encode().replace(b"application/json", b"")), refusal  # quotes nothing


def test_serving_limits_travel_in_a_model_config():
    limits = InputLimits(max_body_bytes=10, max_pixels=20, max_image_bytes=30, max_images=2)
    assert InputLimits.from_config({**limits.as_config(), "threshold": 0.5}) == limits
    assert InputLimits.from_config(None) == InputLimits()
    with pytest.raises(ValueError, match="max_body_bytes"):
        InputLimits(max_body_bytes=-1)
    with pytest.raises(ValueError, match="max_images"):
        InputLimits(max_images=0)


def test_a_file_that_does_not_decode_is_refused_without_the_temporary_path():
    from masksup_med.serving.model import decode_image

    truncated = encoded(picture())[:60]  # a valid header, then nothing
    with pytest.raises(RequestRejected, match="does not decode") as refused:
        decode_image(base64.b64encode(truncated))
    assert not PATHS.search(str(refused.value)) and "masksup-serve-" not in str(refused.value), str(refused.value)
