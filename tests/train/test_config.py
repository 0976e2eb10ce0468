"""Every config option composes and builds; typos, unsafe targets and missing values fail early and clearly."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from scail2.config import (
    ConfigError,
    UnsafeTargetError,
    compose_config,
    config_dir,
    experiments_dir,
    instantiate,
    validate_targets,
)
from scail2.lit.base import build_network
from scail2.train import build_module, build_trainer

# Values a config leaves to the command line (???), filled so that it can be built here.
REQUIRED = {
    "data.cache_dir": "/nonexistent/cache",
    "data.manifest": "/nonexistent/manifest.jsonl",
    "data.encoders_root": "/nonexistent/encoders",
    "module.init_from": "/nonexistent/wan2.1-i2v",
    "module.validation.vae": "/nonexistent/encoders",
}


# The groups of conf/train.yaml (conf/ also holds other tools' groups).
TRAIN_GROUPS = ("hardware", "model", "data", "objective", "optim", "strategy", "trainer", "logger", "callbacks", "debug")


def _options() -> list[tuple[str, str]]:
    groups = [(g, f.stem) for g in TRAIN_GROUPS for f in sorted((config_dir() / g).glob("*.yaml"))]
    return groups + [("experiment", f.stem) for f in sorted(experiments_dir().glob("*.yaml"))]


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    # One store for the module: creating an MLflow SQLite store runs its migrations (seconds).
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def _compose(tmp_path: Path, *overrides: str, mlflow_uri: str | None = None):
    """Compose with ``overrides`` and fill what the command line would have to give."""
    # dpo_demo starts from the newest `experiment=demo` export (${latest_export:demo}): give it one.
    demo_export = tmp_path / "demo" / "2026-01-01_00-00-00" / "model"
    if not (demo_export / "config.json").exists():
        _fake_export(demo_export)
    cfg = compose_config([f"paths.output_root={tmp_path}", f"paths.data_root={tmp_path}/data", *overrides])
    cfg.paths.run_dir = str(tmp_path / "run")
    if cfg.logger is not None and mlflow_uri is not None:
        cfg.logger.tracking_uri = mlflow_uri
    for key in [*OmegaConf.missing_keys(cfg), *cfg.required]:
        OmegaConf.update(cfg, key, REQUIRED[key])
    if cfg.data._target_.endswith(".PreferenceDataModule") and cfg.data.cache_dir is None:
        OmegaConf.update(cfg, "data.cache_dir", REQUIRED["data.cache_dir"])
    if cfg.data._target_.endswith(".MotionDataModule") and cfg.data.cache_dir is None:
        # data=cache needs its folder, data=manifest its manifest and encoders (set by the user).
        keys = ("data.manifest", "data.encoders_root") if "data=manifest" in overrides else ("data.cache_dir",)
        for key in keys:
            OmegaConf.update(cfg, key, REQUIRED[key])
    return cfg


def _fake_export(folder: Path, **record) -> Path:
    """An export folder with the training.json of a finished `experiment=demo` run (or ``record``'s values)."""
    from scail2.lit.export import write_training_record

    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    defaults = {"experiment": "demo", "overrides": ["experiment=demo"], "global_step": 1500, "max_steps": 1500,
                "fast_dev_run": False, "finished": True, "run_id": "run1", "resolutions": []}  # fmt: skip
    write_training_record(folder, {**defaults, **record})
    return folder


def test_train_yaml_lists_every_group():
    from scail2.config.schema import SPECIALIZED_GROUPS

    defaults = OmegaConf.load(config_dir() / "train.yaml").defaults
    listed = {next(iter(d)).removeprefix("optional ") for d in defaults if not isinstance(d, str)}
    assert listed == {*TRAIN_GROUPS, "experiment", *(f"experiment_{g}" for g in SPECIALIZED_GROUPS)}


@pytest.mark.parametrize("group,option", _options(), ids=lambda x: str(x))
def test_option_composes_and_builds(tmp_path, mlflow_uri, group, option):
    """Compose the option; build what it changes (an experiment: everything) on the CPU."""
    cfg = _compose(tmp_path, f"{group}={option}", mlflow_uri=mlflow_uri)
    assert validate_targets(cfg) > 5
    OmegaConf.to_yaml(cfg, resolve=True)  # every interpolation resolves
    everything = group == "experiment"
    if everything or group == "model":
        with torch.device("meta"):  # the 14B preset costs nothing there
            assert build_network(instantiate(cfg.model, "model")).num_params() > 0
    if everything or group in ("objective", "optim", "model"):
        build_module(cfg)
    if everything or group == "data":
        instantiate(cfg.data, "data")
    if not (everything or group in ("strategy", "trainer", "logger", "callbacks", "debug")):
        return
    if cfg.strategy._target_.endswith(".deepspeed"):
        with pytest.raises(ConfigError, match=r"config `strategy`.*needs CUDA GPUs.*strategy=fsdp2"):
            instantiate(cfg.strategy, "strategy")
        return
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        with pytest.raises(Exception, match="(?i)gpu|cuda"):
            build_trainer(cfg)
        return
    trainer = build_trainer(cfg)
    assert trainer.max_steps == cfg.trainer.max_steps or cfg.trainer.fast_dev_run


def test_presets_have_their_size():
    with torch.device("meta"):
        sizes = {p: build_network(instantiate(compose_config([f"model={p}"]).model, "model")).num_params() for p in ("wan2.1-1.3b", "wan2.1-14b")}
    assert 1.3e9 < sizes["wan2.1-1.3b"] < 1.8e9
    assert 14e9 < sizes["wan2.1-14b"] < 17e9


def test_paper_recipe():
    cfg = compose_config(["experiment=pretrain_wan14b"])
    assert cfg.model.preset == "wan2.1-14b"
    assert cfg.strategy._target_ == "scail2.lit.strategies.FSDP2Strategy"
    assert cfg.trainer.num_nodes * cfg.trainer.devices == 64
    global_batch = cfg.trainer.num_nodes * cfg.trainer.devices * cfg.data.batch_size * cfg.trainer.accumulate_grad_batches
    assert global_batch == 128
    assert cfg.trainer.max_steps == 3500 and cfg.optim.optimizer.lr == 1e-5
    assert list(cfg.optim.optimizer.betas) == [0.9, 0.95] and cfg.optim.optimizer.weight_decay == 1e-4
    assert cfg.trainer.gradient_clip_val == 0.1 and cfg.trainer.precision == "bf16-mixed"


def test_defaults_come_from_signatures():
    from scail2.lit.base import SCAIL2Module
    from scail2.objectives.flow_matching import FlowMatchingConfig

    cfg = compose_config([])
    params = inspect.signature(SCAIL2Module).parameters
    assert cfg.module.nonfinite == params["nonfinite"].default
    assert cfg.module.max_consecutive_skips == params["max_consecutive_skips"].default
    assert cfg.module.validation.num_inference_steps == params["validation"].default.num_inference_steps
    assert cfg.objective.text_dropout == FlowMatchingConfig().text_dropout


@pytest.mark.parametrize("override", ["module.nonfinit=skip", "trainer.max_step=5", "objective.logit_sd=2", "data.batchsize=2"])
def test_typo_fails_at_composition_naming_the_key(override):
    with pytest.raises(Exception, match=override.split("=")[0].split(".")[-1]):
        compose_config([override])


def test_added_unknown_key_is_refused_before_building(tmp_path):
    cfg = _compose(tmp_path, "+module.nonfinit=skip")
    with pytest.raises(ConfigError, match=r"module\.nonfinit.*did you mean `nonfinite`"):
        validate_targets(cfg)


@pytest.mark.parametrize("target", ["os.system", "subprocess.run", "builtins.eval", "torch.hub.load", "torch.load"])
def test_unsafe_target_is_refused_with_path_and_target(tmp_path, mlflow_uri, target):
    cfg = _compose(tmp_path, f"+callbacks.evil._target_={target}", "+callbacks.evil.command=touch /tmp/pwned", mlflow_uri=mlflow_uri)
    with pytest.raises(UnsafeTargetError, match=rf"callbacks\.evil\._target_: {target}"):
        validate_targets(cfg)
    with pytest.raises(UnsafeTargetError, match=target):
        instantiate(cfg.callbacks.evil, "callbacks.evil")
    with pytest.raises(UnsafeTargetError):
        build_trainer(cfg)


def test_nested_unsafe_target_is_refused(tmp_path):
    cfg = _compose(
        tmp_path, "+callbacks.nested._target_=scail2.lit.callbacks.ThroughputMonitor", "+callbacks.nested.peak_flops._target_=os.getcwd"
    )
    with pytest.raises(UnsafeTargetError, match=r"callbacks\.nested\.peak_flops\._target_: os\.getcwd"):
        instantiate(cfg.callbacks.nested, "callbacks.nested")


def test_missing_required_values_are_listed(tmp_path):
    from scail2.train import train

    cfg = compose_config([f"paths.output_root={tmp_path}", "experiment=pretrain_wan14b"])
    cfg.paths.run_dir = str(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"data\.cache_dir.*module\.init_from"):
        train(cfg)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_refuses_cpu_clearly(stage):
    from scail2.lit.strategies import deepspeed

    with pytest.raises(RuntimeError, match=rf"deepspeed_zero{stage} needs CUDA GPUs.*strategy=fsdp2"):
        deepspeed(stage=stage, accelerator="cpu")


def test_dpo_recipe():
    from scail2.lora import DEFAULT_TARGETS

    cfg = compose_config(["experiment=dpo_wan14b"])
    assert cfg.model.preset == "wan2.1-14b" and cfg.module._target_ == "scail2.lit.dpo.DPOModule"
    assert cfg.module.lora.rank == 128 and cfg.module.lora.alpha is None  # scale alpha / r = 1, as released
    assert cfg.module.lora.target_modules == DEFAULT_TARGETS
    assert cfg.trainer.max_steps == 400 and cfg.objective._target_ == "scail2.objectives.dpo.DPOConfig"
    assert set(cfg.required) == {"data.cache_dir", "module.init_from"}
    assert cfg.module.frozen_dtype == "bfloat16" and cfg.trainer.precision == "bf16-mixed"
    demo = compose_config(["experiment=dpo_demo"])
    module = OmegaConf.to_container(demo.module, resolve=False)
    assert module["init_from"] == "${latest_export:demo}"  # resolved when the run starts
    assert module["heldout"]["cache_dir"] is None  # the data module's held-out set (data=synthetic_preference)


def test_latest_export_takes_the_newest_finished_demo_run_with_its_own_settings(tmp_path, capsys):
    import os

    from scail2.train import _report_init_from

    cfg = compose_config([f"paths.output_root={tmp_path}", "experiment=dpo_demo"])
    with pytest.raises(Exception, match=r"no exported model of a finished `experiment=demo` run.*scail2-train experiment=demo.*module\.init_from"):
        _ = cfg.module.init_from
    runs = tmp_path / "demo"
    good = [_fake_export(runs / name / "model", run_id=name) for name in ("2026-01-02_00-00-00", "2026-01-01_00-00-00")]
    for i, folder in enumerate(good):
        os.utime(folder / "training.json", (1e9 + i, 1e9 + i))
    # Newer, but not the demo's own settings / not finished / not a scail2-train export: never taken.
    bad = [
        _fake_export(runs / "profile" / "model", overrides=["experiment=demo", "debug=profile"], global_step=20, max_steps=20),
        _fake_export(runs / "short" / "model", overrides=["experiment=demo", "trainer.max_steps=50"], global_step=50, max_steps=50),
        _fake_export(runs / "stopped" / "model", global_step=700),
        _fake_export(runs / "failed" / "model", finished=False),
        _fake_export(runs / "resumed" / "model", overrides=["experiment=demo", "ckpt_path=last", "paths.output_root=/x"], run_id="resumed"),
    ]
    (runs / "legacy" / "model").mkdir(parents=True)
    (runs / "legacy" / "model" / "config.json").write_text("{}")
    for i, folder in enumerate(bad[:-1]):
        os.utime(folder / "training.json", (2e9 + i, 2e9 + i))
    os.utime(bad[-1] / "training.json", (1e9 + 5, 1e9 + 5))
    # The newest by the time it was written (run folder names from SLURM / torchrun ids do not sort by time);
    # neutral overrides (paths, resume) keep the demo's own settings.
    assert cfg.module.init_from == str(bad[-1])
    _report_init_from(cfg)
    assert f"-> {bad[-1]} (1500 steps, MLflow run resumed, experiment=demo, finished)" in capsys.readouterr().out
    os.utime(bad[-1] / "training.json", (1e9 - 5, 1e9 - 5))
    cfg = compose_config([f"paths.output_root={tmp_path}", "experiment=dpo_demo"])
    assert cfg.module.init_from == str(good[1])
    for folder in bad + good:
        (folder / "training.json").unlink()
    cfg = compose_config([f"paths.output_root={tmp_path}", "experiment=dpo_demo"])
    with pytest.raises(Exception) as info:
        _ = cfg.module.init_from
    text = str(info.value)
    assert "none of the 8 export(s) there qualifies" in text and "legacy/model: no training.json" in text


def test_export_problems_name_the_reason():
    from scail2.lit.export import export_problem

    ok = {"experiment": "demo", "overrides": ["experiment=demo"], "global_step": 10, "max_steps": 10, "finished": True}
    assert export_problem(ok, "demo") is None
    assert export_problem({**ok, "overrides": ["debug=profile"]}, "demo") == "run with other settings: debug=profile"
    assert export_problem({**ok, "global_step": 4}, "demo") == "stopped at step 4 of 10"
    assert export_problem({**ok, "finished": False}, "demo").startswith("the run did not finish")
    assert export_problem({**ok, "fast_dev_run": True}, "demo") == "a fast_dev_run"
    assert export_problem({**ok, "experiment": "dpo_demo"}, "demo") == "a run of experiment=dpo_demo, not demo"
    assert export_problem({**ok, "overrides": None}, "demo").startswith("its overrides are unknown")


def test_dpo_config_is_checked():
    from scail2.objectives.dpo import DPOConfig
    from scail2.objectives.flow_matching import FlowMatchingConfig

    assert DPOConfig(sigma={"logit_std": 2.0}).sigma == FlowMatchingConfig(logit_std=2.0)
    with pytest.raises(ValueError, match="beta is -1"):
        DPOConfig(beta=-1)
    with pytest.raises(Exception, match="heldout.drawz"):
        compose_config(["experiment=dpo_demo", "module.heldout.drawz=3"])


def test_hardware_option_feeds_the_callbacks_and_the_loaders():
    """An experiment chooses its machines once; the throughput monitor and the data loader read them."""
    cpu = compose_config(["data=cache"])
    assert cpu.callbacks.throughput.peak_flops is None and cpu.data.num_workers == 2 and cpu.data.pin_memory is False
    h100 = compose_config(["experiment=pretrain_wan14b"])
    assert h100.callbacks.throughput.peak_flops == 989e12
    assert (h100.data.num_workers, h100.data.pin_memory, h100.data.persistent_workers) == (8, True, True)
    a100 = compose_config(["experiment=pretrain_wan14b", "hardware=a100", "hardware.loader_workers=4"])
    assert a100.callbacks.throughput.peak_flops == 312e12 and a100.data.num_workers == 4
    with pytest.raises(Exception, match="hardware.nope"):
        compose_config(["hardware.nope=1"])


def test_model_node_is_the_transformer_config():
    """The model group builds a TransformerConfig (preset + overrides); unset fields keep the preset's values."""
    from scail2.models.config import TransformerConfig, scail2_config

    cfg = compose_config(["model=tiny", "model.num_layers=3"])
    built = instantiate(cfg.model, "model")
    assert isinstance(built, TransformerConfig)
    assert built == scail2_config("tiny", num_layers=3)
    assert set(cfg.model) - {"_target_", "preset"} == {f.name for f in dataclasses.fields(TransformerConfig)}
    with pytest.raises(Exception, match="model.nope"):
        compose_config(["model.nope=1"])


def test_schemas_come_from_the_targets_the_files_name(tmp_path):
    """A new option needs no registry entry: its defaults name the target, whose signature is the schema."""
    from scail2.config.schema import schema_uses

    uses = schema_uses((config_dir(), experiments_dir()))
    assert uses["scail2.lit.optim.warmup_cosine"].partial and not uses["scail2.lit.dpo.DPOModule"].partial
    assert "scail2.models.config.scail2_config" in uses
    (tmp_path / "bad.yaml").write_text(
        "defaults:\n  - /schema@_here_: scail2.lit.callbacks.ThroughputMonitor\n_target_: scail2.lit.callbacks.DataSkipMonitor\n"
    )
    with pytest.raises(ValueError, match="DataSkipMonitor but pulls in the schema of scail2.lit.callbacks.ThroughputMonitor"):
        schema_uses((tmp_path,))


def test_dpo_module_lists_the_base_parameters():
    """No **kwargs: DPOModule's signature is the schema, with the base's parameters and defaults (validation off)."""
    from scail2.lit.base import SCAIL2Module
    from scail2.lit.dpo import DPOModule

    base = inspect.signature(SCAIL2Module).parameters
    own = inspect.signature(DPOModule).parameters
    assert not any(p.kind is p.VAR_KEYWORD for p in own.values())
    assert set(base) <= set(own)
    assert {n for n in base if base[n].default != own[n].default} == {"validation"} and own["validation"].default is None
    module = compose_config(["objective=dpo", "data=synthetic_preference"]).module
    assert {"lora", "heldout", "frozen_dtype", "init_from", "max_loss"} <= set(module) and "net" not in module
