"""Scoring a benchmark's videos: ground-truth alignment, frame metrics, FVD and the VLM judge.

Every metric is computed with ``scail2.eval`` under its pinned protocol (docs/evaluation.md). A video is scored
case by case, so memory holds one case at a time; the benchmark value of a frame metric is the mean over cases
of each case's mean over frames, the same number ``scail2.eval.metrics.psnr`` (etc.) returns for the stacked
videos. FVD accumulates detector features case by case and is computed once at the end.

Ground truth and generated video are compared frame for frame: the ground truth is resized to cover the
generated size and centre-cropped exactly as the pipeline prepares its inputs (antialiased bilinear, rounded to
8 bits), and both are cut to their common length from frame 0.
"""

from __future__ import annotations

import logging
import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scail2.bench.cases import Case, ImageSource, VideoFrame
from scail2.config.bench import MetricsConfig
from scail2.eval.judge import JudgeConfig

log = logging.getLogger(__name__)

FRAME_METRICS: tuple[str, ...] = ("psnr", "ssim", "lpips")
FVD_MIN_VIDEOS = 2  # a covariance needs at least two feature vectors per set
GROUND_TRUTH_ALIGNMENT = (
    "ground truth resized to cover the generated size and centre-cropped (antialiased bilinear, 8-bit, as the "
    "pipeline prepares its inputs); both videos cut to their common length from frame 0"
)


class MetricUnavailable(RuntimeError):
    """A metric the config requires (``metrics.<name>=required``) cannot run; the message says why and the fix."""


# ------------------------------------------------------------------------------------------------- frames


def load_image_source(source: ImageSource) -> np.ndarray:
    """An image file or a video frame -> uint8 (H, W, 3)."""
    from scail2.data.video import read_image, read_video

    if isinstance(source, VideoFrame):
        return read_video(source.video, [source.index])[0]
    return read_image(source)


def read_frames(path: str | Path, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """The first ``max_frames`` frames (all when None) -> (uint8 (F, H, W, 3), fps)."""
    from scail2.data.video import VideoReader

    with VideoReader(path) as reader:
        n = reader.num_frames if max_frames is None else min(max_frames, reader.num_frames)
        return reader.read(range(n)), reader.fps


def align_to(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (F, H, W, 3) resized to cover ``height x width`` and centre-cropped, like the pipeline's inputs."""
    from scail2.pipeline.inputs import resize_cover

    if frames.shape[1:3] == (height, width):
        return frames
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (F, 3, H, W) uint8
    return resize_cover(video, height, width).permute(0, 2, 3, 1).contiguous().numpy()


def unit_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float32 (1, F, 3, H, W) in [0, 1] (one video in the metrics' batch layout)."""
    return (torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0)[None]


def paired_frames(generated: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Cut both to the common length and align the ground truth to the generated size; notes say what changed."""
    notes = []
    n = min(len(generated), len(truth))
    if len(generated) != len(truth):
        notes.append(f"generated video has {len(generated)} frames, ground truth {len(truth)}: scored the first {n}")
    height, width = generated.shape[1:3]
    if truth.shape[1:3] != (height, width):
        notes.append(f"ground truth {truth.shape[1]}x{truth.shape[2]} aligned to the generated {height}x{width}")
    return generated[:n], align_to(truth[:n], height, width), notes


def _metric_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("metrics.device=cuda but no CUDA device is available; use metrics.device=cpu")
    return torch.device(name)


# ------------------------------------------------------------------------------------------------- results


@dataclass
class CaseScores:
    """The scores of one case."""

    id: str
    kind: str  # single | multi | replacement
    video: str  # the generated video, relative to the run folder (or absolute for generated_dir)
    frames: int  # frames scored
    fps: float
    metrics: dict[str, float] = field(default_factory=dict)  # psnr / ssim / lpips and judge dimensions
    per_frame: dict[str, list[float]] = field(default_factory=dict)  # psnr / ssim / lpips per frame
    judge_std: dict[str, float] = field(default_factory=dict)  # per dimension, over repeats
    judge_failures: int = 0
    notes: list[str] = field(default_factory=list)
    generation_seconds: float | None = None


@dataclass
class MetricSummary:
    """A benchmark-level value with what produced it."""

    name: str
    value: float
    std: float  # over videos (population std); nan for FVD
    videos: int
    protocol: str
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------- scorer


class Scorer:
    """Decides which metrics run, scores case by case, and summarises.

    Metric ``auto`` runs when it applies and its weights (or judge) are available, otherwise it is skipped with
    the reason recorded in ``skipped``; ``required`` raises `MetricUnavailable` instead; ``skip`` never runs.
    """

    def __init__(self, metrics: MetricsConfig, judge: JudgeConfig, cases: Sequence[Case]) -> None:
        self.config = metrics
        self.judge_config = judge
        self.skipped: dict[str, str] = {}
        self.protocols: dict[str, str] = {}
        self.cases: list[CaseScores] = []
        self._device = _metric_device(metrics.device)
        self._lpips = None
        self._detector = None
        self._detector_label = ""
        self._judge = None
        self._fvd_real = self._fvd_fake = None
        self._fvd_short = 0  # videos too short for a 16-frame clip
        self._judge_results: list[dict] = []
        self.judge_records: list[dict] = []  # every raw judge answer (judge_answers.jsonl)
        has_truth = any(c.ground_truth is not None for c in cases)
        missing_truth = [c.id for c in cases if c.ground_truth is None]
        self.enabled: dict[str, bool] = {}
        for name in ("psnr", "ssim", "lpips", "fvd"):
            reason = None
            if not has_truth:
                reason = (
                    "no ground truth in this benchmark (cross-identity cases): frame metrics and FVD compare with "
                    "the source clip"
                )
            self.enabled[name] = self._decide(name, reason)
        if has_truth and missing_truth and any(self.enabled[n] for n in ("psnr", "ssim", "lpips", "fvd")):
            log.info("%d case(s) without ground truth get no frame metrics: %s", len(missing_truth), missing_truth[:5])
        if self.enabled["lpips"]:
            self._load_lpips()
        if self.enabled["fvd"]:
            self._load_i3d()
        judge_reason = None
        if not judge.model:
            judge_reason = "no judge configured: set judge.model (and judge.base_url) to score with a VLM"
        self.enabled["judge"] = self._decide("judge", judge_reason)
        if self.enabled["judge"]:
            self._start_judge()
        self._set_frame_protocols()

    # -- decisions -----------------------------------------------------------------------------------------

    def _decide(self, name: str, reason: str | None) -> bool:
        use = getattr(self.config, name)
        if use == "skip":
            self.skipped[name] = f"metrics.{name}=skip"
            return False
        if reason is None:
            return True
        if use == "required":
            raise MetricUnavailable(f"metrics.{name}=required but {name} cannot run: {reason}")
        self.skipped[name] = reason
        return False

    def _unavailable(self, name: str, reason: str) -> None:
        """A metric that was planned cannot run after all (missing weights, too few videos)."""
        if getattr(self.config, name) == "required":
            raise MetricUnavailable(f"metrics.{name}=required but {name} cannot run: {reason}")
        self.enabled[name] = False
        self.skipped[name] = reason

    def _load_lpips(self) -> None:
        from scail2.eval.lpips_net import TRUNK_FILES, load_lpips
        from scail2.eval.weights import resolve_weight_file, sha256_file

        net = self.config.lpips_net
        try:
            path = resolve_weight_file(TRUNK_FILES[net], self.config.lpips_weights, what=f"LPIPS {net} trunk")
        except FileNotFoundError as exc:
            self._unavailable("lpips", f"{exc} (or pass metrics.lpips_weights=<file>)")
            return
        self._lpips = load_lpips(net, path).to(self._device)
        self.protocols["lpips"] = (
            f"scail2 LPIPS v0.1-{net}: inputs mapped [0,1] -> [-1,1], per frame, mean over frames then videos; "
            f"trunk {path.name} sha256:{sha256_file(path)[:16]}"
        )

    def _load_i3d(self) -> None:
        from scail2.eval.i3d import I3D_FILE, load_i3d
        from scail2.eval.metrics import FeatureStats
        from scail2.eval.weights import resolve_weight_file, sha256_file

        try:
            path = resolve_weight_file(I3D_FILE, self.config.i3d_weights, what="FVD I3D")
        except FileNotFoundError as exc:
            self._unavailable("fvd", f"{exc} (or pass metrics.i3d_weights=<file>)")
            return
        self._detector = load_i3d(path).to(self._device)
        self._detector_label = f"{path.name} sha256:{sha256_file(path)[:16]}"
        self._fvd_real, self._fvd_fake = FeatureStats(), FeatureStats()

    def _start_judge(self) -> None:
        from scail2.eval.judge import VideoJudge, dimension

        self._judge = VideoJudge(self.judge_config)
        cfg = self.judge_config
        digests = {d: self._judge.prompt_digest(dimension(d), False)[:12] for d in self.config.judge_dimensions}
        for name, digest in digests.items():
            self.protocols[name] = (
                f"scail2 Video-Bench-style judge, prompts {cfg.prompt_version} (sha256:{digest}), model {cfg.model}, "
                f"temperature 0, {cfg.repeats} repeat(s), score 1-5; mean over videos of per-video means"
            )

    def _set_frame_protocols(self) -> None:
        if not (self.enabled["psnr"] or self.enabled["ssim"]):
            return  # judge-only runs never import the metrics module (torchmetrics takes seconds to import)
        from scail2.eval.metrics import PSNR_MAX_DB

        self.protocols["psnr"] = (
            f"scail2 PSNR: 10 log10(1/mse) per frame on [0,1], capped at {PSNR_MAX_DB:g} dB; mean over frames then "
            "videos"
        )
        self.protocols["ssim"] = (
            f"scail2 SSIM: Gaussian 11x11 sigma 1.5, k1 0.01, k2 0.03, data range 1, valid region, RGB mean, "
            f"{self.config.ssim_dtype}; per frame, mean over frames then videos"
        )

    # -- scoring -------------------------------------------------------------------------------------------

    def score(self, case: Case, generated: np.ndarray, fps: float, video: str) -> CaseScores:
        """Score one generated video (uint8 (F, H, W, 3)) of ``case``; returns (and keeps) its scores."""
        result = CaseScores(id=case.id, kind=case.kind, video=video, frames=len(generated), fps=float(fps))
        frame_metrics = [n for n in ("psnr", "ssim", "lpips", "fvd") if self.enabled[n]]
        if case.ground_truth is None and frame_metrics:
            result.notes.append("no ground truth: no frame metrics or FVD for this case")
        if case.ground_truth is not None and frame_metrics:
            from scail2.eval import metrics as M

            truth, _ = read_frames(case.ground_truth, max_frames=len(generated))
            gen_frames, truth, notes = paired_frames(generated, truth)
            result.notes += notes
            result.frames = len(gen_frames)
            preds, target = unit_video(gen_frames), unit_video(truth)  # (1, F, 3, H, W) in [0, 1]
            computed = {}
            if self.enabled["psnr"]:
                computed["psnr"] = M.psnr(preds, target)
            if self.enabled["ssim"]:
                computed["ssim"] = M.ssim(preds, target, dtype=getattr(torch, self.config.ssim_dtype))
            if self.enabled["lpips"]:
                computed["lpips"] = M.lpips(preds, target, model=self._lpips)
            for name, scores in computed.items():
                result.metrics[name] = float(scores.per_video[0])
                result.per_frame[name] = [float(v) for v in scores.per_frame[0]]
            if self.enabled["fvd"]:
                self._fvd_update(preds, target, result)
        if self.enabled["judge"]:
            self._judge_case(unit_video(generated)[0], fps, result)
        self.cases.append(result)
        return result

    def _fvd_update(self, preds: torch.Tensor, target: torch.Tensor, result: CaseScores) -> None:
        from scail2.eval.metrics import FVD_CLIP_FRAMES, i3d_features, video_clips

        if preds.shape[1] < FVD_CLIP_FRAMES:
            self._fvd_short += 1
            result.notes.append(f"{preds.shape[1]} frames: too short for a {FVD_CLIP_FRAMES}-frame FVD clip")
            return
        stride = self.config.fvd_clip_stride
        self._fvd_real.update(i3d_features(video_clips(target, stride=stride), self._detector))
        self._fvd_fake.update(i3d_features(video_clips(preds, stride=stride), self._detector))

    def _judge_case(self, video: torch.Tensor, fps: float, result: CaseScores) -> None:
        from scail2.eval.judge import answers_as_records

        scores = self._judge.score(video, fps, self.config.judge_dimensions)
        self._judge_results.append(scores)
        for name, score in scores.items():
            if score.scores:
                result.metrics[name] = score.mean
                result.judge_std[name] = score.std
            result.judge_failures += len(score.failures)
        if result.judge_failures:
            result.notes.append(f"{result.judge_failures} judge answer(s) failed (see judge_answers.jsonl)")
        self.judge_records += [{"case": result.id, **r} for r in answers_as_records(scores)]

    # -- summary -------------------------------------------------------------------------------------------

    def summarise(self) -> list[MetricSummary]:
        """Benchmark-level values of every metric that ran (FVD is computed here)."""
        out = []
        for name in FRAME_METRICS:
            values = [c.metrics[name] for c in self.cases if name in c.metrics]
            if self.enabled[name] and values:
                # Same reduction as scail2.eval.metrics: float64 mean of the per-video means.
                mean = float(torch.tensor(values, dtype=torch.float64).mean())
                out.append(MetricSummary(name, mean, statistics.pstdev(values), len(values), self.protocols[name]))
        if self.enabled["fvd"]:
            summary = self._fvd_summary()
            if summary is not None:
                out.append(summary)
        if self.enabled["judge"]:
            from scail2.eval.judge import aggregate

            for name, row in aggregate(self._judge_results).items():
                if row["videos"]:
                    extra = {"failed_answers": row["failed_answers"]}
                    videos = int(row["videos"])
                    out.append(MetricSummary(name, row["mean"], row["std"], videos, self.protocols[name], extra))
                else:
                    failed = row["failed_answers"]
                    self.skipped[name] = f"every judge answer for {name} failed ({failed}); see judge_answers.jsonl"
        return out

    def _fvd_summary(self) -> MetricSummary | None:
        from scail2.eval.metrics import FVD_PROTOCOL, fvd_from_stats

        real, fake = self._fvd_real, self._fvd_fake
        if min(real.count, fake.count) < FVD_MIN_VIDEOS:
            short = f" ({self._fvd_short} video(s) shorter than 16 frames)" if self._fvd_short else ""
            self._unavailable(
                "fvd", f"FVD needs at least {FVD_MIN_VIDEOS} clips per set; got {fake.count}{short}: score more cases"
            )
            return None
        # Warnings (too few clips, a singular matrix square root) go into the results next to the value.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fvd_from_stats(real, fake, strict=self.config.fvd_strict, detector=self._detector_label)
        stride = self.config.fvd_clip_stride
        clips = "one clip per video from frame 0" if stride is None else f"every 16-frame clip at stride {stride}"
        protocol = f"{FVD_PROTOCOL}; {clips}; detector {result.detector}; {result.num_fake_clips} clips per set"
        extra: dict[str, Any] = {
            "real_clips": result.num_real_clips,
            "fake_clips": result.num_fake_clips,
            "detector": result.detector,
        }
        messages = list(dict.fromkeys(str(w.message).strip() for w in caught))
        if messages:
            extra["warning"] = " | ".join(messages)
        return MetricSummary("fvd", result.value, math.nan, result.num_fake_clips, protocol, extra)
