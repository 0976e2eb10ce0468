"""Structured-config schemas of ``scail2-train`` and their registration with Hydra.

Two kinds of schema:

- Hand-written dataclasses for the parts of the tree that belong to the entry point (`TrainConfig`, `PathsConfig`,
  `TrainerConfig`, `ExportConfig`). Their field defaults are the defaults.
- Schemas generated from a target's signature (`target_schema`) for the ``_target_`` nodes built from scail2's
  own classes (the LightningModule, the network geometry, the objective, the data modules, the schedule, the
  callbacks). A group option pulls in the schema of the target it builds through its defaults list, naming
  the target (``- /schema@module: scail2.lit.pretrain.PretrainModule``); registration walks the config files
  and generates the schema of every target named so (`register_schemas`), so a new data module or callback
  needs no entry anywhere else. The target's signature (or dataclass fields) stays the one place where each
  default lives, the composed config shows every knob, and an unknown key fails at composition with its name.

Nothing is registered on import: the entry point and the tests call `register_configs`.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import difflib
import enum
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, OmegaConf

# --------------------------------------------------------------------------------------------- locations


def config_dir() -> Path:
    """``conf/``: the Hydra groups (the source checkout's, or the copy an installed wheel carries)."""
    return shipped_folder("conf")


def experiments_dir() -> Path:
    """``experiments/``: the experiment files, registered as the ``experiment`` group."""
    return shipped_folder("experiments")


def shipped_folder(name: str) -> Path:
    """``conf`` or ``experiments``: from an installed wheel, the copy under ``scail2/_configs/`` (setup.py puts
    it there); from a source checkout (editable install), the folder at the top of the checkout."""
    package = Path(__file__).resolve().parents[1]
    candidates = (package / "_configs" / name, package.parent / name)
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError(
        f"no {name}/ folder at {candidates[0]} (an installed wheel) or {candidates[1]} (a source checkout): "
        "reinstall scail2 (pip install . or pip install -e . from a checkout), or pass --config-dir"
    )


# --------------------------------------------------------------------------------------------- hand-written


@dataclass
class PathsConfig:
    """Where runs and generated data go. Relative paths are taken from the working directory."""

    output_root: str = "outputs"  # every run folder and the MLflow store (mlflow.db)
    data_root: str = "data"  # generated data: the synthetic dataset, its latent cache, tiny encoders
    # The MLflow store of training runs (logger.tracking_uri) and, by default, of scail2-bench: one store for
    # every run. A relative sqlite path is taken from the working directory; or a server, http://host:5000.
    mlflow: str = "sqlite:///${paths.output_root}/mlflow.db"
    run_dir: str = "${hydra:runtime.output_dir}"  # this run's folder (set by hydra.run.dir)


@dataclass
class TrainerConfig:
    """Arguments of `lightning.pytorch.Trainer` that experiments set (SPEC §5 recipe by default).

    ``strategy``, ``logger``, ``callbacks`` and ``plugins`` come from their own groups.
    """

    _target_: str = "lightning.pytorch.Trainer"
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    precision: Any = "bf16-mixed"
    max_steps: int = 3500
    # Steps govern the run; -1 lets epochs (passes over samples_per_epoch draws) repeat until max_steps.
    max_epochs: int = -1
    max_time: Optional[str] = None
    gradient_clip_val: Optional[float] = 0.1
    gradient_clip_algorithm: str = "norm"
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    enable_model_summary: bool = True
    enable_checkpointing: bool = True
    limit_train_batches: Optional[Any] = None
    # No Lightning validation loop: validation sampling runs as a callback the module attaches (scail2.lit.validation).
    limit_val_batches: Any = 0
    num_sanity_val_steps: int = 0
    fast_dev_run: Any = False
    deterministic: Any = False
    benchmark: Optional[bool] = None
    detect_anomaly: bool = False
    # The data module's sampler draws per rank already (scail2.data.sampling.MixBatchSampler).
    use_distributed_sampler: bool = False
    default_root_dir: Optional[str] = "${paths.run_dir}"
    profiler: Optional[str] = None


@dataclass
class ExportConfig:
    """The trained network, written with `scail2.models.save_pretrained` at the end of training."""

    enabled: bool = True
    dir: str = "${paths.run_dir}/model"
    dtype: Optional[str] = None  # e.g. "bfloat16"; None keeps the training dtype
    # A folder with the encoders (vae/, text_encoder/, tokenizer/, image_encoder/, image_processor/): the export
    # then also is a pipeline folder for SCAIL2Pipeline / scail2-animate (see scail2.lit.export.ExportModel).
    encoders: Optional[str] = None
    # How the pipeline folder refers to the encoders: "copy" (inside it, hard links where the file system allows:
    # the folder moves anywhere) or "relative" (relative paths: it moves together with the encoders).
    encoders_mode: str = "copy"


@dataclass
class HardwareConfig:
    """What the machines are, for the nodes that depend on it (group ``hardware``: cpu, h100, h200, a100).

    The callbacks and data options read these values (``${hardware.peak_flops}``, ``${hardware.loader_workers}``),
    so an experiment chooses its machines once (``override /hardware: h100``). The defaults are a CPU box.
    """

    # Peak dense FLOP/s of one device in the training precision (perf/mfu); None: no MFU is logged.
    peak_flops: Optional[float] = None
    loader_workers: int = 2  # data loader worker processes per training process (cache, manifest, preference data)
    pin_memory: bool = False  # page-locked host batches (faster copies to a GPU)
    persistent_workers: bool = False  # keep the loader workers alive between epochs


@dataclass
class TrainConfig:
    """The root of the ``scail2-train`` config (``conf/train.yaml`` fills it from the groups)."""

    run_name: str = "train"  # runs go to <output_root>/<run_name>/<time>; the MLflow experiment name
    seed: int = 0
    # None: fresh run; "last": newest complete checkpoint of run_name; "auto": that or a fresh run; or a path
    ckpt_path: Optional[str] = None
    print_config: bool = True
    # CPU only: treat denormal floats as zero. Adam's second moments of rarely-updated weights decay into the
    # denormal range, where CPU arithmetic is orders of magnitude slower; flushing them changes nothing visible.
    flush_denormal: bool = True
    # torch intra-op threads for the run (None: the process's default, e.g. from OMP_NUM_THREADS). CPU results
    # depend on it in the last bits, so a resume is bit-exact only with the same count (recorded in checkpoints).
    threads: Optional[int] = None
    tags: List[str] = field(default_factory=list)
    # Config keys this run cannot start without (e.g. data.cache_dir); an experiment lists them, the entry point
    # refuses to start while any is null. (A `???` in a group file cannot do this: merging `???` over a
    # schema default keeps the default.)
    required: List[str] = field(default_factory=list)
    paths: PathsConfig = field(default_factory=PathsConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)  # group ``hardware``
    model: Any = MISSING  # the network's geometry (a TransformerConfig), group ``model``
    module: Any = MISSING  # the LightningModule, set with the objective (group ``objective``)
    objective: Any = MISSING  # the loss settings, group ``objective``
    optim: Any = MISSING  # optimizer and schedule factories, group ``optim``
    data: Any = MISSING  # the LightningDataModule, group ``data``
    strategy: Any = MISSING  # group ``strategy``
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: Any = None  # group ``logger``
    callbacks: Dict[str, Any] = field(default_factory=dict)  # group ``callbacks``; a None entry is dropped
    export: ExportConfig = field(default_factory=ExportConfig)


# --------------------------------------------------------------------------------------------- generated

_SIMPLE = (bool, int, float, str)


def _omegaconf_type(annotation: Any) -> Any:
    """The field type OmegaConf can check for a signature annotation; Any where it cannot."""
    if annotation in _SIMPLE:
        return annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and rest[0] in _SIMPLE:
            return Optional[rest[0]]
    return Any


def _plain(value: Any) -> Any:
    """A default value as a config value (tuples -> lists, paths -> str, enums -> names); raises if not plain."""
    if value is None or isinstance(value, _SIMPLE):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    raise TypeError(f"{type(value).__name__} is not a plain config value")


def _field(annotation: Any, default: Any) -> tuple[Any, Any]:
    """(type, dataclasses.field) for one schema entry, or raise TypeError when the default is not plain."""
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        nested = dataclass_schema(type(default))
        values = _plain(default)
        return Optional[nested], field(default_factory=lambda: nested(**values))
    value = _plain(default)
    if isinstance(value, (list, dict)):
        return Any, field(default_factory=lambda: copy.deepcopy(value))
    kind = _omegaconf_type(annotation)
    if value is None and kind in _SIMPLE:
        kind = Optional[kind]
    return kind, field(default=value)


def _hints(fn: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable forward references: fall back to Any
        return {}


def dataclass_schema(
    cls: type, overrides: bool = False, defaults: dict[str, Any] | None = None, name: str | None = None
) -> type:
    """A mutable schema with the fields and defaults of dataclass ``cls`` (which may be frozen).

    ``overrides``: every field optional with default None (a factory's ``**overrides``: None keeps the value the
    factory chooses, e.g. the size preset's). ``defaults``: other defaults for some fields. ``name``: the
    schema's class name (default ``<cls>Schema``).
    """
    hints = _hints(cls)
    entries = []
    for f in dataclasses.fields(cls):
        if overrides:
            kind = _omegaconf_type(hints.get(f.name, Any))
            entries.append((f.name, Optional[kind] if kind in _SIMPLE else kind, field(default=None)))
            continue
        if defaults and f.name in defaults:
            kind, spec = _field(hints.get(f.name, Any), defaults[f.name])
            entries.append((f.name, kind, spec))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            entries.append((f.name, Any, field(default=MISSING)))
            continue
        kind, spec = _field(hints.get(f.name, Any), default)
        entries.append((f.name, kind, spec))
    name = name or f"{cls.__name__}{'Overrides' if overrides else 'Schema'}"
    return dataclasses.make_dataclass(name, entries, namespace={"__doc__": cls.__doc__})


def _config_type(annotation: Any) -> bool:
    """Whether a parameter annotated ``annotation`` takes a config value: scalars, paths, enums, dataclasses,
    containers of them and their unions (``Any`` too). Callables and other classes (an optimizer, a network, an
    objective object) are objects the entry point builds and passes."""
    if annotation is Any or annotation is type(None) or annotation in (*_SIMPLE, Path):
        return True
    if isinstance(annotation, type):
        containers = (collections.abc.Mapping, collections.abc.Sequence)
        return issubclass(annotation, (enum.Enum, *containers)) or dataclasses.is_dataclass(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, tuple, dict, typing.Literal) or origin in (
        collections.abc.Mapping, collections.abc.Sequence,
    ):
        return origin is typing.Literal or all(_config_type(a) for a in typing.get_args(annotation) if a is not Ellipsis)
    return False


def target_schema(target: Any, partial: bool = False) -> type:
    """A schema dataclass for ``_target_`` nodes that build ``target`` (a class, function or dataclass).

    Fields: ``_target_`` (the import path), ``_partial_`` when ``partial`` (the node is a factory), and one per
    configurable parameter of the target: a parameter's default (from the signature or the dataclass field) is
    the field's default, a required one is MISSING (``???``: the config must set it). Parameters annotated with
    a callable or another non-config class, and required ones annotated ``Any``, are objects the entry point
    passes (the module's network, objective and optimizer; the schedule's optimizer) and are left out, as are
    parameters whose default is not a plain value. A factory whose ``**overrides`` are the fields of the
    dataclass it returns (``scail2_config(preset, **overrides) -> TransformerConfig``) gets those fields, each
    None by default (not overridden).
    """
    from scail2.config.instantiate import override_fields, parameter_hints

    path = f"{target.__module__}.{target.__qualname__}"
    entries: list[tuple[str, Any, Any]] = [("_target_", str, field(default=path))]
    if partial:
        entries.append(("_partial_", bool, field(default=True)))
    if dataclasses.is_dataclass(target):
        base = dataclass_schema(target)
        entries += [(f.name, f.type, f) for f in dataclasses.fields(base)]
        return dataclasses.make_dataclass(f"{target.__name__}Node", _fresh(entries))
    hints = parameter_hints(target)
    sig = inspect.signature(target)
    for name, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        annotation = hints.get(name, Any)
        required = p.default is inspect.Parameter.empty
        if not _config_type(annotation) or (required and annotation is Any):
            continue  # passed by the entry point
        if required:
            entries.append((name, Any, field(default=MISSING)))
            continue
        try:
            kind, spec = _field(annotation, p.default)
        except TypeError:
            continue  # an object default: settable with +key=..., checked against the signature at build time
        entries.append((name, kind, spec))
    fields_of = override_fields(target)
    if fields_of is not None and any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        named = {e[0] for e in entries}
        entries += [(f.name, f.type, f) for f in dataclasses.fields(dataclass_schema(fields_of, overrides=True))
                    if f.name not in named]
    return dataclasses.make_dataclass(f"{target.__name__}Node", _fresh(entries))


def _fresh(entries: list[tuple[str, Any, Any]]) -> list[tuple[str, Any, Any]]:
    """Copies of dataclass fields, so that one field object is never reused across generated classes."""
    out = []
    for name, kind, spec in entries:
        if isinstance(spec, dataclasses.Field):
            if spec.default_factory is not dataclasses.MISSING:
                spec = field(default_factory=spec.default_factory)
            else:
                spec = field(default=spec.default)
        out.append((name, kind, spec))
    return out


# The config group of the generated schemas. A YAML option pulls the schema of the target it builds in through
# its defaults list, naming the target: ``- /schema@_here_: scail2.data.datamodule.MotionDataModule``.
SCHEMA_GROUP = "schema"


@dataclass(frozen=True)
class SchemaUse:
    """One ``/schema@<package>: <target>`` entry of a config file's defaults list."""

    target: str
    partial: bool  # the node it fills sets ``_partial_: true`` (a factory)
    where: str  # "<file>: <package>", for messages


def schema_uses(folders: tuple[Path, ...]) -> dict[str, SchemaUse]:
    """The schemas the config files under ``folders`` pull in, by target.

    Each is checked against the node it fills: the node's ``_target_``, when the file states one, must be the
    schema's target, and every file that pulls a target's schema must agree on ``_partial_``.
    """
    out: dict[str, SchemaUse] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*.yaml")):
            node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # interpolations stay as written
            defaults = node.get("defaults") if isinstance(node, dict) else None
            for entry in defaults or ():
                if not isinstance(entry, dict) or len(entry) != 1:
                    continue
                key, target = next(iter(entry.items()))
                group, _, package = str(key).lstrip("/").partition("@")
                if group != SCHEMA_GROUP:
                    continue
                where = f"{path}: {package or '_here_'}"
                filled: Any = node
                if package not in ("", "_here_"):
                    for part in package.split("."):
                        filled = filled.get(part) if isinstance(filled, dict) else None
                stated = filled.get("_target_") if isinstance(filled, dict) else None
                if stated is not None and stated != target:
                    raise ValueError(f"{where}: the node builds {stated} but pulls in the schema of {target}; name the same target in both")
                partial = filled.get("_partial_", False) is True if isinstance(filled, dict) else False
                seen = out.get(target)
                if seen is not None and seen.partial != partial:
                    raise ValueError(
                        f"{where} and {seen.where} build {target} with different _partial_; a target's schema is "
                        "either a factory or not"
                    )
                out[target] = SchemaUse(str(target), partial, where)
    return out


def register_schemas(folders: tuple[Path, ...]) -> list[str]:
    """Generate and store the schema of every target the config files under ``folders`` pull in
    (`schema_uses`); returns the targets. Each name is checked against the allow-list before it is imported."""
    from hydra.core.config_store import ConfigStore

    from scail2.config.instantiate import check_target_name, locate

    cs = ConfigStore.instance()
    uses = schema_uses(folders)
    for target, use in uses.items():
        check_target_name(target, f"{use.where} (/{SCHEMA_GROUP})")
        cs.store(group=SCHEMA_GROUP, name=target, node=target_schema(locate(target, use.where), partial=use.partial))
    return sorted(uses)


def register_configs(experiments: Path | None = None) -> None:
    """Register the schemas and the experiment files with Hydra's ConfigStore, and the config resolver
    ``latest_export`` (idempotent).

    ``experiments``: folder of experiment files (default: the checkout's ``experiments/``); each ``NAME.yaml``
    becomes the option ``experiment=NAME`` (package ``_global_``: experiments override anything).
    """
    from hydra.core.config_store import ConfigStore

    if not OmegaConf.has_resolver("latest_export"):
        OmegaConf.register_new_resolver("latest_export", _latest_export)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    from scail2.config.bench import BenchConfig

    cs.store(name="bench_schema", node=BenchConfig)  # scail2-bench's primary config (conf/bench.yaml)
    folder = experiments if experiments is not None else experiments_dir()
    register_schemas((config_dir(), folder))
    from scail2.config.checks import check_hydra_node

    for path in sorted(folder.glob("*.yaml")):
        node = OmegaConf.load(path)
        check_hydra_node(node, f"experiment file {path}")  # Hydra settings there could name code
        cs.store(group="experiment", name=path.stem, node=node, package="_global_")
    for name, group, option, path in experiment_specializations(folder):
        node = OmegaConf.load(path)
        check_hydra_node(node, f"experiment file {path}")
        cs.store(group=f"experiment_{group}/{name}", name=option, node=node, package="_global_")



# The groups an experiment can hold settings for one option of (``experiments/<name>/<group>/<option>.yaml``).
SPECIALIZED_GROUPS: tuple[str, ...] = ("model", "data", "objective", "strategy", "trainer", "logger", "callbacks")


def experiment_specializations(folder: Path) -> list[tuple[str, str, str, Path]]:
    """(experiment, group, option, file) of every ``<folder>/<experiment>/<group>/<option>.yaml``.

    Such a file holds an experiment's settings that only make sense with one option of a group (e.g. the
    synthetic dataset's size, or FSDP2's mixed precision). ``conf/train.yaml`` applies it, after the experiment,
    only while that option is chosen, so choosing another option on the command line drops those settings
    instead of merging them into an option that lacks the keys. A file naming an experiment, group or option
    that does not exist is refused (it would otherwise never apply).
    """
    out = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if not (folder / f"{sub.name}.yaml").is_file():
            raise FileNotFoundError(f"{sub} holds settings of an experiment {sub.name!r}, but there is no {folder / sub.name}.yaml")
        for group_dir in sorted(p for p in sub.iterdir() if p.is_dir()):
            group = group_dir.name
            if group not in SPECIALIZED_GROUPS:
                raise ValueError(f"{group_dir}: {group!r} is not a config group; use one of {list(SPECIALIZED_GROUPS)}")
            options = sorted(f.stem for f in (config_dir() / group).glob("*.yaml"))
            for path in sorted(group_dir.glob("*.yaml")):
                if path.stem not in options:
                    close = difflib.get_close_matches(path.stem, options, n=1)
                    hint = f" (did you mean {close[0]}.yaml?)" if close else ""
                    raise ValueError(f"{path}: the {group} group has no option {path.stem!r}{hint}; its options are {options}")
                out.append((sub.name, group, path.stem, path))
    return out


def _latest_export(run_name: str, *, _root_: Any) -> str:
    """``${latest_export:NAME}``: the newest export of a finished ``experiment=NAME`` run with that experiment's
    own settings under paths.output_root (`scail2.lit.export.latest_export`)."""
    from scail2.lit.export import latest_export

    return str(latest_export(Path(_root_.paths.output_root).expanduser().absolute(), run_name))


def compose_config(
    overrides: list[str] | tuple[str, ...] = (),
    config_name: str = "train",
    config_dir: str | Path | None = None,
    job_name: str = "app",
) -> Any:
    """The composed config of ``config_name`` (``train``: ``scail2-train``'s, ``bench``: ``scail2-bench``'s) for
    ``overrides``, as the command line builds it (for the entry points, tests, notebooks and benchmarks).
    ``config_dir``: the folder of the primary config and its groups (default: the shipped ``conf/``).

    Hydra's own ``hydra`` node is removed after it is installed for ``${hydra:...}`` interpolations; set
    ``paths.run_dir`` (by default Hydra's output folder, which compose does not create)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    register_configs()
    folder = Path(config_dir).resolve() if config_dir is not None else shipped_folder("conf")
    if not (folder / f"{config_name}.yaml").is_file():
        raise FileNotFoundError(
            f"{folder / (config_name + '.yaml')} not found: the config folder lacks the primary config "
            f"{config_name}.yaml; reinstall scail2 or pass another --config-dir"
        )
    with initialize_config_dir(config_dir=str(folder), version_base="1.3", job_name=job_name):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg

