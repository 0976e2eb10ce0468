"""Hostile configs and command lines: no code runs from a config, no run leaves the output root, every unknown
key and impossible value is refused up front with one line naming the key, the value and the fix."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from scail2.config import (
    SHIPPED_TARGETS,
    ConfigError,
    UnsafeTargetError,
    compose_config,
    config_dir,
    experiments_dir,
    instantiate,
    register_configs,
    validate_targets,
)
from scail2.train import _task, build_trainer, main, train

from ..registration import fake_distribution
from .conftest import compose_run, train_overrides

pytestmark = pytest.mark.hostile


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["scail2-train"])  # main() replaces sys.argv
QUICK = ("logger=none", "export.enabled=false", "trainer.max_steps=2", "optim.scheduler.warmup_steps=0", "trainer.enable_progress_bar=false", "callbacks.progress=null")


def _marker_overrides(target: str, marker: Path) -> list[str]:
    """Overrides that would make ``target`` create ``marker`` when the callback node is built."""
    if target == "torch.utils.collect_env.run":
        return [f"+callbacks.x._target_={target}", f"+callbacks.x.command='touch {marker}'"]
    if target == "lightning.fabric.utilities.cloud_io._load":
        evil = marker.with_name("evil.pkl")
        evil.write_bytes(pickle.dumps(_Touch(str(marker))))
        return [f"+callbacks.x._target_={target}", f"+callbacks.x.path_or_url={evil}", "+callbacks.x.weights_only=false"]
    if target in ("torch.save", "scail2.lit.checkpoint.torch.save"):
        return [f"+callbacks.x._target_={target}", "+callbacks.x.obj=1", f"+callbacks.x.f={marker}"]
    if target in ("os.system", "scail2.lit.checkpoint.os.system"):
        return [f"+callbacks.x._target_={target}", f"+callbacks.x.command='touch {marker}'"]
    if target == "subprocess.Popen":
        return [f"+callbacks.x._target_={target}", f"+callbacks.x.args=[touch,{marker}]"]
    if target == "builtins.eval":
        return [f"+callbacks.x._target_={target}", f"+callbacks.x._args_=[\"open('{marker}','w')\"]"]
    raise AssertionError(target)


class _Touch:
    """Unpickling this creates a file: the payload of a malicious pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


HOSTILE_TARGETS = [
    "torch.utils.collect_env.run",  # runs a shell command
    "lightning.fabric.utilities.cloud_io._load",  # unpickles with weights_only=false
    "torch.save",  # writes a file at a chosen path
    "builtins.eval",
    "subprocess.Popen",
    "os.system",
    "scail2.lit.checkpoint.os.system",  # os.system reached through a module that imports os
    "scail2.lit.checkpoint.torch.save",
]


@pytest.mark.parametrize("target", HOSTILE_TARGETS)
def test_a_config_override_cannot_run_code(data_root, tmp_path, target):
    marker = tmp_path / "MARKER"
    cfg = compose_run(data_root, tmp_path / "out", *QUICK, *_marker_overrides(target, marker))
    with pytest.raises(UnsafeTargetError, match=rf"callbacks\.x\._target_: {target}\b.*not allowed"):
        validate_targets(cfg)
    with pytest.raises(UnsafeTargetError, match=rf"callbacks\.x\._target_: {target}\b"):
        build_trainer(cfg)
    with pytest.raises(UnsafeTargetError, match=target):
        train(cfg)
    assert not marker.exists()


def test_a_target_inside_hydra_positional_arguments_is_checked(data_root, tmp_path):
    marker = tmp_path / "MARKER"
    cfg = compose_run(
        data_root, tmp_path / "out", *QUICK,
        "+callbacks.x._target_=scail2.lit.callbacks.ThroughputMonitor",
        f"+callbacks.x._args_=[{{_target_:torch.utils.collect_env.run,command:'touch {marker}'}}]",
    )
    with pytest.raises(UnsafeTargetError, match=r"callbacks\.x\._args_\[0\]\._target_: torch\.utils\.collect_env\.run"):
        train(cfg)
    assert not marker.exists()


def test_a_target_reached_through_an_interpolation_is_checked():
    cfg = OmegaConf.create(
        {"holder": {"_hidden_": {"_target_": "torch.utils.collect_env.run", "command": "true"}}, "cb": "${holder._hidden_}"}
    )
    with pytest.raises(UnsafeTargetError, match=r"_target_: torch\.utils\.collect_env\.run"):
        validate_targets(cfg)
    node = OmegaConf.create({"_target_": "scail2.lit.callbacks.ThroughputMonitor", "peak_flops": "${x}", "x": None})
    node.x = {"_target_": "os.system", "command": "true"}
    with pytest.raises(UnsafeTargetError, match="os.system"):
        instantiate(node, "callbacks.y")


def _named_targets(value) -> set[str]:
    """Every ``_target_`` value in a parsed YAML document, at any depth (block and flow style alike)."""
    if isinstance(value, dict):
        own = {value["_target_"]} if isinstance(value.get("_target_"), str) else set()
        return own.union(*(_named_targets(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_named_targets(v) for v in value))
    return set()


def test_the_allow_list_is_exactly_the_targets_the_shipped_configs_use():
    """The training and benchmark configs and the components files of scail2-data (conf/components/) alike."""
    import yaml

    from scail2.config.schema import TrainerConfig, schema_uses

    named = {TrainerConfig._target_, *schema_uses((config_dir(), experiments_dir()))}
    for folder in (config_dir(), experiments_dir()):
        for path in folder.rglob("*.yaml"):
            named |= _named_targets(yaml.safe_load(path.read_text()))
    components = set().union(*(_named_targets(yaml.safe_load(p.read_text())) for p in (config_dir() / "components").rglob("*.yaml")))
    assert components and components <= named
    assert {t for t in named if not t.startswith("scail2.bench")} == set(SHIPPED_TARGETS)


# ----------------------------------------------------------------------------------------------- registration
def _dist(root: Path, name: str, entry: str, package: str | None) -> None:
    """An installed distribution ``name`` (a dist-info folder on sys.path) registering ``entry``."""
    mine = (
        "from lightning.pytorch.callbacks import Callback\n\n\nclass Mine(Callback):\n"
        "    def __init__(self, level: int = 1):\n        self.level = level\n"
    )
    fake_distribution(root, name, {"thing": entry}, {f"{package}/__init__.py": mine} if package is not None else {})


def test_a_users_package_registers_its_own_class(tmp_path, monkeypatch, data_root):
    _dist(tmp_path / "site", "mylab", "mylab:Mine", "mylab")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    cfg = compose_run(data_root, tmp_path / "out", *QUICK, "+callbacks.mine._target_=mylab.Mine", "+callbacks.mine.level=3")
    assert validate_targets(cfg) > 5
    trainer = build_trainer(cfg)
    assert [cb.level for cb in trainer.callbacks if type(cb).__name__ == "Mine"] == [3]
    # Another class of that package is not registered by it.
    bad = compose_run(data_root, tmp_path / "out", *QUICK, "+callbacks.mine._target_=mylab.Callback")
    with pytest.raises(UnsafeTargetError, match="mylab.Callback"):
        validate_targets(bad)
    sys.modules.pop("mylab", None)


@pytest.mark.parametrize("entry", ["os:system", "torch.utils.collect_env:run", "scail2.train:main", "subprocess:Popen"])
def test_a_package_cannot_register_callables_of_other_packages(tmp_path, monkeypatch, entry):
    _dist(tmp_path / "site", "evil-pkg", entry, None)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    cfg = OmegaConf.create({"x": {"_target_": entry.replace(":", ".")}})
    with pytest.raises(UnsafeTargetError, match=r"evil-pkg registers config target .* belongs to"):
        validate_targets(cfg)


# ----------------------------------------------------------------------------------------------- command line
@pytest.mark.parametrize(
    "override",
    [
        "+hydra.callbacks.x._target_=torch.utils.collect_env.run",
        "hydra.job_logging.handlers.console.class=torch.utils.collect_env.run",
        "+hydra.job_logging.handlers.x={class:torch.utils.collect_env.run,command:true}",
        "hydra.searchpath=[file:///tmp]",
        "+hydra.job.env_set.LD_PRELOAD=/tmp/evil.so",
        "+callbacks@hydra.callbacks=default",
        "hydra.launcher._target_=hydra._internal.core_plugins.basic_launcher.BasicLauncher",
    ],
)
def test_hydra_settings_that_can_name_code_are_refused_on_the_command_line(data_root, tmp_path, capsys, override):
    marker = tmp_path / "MARKER"
    extra = [f"+hydra.callbacks.x.command='touch {marker}'"] if "hydra.callbacks.x._target_" in override else []
    args = train_overrides(data_root, tmp_path, "debug=fast_dev_run", *QUICK, override, *extra)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the override") and override.split("=")[0] in err and err.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "demo").exists()


def test_experimental_rerun_of_a_pickle_is_refused(tmp_path, capsys):
    evil = tmp_path / "config.pickle"
    evil.write_bytes(pickle.dumps(_Touch(str(tmp_path / "MARKER"))))
    with pytest.raises(SystemExit) as exit_info:
        main(["--experimental-rerun", str(evil)])
    assert exit_info.value.code == 2 and "unpickles" in capsys.readouterr().err
    assert not (tmp_path / "MARKER").exists()


def test_an_experiment_file_cannot_set_hydra_callbacks(tmp_path):
    (tmp_path / "evil.yaml").write_text(
        "# @package _global_\nhydra:\n  callbacks:\n    x:\n      _target_: torch.utils.collect_env.run\n      command: 'true'\n"
    )
    with pytest.raises(ConfigError, match=r"evil\.yaml sets `hydra\.callbacks`"):
        register_configs(tmp_path)
    register_configs()  # the shipped experiments again, for the other tests


@pytest.mark.parametrize("name", ["../..", "..", ".", "a/b", "/abs", "", " x", "run name", "x" * 200])
def test_a_run_name_that_leaves_the_output_root_is_refused(data_root, tmp_path, capsys, name):
    args = train_overrides(data_root, tmp_path / "out", "debug=fast_dev_run", *QUICK, f"run_name='{name}'")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "run_name=" in err and "not a plain folder name" in err
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    cfg = compose_run(data_root, tmp_path / "out", *QUICK)
    cfg.run_name = name
    with pytest.raises(ConfigError, match="not a plain folder name"):
        train(cfg)


def test_a_checkpoint_path_outside_the_output_root_is_refused(data_root, tmp_path):
    out = tmp_path / "out"
    outside = tmp_path / "elsewhere" / "step=0000002.ckpt"
    outside.parent.mkdir()
    outside.write_bytes(b"not a checkpoint")
    for path in ("/etc/passwd", str(outside), f"{out}/../elsewhere/step=0000002.ckpt", f"{out}/demo/../../elsewhere/x.ckpt"):
        cfg = compose_run(data_root, out, *QUICK, f"ckpt_path='{path}'")
        with pytest.raises(ConfigError, match=r"ckpt_path=.* lies outside paths\.output_root"):
            train(cfg)
    # A link inside the output root may point elsewhere (checkpoints on scratch storage); what it points to must
    # still be a checkpoint.
    (out / "demo" / "r" / "checkpoints").mkdir(parents=True)
    link = out / "demo" / "r" / "checkpoints" / "step=0000004.ckpt"
    link.symlink_to(outside)
    cfg = compose_run(data_root, out, *QUICK, f"ckpt_path='{link}'")
    with pytest.raises(ConfigError, match=r"cannot be read as a checkpoint"):
        train(cfg)


def test_a_checkpoint_path_with_equals_signs_is_read_as_a_path(data_root, tmp_path, capsys):
    ckpt = tmp_path / "demo" / "r" / "checkpoints" / "step=0000500.ckpt"
    args = train_overrides(data_root, tmp_path, *QUICK, f"ckpt_path={ckpt}")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"ckpt_path={ckpt}: no complete checkpoint there" in err


def test_an_override_hydra_cannot_read_names_the_quoting(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["experiment=demo", "module.init_from=/a b/step=1.ckpt"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "must be quoted" in err and "ckpt_path='" in err


# ----------------------------------------------------------------------------------------------- keys and values
@pytest.mark.parametrize(
    "override,key",
    [
        ("+foo=1", "foo"),
        ("+paths.foo=1", "paths.foo"),
        ("+export.foo=1", "export.foo"),
        ("+optim.foo=1", "optim.foo"),
        ("+module.validation.foo=1", "module.validation.foo"),
        ("+trainer.foo=1", "trainer.foo"),
        ("+callbacks.x=1", "callbacks.x"),
    ],
)
def test_unknown_keys_added_with_plus_are_refused(data_root, tmp_path, override, key):
    extra = ["module.validation.every_n_steps=0"] if "validation" in override else []
    cfg = compose_run(data_root, tmp_path, *QUICK, *extra, override)
    with pytest.raises(ConfigError, match=rf"config `{key}`"):
        train(cfg)


BAD_VALUES = [
    ("optim.optimizer.lr=fast", "optim.optimizer.lr", "'fast'"),
    ("optim.optimizer.lr=nan", "optim.optimizer.lr", "nan"),
    ("optim.optimizer.lr=inf", "optim.optimizer.lr", "inf"),
    ("optim.optimizer.lr=-0.1", "optim.optimizer.lr", "-0.1"),
    ("data.batch_size=0", "data.batch_size", "0"),
    ("data.batch_size=-2", "data.batch_size", "-2"),
    ("seed=-1", "seed", "-1"),
    ("seed=4294967296", "seed", "4294967296"),
    ("data.data_seed=-3", "data.data_seed", "-3"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val", "-1"),
    ("trainer.gradient_clip_val=nan", "trainer.gradient_clip_val", "nan"),
    ("trainer.max_steps=0", "trainer.max_steps", "0"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches", "0"),
    ("module.validation.fps=0", "module.validation.fps", "0"),
    ("module.validation.fps=-5", "module.validation.fps", "-5"),
    ("module.validation.guidance_scale=nan", "module.validation.guidance_scale", "nan"),
    ("module.validation.shift=inf", "module.validation.shift", "inf"),
    ("objective.logit_std=nan", "objective.logit_std", "nan"),
    ("module.max_loss=-1", "module.max_loss", "-1"),
    ("optim.scheduler.warmup_steps=5", "optim.scheduler.warmup_steps", "5"),  # not below total_steps (max_steps=2)
    ("optim.scheduler.min_lr_ratio=2", "optim.scheduler.min_lr_ratio", "2"),
]


@pytest.mark.parametrize("override,key,value", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_impossible_values_are_refused_naming_key_value_and_range(data_root, tmp_path, override, key, value):
    extra = [] if "validation" not in override else ["module.validation.every_n_steps=0"]
    cfg = compose_run(data_root, tmp_path, *QUICK, *extra, override)
    with pytest.raises(ConfigError) as info:
        train(cfg)
    message = str(info.value)
    assert f"`{key}`" in message and value in message and ("need" in message or "finite" in message)
    assert "\n" not in message
    assert not any(tmp_path.rglob("*.ckpt"))


def test_bad_values_end_the_command_line_with_one_line_and_code_2(data_root, tmp_path):
    import subprocess

    args = train_overrides(data_root, tmp_path, *QUICK, "optim.optimizer.lr=fast")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "scail2.train", *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: config `optim.optimizer.lr` is 'fast'")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("kind", ["truncated", "missing"])
def test_weights_to_start_from_are_checked_before_anything_is_built(data_root, tmp_path, kind, capsys):
    from safetensors.torch import save_file

    weights = tmp_path / "init" / "diffusion_pytorch_model.safetensors"
    weights.parent.mkdir()
    save_file({"w": torch.zeros(1000)}, str(weights))
    if kind == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        path, words = weights.parent, "is not a complete safetensors file"
    else:
        path, words = tmp_path / "nowhere", "does not exist"
    cfg = compose_run(data_root, tmp_path / "out", *QUICK, f"module.init_from={path}")
    with pytest.raises(SystemExit) as info:
        _task(cfg)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: module.init_from=") and words in err and err.count("\n") == 1
