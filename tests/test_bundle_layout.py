"""Bundle configs: each bundle's train.json is the shared pipeline written out, current, readable,
and readable by plain MONAI from any working directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from masksup_med.bundles import MARKER, bundle_values, shared_config, sync_bundle, sync_bundles

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
COMMON = BUNDLES / "common" / "configs"
NAMES = ("glas", "cvc_clinicdb")
LINKED = ("evaluate.json", "inference.json", "multi_gpu_train.json", "supervised.json", "semi_train.json",
          "pretrain.json", "logging.conf")


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
    config = {"seg_loss": {"_target_": "DiceLoss", "sigmoid": True},  # a bundle may set a shared id itself
              **{k: v for k, v in config.items() if k != "seg_loss"}}
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
            assert len(expression) <= 110, f"{path}: {expression}"
    train = json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())
    counted = [e for e in _expressions(train) if "(" in e and len(e) > 50]
    assert len(counted) == len(set(counted)), "an expression that builds something is written twice"


def test_bundles_differ_only_in_their_values():
    glas, cvc = (json.loads((BUNDLES / b / "configs" / "train.json").read_text()) for b in NAMES)
    assert (glas["dataset"], cvc["dataset"]) == ("glas", "cvc-clinicdb")
    assert cvc["split_options"]["by"] == "sequence" and glas["image_size"] != cvc["image_size"]
    shared = shared_config(COMMON)
    for config in (glas, cvc):
        assert {k: v for k, v in config.items() if k not in bundle_values(config) and k != MARKER} == shared


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
