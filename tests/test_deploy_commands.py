"""The jobs the Docker image runs, run here outside Docker: ``masksup-med train | evaluate | predict | serve``.

The image's ENTRYPOINT is ``masksup-med``; these tests run the same console script with the same
arguments on demo data. Training runs once per module; ``predict`` and ``serve`` use the model it
registers (``models:/masksup-glas@candidate`` in the run's SQLite tracking store), and ``serve`` answers a
real REST request on 127.0.0.1 with a mask.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
from PIL import Image
from servers import free_port, job_env, masksup_command, masksup_server

from masksup_med.cli import deploy, main
from masksup_med.data import make_glas_demo
from masksup_med.serving.model import decode_image, sniff_suffix

pytestmark = pytest.mark.xdist_group("servers")  # with the MLflow tests: one PostgreSQL server per run
REPO = Path(__file__).resolve().parents[1]
HEALTHCHECK = REPO / "docker" / "healthcheck.py"
LOOPBACK = "127.0.0.1"
MODEL = "models:/masksup-glas@candidate"
SERVE_START_TIMEOUT_S = 180


def run_job(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        check=False,
        args=[*masksup_command(), *args],
        cwd=cwd,
        env=env or job_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def output_of(result: subprocess.CompletedProcess) -> str:
    return result.stdout[-4000:] + "\n--- stderr ---\n" + result.stderr[-6000:]


# ------------------------------------------------------------------------------------------ --help, units
@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "serve"])
def test_help_of_each_job(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: masksup-med {command}") and "example:" in out


def test_help_after_the_bundle_name_is_ours_too(capsys):
    assert main(["train", "glas", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: masksup-med train")


def test_console_script_help_runs():
    result = subprocess.run(
        check=False,
        args=[*masksup_command(), "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=job_env(),
    )
    assert result.returncode == 0 and "/invocations" in result.stdout, output_of(result)


def test_bundles_root_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(deploy.BUNDLES_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # found from the package's own place, not the working folder
    assert deploy.bundles_root() == REPO / "bundles"  # the source checkout's bundles/
    monkeypatch.setenv(deploy.BUNDLES_ENV, str(tmp_path / "env"))
    assert deploy.bundles_root() == tmp_path / "env"
    assert deploy.bundles_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_unknown_bundle_names_the_folder_and_what_is_there(tmp_path, monkeypatch):
    monkeypatch.delenv(deploy.BUNDLES_ENV, raising=False)
    with pytest.raises(SystemExit) as info:
        main(["train", "nosuchbundle", "--max_epochs", "1"])
    message = str(info.value.code)
    assert "nosuchbundle" in message and str(REPO / "bundles") in message and "glas" in message
    with pytest.raises(SystemExit) as info:
        main(["train", "--bundles-dir", str(tmp_path), "glas"])
    assert str(tmp_path) in str(info.value.code) and "bundles there: none" in str(info.value.code)


def test_bundle_command_passes_overrides_verbatim(tmp_path):
    folder = REPO / "bundles" / "glas"
    cmd = deploy.bundle_command(
        tmp_path / "evaluating.json", "evaluating", folder, ["--max_epochs", "2", "--image_size", "[64,64]"]
    )
    assert cmd[:5] == [sys.executable, "-m", "monai.bundle", "run", "evaluating"]
    assert cmd[cmd.index("--config_file") + 1] == str(tmp_path / "evaluating.json")
    assert cmd[cmd.index("--bundle_root") + 1] == str(folder)
    assert cmd[-4:] == ["--max_epochs", "2", "--image_size", "[64,64]"]
    own_root = deploy.bundle_command(tmp_path / "training.json", "training", folder, ["--bundle_root", "/x"])
    assert own_root.count("--bundle_root") == 1


@pytest.fixture
def tagged_store(tmp_path) -> str:
    """A SQLite store with model ``m``: version 1 tagged with bundle cvc_clinicdb (as a path), version 2 untagged."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")
    client.create_model_version("m", str(tmp_path / "weights"), tags={"bundle": "bundles/cvc_clinicdb/"})
    client.create_model_version("m", str(tmp_path / "weights"))
    client.set_registered_model_alias("m", "candidate", "1")
    return uri


@pytest.mark.parametrize(
    ("model", "bundle", "chosen", "said"),
    [
        ("models:/m@candidate", None, "cvc_clinicdb", "was trained with bundle cvc_clinicdb"),
        ("models:/m/2", None, "glas", "names no bundle (no version tag 'bundle'); using the glas bundle"),
        ("models:/m/1", "kvasir_seg", "kvasir_seg", ""),  # chosen by hand
        ("model.pt", None, "glas", "names no bundle (a checkpoint file carries no bundle)"),
    ],
)
def test_predict_and_serve_take_the_bundle_a_registered_model_was_trained_with(
    tagged_store, capsys, model, bundle, chosen, said
):
    args = SimpleNamespace(model=model, bundle=bundle, bundles_dir=None, tracking_uri=tagged_store)
    store = tagged_store if model.startswith("models:/") else None  # as predict and serve look it up
    assert deploy.bundle_for_model(args, store) == chosen
    assert said in capsys.readouterr().err


def _encoded(image: Image.Image, fmt: str) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.mark.parametrize("mode,fmt", [("RGB", "PNG"), ("L", "PNG"), ("RGBA", "PNG"), ("RGB", "JPEG"), ("RGB", "BMP")])
def test_decode_image_gives_three_channels_in_monai_axes(mode, fmt):
    image = Image.new(mode, (30, 20))
    array = decode_image(_encoded(image, fmt))
    assert array.shape == (3, 30, 20)  # C, W, H as MONAI's PILReader


def test_decode_tiff_through_the_project_reader():
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((20, 30, 3), dtype=np.uint8))
    assert decode_image(base64.b64encode(buffer.getvalue())).shape == (3, 30, 20)


def test_decode_rejects_what_is_not_an_image():
    with pytest.raises(ValueError, match="PNG, JPEG, BMP, TIFF, NIfTI or DICOM"):
        sniff_suffix(b"hello world")
    with pytest.raises(ValueError, match="base64"):
        decode_image("not base64 !!")


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> SimpleNamespace:
    """``masksup-med train glas`` once on demo data, run from an unrelated folder; registers a model."""
    root = tmp_path_factory.mktemp("deploy")
    demo = make_glas_demo(root / "demo", n_train=10, n_test_a=2, n_test_b=2, size=(64, 48))
    out = root / "out"
    workdir = root / "work"
    workdir.mkdir()
    result = run_job(
        "train",
        "glas",
        "--dataset_dir",
        str(demo),
        "--output_dir",
        str(out),
        "--max_epochs",
        "1",
        "--val_interval",
        "1",
        "--image_size",
        "[64,64]",
        "--num_workers",
        "0",
        "--batch_size",
        "4",
        cwd=workdir,
    )
    return SimpleNamespace(
        root=root, demo=demo, out=out, workdir=workdir, result=result, tracking_uri=f"sqlite:///{out / 'mlflow.db'}"
    )


@pytest.fixture(scope="module")
def inputs(trained) -> Path:
    """A folder of images of different sizes and formats: BMP 64x48, PNG 80x56, TIFF 50x70."""
    folder = trained.root / "inputs"
    folder.mkdir()
    shutil.copy(trained.demo / "testA_1.bmp", folder / "a.bmp")
    picture = Image.open(trained.demo / "testB_1.bmp").convert("RGB")
    picture.resize((80, 56)).save(folder / "b.png")
    tifffile.imwrite(folder / "c.tif", np.asarray(picture.resize((50, 70))))
    return folder


@pytest.fixture(scope="module")
def predicted(trained, inputs) -> SimpleNamespace:
    if trained.result.returncode != 0:
        pytest.skip("training failed (see test_train_job)")
    output = trained.root / "masks"
    result = run_job(
        "predict",
        "--model",
        MODEL,
        "--input",
        str(inputs),
        "--output",
        str(output),
        "--overlays",
        cwd=trained.workdir,
        env=job_env(MLFLOW_TRACKING_URI=trained.tracking_uri),
    )
    return SimpleNamespace(result=result, output=output)


@pytest.mark.slow
def test_train_job_writes_checkpoint_and_registers_model(trained):
    assert trained.result.returncode == 0, output_of(trained.result)
    assert (trained.out / "models" / "model.pt").is_file()
    assert "monai.bundle run training" in trained.result.stderr  # the command it ran is echoed
    assert not (trained.workdir / "outputs").exists()  # nothing lands in the working folder
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=trained.tracking_uri, registry_uri=trained.tracking_uri)
    assert str(client.get_model_version_by_alias("masksup-glas", "candidate").version) == "1"


@pytest.mark.slow
def test_evaluate_job_writes_the_summary(trained):
    if trained.result.returncode != 0:
        pytest.skip("training failed (see test_train_job)")
    result = run_job(
        "evaluate",
        "glas",
        "--dataset_dir",
        str(trained.demo),
        "--output_dir",
        str(trained.out),
        "--model_source",
        MODEL,
        "--num_workers",
        "0",
        cwd=trained.workdir,
    )
    assert result.returncode == 0, output_of(result)
    assert "--image_size [64, 64]" in result.stderr  # the registered model's training size, from its signature
    summary = json.loads((trained.out / "eval" / "glas" / "test" / "summary.json").read_text())
    assert summary["images"] == 4 and summary["split"] == "test" and summary["model_source"] == MODEL


@pytest.mark.slow
def test_predict_job_writes_masks_at_each_input_size(predicted, inputs):
    assert predicted.result.returncode == 0, output_of(predicted.result)
    assert "--image_size [64, 64]" in predicted.result.stderr  # run at the registered model's training size
    for name, size in (("a", (64, 48)), ("b", (80, 56)), ("c", (50, 70))):
        mask = Image.open(predicted.output / f"{name}_mask.png")
        assert mask.size == size, name
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
        assert (predicted.output / f"{name}_overlay.png").is_file()


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _mask(encoded: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))


@pytest.mark.slow
def test_serve_answers_a_rest_request_with_a_mask(trained, inputs, predicted):
    if trained.result.returncode != 0:
        pytest.skip("training failed (see test_train_job)")
    log = trained.root / "serve.log"
    args = ["--model", MODEL, "--port", str(free_port())]  # no --bundle, no --host: the tag's bundle, on 127.0.0.1
    with masksup_server(
        args, trained.workdir, job_env(MLFLOW_TRACKING_URI=trained.tracking_uri), log, SERVE_START_TIMEOUT_S
    ) as (base, proc):
        # the image's HEALTHCHECK script agrees
        health = subprocess.run(
            check=False, args=[sys.executable, str(HEALTHCHECK), "--url", f"{base}/ping"], timeout=60
        )
        assert health.returncode == 0

        png = base64.b64encode((inputs / "b.png").read_bytes()).decode("ascii")
        status, answer = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["image"], "data": [[png]]}})
        assert status == 200, answer
        (row,) = answer["predictions"]
        mask = _mask(row["mask"])
        assert mask.shape == (56, 80) and (row["width"], row["height"]) == (80, 56)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        assert row["foreground_fraction"] == pytest.approx((mask > 0).mean())
        # same preprocessing as the bundle: the served mask is the one `masksup-med predict` wrote
        if predicted.result.returncode == 0:
            written = np.asarray(Image.open(predicted.output / "b_mask.png"))
            assert (written == mask).mean() > 0.999

        # several images of other sizes and formats in one request, "inputs" layout
        tif = base64.b64encode((inputs / "c.tif").read_bytes()).decode("ascii")
        bmp = base64.b64encode((inputs / "a.bmp").read_bytes()).decode("ascii")
        status, answer = _post(f"{base}/invocations", {"inputs": {"image": [tif, bmp]}})
        assert status == 200, answer
        assert [_mask(r["mask"]).shape for r in answer["predictions"]] == [(70, 50), (48, 64)]

        # a grey image is the RGB image with three equal channels: the same mask
        grey = Image.open(inputs / "b.png").convert("L")
        status, answer = _post(
            f"{base}/invocations", {"inputs": {"image": [_encoded(grey, "PNG"), _encoded(grey.convert("RGB"), "PNG")]}}
        )
        assert status == 200, answer
        as_grey, as_rgb = (_mask(r["mask"]) for r in answer["predictions"])
        assert (as_grey == as_rgb).all()

        # something that is not an image: a 400 naming the problem, and the server stays up
        status, answer = _post(f"{base}/invocations", {"dataframe_records": [{"image": "aGVsbG8="}]})
        assert status == 400 and "PNG, JPEG, BMP, TIFF, NIfTI or DICOM" in answer["message"]
        assert "Traceback" not in json.dumps(answer)
        assert proc.poll() is None
    served = log.read_text()
    assert "models:/masksup-glas@candidate was trained with bundle glas (its version tag 'bundle')" in served
    assert f"Uvicorn running on http://{LOOPBACK}:" in served  # loopback by default
    assert not (trained.workdir / "mlflow.db").exists()  # the store it was given, no fresh one


# ------------------------------------------------------------------------- the compose tracking server
@pytest.mark.slow
def test_compose_tracking_server_command_with_basic_auth(postgres_uri, tmp_path):
    """The mlflow service of docker/compose.yaml, its command and auth settings as written, on PostgreSQL.

    Only what exists inside compose alone is replaced: the database address, the artifact folder, the
    listening address and port. Clients use the credentials the trainer and serving services get.
    """
    import psycopg2
    import yaml
    from servers import _kill_group, _wait_for_health

    docker = REPO / "docker"
    service = yaml.safe_load((docker / "compose.yaml").read_text())["services"]["mlflow"]
    args = list(service["command"])
    port = free_port()
    base = f"http://{LOOPBACK}:{port}"

    # a database of its own on the test PostgreSQL server
    database = "masksup_compose"
    connection = psycopg2.connect(postgres_uri.replace("postgresql+psycopg2", "postgresql"))
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {database}")
        cursor.execute(f"CREATE DATABASE {database}")
    connection.close()

    def replace(flag: str, value: str) -> None:
        args[args.index(flag) + 1] = value

    replace("--backend-store-uri", postgres_uri.rsplit("/", 1)[0] + f"/{database}")
    replace("--artifacts-destination", str(tmp_path / "artifacts"))
    replace("--host", LOOPBACK)
    replace("--port", str(port))
    replace("--workers", "1")
    replace("--allowed-hosts", args[args.index("--allowed-hosts") + 1] + f",{LOOPBACK}:{port}")
    auth_ini = tmp_path / "mlflow-auth.ini"
    auth_ini.write_text(
        (docker / "mlflow-auth.ini")
        .read_text()
        .replace("sqlite:////mlflow-auth/basic_auth.db", f"sqlite:///{tmp_path / 'basic_auth.db'}")
    )
    example = dict(re.findall(r"^([A-Z_][A-Z0-9_]*)=(.*)$", (docker / ".env.example").read_text(), flags=re.MULTILINE))
    resolved = {
        k: re.sub(r"\$\{([A-Z0-9_]+)[^}]*\}", lambda m: example[m.group(1)], str(v))
        for k, v in service["environment"].items()
    }  # as compose would, with the example .env
    env = job_env(**{**resolved, "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini), "PYTHONUNBUFFERED": "1"})
    user, password = example["MLFLOW_TRACKING_USERNAME"], example["MLFLOW_TRACKING_PASSWORD"]
    log = tmp_path / "mlflow.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", *service["entrypoint"], *args],
            cwd=tmp_path,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        _wait_for_health(proc, base, log, 120)  # /health needs no credentials (the compose health check)
        search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(search, timeout=30)
        assert denied.value.code == 401
        request = urllib.request.Request(
            search, headers={"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200

        # the trainer / serving containers' client settings
        client_env = job_env(MLFLOW_TRACKING_URI=base, MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
        listed = run_job("registry", "list", cwd=tmp_path, env=client_env, timeout=120)
        assert listed.returncode == 0 and "no registered models" in listed.stdout, output_of(listed)
        wrong = run_job(
            "registry", "list", cwd=tmp_path, timeout=120, env={**client_env, "MLFLOW_TRACKING_PASSWORD": "wrong"}
        )
        assert wrong.returncode != 0
    finally:
        _kill_group(proc)
