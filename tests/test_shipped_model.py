"""A model shipped with a bundle: ``bundle ship``, the checksum checked on every load, and predict / serve /
evaluate / registry / pretrained weights running it with no training and no MLflow store.

Every test works on a COPY of the Kvasir-SEG bundle in ``tmp_path`` (configs resolved, network made the tiny
UNet at 32 x 32), never on the repository's ``bundles/``. The "trained" models are hand-made: all weights zero
but the output bias, so a model answers polyp everywhere (+5) or nowhere (-5), and a mask shows which ran.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _models import TINY_UNET
from monai.bundle import ConfigParser
from PIL import Image
from servers import LOOPBACK, free_port, job_env, masksup_command, masksup_server

from masksup_med.cli import main
from masksup_med.errors import MissingInputError
from masksup_med.run.pretrained import load_pretrained_weights
from masksup_med.run.shipped import ChecksumMismatchError, default_model_source, ship_model, shipped_model
from masksup_med.serving.model import build_serving_model, segment_files
from masksup_med.tracking.model_format import build_network, load_model
from masksup_med.tracking.registry import load_checkpoint

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def constant_model(path: Path, logit: float) -> Path:
    """A checkpoint (``{"model": state}``, as training writes it) of the tiny UNet answering ``logit`` everywhere."""
    state = {k: torch.zeros_like(v) for k, v in build_network(TINY_UNET).state_dict().items()}
    state["model.2.conv.bias"] += logit  # the output convolution's bias
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, path)
    return path


@pytest.fixture
def bundle(tmp_path) -> Path:
    """A copy of the kvasir_seg bundle under ``tmp_path/bundles``, with the tiny UNet at 32 x 32 and no model."""
    folder = tmp_path / "bundles" / "kvasir_seg"
    shutil.copytree(BUNDLES / "kvasir_seg", folder, ignore=shutil.ignore_patterns("model.pt", "large_files.yml"))
    train = folder / "configs" / "train.json"
    config = json.loads(train.read_text(encoding="utf-8"))
    config.update(network_def=TINY_UNET, image_size=[32, 32], bundle_root=str(folder))
    train.write_text(json.dumps(config, indent=4), encoding="utf-8")
    return folder


@pytest.fixture
def shipped(bundle, tmp_path) -> Path:
    """The bundle copy shipping a model that finds polyp everywhere; its path."""
    network = build_network(TINY_UNET)
    path, _ = ship_model(constant_model(tmp_path / "run" / "models" / "model.pt", 5.0), bundle, network)
    return path


def alter_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def images(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / f"frame{i}.png")
    return folder


# ------------------------------------------------------------------------------------------ ship and verify
def test_ship_writes_the_weights_and_lists_their_sha256_in_large_files_yml(shipped, bundle):
    listed = ConfigParser.load_config_file(str(bundle / "large_files.yml"))["large_files"]
    assert listed == [
        {
            "path": "models/model.pt",
            "url": "",
            "hash_val": hashlib.sha256(shipped.read_bytes()).hexdigest(),
            "hash_type": "sha256",
        }
    ]
    state = torch.load(shipped, weights_only=True)
    assert "model.2.conv.bias" in state and "model" not in state  # a plain state dict, nothing else
    assert shipped_model(bundle) == shipped.resolve()
    network = load_checkpoint(build_network(TINY_UNET), shipped)
    assert torch.all(network(torch.rand(1, 3, 32, 32)) == 5.0)
    alter_one_byte(shipped)
    with pytest.raises(ChecksumMismatchError, match="checksum mismatch"):
        load_pretrained_weights(build_network(TINY_UNET), shipped)
    assert not list((bundle / "models").glob(".*.tmp"))  # written whole, no temporary left


def test_bundle_ship_command_checks_the_weights_fit_the_bundles_network(bundle, tmp_path, capsys):
    other = tmp_path / "other.pt"
    torch.save(build_network({**TINY_UNET, "channels": [8, 16]}).state_dict(), other)
    args = ["bundle", "ship", "--bundle", "kvasir_seg", "--bundles-dir", str(bundle.parent)]
    assert main([*args, "--model", str(other)]) == 2
    said = capsys.readouterr().err
    assert f"error: model {other} does not fit the network_def of {bundle / 'configs' / 'train.json'}" in said
    assert "size mismatch for" in said
    assert not (bundle / "models" / "model.pt").exists() and not (bundle / "large_files.yml").exists()

    good = constant_model(tmp_path / "good.pt", 5.0)
    assert main([*args, "--model", str(good)]) == 0
    assert f"as {bundle / 'models' / 'model.pt'} (sha256 " in capsys.readouterr().out
    assert shipped_model(bundle) is not None


def test_an_altered_byte_is_refused_naming_the_file_and_the_checksum_mismatch(shipped):
    alter_one_byte(shipped)
    with pytest.raises(ChecksumMismatchError) as refused:
        load_checkpoint(build_network(TINY_UNET), shipped)
    message = str(refused.value)
    assert message.startswith(f"{shipped}: checksum mismatch: its sha256 is ")
    assert "large_files.yml lists " in message and "was not loaded" in message


def test_a_missing_shipped_file_is_refused_naming_it(shipped):
    shipped.unlink()
    with pytest.raises(MissingInputError, match=f"{shipped} is missing: .*large_files.yml lists it"):
        load_checkpoint(build_network(TINY_UNET), shipped)


def test_the_runs_own_model_comes_first_then_the_shipped_one(shipped, bundle, tmp_path):
    own = tmp_path / "outputs" / "models" / "model.pt"
    assert default_model_source(own, bundle) == str(shipped.resolve())
    constant_model(own, -5.0)
    assert default_model_source(own, bundle) == str(own)
    assert default_model_source(tmp_path / "none.pt", BUNDLES / "glas") == str(tmp_path / "none.pt")  # ships none


def test_pretrained_weights_start_a_training_from_the_shipped_model(shipped):
    network = build_network(TINY_UNET)
    result = load_pretrained_weights(network, shipped)
    assert len(result["loaded"]) == len(network.state_dict()) and not result["reinitialised"]
    assert torch.all(network(torch.rand(1, 3, 32, 32)) == 5.0)


def test_registry_register_puts_the_shipped_model_in_a_store(shipped, bundle, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = bundle / "configs" / "train.json"
    with contextlib.chdir(tmp_path):  # the artifacts go next to the store
        args = ["registry", "--tracking-uri", uri, "register", str(shipped), "--config", str(config), "--name", "kv"]
        assert main(args) == 0
        network = load_model("models:/kv@candidate", tracking_uri=uri)
    assert torch.all(network(torch.rand(1, 3, 32, 32)) == 5.0)
    alter_one_byte(shipped)
    with contextlib.chdir(tmp_path):
        assert main(args) == 2
    assert f"error: {shipped}: checksum mismatch" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ serve
@pytest.mark.parametrize("tta_flips", [False, True])
def test_serving_runs_the_shipped_model_without_a_store(shipped, bundle, tmp_path, tta_flips):
    served = build_serving_model(
        str(shipped), bundle / "configs" / "train.json", tmp_path / "served", device="cpu", tta_flips=tta_flips
    )
    answer = segment_files(served, sorted(images(tmp_path / "in").iterdir()))
    assert list(answer["foreground_fraction"]) == [1.0, 1.0] and list(answer["width"]) == [40, 40]
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_serve_with_the_bundle_serves_its_shipped_model_with_flips_and_no_store(shipped, bundle, tmp_path):
    port = free_port()
    args = ["--bundle", "kvasir_seg", "--bundles-dir", str(bundle.parent), "--tta", "--port", str(port)]
    frame = base64.b64encode(next(images(tmp_path / "in").iterdir()).read_bytes()).decode("ascii")
    work = tmp_path / "work"
    work.mkdir()
    with masksup_server([*args, "--device", "cpu"], work, job_env(), tmp_path / "serve.log", timeout=600):
        connection = http.client.HTTPConnection(LOOPBACK, port, timeout=120)
        body = json.dumps({"dataframe_records": [{"image": frame}]})
        connection.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
    assert response.status == 200, answer
    assert answer["predictions"][0]["foreground_fraction"] == 1.0 and answer["predictions"][0]["width"] == 40
    log = (tmp_path / "serve.log").read_text()
    assert f"running the model bundle kvasir_seg ships: {shipped.resolve()}" in log
    assert "with bundle kvasir_seg (flip TTA)" in log and not list(work.iterdir())  # no store made


def test_serve_refuses_an_altered_shipped_model_before_starting(shipped, bundle, capsys):
    alter_one_byte(shipped)
    with pytest.raises(SystemExit) as refused:
        main(["serve", "--bundle", "kvasir_seg", "--bundles-dir", str(bundle.parent), "--device", "cpu"])
    assert str(refused.value).startswith(f"error: {shipped}: checksum mismatch")


def test_predict_without_a_model_names_the_bundle_that_ships_none(bundle, tmp_path):
    args = ["predict", "--bundle", "kvasir_seg", "--bundles-dir", str(bundle.parent)]
    with pytest.raises(SystemExit, match=r"bundle kvasir_seg ships no model \(.*large_files.yml does not list"):
        main([*args, "--input", str(images(tmp_path / "in")), "--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="pass --model .* or --bundle NAME"):
        main(["predict", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])


# ------------------------------------------------------------------------------------------ predict, evaluate
def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*masksup_command(), *args],
        cwd=cwd,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


@pytest.mark.slow
def test_predict_with_the_bundle_runs_its_shipped_model_with_no_training_and_no_store(shipped, bundle, tmp_path):
    inputs, work = images(tmp_path / "in"), tmp_path / "work"
    work.mkdir()
    for tta, out in (([], tmp_path / "out"), (["--tta"], tmp_path / "out-tta")):
        args = ["predict", "--bundle", "kvasir_seg", "--bundles-dir", str(bundle.parent), *tta]
        result = run_cli([*args, "--input", str(inputs), "--output", str(out), "--", "--num_workers", "0"], work)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"running the model bundle kvasir_seg ships: {shipped.resolve()}" in result.stderr
        assert sorted(p.name for p in out.iterdir()) == ["frame0_mask.png", "frame1_mask.png"]
        assert np.all(np.asarray(Image.open(out / "frame0_mask.png")) == 255)  # the shipped model ran
    assert ("--tta_flips true" in result.stderr) and not list(work.iterdir())  # no store, no outputs/ made

    alter_one_byte(shipped)
    args = ["predict", "--bundle", "kvasir_seg", "--bundles-dir", str(bundle.parent), "--input", str(inputs)]
    result = run_cli([*args, "--output", str(tmp_path / "never")], work)
    assert result.returncode != 0
    assert f"{shipped.resolve()}: checksum mismatch" in result.stderr and not (tmp_path / "never").exists()


@pytest.mark.slow
def test_the_evaluate_config_runs_the_shipped_model_when_the_run_has_none(shipped, bundle, tmp_path):
    from masksup_med.data import make_kvasir_seg_demo

    demo = make_kvasir_seg_demo(tmp_path / "demo", n_images=5, size=(48, 40))
    out = tmp_path / "outputs"
    args = ["evaluate", "--bundles-dir", str(bundle.parent), "kvasir_seg", "--dataset_dir", str(demo)]
    result = run_cli([*args, "--output_dir", str(out), "--num_workers", "0", "--tta_flips", "true"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "eval" / "kvasir-seg" / "test" / "summary.json").read_text())
    assert summary["model_source"] == str(shipped.resolve()) and summary["images"] == 1


def shipped_benchmark():
    """``benchmarks/shipped.py`` as a module."""
    sys.path.insert(0, str(BUNDLES.parent / "benchmarks"))
    return importlib.import_module("shipped")


@pytest.mark.slow  # the benchmark's evaluations at toy size: two on the test split, three on the other data (~1 min)
def test_the_shipped_model_benchmark_scores_the_file_the_bundle_ships_and_writes_its_block(shipped, bundle, tmp_path):
    from masksup_med.data import make_cvc_clinicdb_demo, make_kvasir_seg_demo

    benchmark = shipped_benchmark()
    demo = make_kvasir_seg_demo(tmp_path / "demo", n_images=5, size=(48, 40))
    cvc = make_cvc_clinicdb_demo(tmp_path / "cvc", n_frames=6, size=(48, 36))
    out, md, work = tmp_path / "shipped.json", tmp_path / "RESULTS.md", tmp_path / "work"
    md.write_text("# Results\n")
    argv = ["--bundle-dir", str(bundle), "--dataset-dir", str(demo), "--cross", "cvc-clinicdb", str(cvc)]
    argv += ["--work-dir", str(work), "--images", "1", "--rounds", "1", "--num-workers", "0"]
    argv += ["--output", str(out), "--markdown", str(md)]
    result = benchmark.main(argv)

    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert {arm["model_source"] for arm in result["arms"].values()} == {str(shipped.resolve())}
    # the shipped model answers polyp everywhere: its IoU on an image is the polyp's share of it, never 0 or 1
    assert all(0.0 < arm["test"]["iou"] < 1.0 for arm in result["arms"].values())
    (other,) = result["elsewhere"]
    assert other["dataset"] == "cvc-clinicdb" and other["images"] == 6 and 0.0 < other["iou"] < 1.0
    block = md.read_text().split("<!-- kvasir_seg-shipped:begin -->", 1)[1].split("<!-- kvasir_seg-shipped:end -->")[0]
    assert "Kvasir-SEG test, flips" in block and "CVC-ClinicDB sample, every frame" in block
    assert result["sha256"][:16] in block and "python benchmarks/shipped.py --bundle-dir" in block

    (work / "models").mkdir()
    (work / "models" / "model.pt").write_bytes(b"a run's own model")
    with pytest.raises(SystemExit, match="would run it instead of the shipped model"):
        benchmark.main(argv)


def test_the_shipped_model_benchmark_refuses_a_bundle_that_ships_none(bundle, tmp_path):
    with pytest.raises(SystemExit, match="ships no model"):
        shipped_benchmark().main(["--bundle-dir", str(bundle), "--work-dir", str(tmp_path / "work"), "--markdown=none"])
