"""Bundle configs: each bundle's train.json is the shared pipeline written out, current, readable,
and readable by plain MONAI from any working directory."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from masksup_med.bundles import (
    DEFAULTS,
    MARKER,
    bundle_dirs,
    bundle_values,
    compose_train_config,
    defaults_config,
    shared_config,
    sync_bundle,
    sync_bundles,
)

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
COMMON = BUNDLES / "common" / "configs"
NAMES = tuple(p.name for p in bundle_dirs(BUNDLES))
POLYP = ("cvc_clinicdb", "kvasir_seg")
LINKED = (
    "evaluate.json",
    "inference.json",
    "multi_gpu_train.json",
    "supervised.json",
    "semi_train.json",
    "semi_mim.json",
    "pretrain.json",
    "finetune.json",
    "logging.conf",
)


def _expressions(value):
    if isinstance(value, str) and value.startswith("$"):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _expressions(v)
    elif isinstance(value, list):
        for v in value:
            yield from _expressions(v)


def test_every_bundle_train_config_is_current_with_the_shared_pipeline():
    assert sync_bundles(BUNDLES, check=True) == [], "run `python -m masksup_med.bundles`"


def test_sync_restores_shared_ids_and_keeps_the_bundle_own_values(tmp_path):
    bundle = tmp_path / "glas"
    shutil.copytree(BUNDLES / "glas", bundle, symlinks=False)
    train = bundle / "configs" / "train.json"
    config = json.loads(train.read_text())
    config["image_size"] = [96, 96]  # the bundle's own value: kept
    config["train"]["trainer"]["max_epochs"] = 3  # a shared id edited in place: restored
    config = {
        "seg_loss": {"_target_": "DiceLoss", "sigmoid": True},  # a bundle may set a shared id itself
        **{k: v for k, v in config.items() if k != "seg_loss"},
    }
    train.write_text(json.dumps(config))
    assert sync_bundle(bundle, COMMON, check=True)
    assert sync_bundle(bundle, COMMON)
    written = json.loads(train.read_text())
    assert written["image_size"] == [96, 96]
    assert written["train"]["trainer"]["max_epochs"] == "@max_epochs"
    assert written["seg_loss"]["_target_"] == "DiceLoss"
    assert list(written).index("seg_loss") < list(written).index(MARKER)  # set once, among the bundle's values
    assert not sync_bundle(bundle, COMMON, check=True)


@pytest.mark.parametrize("bundle", NAMES)
def test_shared_configs_are_links_to_the_common_ones(bundle):
    for name in LINKED:
        path = BUNDLES / bundle / "configs" / name
        assert path.is_symlink() and path.resolve() == (COMMON / name).resolve(), name


@pytest.mark.parametrize("bundle", NAMES)
def test_configs_are_plain_monai_configs_with_one_line_expressions(bundle):
    for path in (BUNDLES / bundle / "configs").glob("*.json"):
        text = path.read_text()
        assert '"%' not in text, f"{path}: a % macro reads a file relative to the working directory"
        for expression in _expressions(json.loads(text)):
            assert len(expression) <= 120, f"{path}: {expression}"
    train = json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())
    counted = [e for e in _expressions(train) if "(" in e and len(e) > 50]
    assert len(counted) == len(set(counted)), "an expression that builds something is written twice"


@pytest.mark.parametrize("bundle", NAMES)
def test_bundle_docs_are_model_zoo_size_with_no_generated_blocks(bundle):
    """Each bundle's docs: under 10 KB, no generated ``<!-- NAME:begin -->`` block (those live in
    benchmarks/RESULTS.md only), and a link to RESULTS.md for the studies."""
    docs = BUNDLES / bundle / "docs" / "README.md"
    assert docs.stat().st_size < 10_000, f"{docs}: {docs.stat().st_size} bytes"
    text = docs.read_text(encoding="utf-8")
    assert not re.search(r"<!-- \S+:(begin|end) -->", text), f"{docs}: a generated block"
    assert "](../../../benchmarks/RESULTS.md" in text
    assert (docs.parent / "../../../benchmarks/RESULTS.md").resolve().is_file()


def _train(bundle: str) -> dict:
    return json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())


def test_every_bundle_is_found_and_the_polyp_ones_are_among_them():
    assert {"glas", *POLYP} <= set(NAMES)


@pytest.mark.parametrize("bundle", NAMES)
def test_bundles_differ_only_in_their_values(bundle):
    """After the marker: the family defaults it names (if any), then the shared pipeline, nothing else."""
    config = _train(bundle)
    values = bundle_values(config)
    assert config == compose_train_config(values, shared_config(COMMON), defaults_config(COMMON, values))
    assert values["dataset"] == values["bundle_root"].rsplit("/", 1)[-1].replace("_", "-")


def test_polyp_bundles_share_one_set_of_defaults_and_glas_keeps_its_own():
    glas, cvc, kvasir = (_train(b) for b in ("glas", *POLYP))
    polyp = defaults_config(COMMON, {DEFAULTS: "polyp.json"})
    for config in (cvc, kvasir):
        assert config[DEFAULTS] == "polyp.json" and "polyp.json" in config[MARKER]
        assert not set(polyp) & set(bundle_values(config)), "a polyp default restated in a bundle"
        assert {k: config[k] for k in polyp} == polyp
    assert DEFAULTS not in glas and glas["image_size"] == [384, 256] != kvasir["image_size"]
    assert cvc["split_options"]["by"] == "sequence" and "by" not in kvasir["split_options"]


@pytest.mark.parametrize(("bundle", "native"), [("cvc_clinicdb", (384, 288)), ("kvasir_seg", (622, 530))])
def test_polyp_image_size_is_width_then_height_in_the_frames_own_aspect(bundle, native):
    """image_size is [width, height] (MONAI's reader axes): landscape frames stay landscape, within 2 %."""
    width, height = _train(bundle)["image_size"]
    assert width > height and width / height == pytest.approx(native[0] / native[1], rel=0.02)
    meta = json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [width, height]
    assert f"[{width}, {height}] = [width, height]" in meta["image_classes"]


def test_defaults_file_that_does_not_exist_is_named(tmp_path):
    bundle = tmp_path / "new"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "train.json").write_text(json.dumps({"dataset": "x", DEFAULTS: "nope.json"}))
    with pytest.raises(ValueError, match=r"train.json: _defaults_ names 'nope.json', but .*nope.json does not exist"):
        sync_bundle(bundle, COMMON)


def test_plain_monai_parser_reads_a_bundle_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / "glas" / "configs" / n) for n in ("train.json", "evaluate.json")])
    assert parser["eval_split"] == "test" and "$import masksup_med.evaluation" in parser["imports"]
    assert parser.get_parsed_content("network_def").__class__.__name__ == "UNet"
    assert parser.get_parsed_content("loss").__class__.__name__ == "MaskSupLoss"


def test_supervised_config_swaps_the_method_and_nothing_else():
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / "glas" / "configs" / n) for n in ("train.json", "supervised.json")])
    assert parser.get_parsed_content("loss").__class__.__name__ == "DiceCELoss"
    assert parser["train"]["trainer"]["_target_"] == "SupervisedTrainer"
    assert parser.get_parsed_content("method_transforms") == []
    masksup = ConfigParser()
    masksup.read_config(str(BUNDLES / "glas" / "configs" / "train.json"))

    def same(a, b):  # a merged config writes nested ids with "::", a single file keeps "#"
        return json.dumps(a).replace("::", "#") == json.dumps(b).replace("::", "#")

    assert same(parser["train"]["dataloader"], masksup["train"]["dataloader"])
    assert same(parser["validate"], masksup["validate"])


def test_determinism_is_set_before_anything_random_is_built():
    """``set_determinism`` runs before the first start-up step that builds the network (its initial weights)."""
    steps = shared_config(COMMON)["initialize"]
    seeding = next(i for i, step in enumerate(steps) if "set_determinism(seed=@seed)" in step)
    building = next(i for i, step in enumerate(steps) if "@network_def" in step or "@network" in step)
    assert seeding < building, steps
