"""Every experiment x every option of every group composes, or is refused naming the combination and why; an
experiment's settings for one option of a group (experiments/<name>/<group>/<option>.yaml) apply with that
option and never leak into another. Composition only: nothing is built."""

from __future__ import annotations

import os
from functools import lru_cache

import pytest
from omegaconf import DictConfig, OmegaConf

from scail2.config import ConfigError, config_dir, experiments_dir, validate_targets
from scail2.config.combinations import check_combination
from scail2.config.schema import SPECIALIZED_GROUPS, experiment_specializations, register_configs
from scail2.train import _check_schedule, build_module

GROUPS = ("model", "data", "objective", "optim", "strategy", "trainer", "logger", "callbacks", "debug")
EXPERIMENTS = sorted(f.stem for f in experiments_dir().glob("*.yaml"))
MOTION_DATA = {"synthetic", "cache", "manifest"}
SHARDED = {"fsdp2", "deepspeed_zero2", "deepspeed_zero3"}


def _options(group: str) -> list[str]:
    return sorted(f.stem for f in (config_dir() / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def compose(tmp_path_factory):
    """compose(overrides) -> config, in one Hydra context for the module (each composition ~0.1 s)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from scail2.lit.export import write_training_record

    root = tmp_path_factory.mktemp("compositions")
    # dpo_demo starts from the newest complete `experiment=demo` export (${latest_export:demo}): give it one.
    export = root / "demo" / "2026-01-01_00-00-00" / "model"
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    write_training_record(export, {"experiment": "demo", "overrides": [], "global_step": 1500, "max_steps": 1500,
                                   "fast_dev_run": False, "finished": True, "run_id": "r1", "resolutions": []})  # fmt: skip
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):

        def _compose(overrides: list[str]) -> DictConfig:
            cfg = hydra_compose("train", overrides=[f"paths.output_root={root}", f"paths.data_root={root}/data", *overrides],
                                return_hydra_config=True)  # fmt: skip
            HydraConfig.instance().set_config(cfg)
            with open_dict(cfg):
                del cfg["hydra"]
            cfg.paths.run_dir = str(root / "run")
            return cfg

        yield _compose


@lru_cache(maxsize=None)
def _choice(experiment: str, group: str) -> str:
    """The experiment's own option of ``group`` (its defaults list, else conf/train.yaml's)."""
    for entry in OmegaConf.load(experiments_dir() / f"{experiment}.yaml").defaults:
        if isinstance(entry, DictConfig) and f"override /{group}" in entry:
            return entry[f"override /{group}"]
    for entry in OmegaConf.load(config_dir() / "train.yaml").defaults:
        if isinstance(entry, DictConfig) and group in entry:
            return entry[group]
    raise KeyError(group)


def _refusal(choices: dict[str, str]) -> str | None:
    """The message expected for a combination that cannot train, or None."""
    dpo = choices["objective"] == "dpo"
    if dpo and choices["data"] in MOTION_DATA:
        return r"unsupported combination .*objective=dpo .*trains on preference pairs, but data=%s" % choices["data"]
    if not dpo and choices["data"] not in MOTION_DATA:
        return r"unsupported combination .*data=%s .*gives preference pairs.*objective=%s" % (choices["data"], choices["objective"])
    if dpo and choices["strategy"] == "fsdp2":
        return r"unsupported combination .*objective=dpo with strategy=fsdp2 .*strategy=ddp"
    if choices["callbacks"] == "ema" and choices["strategy"] in SHARDED:
        return r"unsupported combination .*callbacks\.ema .*strategy=%s" % choices["strategy"]
    return None


def _flat(node: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in node.items():
        if key == "defaults":
            continue
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{path}."))
        else:
            out[path] = value
    return out


def _raw(cfg: DictConfig, key: str) -> object:
    """The value at ``key`` as written (interpolations unresolved); a sentinel when absent."""
    node: object = OmegaConf.to_container(cfg, resolve=False)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return "<absent>"
        node = node[part]
    return node


def _own_settings(experiment: str, group: str, option: str | None = None) -> dict[str, object]:
    """The experiment's settings for ``option`` of ``group`` (default: its own option), flattened, with included
    files."""
    path = experiments_dir() / experiment / group / f"{option or _choice(experiment, group)}.yaml"
    if not path.is_file():
        return {}
    node = OmegaConf.to_container(OmegaConf.load(path))
    settings = _flat(node)
    for entry in node.get("defaults", []):  # `- /experiment_<group>/<experiment>@_global_: <option>`
        if entry == "_self_" or not next(iter(entry)).startswith("/experiment_"):
            continue  # `_self_`, or the schema of a node the file adds (`- /schema@<key>: <target>`)
        (option,) = entry.values()
        settings = {**_flat(OmegaConf.to_container(OmegaConf.load(path.with_name(f"{option}.yaml")))), **settings}
    return settings


# Each experiment with every option it does not choose itself (its own choices: test_specialized_settings_...).
CASES = [(e, g, o) for e in EXPERIMENTS for g in GROUPS for o in _options(g) if g == "debug" or o != _choice(e, g)]


@pytest.mark.parametrize("experiment,group,option", CASES, ids=[f"{e}-{g}={o}" for e, g, o in CASES])
def test_experiment_with_any_option_composes_or_is_refused(compose, experiment, group, option):
    cfg = compose([f"experiment={experiment}", f"{group}={option}"])
    choices = {g: _choice(experiment, g) for g in ("data", "objective", "strategy", "callbacks")}
    choices[group] = option
    expected = _refusal(choices)
    if expected is not None:
        with pytest.raises(ConfigError, match=expected):
            check_combination(cfg)
        return
    check_combination(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    validate_targets(cfg)  # every key is a parameter of its target
    _check_schedule(build_module(cfg))  # the schedule fits the run (debug=profile: 20 steps, its own warm-up)
    # The experiment's settings for its own option of this group do not reach another option.
    if group in SPECIALIZED_GROUPS and option != _choice(experiment, group):
        body = _flat(OmegaConf.to_container(OmegaConf.load(experiments_dir() / f"{experiment}.yaml")))
        swapped = _own_settings(experiment, group, option)  # its settings for this option, if it has any
        for key, value in _own_settings(experiment, group).items():
            if body.get(key) != value and swapped.get(key) != value and _raw(cfg, key) == value:
                # The same value is only allowed when it is the option's own (composed without the experiment).
                assert _raw(compose([f"{group}={option}"]), key) == value, (key, value)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_specialized_settings_apply_with_their_option(compose, experiment):
    cfg = compose([f"experiment={experiment}"])
    applied = 0
    for group in SPECIALIZED_GROUPS:
        for key, value in _own_settings(experiment, group).items():
            assert _raw(cfg, key) == value, (group, key)
            applied += 1
    if (experiments_dir() / experiment).is_dir():
        assert applied > 0
    # callbacks=ema carries the experiment's callback settings too (ema.yaml includes default.yaml).
    if _choice(experiment, "strategy") not in SHARDED:
        ema = compose([f"experiment={experiment}", "callbacks=ema"])
        for key, value in _own_settings(experiment, "callbacks").items():
            assert _raw(ema, key) == value, key


def test_reported_examples_compose(compose):
    """The two combinations that used to fail at composition."""
    cfg = compose(["experiment=demo", "data=manifest"])
    assert "pairs" not in cfg.data and cfg.trainer.max_steps == 1500
    cfg = compose(["experiment=pretrain_wan1.3b", "strategy=single"])
    assert "param_dtype" not in cfg.strategy and cfg.trainer.devices == 1
    check_combination(cfg)


def test_a_misnamed_specialization_file_is_refused(tmp_path):
    folder = tmp_path / "experiments"
    (folder / "mine" / "data").mkdir(parents=True)
    (folder / "mine.yaml").write_text("run_name: mine\n")
    (folder / "mine" / "data" / "synthtic.yaml").write_text("data: {pairs: 3}\n")
    with pytest.raises(ValueError, match=r"synthtic\.yaml: the data group has no option 'synthtic' \(did you mean synthetic\.yaml\?\)"):
        experiment_specializations(folder)
    os.rename(folder / "mine" / "data", folder / "mine" / "dataa")
    with pytest.raises(ValueError, match=r"'dataa' is not a config group"):
        experiment_specializations(folder)


def test_single_device_with_several_devices_is_refused(compose):
    cfg = compose(["experiment=demo", "trainer.devices=2"])
    with pytest.raises(ConfigError, match=r"strategy=single .*trainer\.devices=2.*strategy=ddp"):
        check_combination(cfg)


def test_a_schedule_that_does_not_fit_the_run_is_refused_before_training(compose):
    cfg = compose(["experiment=demo", "trainer.max_steps=20"])  # the demo warms up for 50 steps
    with pytest.raises(ConfigError, match=r"config `optim.scheduler`: warmup_steps 50 must be in \[0, total_steps=20\).*optim\.scheduler\.warmup_steps=2"):
        _check_schedule(build_module(cfg))
    _check_schedule(build_module(compose(["experiment=demo", "debug=profile"])))
