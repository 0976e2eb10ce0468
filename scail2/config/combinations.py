"""Combinations of group options that compose but cannot train together, refused before anything is built.

Every experiment composes with every option of every group (an experiment's settings for one option live in
``experiments/<name>/<group>/<option>.yaml`` and are dropped with another option). Some combinations still make
no sense: a pretraining objective on preference pairs, DPO's LoRA on a sharded backbone, weight averaging under
a sharded strategy, one device with several devices asked for. `check_combination` names the combination, why it
cannot run and what to choose instead, reading the composed config's targets (so it holds for configs built in
Python too).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from scail2.config.instantiate import ConfigError, locate

_SHARDED_STRATEGIES = ("scail2.lit.strategies.FSDP2Strategy", "scail2.lit.strategies.deepspeed")


def _choices() -> dict[str, Any]:
    """The option chosen for each group, when a Hydra composition is installed (else empty)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return dict(HydraConfig.get().runtime.choices)


def _describe(group: str, target: str, choices: dict[str, Any]) -> str:
    option = choices.get(group)
    return f"{group}={option} ({target})" if option is not None else f"{group} {target}"


def _is_subclass(target: str, path: str, base: type) -> bool:
    found = locate(target, path)
    return isinstance(found, type) and issubclass(found, base)


def check_combination(cfg: DictConfig) -> None:
    """Raise `ConfigError` for a combination of options that cannot train together (see the module docstring)."""
    from scail2.preference.datamodule import PreferenceDataModule
    from scail2.lit.dpo import DPOModule

    choices = _choices()
    experiment = choices.get("experiment")
    where = f" (experiment={experiment})" if experiment else ""
    module, data, strategy = cfg.module._target_, cfg.data._target_, cfg.strategy._target_
    dpo = _is_subclass(module, "module", DPOModule)
    preference = _is_subclass(data, "data", PreferenceDataModule)
    if dpo and not preference:
        raise ConfigError(
            f"unsupported combination{where}: {_describe('objective', module, choices)} trains on preference "
            f"pairs, but {_describe('data', data, choices)} gives motion pairs; choose data=preference or "
            "data=synthetic_preference, or objective=flow_matching"
        )
    if preference and not dpo:
        raise ConfigError(
            f"unsupported combination{where}: {_describe('data', data, choices)} gives preference pairs, which "
            f"only objective=dpo trains on, but the objective is {_describe('objective', module, choices)}; "
            "choose objective=dpo, or data=synthetic, data=cache or data=manifest"
        )
    if dpo and strategy == _SHARDED_STRATEGIES[0]:
        raise ConfigError(
            f"unsupported combination{where}: objective=dpo with {_describe('strategy', strategy, choices)}: DPO "
            "with LoRA keeps the frozen backbone whole on every device (it is not sharded); choose strategy=ddp "
            "or strategy=single"
        )
    if strategy in _SHARDED_STRATEGIES:
        for name, node in cfg.callbacks.items():
            target = node.get("_target_") if isinstance(node, DictConfig) else None
            if target is not None and target.endswith("WeightAveraging"):
                raise ConfigError(
                    f"unsupported combination{where}: callbacks.{name} ({target}) keeps a full unsharded copy of "
                    f"the weights, which {_describe('strategy', strategy, choices)} does not hold; choose "
                    "strategy=single or strategy=ddp, or callbacks=default"
                )
    if strategy == "scail2.lit.strategies.single_device":
        devices, nodes = cfg.trainer.devices, cfg.trainer.num_nodes
        if devices not in (1, "1", "auto") or nodes != 1:
            raise ConfigError(
                f"unsupported combination{where}: {_describe('strategy', strategy, choices)} runs one process on "
                f"one device, but trainer.devices={devices} and trainer.num_nodes={nodes}; set trainer.devices=1 "
                "trainer.num_nodes=1, or choose strategy=ddp or strategy=fsdp2"
            )
