"""Configs of ``scail2-train``, ``scail2-bench`` and the components files of ``scail2-data``: structured schemas
(generated from the targets the config files name), their Hydra registration and composition, the checks, and
safe instantiation under one allow-list."""

from scail2.config.components import build_component, component_presets, describe_component, read_components
from scail2.config.instantiate import (
    REGISTRATION_GROUP,
    SHIPPED_TARGETS,
    ConfigError,
    UnsafeTargetError,
    allowed_targets,
    instantiate,
    registered_targets,
    to_container,
    validate_targets,
)
from scail2.config.schema import (
    ExportConfig,
    HardwareConfig,
    PathsConfig,
    TrainConfig,
    TrainerConfig,
    compose_config,
    config_dir,
    experiments_dir,
    register_configs,
    target_schema,
)

__all__ = [
    "REGISTRATION_GROUP",
    "SHIPPED_TARGETS",
    "ConfigError",
    "ExportConfig",
    "HardwareConfig",
    "PathsConfig",
    "TrainConfig",
    "TrainerConfig",
    "UnsafeTargetError",
    "allowed_targets",
    "build_component",
    "component_presets",
    "compose_config",
    "config_dir",
    "describe_component",
    "experiments_dir",
    "instantiate",
    "read_components",
    "register_configs",
    "registered_targets",
    "target_schema",
    "to_container",
    "validate_targets",
]
