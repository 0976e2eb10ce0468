"""Checks of a ``scail2-train`` command line and of a composed config, before anything is built or written.

- `prepare_command_line`: Hydra's own settings can name code too (``hydra.callbacks`` are built by Hydra
  before the run starts, ``hydra.job_logging`` handlers name classes, ``hydra.searchpath`` adds config
  sources, ``--experimental-rerun`` unpickles a file), so an override of a ``hydra`` key is refused unless it
  is one of `SAFE_HYDRA_OVERRIDES`; a ``run_name`` that is not a plain folder name is refused before Hydra
  creates its run folder; a value with ``=`` in it (``ckpt_path=.../step=0000500.ckpt``), which Hydra's
  grammar cannot read unquoted, is quoted for it.
- `check_config`: every key is known (``+foo=1`` is refused like a typo), ``run_name`` is a plain folder name,
  and numbers are in range (`check_values`): the error names the key, the value and what is allowed.
- `inside_root`: a path given in the config must lie inside ``paths.output_root``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from scail2.config.instantiate import ConfigError

# Overrides of Hydra's settings that name no code and add no config source. Launcher and sweeper options are
# chosen by name (Hydra admits only its plugins); their settings belong in a config file.
SAFE_HYDRA_OVERRIDES: tuple[str, ...] = (
    "hydra.run.dir",
    "hydra.sweep.dir",
    "hydra.sweep.subdir",
    "hydra.job.chdir",
    "hydra.job.name",
    "hydra.output_subdir",
    "hydra.verbose",
    "hydra.mode",
    "hydra/job_logging",
    "hydra/hydra_logging",
    "hydra/launcher",
    "hydra/sweeper",
)
# Hydra command-line flags that load code or pickles.
REFUSED_FLAGS: tuple[str, ...] = ("--experimental-rerun",)
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SEED_RANGE = (0, 2**32 - 1)  # what Lightning's seed_everything and NumPy accept
# Characters with a meaning in Hydra's override grammar; a value holding one is never quoted automatically.
_GRAMMAR = set(",[]{}()'\"\\$ \t:*?")


# ------------------------------------------------------------------------------------------------ command line
def check_run_name(name: Any, key: str = "run_name") -> str:
    """A run name is one plain folder name (it names ``<output_root>/<run_name>`` and the MLflow experiment)."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or set(name) == {"."}:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._") or "train"
        raise ConfigError(
            f"{key}={name!r} is not a plain folder name: it may hold letters, digits, '.', '_' and '-' (at most "
            f"128, starting with a letter or digit), so that runs stay inside paths.output_root; e.g. {key}={safe}"
        )
    return name


def _hydra_key(key: str) -> bool:
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def prepare_command_line(argv: Sequence[str]) -> list[str]:
    """``argv`` of ``scail2-train`` checked, with values holding ``=`` quoted for Hydra; raises `ConfigError`."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    args = list(argv)
    for flag in REFUSED_FLAGS:
        if any(a == flag or a.startswith(f"{flag}=") for a in args):
            raise ConfigError(
                f"{flag} is refused: it unpickles a saved config, and unpickling runs code; rerun with the "
                "overrides of that run (its .hydra/overrides.yaml)"
            )
    parsed, unknown = get_args_parser().parse_known_args(args)
    overrides = [*parsed.overrides, *[u for u in unknown if not u.startswith("-")]]
    parser = OverridesParser.create()
    out = list(args)
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except OverrideParseException as exc:
            quoted = _quoted(text)
            if quoted is None:
                raise ConfigError(
                    f"cannot read the override {text!r} ({str(exc).strip().splitlines()[0]}); a value holding '=', "
                    "spaces or quotes must be quoted for Hydra, e.g. \"ckpt_path='outputs/demo/RUN/checkpoints/"
                    "step=0000500.ckpt'\" (the double quotes are for the shell)"
                ) from None
            out[out.index(text)] = quoted
            (override,) = parser.parse_overrides([quoted])
        key = override.key_or_group
        package = override.package or ""
        if (_hydra_key(key) and key not in SAFE_HYDRA_OVERRIDES) or _hydra_key(package):
            raise ConfigError(
                f"the override {text!r} changes Hydra's own settings, which can name code that runs before "
                f"training (hydra.callbacks, logging handlers) or add config sources; only {list(SAFE_HYDRA_OVERRIDES)} "
                "can be overridden on the command line (set other Hydra settings in a config file of your own)"
            )
        if key == "run_name" and not override.is_sweep_override() and not override.is_delete():
            check_run_name(override.value())
        elif key == "run_name" and override.is_sweep_override():
            for value in override.sweep_string_iterator():
                check_run_name(value)
    return out


def _quoted(text: str) -> str | None:
    """``key='value'`` for an override ``key=value`` whose value holds '=' and nothing else Hydra reads, else None."""
    key, sep, value = text.partition("=")
    if not sep or "=" not in value or not re.fullmatch(r"[+~]{0,2}[A-Za-z_][\w.@/-]*", key) or set(value) & _GRAMMAR:
        return None
    return f"{key}='{value}'"


def check_hydra_node(node: Any, where: str) -> None:
    """Refuse Hydra settings in a config file (an experiment) beyond those `SAFE_HYDRA_OVERRIDES` names."""
    if not isinstance(node, (Mapping, DictConfig)) or "hydra" not in node:
        return
    allowed = {k for k in SAFE_HYDRA_OVERRIDES if k.startswith("hydra.")}

    def walk(value: Any, path: str) -> None:
        if path in allowed:
            return
        if isinstance(value, (Mapping, DictConfig)) and any(a.startswith(path + ".") for a in allowed):
            for k in value:
                walk(value[k] if not isinstance(value, DictConfig) else value._get_node(k), f"{path}.{k}")
            return
        raise ConfigError(
            f"{where} sets `{path}`: Hydra settings in experiment files are limited to "
            f"{sorted(allowed)} (other Hydra settings can name code that runs before training)"
        )

    walk(node["hydra"] if not isinstance(node, DictConfig) else node._get_node("hydra"), "hydra")


# ------------------------------------------------------------------------------------------------ config
def check_config(cfg: DictConfig) -> None:
    """Known keys, a plain ``run_name``, numbers in range and readable weights to start from; raises
    `ConfigError` naming key, value and fix."""
    check_run_name(cfg.run_name)
    check_known_keys(cfg)
    check_values(cfg)
    init_from = OmegaConf.select(cfg, "module.init_from", default=None)
    if isinstance(init_from, str):
        check_weights(init_from, "module.init_from")


def check_weights(path: str | Path, key: str) -> None:
    """Weights to load exist, and every safetensors file among them is complete (its header and size agree:
    only the header is read), so a truncated download fails here and not after the data is prepared."""
    from safetensors import SafetensorError, safe_open

    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{key}={path} does not exist; give a checkpoint file or folder")
    files = sorted(p.rglob("*.safetensors")) if p.is_dir() else [p] if p.suffix == ".safetensors" else []
    for f in files:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ConfigError(
                f"{key}={path}: {f} is not a complete safetensors file ({exc}); copy it again (a truncated download)"
            ) from None


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def check_known_keys(cfg: DictConfig) -> None:
    """Keys added with ``+`` outside any target's parameters (the root, ``paths``, ``export``, ``optim``,
    ``callbacks`` entries, dataclass-valued parameters such as ``module.validation``) are refused like typos.
    (Keys of ``_target_`` nodes are checked against their target's signature by `validate_targets`.)"""
    from scail2.config.schema import ExportConfig, PathsConfig, TrainConfig

    _unknown(cfg, _fields(TrainConfig), "")
    _unknown(cfg.paths, _fields(PathsConfig), "paths")
    _unknown(cfg.export, _fields(ExportConfig), "export")
    if isinstance(cfg.optim, DictConfig):
        _unknown(cfg.optim, {"optimizer", "scheduler"}, "optim")
    for name in cfg.callbacks:
        node = cfg.callbacks._get_node(name)
        if not node._is_none() and not isinstance(node, DictConfig):
            raise ConfigError(
                f"config `callbacks.{name}` is {cfg.callbacks[name]!r}; a callback is a node with a `_target_` "
                "(or null to drop it)"
            )
    from scail2.config.instantiate import iter_target_nodes, locate

    for path, node in iter_target_nodes(cfg):
        try:
            target = locate(node["_target_"], path)
        except Exception:  # noqa: BLE001 - refused or unimportable targets are reported by validate_targets
            continue
        _dataclass_params(node, target, path)


def refuse_unknown_keys(node: Any, known: Any, path: str = "") -> None:
    """Refuse a key of ``node`` that is not in ``known`` (a set of names, or a structured schema node whose
    nested nodes are checked too), naming the key, the closest known one and all of them.

    OmegaConf's struct mode refuses a misspelt key at composition; a key added with ``+`` gets past it (and
    `OmegaConf.to_object` would drop it silently), so both entry points check the composed tree again.
    """
    if not isinstance(node, DictConfig):
        return
    import difflib

    schema = known if isinstance(known, DictConfig) else None
    names = set(schema.keys()) if schema is not None else set(known)  # `in` alone treats ??? values as absent
    for key in node.keys():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f"did you mean `{close[0]}`? " if close else ""
            raise ConfigError(
                f"config `{where}` is not a known key; {hint}the keys there are {sorted(names)} (a key added with "
                "`+` must be one the schema or the target's parameters have)"
            )
        if schema is not None:
            sub = schema._get_node(key)
            if isinstance(sub, DictConfig) and not sub._is_none():
                refuse_unknown_keys(node._get_node(key), sub, where)


_unknown = refuse_unknown_keys


def _dataclass_type(annotation: Any, default: Any) -> type | None:
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        return type(default)
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def _dataclass_params(node: DictConfig, target: Any, path: str) -> None:
    """Keys of dataclass-valued parameters (``module.validation``, ``module.lora``, ...) are that dataclass's
    fields, at every depth."""
    from scail2.config.instantiate import parameter_hints, signature_parameters

    params, _ = signature_parameters(target)
    hints = parameter_hints(target)
    for name, p in params.items():
        if name not in node:
            continue
        cls = _dataclass_type(hints.get(name), p.default)
        if cls is not None:
            _check_dataclass_node(node._get_node(name), cls, f"{path}.{name}")


def _check_dataclass_node(node: Any, cls: type, path: str) -> None:
    if not isinstance(node, DictConfig) or node._is_none() or node._is_missing() or node._is_interpolation():
        return
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _unknown(node, set(fields), path)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001
        hints = {}
    for name, f in fields.items():
        default = f.default if f.default is not dataclasses.MISSING else None
        sub = _dataclass_type(hints.get(name), default)
        if sub is not None and name in node:
            _check_dataclass_node(node._get_node(name), sub, f"{path}.{name}")


# ------------------------------------------------------------------------------------------------ values
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bad(key: str, value: Any, allowed: str, example: str) -> ConfigError:
    shown = repr(value) if isinstance(value, str) else value
    kind = "" if _is_number(value) or value is None else f" (a {type(value).__name__})"
    return ConfigError(f"config `{key}` is {shown}{kind}; need {allowed}, e.g. {key}={example}")


def _number(cfg: Any, key: str, low: float, high: float = math.inf, *, low_open: bool = False,
            integer: bool = False, optional: bool = False, example: str = "1") -> None:
    value = OmegaConf.select(cfg, key, default="<absent>", throw_on_missing=False)
    if value == "<absent>" or (value is None and optional):
        return
    kind = "an integer" if integer else "a number"
    bound = f"> {low:g}" if low_open else f">= {low:g}"
    allowed = f"{kind} {bound}" + (f" and <= {high:g}" if high < math.inf else "") + (" (or null)" if optional else "")
    ok = _is_number(value) and math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if integer and ok:
        ok = isinstance(value, int) or float(value).is_integer()
    if not ok:
        raise _bad(key, value, allowed, example)


def _walk(node: Any, path: str = ""):
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, node


def check_values(cfg: DictConfig) -> None:
    """Refuse impossible values before anything is built: every number finite, seeds in [0, 2**32 - 1],
    frame rates > 0, and the ranges of the recipe's keys (learning rate, clipping, batch size, steps, ...)."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception as exc:  # noqa: BLE001 - a resolver's own error (e.g. ${latest_export:...} finding nothing)
        raise ConfigError(f"the config cannot be resolved: {exc}") from None
    for key, value in _walk(plain):
        name = key.rsplit(".", 1)[-1]
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config `{key}` is {value}; every number in a config must be finite")
        if name == "seed" or name.endswith("_seed"):
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                          and SEED_RANGE[0] <= value <= SEED_RANGE[1]):
                raise _bad(key, value, f"an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]", "0")
        if name == "fps" and value is not None and not (_is_number(value) and value > 0):
            raise _bad(key, value, "a frame rate > 0", "16")
        if name == "batch_size" and value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise _bad(key, value, "an integer >= 1 (samples per rank and step)", "2")
    _number(cfg, "optim.optimizer.lr", 0, low_open=True, example="1e-5")
    _number(cfg, "optim.optimizer.weight_decay", 0, example="1e-4")
    _number(cfg, "optim.optimizer.eps", 0, low_open=True, example="1e-8")
    betas = OmegaConf.select(cfg, "optim.optimizer.betas", default=None)
    if betas is not None:
        if not (isinstance(betas, (ListConfig, list)) and len(betas) == 2):
            raise _bad("optim.optimizer.betas", betas, "two numbers in [0, 1)", "[0.9,0.95]")
        for i in range(2):
            _number(cfg, f"optim.optimizer.betas[{i}]", 0, 1 - 1e-12, example="0.9")
    _number(cfg, "trainer.gradient_clip_val", 0, optional=True, example="0.1 (or null for no clipping)")
    max_steps = OmegaConf.select(cfg, "trainer.max_steps", default=-1)
    if max_steps != -1:
        _number(cfg, "trainer.max_steps", 1, integer=True, example="1000 (or -1 to let max_epochs decide)")
    _number(cfg, "trainer.accumulate_grad_batches", 1, integer=True, example="1")
    _number(cfg, "trainer.log_every_n_steps", 1, integer=True, example="10")
    _number(cfg, "data.num_workers", 0, integer=True, example="0")
    _number(cfg, "module.max_loss", 0, low_open=True, optional=True, example="100")
    _number(cfg, "optim.scheduler.total_steps", 1, integer=True, example="${trainer.max_steps}")
    _number(cfg, "optim.scheduler.min_lr_ratio", 0, 1, example="0")
    total = OmegaConf.select(cfg, "optim.scheduler.total_steps", default=None)
    if total is not None:
        _number(cfg, "optim.scheduler.warmup_steps", 0, total - 1, integer=True, example=str(min(100, total // 10)))
    _number(cfg, "module.validation.guidance_scale", 1, example="1")
    _number(cfg, "module.validation.shift", 0, low_open=True, example="3")


def inside_root(path: str | Path, root: str | Path, key: str) -> Path:
    """``path`` (absolute, ``..`` collapsed) when it lies inside ``root``; else a `ConfigError` naming ``key``.

    Inside means: below ``root`` as written (a link there may point to another disk, as checkpoint folders on
    scratch storage do), or below ``root``'s real location.
    """
    given = Path(os.path.normpath(Path(path).expanduser().absolute()))
    base = Path(os.path.normpath(Path(root).expanduser().absolute()))

    def below(p: Path, b: Path) -> bool:
        return p == b or b in p.parents

    if not (below(given, base) or below(given.resolve(), base.resolve())):
        raise ConfigError(
            f"{key}={path} lies outside paths.output_root ({base}); give a checkpoint under it (ckpt_path=last "
            "finds the newest one of run_name), copy the checkpoint there, or set paths.output_root to the folder "
            "that holds it"
        )
    return given
