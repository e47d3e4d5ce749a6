"""Bundle configs share the common pipeline through MONAI macros, and read the same from any folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from masksup_med.bundle_config import bundles_parent, load_bundle_config, write_expanded_config

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
COMMON_TRAIN = BUNDLES / "common" / "configs" / "train.json"


@pytest.mark.parametrize("bundle", ["glas", "cvc_clinicdb"])
def test_bundle_train_config_holds_only_dataset_values_and_macros(bundle):
    own = json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())
    common = json.loads(COMMON_TRAIN.read_text())
    macros = {k for k, v in own.items() if isinstance(v, str) and v.startswith("%")}
    assert macros == set(common)  # every shared id comes from the common file, by the same name
    for key in macros:
        assert own[key] == f"%bundles/common/configs/train.json#{key}"


@pytest.mark.parametrize("bundle", ["glas", "cvc_clinicdb"])
def test_linked_configs_are_the_common_ones(bundle):
    for name in ("evaluate.json", "inference.json", "multi_gpu_train.json", "logging.conf"):
        path = BUNDLES / bundle / "configs" / name
        assert path.resolve() == (BUNDLES / "common" / "configs" / name).resolve(), name


def test_bundles_differ_in_dataset_values():
    glas = load_bundle_config(BUNDLES / "glas" / "configs" / "train.json")
    cvc = load_bundle_config(BUNDLES / "cvc_clinicdb" / "configs" / "train.json")
    assert (glas["dataset"], cvc["dataset"]) == ("glas", "cvc-clinicdb")
    assert cvc["split_options"]["by"] == "sequence"
    assert glas["image_size"] != cvc["image_size"]
    assert glas["train"] == cvc["train"]  # the same pipeline, expanded from the same macro


def test_loads_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = load_bundle_config([BUNDLES / "glas" / "configs" / "train.json", BUNDLES / "glas" / "configs" / "evaluate.json"])
    assert isinstance(parser["train"], dict) and parser["eval_split"] == "test"
    assert parser.get_parsed_content("network_def").__class__.__name__ == "UNet"


def test_plain_monai_parser_needs_the_repository_root(tmp_path, monkeypatch):
    """Why the helper exists: MONAI reads macro files relative to the working directory."""
    monkeypatch.chdir(tmp_path)
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "glas" / "configs" / "train.json"))
    with pytest.raises(FileNotFoundError):
        parser.resolve_macro_and_relative_ids()


def test_expanded_config_is_self_contained_and_equivalent(tmp_path, monkeypatch):
    source = BUNDLES / "cvc_clinicdb" / "configs" / "train.json"
    out = write_expanded_config(source, tmp_path / "expanded" / "train.json")
    text = out.read_text()
    assert '"%' not in text
    monkeypatch.chdir(tmp_path)  # nothing left to resolve against the repository
    parser = ConfigParser()
    parser.read_config(str(out))
    parser.resolve_macro_and_relative_ids()
    def normalised(config: dict) -> str:  # MONAI writes nested ids with "::" or "#" interchangeably
        return json.dumps(config, sort_keys=True).replace("#", "::")

    assert normalised(parser.get()) == normalised(load_bundle_config(source).get())


def test_missing_macro_file_names_the_config(tmp_path):
    config = tmp_path / "bundles" / "broken" / "configs" / "train.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"train": "%bundles/common/configs/nowhere.json#train"}))
    with pytest.raises(FileNotFoundError, match=str(config)):
        load_bundle_config(config)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bundle_config(tmp_path / "missing.json")


def test_bundles_parent_is_the_folder_holding_bundles(tmp_path, monkeypatch):
    assert bundles_parent(BUNDLES / "glas" / "configs" / "evaluate.json") == REPO  # a link stays in its bundle
    monkeypatch.chdir(tmp_path)
    assert bundles_parent(tmp_path / "elsewhere" / "train.json") == Path(os.getcwd())
