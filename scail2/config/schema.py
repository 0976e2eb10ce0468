"""Structured-config schemas of ``scail2-train`` and their registration with Hydra.

Two kinds of schema:

- Hand-written dataclasses for the parts of the tree that belong to the entry point (`TrainConfig`, `PathsConfig`,
  `TrainerConfig`, `ExportConfig`). Their field defaults are the defaults.
- Schemas generated from a target's signature (`target_schema`) for the ``_target_`` nodes built from scail2's
  own classes (the LightningModule, the network factory, the objective, the data modules, the schedule, the
  callbacks). A group option pulls its schema in through its defaults list
  (``- /schema/module@module: pretrain``); the target's signature (or dataclass fields) stays the one place
  where each default lives, the composed config shows every knob, and an unknown key fails at composition
  with its name.

Nothing is registered on import: the entry point and the tests call `register_configs`.
"""

from __future__ import annotations

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
    model: Any = MISSING  # the network factory (``_partial_``), group ``model``
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


def _init_hints(target: Any) -> dict[str, Any]:
    """Type hints of a function, or of a class's ``__init__`` and those of its bases (inherited parameters)."""
    if not inspect.isclass(target):
        return _hints(target)
    out: dict[str, Any] = {}
    for cls in reversed(target.__mro__):
        if "__init__" in cls.__dict__ and cls is not object:
            out.update(_hints(cls.__init__))
    return out


def dataclass_schema(cls: type) -> type:
    """A mutable schema with the fields and defaults of dataclass ``cls`` (which may be frozen)."""
    hints = _hints(cls)
    entries = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            entries.append((f.name, Any, field(default=MISSING)))
            continue
        kind, spec = _field(hints.get(f.name, Any), default)
        entries.append((f.name, kind, spec))
    return dataclasses.make_dataclass(f"{cls.__name__}Schema", entries)


def target_schema(target: Any, injected: tuple[str, ...] = (), partial: bool = False) -> type:
    """A schema dataclass for ``_target_`` nodes that build ``target`` (a class, function or dataclass).

    Fields: ``_target_`` (the import path), ``_partial_`` when ``partial`` (the node is a factory), and one per
    parameter of the target; a parameter's default (from the signature or the dataclass field) is the field's
    default, a required parameter is MISSING (``???``: the config must set it). ``injected`` parameters are passed by the entry point and left
    out; parameters whose default is not a plain value (an object, a callable) are left out too.
    """
    path = f"{target.__module__}.{target.__qualname__}"
    entries: list[tuple[str, Any, Any]] = [("_target_", str, field(default=path))]
    if partial:
        entries.append(("_partial_", bool, field(default=True)))
    if dataclasses.is_dataclass(target):
        base = dataclass_schema(target)
        entries += [(f.name, f.type, f) for f in dataclasses.fields(base)]
        return dataclasses.make_dataclass(f"{target.__name__}Node", _fresh(entries))
    from scail2.config.instantiate import signature_parameters

    hints = _init_hints(target)
    for name, p in signature_parameters(target)[0].items():
        if name in injected:
            continue
        if p.default is inspect.Parameter.empty:
            entries.append((name, Any, field(default=MISSING)))
            continue
        try:
            kind, spec = _field(hints.get(name, Any), p.default)
        except TypeError:
            continue  # an object default: settable with +key=..., checked against the signature at build time
        entries.append((name, kind, spec))
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


# The schema group: (group under ``schema/``, option name) -> (target import path, parameters injected by
# the entry point, whether the node is a ``_partial_`` factory). YAML options select one with
# ``- /schema/<group>@<package>: <name>``.
TARGET_SCHEMAS: dict[tuple[str, str], tuple[str, tuple[str, ...], bool]] = {
    ("model", "scail2_transformer"): ("scail2.lit.networks.scail2_transformer", (), True),
    ("module", "pretrain"): ("scail2.lit.pretrain.PretrainModule", ("net", "objective", "optimizer", "scheduler"), False),
    ("module", "dpo"): ("scail2.lit.dpo.DPOModule", ("net", "objective", "optimizer", "scheduler"), False),
    ("objective", "flow_matching"): ("scail2.objectives.flow_matching.FlowMatchingConfig", (), False),
    ("objective", "dpo"): ("scail2.objectives.dpo.DPOConfig", (), False),
    ("scheduler", "warmup_cosine"): ("scail2.lit.optim.warmup_cosine", ("optimizer",), True),
    ("data", "motion"): ("scail2.data.datamodule.MotionDataModule", (), False),
    ("data", "synthetic"): ("scail2.lit.data.SyntheticDataModule", (), False),
    ("data", "preference"): ("scail2.preference.datamodule.PreferenceDataModule", (), False),
    ("data", "synthetic_preference"): ("scail2.lit.data.SyntheticPreferenceDataModule", (), False),
    ("strategy", "single"): ("scail2.lit.strategies.single_device", (), False),
    ("strategy", "ddp"): ("scail2.lit.strategies.DDPStrategy", (), False),
    ("strategy", "fsdp2"): ("scail2.lit.strategies.FSDP2Strategy", (), False),
    ("strategy", "deepspeed"): ("scail2.lit.strategies.deepspeed", (), False),
    ("callbacks", "checkpoint"): ("scail2.lit.checkpoint.PeriodicCheckpoint", (), False),
    ("callbacks", "throughput"): ("scail2.lit.callbacks.ThroughputMonitor", (), False),
    ("callbacks", "data_skips"): ("scail2.lit.callbacks.DataSkipMonitor", (), False),
    ("callbacks", "progress"): ("scail2.lit.callbacks.progress_bar", (), False),
}


def register_configs(experiments: Path | None = None) -> None:
    """Register the schemas and the experiment files with Hydra's ConfigStore, and the config resolver
    ``latest_export`` (idempotent).

    ``experiments``: folder of experiment files (default: the checkout's ``experiments/``); each ``NAME.yaml``
    becomes the option ``experiment=NAME`` (package ``_global_``: experiments override anything).
    """
    from hydra.core.config_store import ConfigStore

    from scail2.config.instantiate import locate

    if not OmegaConf.has_resolver("latest_export"):
        OmegaConf.register_new_resolver("latest_export", _latest_export)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for (group, name), (target, injected, partial) in TARGET_SCHEMAS.items():
        schema = target_schema(locate(target, f"schema/{group}/{name}"), injected, partial=partial)
        cs.store(group=f"schema/{group}", name=name, node=schema)
    folder = experiments if experiments is not None else experiments_dir()
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


def compose_config(overrides: list[str] = (), config_name: str = "train") -> Any:
    """The composed ``scail2-train`` config for ``overrides``, as the command line would build it (for tests,
    notebooks and benchmarks). Hydra's own ``hydra`` node is removed after it is installed for ``${hydra:...}``
    interpolations; set ``paths.run_dir`` (by default Hydra's output folder, which compose does not create)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
