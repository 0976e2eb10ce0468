"""The structured schema of ``scail2-bench``, composed by the same machinery as ``scail2-train``'s.

The primary config is ``conf/bench.yaml``; each benchmark is one file of the ``conf/benchmark/`` group
(``benchmark=NAME``). Every field below is typed, so a misspelt key or a wrong type fails at composition with
the key's name (`scail2.config.schema.register_configs` stores the schema as ``bench_schema``,
`scail2.config.schema.compose_config` composes it); a key added with ``+`` is refused by the same check as
training's (`scail2.config.checks.refuse_unknown_keys`), and the choices (metric use, layout, task, ...) are
checked when the composed config is turned into these dataclasses (`to_settings`), with the allowed values in
the message.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from scail2.bench.cases import TASKS
from scail2.bench.loaders import LAYOUTS, XDANCE_DRIVING, XDANCE_PAIRINGS
from scail2.config.checks import refuse_unknown_keys
from scail2.config.schema import PathsConfig, compose_config, dataclass_schema
from scail2.eval.judge import DIMENSIONS, JudgeConfig

METRIC_USES: tuple[str, ...] = ("auto", "required", "skip")
FRAME_METRICS: tuple[str, ...] = ("psnr", "ssim", "lpips")
PUBLISHED_TABLES: tuple[str, ...] = ("table2", "table3")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
DTYPES: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
PRIMARY_CONFIG = "bench"


def _choice(value: Any, allowed: tuple[str, ...], key: str) -> None:
    # MISSING ("???") is the schema's own placeholder; composition reports it if nothing fills it.
    if value != MISSING and value not in allowed:
        raise ValueError(f"{key} is {value!r}; use one of {', '.join(allowed)}")


@dataclass
class DatasetConfig:
    """Where a benchmark's cases come from (layouts: docs/benchmarks-quality.md)."""

    layout: str = MISSING  # xdance | studio | synthetic
    root: str = MISSING
    split: str | None = None  # studio: the split folder (default from the task: self_driven, cross_driven, replacement)
    driving: str = "video"  # xdance: video (video.mp4, end-to-end) | pose (pose.mp4, pose-driven)
    pairing: str = "auto"  # xdance: auto | by_id | cross | file
    pairs_file: str | None = None  # xdance pairing=file: CSV with columns reference,video
    cases: list[str] = field(default_factory=list)  # only these case ids (empty: every case)
    max_cases: int | None = None  # the first N cases after `cases` (null: all)

    def __post_init__(self) -> None:
        _choice(self.layout, LAYOUTS, "benchmark.dataset.layout")
        _choice(self.driving, tuple(XDANCE_DRIVING), "benchmark.dataset.driving")
        _choice(self.pairing, XDANCE_PAIRINGS, "benchmark.dataset.pairing")


@dataclass
class BenchmarkConfig:
    """One benchmark: its protocol (task), its data and the published tables it matches."""

    name: str = MISSING
    task: str = MISSING  # self_driven | cross_identity | replacement
    description: str = ""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    # Published tables shown beside our numbers; only list a table whose benchmark and protocol this one matches.
    published: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _choice(self.task, TASKS, "benchmark.task")
        for table in self.published:
            _choice(table, PUBLISHED_TABLES, "an entry of benchmark.published")


@dataclass
class GenerationConfig:
    """Generation through ``SCAIL2Pipeline`` (when ``generated_dir`` is not set).

    Options left null take the pipeline's own defaults (``SCAIL2Pipeline.generate``: 40 steps, guidance 5, the
    saved scheduler and its shift; ``prepare_inputs``: the reference's aspect ratio at about 512 x 896 and every
    driving frame); results.json records the values that were used.
    """

    model_dir: str | None = None  # a pipeline folder (docs/inference.md)
    steps: int | None = None
    guidance: float | None = None
    shift: float | None = None
    scheduler: str | None = None  # unipc | euler (null: the saved scheduler)
    seed: int = 0  # the same seed for every case
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None  # the first N driving frames (null: all; long videos go in segments)
    prompt: str | None = None  # null: each case's own prompt (prompt.txt / caption, else "")
    negative_prompt: str | None = None
    device: str = "auto"  # auto: cuda when available
    dtype: str = "auto"  # auto: bf16 on cuda (umT5 bf16, VAE fp32), fp32 on cpu
    offload: bool = False  # model CPU offload (one model on the accelerator at a time)
    # Lossless RGB videos: scoring the saved files later (generated_dir=) gives exactly this run's numbers.
    lossless: bool = True

    def __post_init__(self) -> None:
        _choice(self.device, DEVICES, "generation.device")
        _choice(self.dtype, DTYPES, "generation.dtype")
        if self.scheduler is not None:
            _choice(self.scheduler, ("unipc", "euler"), "generation.scheduler")


@dataclass
class MetricsConfig:
    """Which metrics run. ``auto``: when applicable (ground truth present, weight files or judge available),
    otherwise skipped with a note in the report; ``required``: fail instead of skipping; ``skip``: never."""

    psnr: str = "auto"
    ssim: str = "auto"
    lpips: str = "auto"
    fvd: str = "auto"
    judge: str = "auto"  # auto: runs when judge.model is set
    lpips_net: str = "alex"  # alex | vgg
    lpips_weights: str | None = None  # trunk file (null: looked up in $SCAIL2_WEIGHTS_DIR, ~/.cache/scail2/weights)
    i3d_weights: str | None = None  # i3d_torchscript.pt (null: looked up as above)
    fvd_clip_stride: int | None = None  # null: one 16-frame clip per video from frame 0 (the pinned protocol)
    fvd_strict: bool = False  # refuse FVD with fewer clips than feature dimensions (400)
    ssim_dtype: str = "float32"  # ~10x faster on CPU than float64, differences < 1e-5
    judge_dimensions: list[str] = field(default_factory=lambda: [d.name for d in DIMENSIONS])
    device: str = "auto"  # where LPIPS and the I3D run (auto: cuda when available); PSNR / SSIM stay on the CPU

    def __post_init__(self) -> None:
        _choice(self.device, DEVICES, "metrics.device")
        for name in ("psnr", "ssim", "lpips", "fvd", "judge"):
            _choice(getattr(self, name), METRIC_USES, f"metrics.{name}")
        _choice(self.lpips_net, ("alex", "vgg"), "metrics.lpips_net")
        _choice(self.ssim_dtype, ("float64", "float32"), "metrics.ssim_dtype")
        for name in self.judge_dimensions:
            _choice(name, tuple(d.name for d in DIMENSIONS), "an entry of metrics.judge_dimensions")


def _judge_settings_schema() -> type:
    """A mutable twin of `JudgeConfig` (`dataclass_schema`): same fields, types and defaults, except ``model``
    "" (no judge configured). JudgeConfig is frozen, and OmegaConf makes a frozen dataclass node read-only, so
    command-line overrides (``judge.model=...``) could not set it; the fields are derived, not restated, so every
    default stays in JudgeConfig."""
    return dataclass_schema(JudgeConfig, defaults={"model": ""}, name="JudgeSettings")


JudgeSettings = _judge_settings_schema()


def judge_config(settings: Any) -> JudgeConfig:
    """The `JudgeConfig` of a ``judge`` section."""
    return JudgeConfig(**dataclasses.asdict(settings))


@dataclass
class GSBConfig:
    """Blinded side-by-side export for a Good/Same/Bad study (docs/benchmarks-quality.md)."""

    baseline_dir: str | None = None  # one video per case id (<id>.mp4); setting it turns the export on
    baseline_name: str = "baseline"
    seed: int = 0  # left/right order and pair numbering
    gap: int = 8  # black pixels between the two videos


@dataclass
class PathsSettings:
    """Where outputs go; the same keys and defaults as ``scail2-train``'s ``paths`` (`PathsConfig`), so both
    tools share one MLflow store unless told otherwise."""

    output_root: str = PathsConfig.output_root  # run folders: <output_root>/bench/<benchmark>-<timestamp>
    mlflow: str = PathsConfig.mlflow  # the MLflow store (relative sqlite paths: from the working directory)


@dataclass
class MLflowConfig:
    enabled: bool = True  # the store is paths.mlflow
    experiment: str | None = None  # null: scail2-bench/<benchmark name>
    run_name: str | None = None  # null: the run folder's name
    log_videos: bool = False  # also upload the generated videos as artifacts


@dataclass
class BenchConfig:
    """The whole ``scail2-bench`` config (``conf/bench.yaml`` chooses the options)."""

    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # model "" = no judge configured (metrics.judge=auto then skips it); other defaults are JudgeConfig's.
    judge: JudgeSettings = field(default_factory=JudgeSettings)  # type: ignore[valid-type]
    gsb: GSBConfig = field(default_factory=GSBConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    generated_dir: str | None = None  # score these videos (<dir>/<case id>.mp4) instead of generating
    paths: PathsSettings = field(default_factory=PathsSettings)
    out_dir: str | None = None  # this run's folder (null: <paths.output_root>/bench/<benchmark>-<timestamp>)
    progress: bool = True  # per-case progress lines on stderr (CLI)


# --------------------------------------------------------------------------------------------- composition


def compose_bench_config(
    overrides: list[str] | tuple[str, ...] = (), config_dir: str | Path | None = None
) -> DictConfig:
    """Compose ``bench.yaml`` with command-line style overrides (``benchmark=NAME``, ``generation.steps=2``):
    `compose_config` with ``scail2-bench``'s primary config; ``config_dir``: another folder holding
    ``bench.yaml`` and ``benchmark/`` (default: the shipped ``conf/``)."""
    return compose_config(overrides, config_name=PRIMARY_CONFIG, config_dir=config_dir, job_name="scail2-bench")


def to_settings(cfg: DictConfig) -> BenchConfig:
    """The composed config as dataclasses; the choices are checked here (errors name the key and the options)."""
    refuse_unknown_keys(cfg, OmegaConf.structured(BenchConfig))
    settings = OmegaConf.to_object(cfg)
    if not isinstance(settings, BenchConfig):
        raise TypeError(
            f"composed config is a {type(settings).__name__}, not BenchConfig; compose it with compose_bench_config"
        )
    return settings


def flat_params(settings: BenchConfig) -> dict[str, str]:
    """Every config value as ``dotted.key -> str`` (MLflow params, the report's config table)."""
    container = OmegaConf.to_container(OmegaConf.structured(settings), resolve=True)
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        elif prefix.endswith("api_key") and node is not None:
            out[prefix] = "<set>"  # a secret: never written to reports or tracking servers
        else:
            out[prefix] = "null" if node is None else str(node)

    walk(container, "")
    return out
