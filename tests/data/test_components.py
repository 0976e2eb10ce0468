"""Components files of ``scail2-data prepare / motionpair / preference`` on the one config system: the shipped
presets and templates are valid for their command, files are read like other config files, and a component
written as a name alone or as ``{_target_: name}`` is the same component (provenance, resume fingerprint)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from scail2.config import SHIPPED_TARGETS, ConfigError, component_presets, describe_component, read_components, validate_targets
from scail2.config.components import components_dir
from scail2.config.instantiate import iter_target_nodes
from scail2.data.engine import components as engine
from scail2.data.engine.store import fingerprint
from scail2.preference import builder

ROOT = Path(__file__).resolve().parents[2]
KEYS = {
    "prepare": (engine._PREPARE_REQUIRED, engine._PREPARE_OPTIONAL),
    "motionpair": (engine._MP_REQUIRED, engine._MP_OPTIONAL),
    "preference": (builder._REQUIRED_COMPONENTS, builder._OPTIONAL_COMPONENTS),
}
SHIPPED = [(command, name) for command in KEYS for name in component_presets(command)]


def test_every_command_ships_presets():
    assert {c: component_presets(c) for c in KEYS} == {
        "prepare": ["commands", "services", "synthetic"],
        "motionpair": ["local_vlm", "services"],
        "preference": ["services", "synthetic"],
    }


@pytest.mark.parametrize(("command", "name"), SHIPPED, ids=[f"{c}/{n}" for c, n in SHIPPED])
def test_a_shipped_components_file_is_valid_for_its_command(command, name):
    """Its keys are the command's, and every target in it (nested ones too) is allowed and takes the keys given."""
    spec = read_components(name, command)
    required, optional = KEYS[command]
    assert set(required) <= set(spec) <= set(required) | set(optional)
    assert validate_targets(OmegaConf.create(spec)) >= 3


def test_a_components_file_is_read_like_any_config_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SCAIL2_TEST_SEGMENTER_URL", "http://127.0.0.1:9999/segment")
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("segmenter: {_target_: scail2.data.engine.adapters.HTTPSegmenter, url: '${oc.env:SCAIL2_TEST_SEGMENTER_URL}'}\n"
                         "other: ${segmenter.url}\n")  # fmt: skip
    assert read_components(yaml_file, "prepare") == {
        "segmenter": {"_target_": "scail2.data.engine.adapters.HTTPSegmenter", "url": "http://127.0.0.1:9999/segment"},
        "other": "http://127.0.0.1:9999/segment",
    }
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"segmenter": "scail2.data.engine.standins.SyntheticSegmenter"}))
    assert read_components(json_file, "prepare") == {"segmenter": "scail2.data.engine.standins.SyntheticSegmenter"}
    assert read_components("synthetic", "prepare") == OmegaConf.to_container(OmegaConf.load(components_dir("prepare") / "synthetic.yaml"))
    with pytest.raises(FileNotFoundError, match="components file .*missing.yaml not found"):
        read_components(tmp_path / "missing.yaml", "prepare")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"list\.json must hold a mapping of component name -> spec"):
        read_components(tmp_path / "list.json", "prepare")
    (tmp_path / "bad.yaml").write_text("segmenter: {_target_: x\n")
    with pytest.raises(ConfigError, match=r"components file .*bad\.yaml cannot be read"):
        read_components(tmp_path / "bad.yaml", "prepare")
    (tmp_path / "dangling.yaml").write_text("segmenter: ${nowhere}\n")
    with pytest.raises(ConfigError, match=r"dangling\.yaml: an interpolation cannot be resolved"):
        read_components(tmp_path / "dangling.yaml", "prepare")
    with pytest.raises(ValueError, match=r"unknown components preset 'sam2' for scail2-data prepare; use one of \['commands'"):
        read_components("sam2", "prepare")


def test_a_name_alone_and_a_target_node_are_one_component():
    name = "scail2.data.engine.standins.SyntheticCaptioner"
    assert describe_component(name) == describe_component({"_target_": name}) == name
    assert fingerprint({"captioner": name}) == fingerprint({"captioner": {"_target_": name}}) == {"captioner": name}
    node = {"_target_": "scail2.data.engine.vlm.VLMCaptioner", "frames": 4,
            "client": {"_target_": "scail2.data.engine.endpoints.OpenAIChatClient", "base_url": "http://a", "model": "m"}}  # fmt: skip
    assert describe_component(node) == (
        "scail2.data.engine.vlm.VLMCaptioner(client=scail2.data.engine.endpoints.OpenAIChatClient(base_url='http://a', "
        "model='m'), frames=4)"
    )
    # What only changes how a model is reached is not part of the fingerprint.
    assert fingerprint(node) == {"_target_": "scail2.data.engine.vlm.VLMCaptioner", "frames": 4,
                                 "client": {"_target_": "scail2.data.engine.endpoints.OpenAIChatClient", "model": "m"}}  # fmt: skip


def test_a_literal_dollar_brace_reaches_the_component_as_written(tmp_path):
    """An escaped ``\\${`` is a literal ``${``, also when the file's mapping is built later (as the commands do)."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "segmenter: {_target_: scail2.data.engine.adapters.CommandSegmenter, command: [sh, -c, 'seg \\${HOME} {output}']}\n"
        "keypoints: {_target_: scail2.data.engine.standins.SyntheticKeypoints}\n"
        "captioner: null\n"
    )
    for config in (path, read_components(path, "prepare")):
        assert engine.load_prepare_components(config).segmenter.argv == ["sh", "-c", "seg ${HOME} {output}"]


def _yaml_blocks(text: str) -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```", text, re.M | re.S)


def test_the_components_files_in_the_docs_name_only_allowed_targets():
    """The YAML examples of docs/data.md build only shipped classes, with keys their classes take (``mylab``
    classes stand for a user's own registered ones)."""
    blocks = [yaml.safe_load(b) for b in _yaml_blocks((ROOT / "docs" / "data.md").read_text())]
    checked = 0
    for block in blocks:
        node = OmegaConf.create(block)
        targets = [n["_target_"] for _, n in iter_target_nodes(node)]
        if targets and not any(t.startswith("mylab.") for t in targets):
            assert set(targets) <= SHIPPED_TARGETS
            validate_targets(node)
            checked += 1
    assert checked >= 2
