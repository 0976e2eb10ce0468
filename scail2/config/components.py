"""Components files: the models that ``scail2-data prepare``, ``motionpair`` and ``preference`` plug in, read and
built by the same config system as ``scail2-train``'s configs.

A components file maps each component name to a ``_target_`` node, ``{_target_: package.module.Class, **kwargs}``
(a target name alone is short for ``{_target_: name}``; nested ``_target_`` values are built first). It is a
preset, one of the files ``conf/components/<command>/<name>.yaml`` shipped with the package, a ``.yaml`` /
``.yml`` / ``.json`` file, or a mapping. Files are read with OmegaConf, interpolations resolved; a mapping is
taken as plain data (its strings are never read as interpolations).

Each component is built by `scail2.config.instantiate`, under its one allow-list of exact names: the targets the
shipped config files name (`SHIPPED_TARGETS`, the component classes among them, named by the files under
``conf/components/``) and the classes an installed package registers as its own (entry point group
``scail2.config_targets``). Every target of a component, nested ones included, is checked before anything is
imported, and its keys are checked against the target's signature.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from scail2.config.instantiate import ConfigError, instantiate, literal_strings
from scail2.config.schema import config_dir

# The folder of ``conf/`` that holds the components presets, one sub-folder per command.
COMPONENTS_GROUP = "components"
FILE_SUFFIXES = (".yaml", ".yml", ".json")


def components_dir(command: str) -> Path:
    """``conf/components/<command>/``: the presets of ``scail2-data <command>``."""
    return config_dir() / COMPONENTS_GROUP / command


def component_presets(command: str) -> list[str]:
    """The preset names of ``scail2-data <command>`` (the files of `components_dir`, without ``.yaml``)."""
    folder = components_dir(command)
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def read_components(config: str | Path | Mapping[str, Any], command: str) -> dict[str, Any]:
    """A components mapping (plain values, interpolations resolved) from a preset name of ``command``, a
    ``.yaml`` / ``.yml`` / ``.json`` file or a mapping. Nothing is imported or built here."""
    if isinstance(config, Mapping):
        # A mapping is data as it is (what a file gave, resolved): its strings are not read as interpolations.
        where = "mapping"
        try:
            node: Any = config if isinstance(config, DictConfig) else OmegaConf.create(literal_strings(dict(config)))
        except Exception as exc:  # noqa: BLE001 - a value OmegaConf cannot hold (an object, not config data)
            raise ConfigError(f"components mapping: {exc}") from None
    elif Path(str(config)).suffix in FILE_SUFFIXES:
        path = Path(str(config))
        where = f"file {path}"
        if not path.is_file():
            raise FileNotFoundError(f"components file {path} not found")
        node = _load(path)
    else:
        presets = component_presets(command)
        if str(config) not in presets:
            raise ValueError(
                f"unknown components preset {str(config)!r} for scail2-data {command}; use one of {presets} "
                f"(conf/{COMPONENTS_GROUP}/{command}/) or a YAML/JSON file"
            )
        path = components_dir(command) / f"{config}.yaml"
        where = f"preset {path}"
        node = _load(path)
    if not isinstance(node, DictConfig):
        raise ValueError(f"components {where} must hold a mapping of component name -> spec")
    try:
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    except Exception as exc:  # noqa: BLE001 - any resolver's own error
        raise ConfigError(f"components {where}: an interpolation cannot be resolved ({exc})") from None


def _load(path: Path) -> Any:
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            return OmegaConf.create(data) if isinstance(data, dict) else data
        return OmegaConf.load(path)
    except Exception as exc:  # noqa: BLE001 - the parser's own error, with its position
        raise ConfigError(f"components file {path} cannot be read: {exc}") from None


def build_component(spec: Any, path: str, protocol: type | None = None) -> Any:
    """Build the component ``spec`` (a target name or a ``_target_`` mapping) found at ``path`` of a components
    file, after checking it (`scail2.config.instantiate`); ``protocol``: the interface it must implement."""
    if isinstance(spec, str):
        spec = {"_target_": spec}
    if not isinstance(spec, Mapping) or "_target_" not in spec:
        raise ConfigError(
            f"config `{path}` is {spec!r}; give a target name or {{_target_: package.module.Class, ...}}"
        )
    obj = instantiate(OmegaConf.create(literal_strings(dict(spec))), path)
    if protocol is not None and not isinstance(obj, protocol):
        raise ConfigError(f"config `{path}`: {describe_component(spec)} does not implement {protocol.__name__}")
    return obj


def describe_component(spec: Any) -> str:
    """A short, stable text of a component spec (what outputs record as provenance): the target name, with its
    arguments when it has any; a name alone and ``{_target_: name}`` read the same."""
    if isinstance(spec, str):
        return spec
    if not isinstance(spec, Mapping) or "_target_" not in spec:
        return repr(spec)
    args = ", ".join(
        f"{k}={describe_component(v) if isinstance(v, Mapping) and '_target_' in v else repr(v)}"
        for k, v in sorted(spec.items())
        if k != "_target_"
    )
    return f"{spec['_target_']}({args})" if args else str(spec["_target_"])
