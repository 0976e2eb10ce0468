"""Checks every manifest record before training: types, files, decodability, agreement, mask palette.

`validate_manifest` returns one `RecordReport` per bad record; its ``line()`` is
``<id>: <field>: <reason>[; <field>: <reason> ...]``, which the CLI prints.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scail2.data.buckets import Bucket, assign_bucket
from scail2.data.manifest import MotionRecord, iter_manifest
from scail2.data.records import BoxTrack, ManifestError
from scail2.data.transforms import TRAIN_FPS, resampled_length
from scail2.data.video import VFR_TOLERANCE, VideoDecodeError, VideoReader, read_image, variable_rate


@dataclass(frozen=True)
class ValidateOptions:
    """full: decode every frame (default: first, middle and last frame of each video).
    palette_tolerance: largest fraction of mask pixels allowed off the 8-colour palette.
    min_frames: fewest frames at 16 fps a record must have (when ``buckets`` is empty).
    buckets: when given, the record must fit one of them.
    fps_tolerance: relative difference allowed between the record's fps and the container's.
    vfr_tolerance: relative deviation of a frame interval from the median that counts as a variable frame rate
        (`scail2.data.video.variable_rate`); variable-rate videos are refused, not resampled.
    """

    full: bool = False
    palette_tolerance: float = 0.01
    min_frames: int = 5
    buckets: tuple[Bucket, ...] = ()
    fps_tolerance: float = 0.01
    vfr_tolerance: float = VFR_TOLERANCE


@dataclass
class RecordReport:
    record_id: str
    problems: list[tuple[str, str]] = field(default_factory=list)  # (field, reason)
    line_number: int | None = None

    def add(self, field_name: str, reason: str) -> None:
        self.problems.append((field_name, reason))

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        return f"{self.record_id}: " + "; ".join(f"{f}: {r}" for f, r in self.problems)


@dataclass
class VideoInfo:
    """What `probe_video` read of a video: frame count, container fps, (height, width) and, when kept, the
    decoded frames (first, middle and last, or all with ``full``) for the palette check of masks."""

    frames: int
    fps: float
    size: tuple[int, int]
    sample: np.ndarray | None


def probe_video(path: Path, name: str, report: RecordReport, options: ValidateOptions, keep: bool) -> VideoInfo | None:
    """Open and decode a video as the checks need it; a failure is added to ``report`` (None returned)."""
    try:
        with VideoReader(path) as reader:
            n = reader.num_frames
            indices = list(range(n)) if options.full else sorted({0, n // 2, n - 1})
            frames = reader.read(indices)
            info = VideoInfo(n, reader.fps, reader.size, frames if keep else None)
    except VideoDecodeError as exc:
        report.add(name, f"{exc.reason}: {exc.detail} ({path})")
        return None
    except Exception as exc:  # a decoder crash must not stop the scan of the other records
        report.add(name, f"unreadable: {type(exc).__name__}: {exc} ({path})")
        return None
    try:
        problem = variable_rate(path, options.vfr_tolerance)
    except Exception:  # noqa: BLE001 - a container PyAV cannot demux: its timing cannot be checked here
        problem = None
    if problem is not None:
        report.add(name, f"{problem} ({path})")
    return info


def probe_videos(paths: dict[str, Path], masks: set[str], report: RecordReport, options: ValidateOptions) -> dict[str, VideoInfo]:
    """`probe_video` for every video of a record by field name; the frames of the ``masks`` fields are kept."""
    videos = {}
    for name, path in paths.items():
        info = probe_video(path, name, report, options, keep=name in masks)
        if info is not None:
            videos[name] = info
    return videos


def _unit(frames: np.ndarray) -> torch.Tensor:
    from scail2.conditioning.pixels import to_unit

    return to_unit(torch.from_numpy(frames).permute(0, 3, 1, 2))  # (F, 3, H, W) in [-1, 1]


def check_palette(frames: np.ndarray, name: str, report: RecordReport, options: ValidateOptions) -> None:
    """Mask frames (F, H, W, 3) uint8 use the 8-colour mask palette (up to ``options.palette_tolerance``)."""
    from scail2.conditioning.masks import palette_violation_fraction

    fraction = palette_violation_fraction(_unit(frames))
    if fraction > options.palette_tolerance:
        report.add(
            name,
            f"{fraction:.1%} of pixels are off the mask palette (tolerance {options.palette_tolerance:.1%}); draw masks "
            "only in black, white, red, green, blue, yellow, magenta, cyan and store them lossless",
        )


def white_fraction(frames: np.ndarray) -> float:
    """Share of white (environment-switch) pixels of mask frames (F, H, W, 3) uint8."""
    from scail2.conditioning.masks import ON_LEVEL

    return float((frames > ON_LEVEL).all(axis=-1).mean())


def check_video_mask(frames: np.ndarray, name: str, mode: str, report: RecordReport, options: ValidateOptions) -> None:
    """A driving-side mask video: on the palette, drawn on the mode's background (animation: black,
    replacement: white, the environment switch)."""
    check_palette(frames, name, report, options)
    white = white_fraction(frames)
    if mode == "animation" and white > options.palette_tolerance:
        report.add(
            name,
            f"{white:.0%} white pixels in animation mode; the background must be black "
            "(white is the replacement-mode environment switch)",
        )
    if mode == "replacement" and white == 0:
        report.add(name, "no white pixels in replacement mode; the background must be white (the environment switch)")


def check_reference_background(frames: np.ndarray, mode: str, report: RecordReport, options: ValidateOptions) -> None:
    """Reference masks are drawn on the mode's reference background (SPEC §3): white in animation mode (the
    reference's environment is kept), black in replacement mode; they reach the model as given."""
    white = white_fraction(frames)
    if mode == "animation" and white == 0:
        report.add(
            "reference_mask",
            "no white pixels in animation mode; animation-mode reference masks are drawn on white (the reference "
            "background is kept): redraw the background white",
        )
    if mode == "replacement" and white > options.palette_tolerance:
        report.add(
            "reference_mask",
            f"{white:.0%} white pixels in replacement mode; replacement-mode reference masks are drawn on black "
            "(white is the driving side's environment switch)",
        )


def check_pair_videos(
    record, videos: dict[str, VideoInfo], main: str, timed: Sequence[str], report: RecordReport, options: ValidateOptions
) -> None:
    """The videos of a pair agree with its ``main`` video (frame count and size), the ``timed`` ones with the
    record's fps; the record's declared frames / height / width are the main video's; it fits a bucket (or
    ``options.min_frames``). ``record`` has ``fps``, ``frames``, ``height`` and ``width``."""
    info_main = videos[main]
    for name, info in videos.items():
        if name == main:
            continue
        if info.frames != info_main.frames:
            report.add(name, f"has {info.frames} frames but {main} has {info_main.frames}; every video of a pair needs the same count")
        if info.size != info_main.size:
            h, w = info.size
            report.add(name, f"is {h}x{w} but {main} is {info_main.size[0]}x{info_main.size[1]}; videos and masks of a pair need one size")
    for name in timed:
        info = videos.get(name)
        if info is not None and info.fps > 0 and abs(info.fps - record.fps) > options.fps_tolerance * record.fps:
            report.add(name, f"container says {info.fps:g} fps but the record says fps={record.fps:g}")
    for meta_field, actual in (("frames", info_main.frames), ("height", info_main.size[0]), ("width", info_main.size[1])):
        declared = getattr(record, meta_field)
        if declared is not None and declared != actual:
            report.add(meta_field, f"record says {declared} but the {main} video has {actual}")
    available = resampled_length(info_main.frames, record.fps, TRAIN_FPS)
    if options.buckets:
        h, w = info_main.size
        if assign_bucket(info_main.frames, record.fps, h, w, options.buckets) is None:
            shortest = min(b.frames for b in options.buckets)
            report.add(main, f"too short: {available} frames at 16 fps; the shortest bucket needs {shortest}")
    elif available < options.min_frames:
        report.add(main, f"too short: {available} frames at 16 fps; need at least {options.min_frames}")


def check_reference(record, main: VideoInfo | None, main_name: str, report: RecordReport, options: ValidateOptions) -> None:
    """``record.reference`` (a frame index into the main video, or an image) and ``record.reference_mask`` (when
    not None): the index is in range, files decode, the mask has the reference's size, palette and background."""
    ref_size = None
    if isinstance(record.reference, int):
        if main is not None and record.reference >= main.frames:
            report.add("reference", f"frame {record.reference} is past the end of the {main.frames}-frame {main_name}")
        ref_size = main.size if main is not None else None
    else:
        try:
            ref_size = read_image(record.reference).shape[:2]
        except VideoDecodeError as exc:
            report.add("reference", f"{exc.reason}: {exc.detail}")
    if record.reference_mask is None:
        return
    try:
        ref_mask = read_image(record.reference_mask)
        if ref_size is not None and tuple(ref_mask.shape[:2]) != tuple(ref_size):
            report.add("reference_mask", f"is {ref_mask.shape[0]}x{ref_mask.shape[1]} but the reference is {ref_size[0]}x{ref_size[1]}")
        check_palette(ref_mask[None], "reference_mask", report, options)
        check_reference_background(ref_mask[None], record.mode, report, options)
    except VideoDecodeError as exc:
        report.add("reference_mask", f"{exc.reason}: {exc.detail}")


def check_boxes(name: str, track: BoxTrack, main: VideoInfo, main_name: str, report: RecordReport) -> None:
    """A per-frame box track has one entry per frame of the main video and its boxes lie inside it."""
    if len(track) != main.frames:
        report.add(name, f"has boxes for {len(track)} frames but {main_name} has {main.frames}")
    h, w = main.size
    for i, frame in enumerate(track):
        bad = [b for b in frame if b[0] < -1 or b[1] < -1 or b[2] > w + 1 or b[3] > h + 1]
        if bad:
            report.add(name, f"frame {i} box {list(bad[0])} lies outside the {h}x{w} {main_name}")
            break


_MOTION_MASKS = {"driving_mask", "driving_mask_aug", "target_mask"}


def validate_record(record: MotionRecord, options: ValidateOptions = ValidateOptions()) -> RecordReport:
    """All checks of one parsed record."""
    report = RecordReport(record.id)
    videos = probe_videos(record.video_fields(), _MOTION_MASKS, report, options)
    target = videos.get("target")
    if target is not None:
        check_pair_videos(record, videos, "target", ("target", "driving"), report, options)
    for name in sorted(_MOTION_MASKS & set(videos)):
        if videos[name].sample is not None:
            check_video_mask(videos[name].sample, name, record.mode, report, options)
    check_reference(record, target, "target", report, options)
    for name in ("hands", "faces", "ocr"):
        region = getattr(record, name)
        if region is not None and region.boxes is not None and target is not None:
            check_boxes(name, region.boxes, target, "target", report)
    return report


def _validate_one(args: tuple[Callable[[Any, ValidateOptions], RecordReport], Any, ValidateOptions, int]) -> RecordReport:
    check, record, options, line = args
    try:
        report = check(record, options)
    except Exception as exc:  # noqa: BLE001 - one record's failing check must not end the scan of the others
        report = RecordReport(record.id)
        report.add("<record>", f"a check failed: {type(exc).__name__}: {exc}")
    report.line_number = line
    return report


def validate_items(
    items: Iterable[tuple[int, Any]],
    check: Callable[[Any, ValidateOptions], RecordReport],
    options: ValidateOptions = ValidateOptions(),
    workers: int = 1,
) -> Iterator[RecordReport]:
    """A report per ``(line, record or ManifestError)`` item of a manifest: parse errors and duplicate ids first,
    then ``check(record, options)`` of every other record in manifest order (in ``workers`` processes when > 1;
    ``check`` must then be a module-level function)."""
    jobs: list[tuple[Callable, Any, ValidateOptions, int]] = []
    early: list[RecordReport] = []
    seen: dict[str, int] = {}
    for line, item in items:
        if isinstance(item, ManifestError):
            report = RecordReport(item.record_id or f"<line {line}>", line_number=line)
            report.add(item.field, item.reason)
            early.append(report)
            continue
        if item.id in seen:
            report = RecordReport(item.id, line_number=line)
            report.add("id", f"duplicate id (first on line {seen[item.id]})")
            early.append(report)
            continue
        seen[item.id] = line
        jobs.append((check, item, options, line))
    yield from early
    if workers > 1 and len(jobs) > 1:
        # spawn, not fork: forking a process that already runs decoder/torch threads can deadlock the child.
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            yield from pool.map(_validate_one, jobs, chunksize=max(1, len(jobs) // (4 * workers)))
    else:
        for job in jobs:
            yield _validate_one(job)


def validate_manifest(path: str | Path, options: ValidateOptions = ValidateOptions(), workers: int = 1) -> Iterator[RecordReport]:
    """Yield a report per record (parse errors and duplicate ids first, then every record in manifest order)."""
    return validate_items(iter_manifest(path), validate_record, options, workers)
