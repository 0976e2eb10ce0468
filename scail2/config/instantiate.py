"""Safe instantiation of ``_target_`` config nodes.

A config file can name any importable callable in ``_target_``, and importing a module runs its code; so before
anything is imported every ``_target_`` in the tree is checked against an allow-list of exact names: the
callables the shipped configs build (`SHIPPED_TARGETS`) and those a user's own installed package registers
(`registered_targets`). Every key of a node is checked against the target's signature. A bad node fails before
any object is built, with the config path, the target and the fix in the message.

What is checked is what is built: `instantiate` resolves the node's interpolations first and builds that
resolved copy, so an interpolation cannot smuggle in a target the check did not see.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import re
import sys
from collections.abc import Collection, Iterator
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

# The callables that the shipped configs (conf/, experiments/ and the schemas of scail2.config.schema) name:
# those of scail2-train and scail2-bench, and the component classes that the components files of scail2-data
# (conf/components/<command>/) name. Nothing else is built from a config unless a package registers it
# (`REGISTRATION_GROUP`). A prefix rule ("anything under torch.") admitted callables that run shell commands,
# unpickle or write files.
SHIPPED_TARGETS: frozenset[str] = frozenset(
    {
        "lightning.pytorch.Trainer",
        "lightning.pytorch.callbacks.EMAWeightAveraging",
        "lightning.pytorch.loggers.MLFlowLogger",
        "torch.optim.AdamW",
        "scail2.data.datamodule.MotionDataModule",
        "scail2.preference.datamodule.PreferenceDataModule",
        "scail2.lit.benchmark.MotionBenchmark",
        "scail2.lit.callbacks.DataSkipMonitor",
        "scail2.lit.callbacks.ThroughputMonitor",
        "scail2.lit.callbacks.progress_bar",
        "scail2.lit.checkpoint.PeriodicCheckpoint",
        "scail2.lit.data.SyntheticDataModule",
        "scail2.lit.data.SyntheticPreferenceDataModule",
        "scail2.lit.dpo.DPOModule",
        "scail2.lit.heldout.HeldOutHands",
        "scail2.lit.optim.warmup_cosine",
        "scail2.lit.pretrain.PretrainModule",
        "scail2.lit.strategies.DDPStrategy",
        "scail2.lit.strategies.FSDP2Strategy",
        "scail2.lit.strategies.deepspeed",
        "scail2.lit.strategies.single_device",
        "scail2.models.config.scail2_config",
        "scail2.objectives.dpo.DPOConfig",
        "scail2.objectives.flow_matching.FlowMatchingConfig",
        # components of scail2-data prepare / motionpair / preference (conf/components/)
        "scail2.data.engine.adapters.AnimatorGenerator",
        "scail2.data.engine.adapters.CommandAnimator",
        "scail2.data.engine.adapters.CommandKeypoints",
        "scail2.data.engine.adapters.CommandOCR",
        "scail2.data.engine.adapters.CommandReplacer",
        "scail2.data.engine.adapters.CommandSegmenter",
        "scail2.data.engine.adapters.HTTPKeypoints",
        "scail2.data.engine.adapters.HTTPSegmenter",
        "scail2.data.engine.adapters.ImageFolderPool",
        "scail2.data.engine.adapters.ImageFolderReferences",
        "scail2.data.engine.adapters.PipelineAnimator",
        "scail2.data.engine.endpoints.OpenAIChatClient",
        "scail2.data.engine.endpoints.OpenAIImageClient",
        "scail2.data.engine.standins.SyntheticAnimator",
        "scail2.data.engine.standins.SyntheticCaptioner",
        "scail2.data.engine.standins.SyntheticKeypoints",
        "scail2.data.engine.standins.SyntheticReplacer",
        "scail2.data.engine.standins.SyntheticSegmenter",
        "scail2.data.engine.vlm.EndpointImageGenerator",
        "scail2.data.engine.vlm.VLMCandidateSelector",
        "scail2.data.engine.vlm.VLMCaptioner",
        "scail2.data.engine.vlm.VLMPromptWeaver",
        "scail2.data.engine.vlm.VLMQualityChecker",
        "scail2.data.engine.vlm.VLMVideoFilter",
        "scail2.preference.builder.MinHandDifference",
        "scail2.preference.components.NoisyPoses",
        "scail2.preference.components.SyntheticPoses",
        "scail2.preference.components.SyntheticReferences",
        "scail2.preference.components.SyntheticRenderer",
    }
)
# Entry-point group through which an installed package registers its own classes as config targets, e.g. in
# its pyproject.toml:  [project.entry-points."scail2.config_targets"]  my_callback = "mylab.callbacks:MyCallback"
REGISTRATION_GROUP = "scail2.config_targets"
# Keys Hydra's `instantiate` reads itself; they are not arguments of the target.
HYDRA_KEYS: frozenset[str] = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})
# Hydra keys whose values are flags, not nodes that can hold further targets.
_FLAG_KEYS: frozenset[str] = frozenset({"_target_", "_partial_", "_recursive_", "_convert_"})


class ConfigError(ValueError):
    """A config that cannot be built as written; the message names the config path and the fix."""


class UnsafeTargetError(ConfigError):
    """A ``_target_`` that is neither shipped nor registered by an installed package."""


def registered_targets() -> dict[str, str]:
    """Targets registered by installed packages (entry points of `REGISTRATION_GROUP`): name -> distribution.

    A package may register only callables of its own top-level package: not the standard library's, not
    scail2's, not another installed distribution's (``os:system`` or ``torch.utils.collect_env:run``
    registered by some package are refused with an error naming the package).
    """
    eps = importlib.metadata.entry_points(group=REGISTRATION_GROUP)
    if not eps:
        return {}
    owners = importlib.metadata.packages_distributions()
    out: dict[str, str] = {}
    for ep in eps:
        dist = ep.dist.name if ep.dist is not None else "<unknown>"
        module, _, attr = ep.value.partition(":")
        module, attr = module.strip(), attr.strip()
        if not module or not attr or "[" in attr:
            raise UnsafeTargetError(
                f"package {dist} registers config target {ep.name} = {ep.value!r}; write it as 'package.module:Class'"
            )
        top = module.split(".")[0]
        others = [d for d in owners.get(top, []) if _canonical(d) != _canonical(dist)]
        if top == "scail2" or top in sys.stdlib_module_names or top in sys.builtin_module_names or others:
            owner = "scail2" if top == "scail2" else ("the standard library" if not others else others[0])
            raise UnsafeTargetError(
                f"package {dist} registers config target {ep.value!r}, which belongs to {owner}; a package may "
                f"register only classes of its own package ({REGISTRATION_GROUP} entry points)"
            )
        out[f"{module}.{attr}"] = dist
    return out


def _canonical(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def allowed_targets() -> frozenset[str]:
    """`SHIPPED_TARGETS` and the registered targets of installed packages."""
    return SHIPPED_TARGETS | frozenset(registered_targets())


def _resolved(container: Any, key: Any, path: str) -> Any:
    """``container[key]`` with its interpolation resolved (errors name the config path)."""
    try:
        return container[key]
    except Exception as exc:  # noqa: BLE001 - any resolver error: the node cannot be checked
        raise ConfigError(f"config `{path}`: its interpolation cannot be resolved ({exc})") from None


def iter_target_nodes(cfg: Any, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    """Every node with a ``_target_`` key in ``cfg`` (depth first), with its dotted config path.

    Interpolations are resolved, so that a target an interpolation produces is walked too; Hydra's list of
    positional arguments (``_args_``) is walked like any other value (Hydra builds the targets it holds).
    """
    if isinstance(cfg, (DictConfig, ListConfig)) and (cfg._is_none() or cfg._is_missing()):
        return
    if isinstance(cfg, DictConfig):
        if "_target_" in cfg:
            yield path or "<root>", cfg
        for key in cfg.keys():
            if key in _FLAG_KEYS:
                continue
            where = f"{path}.{key}" if path else str(key)
            node = cfg._get_node(key)
            yield from iter_target_nodes(_resolved(cfg, key, where) if node._is_interpolation() else node, where)
    elif isinstance(cfg, ListConfig):
        for i in range(len(cfg)):
            node = cfg._get_node(i)
            where = f"{path}[{i}]"
            yield from iter_target_nodes(_resolved(cfg, i, where) if node._is_interpolation() else node, where)


def check_target_name(target: Any, path: str, allowed: Collection[str] | None = None) -> str:
    """Refuse a ``_target_`` that is not one of ``allowed`` (default: `allowed_targets`); return it."""
    allowed = allowed_targets() if allowed is None else allowed
    if not isinstance(target, str):
        raise UnsafeTargetError(
            f"config `{path}._target_` is a {type(target).__name__}, not a dotted name; name one of the "
            "targets the shipped configs use (scail2.config.SHIPPED_TARGETS)"
        )
    if target not in allowed:
        close = difflib.get_close_matches(target, sorted(allowed), n=1, cutoff=0.8)
        hint = f"did you mean `{close[0]}`? " if close else ""
        raise UnsafeTargetError(
            f"config `{path}._target_: {target}` is not allowed: a config may build only the callables the shipped "
            f"configs use (scail2.config.SHIPPED_TARGETS) and those an installed package registers as its own. "
            f"{hint}To build a class of your own package, register it (entry point group {REGISTRATION_GROUP}, "
            "see docs/training.md, 'Only known code is instantiated')"
        )
    return target


def locate(target: str, path: str) -> Any:
    """Import ``target`` (``package.module.attr[.attr...]``) after the name check; errors name the config path."""
    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not module_name.startswith(exc.name):
                raise  # a real missing dependency inside an existing module
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            raise ConfigError(f"config `{path}._target_: {target}`: `{module_name}` has no attribute path "
                              f"`{'.'.join(parts[split:])}`") from None
        return obj
    raise ConfigError(f"config `{path}._target_: {target}` cannot be imported; check the spelling")


def parameter_hints(target: Any) -> dict[str, Any]:
    """The resolved type hints of a callable's own parameters (a class: of its ``__init__``), and ``return``."""
    import typing

    fn = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable forward references: no hints
        return {}


def override_fields(target: Any) -> type | None:
    """The dataclass whose fields a factory's ``**overrides`` set, or None.

    A function that takes ``**overrides`` and returns a dataclass (``scail2_config(preset, **overrides) ->
    TransformerConfig``) accepts that dataclass's fields as keywords: the dataclass is its schema.
    """
    import dataclasses

    if inspect.isclass(target):
        return None
    returned = parameter_hints(target).get("return")
    if isinstance(returned, type) and dataclasses.is_dataclass(returned):
        return returned
    return None


def signature_parameters(target: Any) -> tuple[dict[str, inspect.Parameter], bool]:
    """Named parameters of a callable (a class: of its ``__init__``) and whether it takes any other keyword.

    The signature is read as written: a class lists the parameters it accepts (no guessing of what ``**kwargs``
    forwards). A factory whose ``**overrides`` are the fields of the dataclass it returns (`override_fields`)
    takes those fields as keyword parameters (default None: not overridden).
    """
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):  # builtins without a signature: nothing to check
        return {}, True
    params = {n: p for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    open_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    fields_of = override_fields(target) if open_kwargs else None
    if fields_of is not None:
        import dataclasses

        for f in dataclasses.fields(fields_of):
            params.setdefault(f.name, inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None))
        open_kwargs = False
    return params, open_kwargs


def _parameters(target: Any) -> tuple[dict[str, inspect.Parameter], bool]:
    return signature_parameters(target)


def check_keys(node: DictConfig, target: Any, path: str) -> None:
    """Refuse keys of ``node`` that are not parameters of ``target`` (typos), naming the closest ones."""
    params, open_kwargs = _parameters(target)
    if open_kwargs:
        return
    for key in node.keys():
        if key in HYDRA_KEYS or key in params:
            continue
        close = difflib.get_close_matches(str(key), list(params), n=1)
        hint = f"did you mean `{close[0]}`? " if close else ""
        raise ConfigError(
            f"config `{path}.{key}`: {node['_target_']} has no parameter `{key}`; {hint}"
            f"its parameters are {sorted(params)}"
        )


def validate_targets(cfg: DictConfig, allowed: Collection[str] | None = None, path: str = "") -> int:
    """Check every ``_target_`` node of ``cfg``: an allowed name, importable, keys known. Returns the count.

    Names are checked for the whole tree before anything is imported, so a refused target never runs.
    ``allowed``: the admitted names (default: `allowed_targets`). ``path``: where ``cfg`` sits in the full
    config (for messages).
    """
    allowed = allowed_targets() if allowed is None else allowed
    nodes = list(iter_target_nodes(cfg, path))
    for where, node in nodes:
        check_target_name(node["_target_"], where, allowed)
    for where, node in nodes:
        target = locate(node["_target_"], where)
        check_keys(node, target, where)
    return len(nodes)


def instantiate(node: Any, path: str, /, **kwargs: Any) -> Any:
    """Build ``node`` (a ``_target_`` config) after checking it; ``kwargs`` add or replace arguments.

    The node is resolved first and the resolved copy is both checked and built (what is checked is what is
    built). Nested ``_target_`` nodes are built too; containers reach the target as plain ``dict``/``list``.
    Returns None for a None node.
    """
    from hydra.utils import instantiate as hydra_instantiate

    if node is None:
        return None
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"config `{path}` has no `_target_`; it cannot be instantiated")
    try:
        plain = OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
    except Exception as exc:  # noqa: BLE001 - a resolver's own error
        raise ConfigError(f"config `{path}`: cannot resolve its interpolations ({exc})") from None
    resolved = OmegaConf.create(literal_strings(plain))
    validate_targets(resolved, path=path)
    for name in kwargs:
        params, open_kwargs = _parameters(locate(resolved["_target_"], path))
        if name not in params and not open_kwargs:
            raise ConfigError(f"{resolved['_target_']} (config `{path}`) takes no argument `{name}`")
    from hydra.errors import InstantiationException

    # Hydra resolves the node it is given in place and then reads it resolved: a string escaped once would be
    # read as an interpolation the second time, so the built copy escapes twice (it reads as `resolved`).
    built = OmegaConf.create(literal_strings(literal_strings(plain)))
    try:
        return hydra_instantiate(built, _convert_="all", **kwargs)
    except InstantiationException as exc:
        # Hydra wraps the target's own error; surface that message with the config path it came from.
        cause = exc.__cause__
        if cause is None or isinstance(cause, InstantiationException):
            raise
        raise ConfigError(f"config `{path}` ({resolved['_target_']}): {type(cause).__name__}: {cause}") from cause


def literal_strings(value: Any) -> Any:
    """Plain config data (dicts, lists, scalars) with every ``${`` in its strings escaped, so that a config node
    made from it holds those strings as they are: resolved values (an escaped ``\\${``, an environment variable
    holding ``${``) made into a node again must not be read as interpolations a second time."""
    if isinstance(value, str):
        # k literal backslashes before ${ are written as 2k (each escaped), then the ${ itself is escaped.
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value) if "${" in value else value
    if isinstance(value, dict):
        return {k: literal_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [literal_strings(v) for v in value]
    return value


def to_container(cfg: Any) -> Any:
    """A resolved plain-Python copy of a config (dicts, lists, scalars), e.g. for logging or checkpoints."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    return cfg
