"""``masksup-med predict`` and the inference config: input limits, output names, symbolic links, the summary.

The units run :class:`~masksup_med.inference.PredictionFiles` in this process. The end-to-end runs use a tiny
untrained network in the registered-model format (no training): a folder with a good image, a pixel bomb
(a 140 KB grey PNG of 12000 x 12000 pixels, 144 MB decoded), a truncated file and an image whose mask name is taken by a
symbolic link to a file outside the output folder.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from _models import TINY_MODEL, png_bomb, register_tiny
from PIL import Image
from servers import job_env, masksup_command

import masksup_med.inference as inference
from masksup_med.data.errors import DatasetError
from masksup_med.data.limits import InputLimits, check_headers
from masksup_med.inference import OutputRefusedError, PredictionFiles, place_output, write_output

BOMB_SAYS = "bomb.png: the image is 12000 x 12000 = 144,000,000 pixels; the limit is 25,000,000 pixels (--max-pixels)"
PRECIOUS = b"a file outside the output folder"


def picture(path: Path, size=(40, 30), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def folders(tmp_path) -> SimpleNamespace:
    """``in/``: good.png, bomb.png, broken.png, linked.png; ``out/linked_mask.png`` links to ``outside.bin``."""
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    output.mkdir()
    picture(inputs / "good.png")
    (inputs / "bomb.png").write_bytes(png_bomb(12000, 12000, depth=8))
    (inputs / "broken.png").write_bytes(picture(tmp_path / "whole.png").read_bytes()[:60])
    picture(inputs / "linked.png", seed=1)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(PRECIOUS)
    (output / "linked_mask.png").symlink_to(outside)
    return SimpleNamespace(root=tmp_path, inputs=inputs, output=output, outside=outside)


def assert_link_untouched(folders: SimpleNamespace) -> None:
    link = folders.output / "linked_mask.png"
    assert link.is_symlink() and os.readlink(link) == str(folders.outside)
    assert folders.outside.read_bytes() == PRECIOUS


# ------------------------------------------------------------------------------------------ units
def test_a_pixel_bomb_is_skipped_from_its_header_and_never_decoded(folders, monkeypatch):
    decoded = []
    read_array = inference.read_array
    monkeypatch.setattr(inference, "read_array", lambda path: decoded.append(Path(path).name) or read_array(path))
    files = PredictionFiles(folders.inputs, folders.output)
    assert [Path(i["image"]).name for i in files.items] == ["good.png"]
    assert f"bomb.png: {files.skipped['bomb.png']}" == BOMB_SAYS
    assert "bomb.png" not in decoded and "good.png" in decoded
    assert files.skipped["broken.png"].startswith("cannot be read")


def test_the_limits_are_the_inference_configs_and_can_be_changed(tmp_path):
    picture(tmp_path / "a.png", size=(40, 30))
    files = PredictionFiles(tmp_path, max_pixels=1000)
    with pytest.raises(DatasetError, match="no usable image") as refused:
        files.items
    assert "a.png: the image is 40 x 30 = 1,200 pixels; the limit is 1,000 pixels" in str(refused.value)
    assert PredictionFiles(tmp_path, max_image_bytes=3600).items  # 40 x 30 x 3 bytes: at the limit
    with pytest.raises(DatasetError, match="3,600 bytes decoded"):
        PredictionFiles(tmp_path, max_image_bytes=3599).items


@pytest.mark.parametrize("names", [("same.png", "same.jpg"), ("Case.png", "case.bmp")])
def test_two_inputs_whose_masks_would_have_one_name_refuse_the_run_naming_both(tmp_path, names):
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for name in (*names, "other.png"):
        picture(inputs / name)
    with pytest.raises(DatasetError) as refused:
        PredictionFiles(inputs, output).items
    message = str(refused.value)
    first, second = sorted(names)
    assert f"{first} and {second} would both be written as" in message and "nothing was written" in message
    with pytest.raises(DatasetError):  # whichever the config builds first, the writer's folder or the dataset
        PredictionFiles(inputs, output).staging_dir
    assert not output.exists()


def test_a_symlink_in_the_output_folder_is_never_followed_or_replaced(folders):
    files = PredictionFiles(folders.inputs, folders.output, overlays=True)
    assert "linked.png" not in {Path(i["image"]).name for i in files.items}
    assert files.skipped["linked.png"].startswith(f"its output {folders.output / 'linked_mask.png'} is a symbolic link")
    staged = folders.root / "staged.png"
    picture(staged)
    with pytest.raises(OutputRefusedError, match="linked_mask.png is a symbolic link"):
        place_output(staged, folders.output / "linked_mask.png")
    with pytest.raises(OutputRefusedError):
        write_output(folders.output / "linked_mask.png", lambda part: part.write_bytes(b"overwritten"))
    (folders.output / "good_overlay.png").symlink_to(folders.root / "nowhere")  # a dangling link counts too
    with pytest.raises(DatasetError, match="every file was skipped") as refused:
        PredictionFiles(folders.inputs, folders.output, overlays=True).items
    assert f"good.png: its output {folders.output / 'good_overlay.png'} is a symbolic link" in str(refused.value)
    assert_link_untouched(folders)
    assert not list(folders.output.glob(".*"))  # no temporary file left behind


def test_write_output_replaces_a_regular_file_whole(tmp_path):
    target = tmp_path / "a_mask.png"
    target.write_bytes(b"old")
    write_output(target, lambda part: part.write_bytes(b"new"))
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["a_mask.png"]


def test_finish_fails_when_an_input_was_skipped_unless_asked_to_skip_them(folders, caplog):
    files = PredictionFiles(folders.inputs, folders.output)
    files.items
    with pytest.raises(DatasetError) as refused:
        files.finish()
    message = str(refused.value)
    assert message.startswith(f"prediction: 0 mask(s) written to {folders.output}; 3 of 4 input(s) skipped:")
    assert BOMB_SAYS in message and "broken.png: cannot be read" in message and "linked.png: its output" in message
    assert "--skip-bad-inputs" in message
    accepting = PredictionFiles(folders.inputs, folders.output, skip_bad_inputs=True)
    accepting.items
    with caplog.at_level(logging.INFO):
        assert accepting.finish() == 0
    assert "3 of 4 input(s) skipped" in caplog.records[-1].getMessage()


# ------------------------------------------------------------------------------------------ predict, end to end
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return register_tiny(tmp_path_factory.mktemp("predict-store"))


def predict(store: str, folders: SimpleNamespace, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            *masksup_command(),
            "predict",
            "--model",
            TINY_MODEL,
            "--input",
            str(folders.inputs),
            "--output",
            str(folders.output),
            *options,
            "--",
            "--device",
            "cpu",
            "--num_workers",
            "0",
        ],
        cwd=folders.root,
        env=job_env(MLFLOW_TRACKING_URI=store),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def outputs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.slow
def test_predict_skips_what_it_cannot_use_names_each_last_and_exits_non_zero(store, folders):
    result = predict(store, folders)
    assert result.returncode != 0, result.stdout[-3000:] + result.stderr[-3000:]
    tail = result.stderr[result.stderr.rindex("error: prediction:") :]
    assert tail.startswith(f"error: prediction: 1 mask(s) written to {folders.output}; 3 of 4 input(s) skipped:")
    assert BOMB_SAYS in tail and "broken.png: cannot be read" in tail
    assert f"linked.png: its output {folders.output / 'linked_mask.png'} is a symbolic link" in tail
    assert outputs(folders.output) == ["good_mask.png", "linked_mask.png"]  # no bomb mask, no staging folder
    assert Image.open(folders.output / "good_mask.png").size == (40, 30)
    assert_link_untouched(folders)


@pytest.mark.slow
def test_predict_with_skip_bad_inputs_exits_0_and_still_lists_them(store, folders):
    result = predict(store, folders, "--skip-bad-inputs", "--overlays")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout[result.stdout.rindex("prediction: 1 mask(s) written") :]
    assert "3 of 4 input(s) skipped" in summary and BOMB_SAYS in summary
    assert outputs(folders.output) == ["good_mask.png", "good_overlay.png", "linked_mask.png"]
    assert_link_untouched(folders)


@pytest.mark.slow
def test_predict_refuses_two_inputs_with_one_stem_before_writing(store, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    picture(inputs / "same.png")
    picture(inputs / "same.jpg", seed=1)
    folders = SimpleNamespace(root=tmp_path, inputs=inputs, output=tmp_path / "out")
    result = predict(store, folders)
    assert result.returncode != 0
    assert "same.jpg and same.png would both be written as same_mask.png" in result.stderr, result.stderr[-3000:]
    assert not folders.output.exists()


# ------------------------------------------------------------------------------------------ evaluation
def test_evaluation_checks_every_header_of_its_split_first(tmp_path):
    items = [
        {"image": str(picture(tmp_path / "a.png")), "label": str(picture(tmp_path / "a_anno.png"))},
        {"image": str(picture(tmp_path / "b.png")), "label": str(tmp_path / "b_anno.png")},
    ]
    (tmp_path / "b_anno.png").write_bytes(png_bomb(12000, 12000, depth=8))
    assert check_headers(items[:1], InputLimits()) == 2
    with pytest.raises(DatasetError) as refused:
        check_headers(items, InputLimits(), what="the test split")
    message = str(refused.value)
    assert message.startswith("1 file(s) of the test split over the input limits or unreadable")
    assert f"{tmp_path / 'b_anno.png'}: the image is 12000 x 12000 = 144,000,000 pixels" in message


@pytest.mark.slow
def test_the_evaluate_config_refuses_a_split_holding_a_pixel_bomb_before_loading_anything(tmp_path):
    from masksup_med.data import make_glas_demo

    demo = make_glas_demo(tmp_path / "demo", n_train=2, n_test_a=1, n_test_b=1, size=(64, 48))
    (demo / "testB_1_anno.bmp").write_bytes(png_bomb(12000, 12000, depth=8))
    result = subprocess.run(
        [
            *masksup_command(),
            "evaluate",
            "glas",
            "--dataset_dir",
            str(demo),
            "--output_dir",
            str(tmp_path / "out"),
            "--model_source",
            str(tmp_path / "never-loaded.pt"),
            "--num_workers",
            "0",
        ],
        cwd=tmp_path,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode != 0
    assert "1 file(s) of the test split over the input limits" in result.stderr, result.stderr[-3000:]
    assert f"{demo / 'testB_1_anno.bmp'}: the image is 12000 x 12000" in result.stderr
    assert "never-loaded.pt" not in result.stderr.split("error: ")[-1]  # refused before the model was looked for
