"""One benchmark run: cases -> videos (generated or collected) -> scores -> outputs -> MLflow.

    settings = to_settings(compose_bench_config(["benchmark=self_driven", "generation.model_dir=/models/x"]))
    run = run_benchmark(settings)
    run.results["metrics"]["psnr"]["value"], run.files["report.html"]

Cases are processed one at a time (generate, save, score), so memory holds a single case. Generated videos are
saved losslessly by default (``generation.lossless``), so re-scoring them later with ``generated_dir=`` gives the
same numbers as the run that made them.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from scail2.bench.cases import Case, VideoFrame, find_video
from scail2.config.bench import BenchConfig, BenchmarkConfig, GenerationConfig, flat_params, judge_config
from scail2.bench.loaders import STUDIO_SPLITS, load_studio, load_synthetic, load_xdance, select_cases
from scail2.bench.published import PublishedTable, published_tables
from scail2.bench.scoring import GROUND_TRUTH_ALIGNMENT, MetricSummary, Scorer, load_image_source, read_frames
from scail2.data.video import write_video

log = logging.getLogger(__name__)

RESULTS_SCHEMA = "scail2-bench/1"
VIDEOS_DIR = "videos"


@dataclass
class BenchRun:
    out_dir: Path
    results: dict[str, Any]
    files: dict[str, Path]
    mlflow_run_id: str | None


# ------------------------------------------------------------------------------------------------- cases


def load_benchmark_cases(benchmark: BenchmarkConfig) -> list[Case]:
    """The benchmark's cases from its layout, restricted by ``dataset.cases`` / ``dataset.max_cases``."""
    data = benchmark.dataset
    if data.layout == "xdance":
        if benchmark.task != "cross_identity":
            raise ValueError(
                f"benchmark.task is {benchmark.task!r} but X-Dance pairs are cross-identity (no ground truth); "
                "use benchmark.task=cross_identity"
            )
        cases = load_xdance(data.root, driving=data.driving, pairing=data.pairing, pairs_file=data.pairs_file)
    elif data.layout == "studio":
        cases = load_studio(data.root, benchmark.task, data.split)
    else:
        cases = load_synthetic(data.root, benchmark.task)
    return select_cases(cases, data.cases, data.max_cases)


# ------------------------------------------------------------------------------------------------- generation


class CaseGenerator:
    """Loads the pipeline once and generates one case at a time with the configured options."""

    def __init__(self, config: GenerationConfig) -> None:
        import torch

        from scail2.pipeline import SCAIL2Pipeline
        from scail2.utils.dtypes import SHORT_DTYPES

        if config.model_dir is None:
            raise ValueError(
                "nothing to score: set generation.model_dir=<pipeline folder> to generate the videos, or "
                "generated_dir=<folder with one video per case id> to score existing ones"
            )
        device = ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("generation.device=cuda but no CUDA device is available; use generation.device=cpu")
        dtype_name = config.dtype if config.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
        dtype = SHORT_DTYPES[dtype_name]
        # umT5 overflows in float16, so it runs in bfloat16 whenever a half type is asked for.
        text_dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
        self.config = config
        self.device, self.dtype_name = device, dtype_name
        self.pipe = SCAIL2Pipeline.from_pretrained(
            config.model_dir, scheduler=config.scheduler, dtype=dtype, text_dtype=text_dtype, image_dtype=dtype
        )
        if config.offload:
            self.pipe.enable_model_cpu_offload(device)
        else:
            self.pipe.to(device)

    def effective(self) -> dict[str, Any]:
        """The options every case is generated with, the pipeline's defaults filled in (for the results)."""
        from scail2.pipeline.schedulers import scheduler_shift

        defaults = inspect.signature(type(self.pipe).generate).parameters
        c = self.config
        return {
            "model_dir": c.model_dir,
            "steps": c.steps if c.steps is not None else defaults["num_inference_steps"].default,
            "guidance": c.guidance if c.guidance is not None else defaults["guidance_scale"].default,
            "shift": c.shift if c.shift is not None else scheduler_shift(self.pipe.scheduler),
            "scheduler": type(self.pipe.scheduler).__name__,
            "seed": c.seed,
            "height": c.height if c.height is not None else "reference aspect at ~512x896",
            "width": c.width if c.width is not None else "reference aspect at ~512x896",
            "num_frames": c.num_frames if c.num_frames is not None else "all driving frames",
            "prompt": c.prompt if c.prompt is not None else "per case",
            "negative_prompt": (
                c.negative_prompt if c.negative_prompt is not None else defaults["negative_prompt"].default
            ),
            "device": self.device,
            "dtype": self.dtype_name,
            "offload": c.offload,
            "lossless": c.lossless,
        }

    def __call__(self, case: Case) -> tuple[Any, list[str]]:
        """Generate one case -> (SCAIL2Output, notes)."""
        from scail2.data.video import probe_video

        c = self.config
        notes = []
        num_frames = c.num_frames
        if num_frames is not None:
            available = probe_video(case.driving).num_frames
            if num_frames > available:
                notes.append(f"driving video has {available} frames (< generation.num_frames={num_frames}): used all")
                num_frames = available
        kwargs: dict[str, Any] = {
            "mode": case.mode,
            "height": c.height,
            "width": c.width,
            "num_frames": num_frames,
            "seed": c.seed,
            "prompt": c.prompt if c.prompt is not None else case.prompt,
            "progress": False,
        }
        if case.reference_mask is not None:
            kwargs["reference_mask"] = _reference_mask_input(case.reference_mask, case.mode)
            kwargs["driving_mask"] = str(case.driving_mask)
        # Only the options that are set: the others keep the pipeline's own defaults.
        names = {"steps": "num_inference_steps", "guidance": "guidance_scale", "shift": "shift",
                 "negative_prompt": "negative_prompt"}  # fmt: skip
        for key, name in names.items():
            if getattr(c, key) is not None:
                kwargs[name] = getattr(c, key)
        output = self.pipe(_image_input(case.reference), str(case.driving), **kwargs)
        return output, notes


def _image_input(source: Path | VideoFrame) -> Any:
    """A file path as the pipeline reads it, or the decoded frame of a video."""
    return load_image_source(source) if isinstance(source, VideoFrame) else str(source)


def _reference_mask_input(source: Path | VideoFrame, mode: str) -> Any:
    """A reference mask image as it is, or a frame of a mask video (drawn on the driving side's background)
    redrawn on the reference background of ``mode`` (`video_mask_to_reference`)."""
    if not isinstance(source, VideoFrame):
        return str(source)
    import torch

    from scail2.conditioning.masks import video_mask_to_reference

    frame = torch.from_numpy(load_image_source(source)).permute(2, 0, 1)  # (3, H, W) uint8
    return video_mask_to_reference(frame, mode).permute(1, 2, 0).contiguous().numpy()


# ------------------------------------------------------------------------------------------------- the run


def resolve_out_dir(settings: BenchConfig) -> Path:
    if settings.out_dir is not None:
        return Path(settings.out_dir).expanduser()
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return Path(settings.paths.output_root).expanduser() / "bench" / f"{settings.benchmark.name}-{stamp}"


def _config_yaml(settings: BenchConfig) -> str:
    container = OmegaConf.to_container(OmegaConf.structured(settings))
    if container["judge"]["api_key"] is not None:
        container["judge"]["api_key"] = "<set>"  # never written to disk
    return OmegaConf.to_yaml(container)


def run_benchmark(settings: BenchConfig) -> BenchRun:
    """Run one benchmark as configured; write every output and log the run to MLflow (unless disabled)."""
    started = time.perf_counter()
    started_at = datetime.now().isoformat(timespec="seconds")
    bench = settings.benchmark
    # Everything that can fail before a model runs fails here, before the run folder exists: the layout, missing
    # videos, required metrics that cannot run, the pipeline folder.
    cases = load_benchmark_cases(bench)
    tables = published_tables(bench.published)
    generated_dir = Path(settings.generated_dir).expanduser() if settings.generated_dir is not None else None
    existing: dict[str, Path] = {}
    if generated_dir is not None:
        existing = _find_generated(cases, generated_dir)
    scorer = Scorer(settings.metrics, judge_config(settings.judge), cases)
    generator = CaseGenerator(settings.generation) if generated_dir is None else None

    out = resolve_out_dir(settings)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(_config_yaml(settings), encoding="utf-8")
    log.info("benchmark %s: %d case(s) -> %s", bench.name, len(cases), out)

    tracker = _Tracker(settings, out) if settings.mlflow.enabled else None
    try:
        videos: list[tuple[Case, Path]] = []
        for index, case in enumerate(cases, start=1):
            notes: list[str] = []
            seconds = None
            if generator is not None:
                t0 = time.perf_counter()
                output, notes = generator(case)
                seconds = time.perf_counter() - t0
                frames, fps = output.frames, output.fps
                path = out / VIDEOS_DIR / f"{case.file_stem}.mp4"
                write_video(path, frames, fps, lossless=settings.generation.lossless)
                label = f"{VIDEOS_DIR}/{path.name}"
            else:
                path = existing[case.id]
                frames, fps = read_frames(path)
                label = str(path)
            scores = scorer.score(case, frames, fps, label)
            scores.notes[:0] = notes
            scores.generation_seconds = seconds
            videos.append((case, path))
            shown = ", ".join(f"{k} {v:.4g}" for k, v in scores.metrics.items())
            log.info("case %d/%d %s: %d frames%s%s", index, len(cases), case.id, scores.frames,
                     f", generated in {seconds:.1f} s" if seconds is not None else "", f"; {shown}" if shown else "")

        summaries = scorer.summarise()
        gsb = _export_gsb(settings, videos, out)
        run_info = {
            "out_dir": str(out),
            "started": started_at,
            "seconds": time.perf_counter() - started,
            "source": "generated" if generator is not None else "scored",
            "generated_dir": str(generated_dir) if generated_dir is not None else None,
            "mlflow_run_id": tracker.run_id if tracker else None,
            "mlflow_tracking_uri": tracker.uri if tracker else None,
        }
        generation = generator.effective() if generator is not None else None
        results = _results_record(settings, cases, tables, scorer, summaries, run_info, generation, gsb)
        files = _write_all(results, scorer, out)
        if tracker is not None:
            tracker.finish(results, files, [p for _, p in videos] if settings.mlflow.log_videos else [])
    except BaseException:
        if tracker is not None:
            tracker.fail()
        raise
    return BenchRun(out, results, files, tracker.run_id if tracker else None)


def _results_record(
    settings: BenchConfig,
    cases: list[Case],
    tables: list[PublishedTable],
    scorer: Scorer,
    summaries: list[MetricSummary],
    run_info: dict[str, Any],
    generation: dict[str, Any] | None,
    gsb: dict[str, Any] | None,
) -> dict[str, Any]:
    """The content of results.json (see docs/benchmarks-quality.md, Outputs)."""
    bench = settings.benchmark
    results = {
        "schema": RESULTS_SCHEMA,
        "benchmark": {
            "name": bench.name,
            "task": bench.task,
            "description": bench.description,
            "layout": bench.dataset.layout,
            "root": str(bench.dataset.root),
            "split": bench.dataset.split or (STUDIO_SPLITS[bench.task] if bench.dataset.layout == "studio" else None),
            "cases": len(cases),
        },
        "run": run_info,
        "generation": generation,
        "alignment": GROUND_TRUTH_ALIGNMENT if any(c.ground_truth is not None for c in cases) else "no ground truth",
        "metrics": {
            m.name: {"value": m.value, "std": m.std, "videos": m.videos, "protocol": m.protocol,
                     "tag": f"ours-{m.name}", **m.extra}
            for m in summaries
        },  # fmt: skip
        "skipped": dict(scorer.skipped),
        "notes": [f"{m.name}: {m.extra['warning']}" for m in summaries if "warning" in m.extra],
        "published": [
            {
                "key": t.key,
                "tag": f"paper-{t.key.replace('table', 'T')}",
                "short": t.short,
                "title": t.title,
                "benchmark": t.benchmark,
                "protocol": t.protocol,
                "rows": [{"method": row.method, "metrics": dict(row.metrics)} for row in t.rows],
            }
            for t in tables
        ],
        "cases": [asdict(c) for c in scorer.cases],
        "gsb": gsb,
        "config": flat_params(settings),
    }
    if not tables:
        results["notes"].append("no published table matches this benchmark (benchmark.published is empty)")
    return results


def _find_generated(cases: list[Case], folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"generated_dir {folder} is not a folder; put one video per case id there (<id>.mp4)")
    found, missing = {}, []
    for case in cases:
        path = find_video(folder, case.file_stem)
        if path is None:
            missing.append(case.file_stem)
        else:
            found[case.id] = path
    if missing:
        listed = ", ".join(f"{m}.mp4" for m in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise FileNotFoundError(
            f"generated_dir {folder} lacks {len(missing)} of {len(cases)} case videos: {listed}; add them, or "
            "restrict the run with benchmark.dataset.cases=[...]"
        )
    return found


def _export_gsb(settings: BenchConfig, videos: list[tuple[Case, Path]], out: Path) -> dict[str, Any] | None:
    if settings.gsb.baseline_dir is None:
        return None
    from scail2.bench.gsb import export_gsb

    ours = settings.generation.model_dir if settings.generated_dir is None else settings.generated_dir
    export = export_gsb(
        videos,
        settings.gsb.baseline_dir,
        out / "gsb",
        ours_name=Path(str(ours)).name or "ours",
        baseline_name=settings.gsb.baseline_name,
        seed=settings.gsb.seed,
        gap=settings.gsb.gap,
    )
    return {
        "baseline": settings.gsb.baseline_name,
        "folder": str(export.folder),
        "sheet": str(export.sheet),
        "key": str(export.key),
        "study": str(export.study) if export.study is not None else None,
        "pairs": [p.pair for p in export.pairs],
        "missing_baseline": export.missing_baseline,
    }


def _write_all(results: dict[str, Any], scorer: Scorer, out: Path) -> dict[str, Path]:
    from scail2.bench.report import write_outputs

    files = write_outputs(results, out)
    files["config.yaml"] = out / "config.yaml"
    if scorer.judge_records:
        path = out / "judge_answers.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in scorer.judge_records), encoding="utf-8")
        files[path.name] = path
    return files


# ------------------------------------------------------------------------------------------------- MLflow


class _Tracker:
    """An MLflow run through ``MlflowClient`` (no process-wide tracking state is touched)."""

    def __init__(self, settings: BenchConfig, out: Path) -> None:
        from mlflow.tracking import MlflowClient

        from scail2.lit.tracking import absolute_tracking_uri, git_state, package_versions

        root = Path(settings.paths.output_root).expanduser().resolve()
        cfg = settings.mlflow
        self.uri = absolute_tracking_uri(settings.paths.mlflow)  # the training runs' store by default
        self.client = MlflowClient(tracking_uri=self.uri)
        name = cfg.experiment or f"scail2-bench/{settings.benchmark.name}"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            # Artifacts next to the store (not ./mlruns of whatever folder the command ran in).
            experiment_id = self.client.create_experiment(name, artifact_location=(root / "mlartifacts").as_uri())
        else:
            experiment_id = experiment.experiment_id
        import scail2

        tags = {"benchmark": settings.benchmark.name, "task": settings.benchmark.task, "out_dir": str(out.resolve())}
        # The code that produced the numbers, as training runs record it.
        tags.update({**git_state(Path(__file__).parent), "scail2_version": scail2.__version__})
        tags.update({f"version.{k}": v for k, v in package_versions().items()})
        run = self.client.create_run(experiment_id, run_name=cfg.run_name or out.name, tags=tags)
        self.run_id = run.info.run_id
        self.settings = settings

    def finish(self, results: dict[str, Any], files: dict[str, Path], videos: list[Path]) -> None:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        params = [Param(k, v[:6000]) for k, v in flat_params(self.settings).items()]
        params.append(Param("cases", str(results["benchmark"]["cases"])))
        params.append(Param("source", results["run"]["source"]))
        metrics = []
        for name, m in results["metrics"].items():
            metrics.append(Metric(name, float(m["value"]), now, 0))
            if m["std"] == m["std"]:  # not NaN (FVD has no per-video spread)
                metrics.append(Metric(f"{name}_std", float(m["std"]), now, 0))
        for step, case in enumerate(results["cases"]):
            metrics += [Metric(f"case_{k}", float(v), now, step) for k, v in case["metrics"].items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])
        for path in files.values():
            self.client.log_artifact(self.run_id, str(path))
        if results.get("gsb"):
            self.client.log_artifact(self.run_id, results["gsb"]["sheet"], "gsb")
            self.client.log_artifact(self.run_id, results["gsb"]["key"], "gsb")
        for path in videos:
            self.client.log_artifact(self.run_id, str(path), VIDEOS_DIR)
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self) -> None:
        try:
            self.client.set_terminated(self.run_id, "FAILED")
        except Exception:  # the original error matters more than a failed status update
            log.warning("could not mark MLflow run %s as failed", self.run_id)
