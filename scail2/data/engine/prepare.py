"""``scail2-data prepare VIDEOS_DIR OUT``: clips, masks, keypoints, boxes, captions and pose-driven records from
one's own videos.

Per video (in parallel over videos with ``workers``): up to ``clips_per_video`` clips of ``frames`` (4k+1) frames
at the training fps (16; source frame k of a clip is the nearest to k / 16 s), each cut to a size divisible by 32
(a centre crop of the native size, or resize-to-cover ``size``). Per clip:

1. the segmenter's per-character masks (K, F, H, W); no character, more than ``max_characters`` or an empty
   character skips the clip;
2. the keypoint estimator's poses; hand and face boxes from them;
3. the caption (never empty: a failed caption skips the clip; ``captioner: null`` writes records without
   captions and says so in the report) and the OCR hook's text boxes;
4. the files: ``target.mp4`` (the clip), ``target_mask.mp4`` (characters in binding colours on black, the
   animation driving background), ``reference_mask.png`` (the reference frame's mask on white, the animation
   reference background), ``characters.npz`` / ``poses.npz`` (for ``motionpair``), ``pose.mp4`` /
   ``pose_mask.mp4`` (the skeleton render and its binding-colour mask), with ``pose_aug.mp4`` /
   ``pose_mask_aug.mp4`` (a randomly scaled skeleton: the pose swap augmentation), and ``clip.json``;
5. a pose-driven record (source ``pose``, ``end_to_end`` false) when every person matches one character.

Output::

    prepare.json           settings; a resume must match them
    clips/<clip id>/       one folder per kept clip (written to a hidden folder, renamed when complete)
    videos/<key>.json      per video: its clips and its skips (written when the video is done)
    manifest.jsonl         the pose-driven records (`scail2-data validate` accepts them)
    report.json            kept clips and records; skips by reason with a detail line each

A killed run continues where it stopped: finished videos are skipped, finished clips of an unfinished video are
kept as they are, half-written folders are removed. ``retry`` names skip reasons to try again (e.g. after an
endpoint came back).
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scail2.config.components import describe_component, read_components
from scail2.data.engine.components import PrepareComponents, load_prepare_components
from scail2.data.engine.masks import binding_order, match_persons, mode_masks
from scail2.data.engine.pose import random_skeleton_scale, render_poses
from scail2.data.engine.store import (
    Skip,
    Tally,
    atomic_folder,
    call,
    check_settings,
    fingerprint,
    item_key,
    read_json,
    remove_stale,
    stable_seed,
    write_json,
)
from scail2.data.manifest import MotionRecord, Regions, parse_record, write_manifest
from scail2.data.engine.clips import Clip, ClipOrigin, PoseTrack
from scail2.data.transforms import TRAIN_FPS, CropBox, clip_indices, cover_box, crop_resize, resampled_length
from scail2.data.video import VideoDecodeError, VideoReader, write_image, write_video

log = logging.getLogger(__name__)

VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
SETTINGS_NAME = "prepare.json"
MANIFEST_NAME = "manifest.jsonl"
REPORT_NAME = "report.json"
_VERSION = 1


@dataclass(frozen=True)
class PrepareOptions:
    """frames: clip length (4k+1) at ``fps``; min_frames: a video shorter than ``frames`` gives one clip of the
    longest 4k+1 it holds when that is at least ``min_frames`` (default: ``frames``, i.e. shorter videos skip as
    too_short); clips_per_video / stride: clip starts 0, stride, 2 stride ... (in ``fps`` frames; default stride =
    frames: no overlap); size: (height, width) to resize-to-cover (multiples of 32), else the native size centre
    cropped to multiples of ``multiple``; max_characters: clips with more characters skip; seed: reference frames
    and skeleton scales; lossless: RGB-lossless target videos (default 4:2:0 H.264 CRF 18); pose_aug /
    skeleton_scale: the scaled-skeleton swap render and its scale range; limb_radius: skeleton limb radius in
    pixels (default 1/128 of the shorter side)."""

    frames: int = 81
    min_frames: int | None = None
    fps: float = TRAIN_FPS
    clips_per_video: int = 1
    stride: int | None = None
    size: tuple[int, int] | None = None
    multiple: int = 32
    max_characters: int = 6
    seed: int = 0
    lossless: bool = False
    pose_aug: bool = True
    skeleton_scale: tuple[float, float] = (0.8, 1.2)
    limb_radius: float | None = None

    def __post_init__(self) -> None:
        def four_k_plus_1(name: str, n: int) -> None:
            if n < 5 or (n - 1) % 4:
                lo = max(5, (n - 1) // 4 * 4 + 1)
                raise ValueError(f"{name} {n}; need 4k+1 >= 5 (e.g. {lo} or {lo + 4})")

        four_k_plus_1("frames", self.frames)
        if self.min_frames is not None:
            four_k_plus_1("min_frames", self.min_frames)
            if self.min_frames > self.frames:
                raise ValueError(f"min_frames {self.min_frames} is more than frames {self.frames}")
        if self.clips_per_video < 1 or (self.stride is not None and self.stride < 1):
            raise ValueError(f"clips_per_video {self.clips_per_video} and stride {self.stride} must be >= 1")
        if self.size is not None and any(v < self.multiple or v % self.multiple for v in self.size):
            raise ValueError(f"size {self.size[0]}x{self.size[1]}: height and width must be multiples of {self.multiple}")
        if not 1 <= self.max_characters:
            raise ValueError(f"max_characters {self.max_characters} must be >= 1")
        if self.fps <= 0:
            raise ValueError(f"fps {self.fps} must be positive")


@dataclass
class PrepareReport:
    out_dir: Path
    manifest: Path
    videos: int  # videos found
    clips: int  # kept clips (all runs)
    new_clips: int  # clips written by this run
    records: int  # pose-driven records in the manifest
    skipped: dict[str, int]  # reason -> videos or clips skipped (and pose records not made)
    details: list[dict[str, str]]
    captions: str  # the captioner, or "none"
    seconds: float

    def summary(self) -> str:
        lines = [f"{self.out_dir}: {self.clips} clips ({self.new_clips} new) from {self.videos} videos, "
                 f"{self.records} pose records in {self.manifest.name}; captions: {self.captions}; {self.seconds:.1f} s"]  # fmt: skip
        if self.skipped:
            lines.append("skipped:")
            lines += [f"  {r}: {n}" for r, n in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0]))]
        return "\n".join(lines)


def find_videos(root: Path) -> list[str]:
    """Relative paths (posix) of the video files under ``root``, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith("."))  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# One clip
# --------------------------------------------------------------------------------------------------------


def _clip_plan(num_frames: int, fps: float, options: PrepareOptions) -> tuple[int, list[int]] | None:
    """(clip length, clip starts in resampled frames), or None when the video is too short."""
    available = resampled_length(num_frames, fps, options.fps)
    length = options.frames
    if available < length:
        length = (available - 1) // 4 * 4 + 1 if available >= 1 else 0
        if length < (options.min_frames or options.frames):
            return None
    stride = options.stride or options.frames
    starts = [k * stride for k in range(options.clips_per_video) if k * stride + length <= available]
    return length, starts


def _window(height: int, width: int, options: PrepareOptions) -> tuple[CropBox, tuple[int, int]] | None:
    if options.size is not None:
        return cover_box(height, width, *options.size).rounded(), options.size
    h, w = height // options.multiple * options.multiple, width // options.multiple * options.multiple
    if h == 0 or w == 0:
        return None
    return CropBox((height - h) // 2, (width - w) // 2, h, w), (h, w)


def check_masks(masks: Any, frames: int, size: tuple[int, int], max_characters: int) -> np.ndarray:
    """The segmenter's answer as (K, F, H, W) bool, or `Skip` naming what is wrong."""
    if not isinstance(masks, np.ndarray) or masks.ndim != 4 or masks.shape[1:] != (frames, *size):
        shape = getattr(masks, "shape", type(masks).__name__)
        raise Skip("segmenter_bad_output", f"masks of shape {shape}; need (K, {frames}, {size[0]}, {size[1]})")
    masks = masks.astype(bool) if masks.dtype != bool else masks
    if masks.shape[0] == 0:
        raise Skip("no_character", "the segmenter found no character")
    if masks.shape[0] > max_characters:
        raise Skip("too_many_characters", f"{masks.shape[0]} characters; at most {max_characters} (max_characters)")
    empty = [k for k in range(masks.shape[0]) if not masks[k].any()]
    if empty:
        raise Skip("segmenter_empty_character", f"character {empty[0]} has an empty mask in every frame")
    return masks


def check_track(track: Any, frames: int, size: tuple[int, int]) -> PoseTrack:
    if not isinstance(track, PoseTrack):
        raise Skip("keypoints_bad_output", f"the keypoint estimator returned {type(track).__name__}, not a PoseTrack")
    if track.frames != frames or (track.height, track.width) != size:
        raise Skip("keypoints_bad_output", f"poses of {track.frames} frames at {track.height}x{track.width}; the clip "
                   f"has {frames} at {size[0]}x{size[1]}")  # fmt: skip
    return track


def check_boxes(boxes: Any, frames: int, size: tuple[int, int], what: str) -> list[list[tuple[float, float, float, float]]]:
    h, w = size
    if not isinstance(boxes, (list, tuple)) or len(boxes) != frames:
        got = len(boxes) if isinstance(boxes, (list, tuple)) else type(boxes).__name__
        raise Skip(f"{what}_bad_output", f"{got} frames of boxes for a {frames}-frame clip")
    out = []
    for i, frame in enumerate(boxes):
        row = []
        for box in frame:
            try:
                x0, y0, x1, y1 = (float(v) for v in box)
            except (TypeError, ValueError):
                raise Skip(f"{what}_bad_output", f"frame {i}: {box!r} is not [x0, y0, x1, y1]") from None
            x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)
            if x1 - x0 < 1 or y1 - y0 < 1:
                raise Skip(f"{what}_bad_output", f"frame {i}: box {box!r} is empty inside the {h}x{w} clip")
            row.append((round(x0, 2), round(y0, 2), round(x1, 2), round(y1, 2)))
        out.append(row)
    return out


def _save_masks(path: Path, masks: np.ndarray) -> None:
    np.savez_compressed(path, masks=np.packbits(masks, axis=-1), shape=np.array(masks.shape))


def load_masks(path: Path) -> np.ndarray:
    """(K, F, H, W) bool masks of a clip folder's ``characters.npz``."""
    with np.load(path, allow_pickle=False) as data:
        shape = tuple(int(v) for v in data["shape"])
        return np.unpackbits(data["masks"], axis=-1, count=shape[-1]).astype(bool).reshape(shape)


def load_poses(path: Path) -> tuple[PoseTrack, list[int] | None]:
    """The clip's `PoseTrack` and each person's character (None when they did not match) from ``poses.npz``."""
    from scail2.data.engine.pose import layout_by_name

    with np.load(path, allow_pickle=False) as data:
        layout = layout_by_name(str(data["layout"]))
        h, w = (int(v) for v in data["size"])
        assign = [int(v) for v in data["person_character"]]
        track = PoseTrack(data["keypoints"].astype(np.float64), layout, h, w, float(data["fps"]))
    return track, (assign if all(a >= 0 for a in assign) and assign else None)


def _process_clip(clip: Clip, folder: Path, rel: str, index: int, components: PrepareComponents,
                  options: PrepareOptions) -> None:  # fmt: skip
    f, h, w = clip.frames.shape[:3]
    masks = check_masks(call("segmenter", components.segmenter.segment, clip), f, (h, w), options.max_characters)
    track = check_track(call("keypoints", components.keypoints.estimate, clip), f, (h, w))
    caption, caption_source = "", "none"
    if components.captioner is not None:
        caption = call("caption", components.captioner.caption, clip)
        if not isinstance(caption, str) or not caption.strip():
            raise Skip("caption_empty", f"the captioner returned {caption!r}")
        caption, caption_source = caption.strip(), "captioner"
    ocr = None
    if components.ocr is not None:
        ocr = check_boxes(call("ocr", components.ocr.detect, clip), f, (h, w), "ocr")
    hands = track.hand_boxes() if track.layout.hands else None
    faces = track.face_boxes() if track.layout.faces else None
    order = binding_order(masks)  # the real characters' slots, shared by every mask of the clip
    rng = np.random.default_rng(stable_seed(options.seed, clip.id))
    reference = int(rng.integers(f))
    assignment = match_persons(track, masks)

    with atomic_folder(folder) as tmp:
        write_video(tmp / "target.mp4", clip.frames, clip.fps, lossless=options.lossless)
        write_video(tmp / "target_mask.mp4", mode_masks(masks, "animation", "driving", order), clip.fps, lossless=True)
        write_image(tmp / "reference_mask.png", mode_masks(masks[:, reference : reference + 1], "animation", "reference", order)[0])
        _save_masks(tmp / "characters.npz", masks)
        np.savez_compressed(tmp / "poses.npz", keypoints=track.keypoints.astype(np.float32), layout=track.layout.name,
                            size=np.array([h, w]), fps=np.array(clip.fps),
                            person_character=np.array(assignment if assignment is not None else [-1] * track.persons))  # fmt: skip
        pose_skip = None
        if track.persons == 0:
            pose_skip = ("pose_no_person", "the keypoint estimator found nobody")
        elif assignment is None:
            pose_skip = ("pose_unmatched", f"{track.persons} persons do not pair up with {masks.shape[0]} characters")
        files = {}
        if pose_skip is None:
            # Each person's skeleton region takes its character's binding colour.
            render = render_poses(track, limb_radius=options.limb_radius)
            by_character = np.zeros_like(masks)
            for p, k in enumerate(assignment):
                by_character[k] = render.masks[p]
            write_video(tmp / "pose.mp4", render.frames, clip.fps, lossless=True)
            write_video(tmp / "pose_mask.mp4", mode_masks(by_character, "animation", "driving", order), clip.fps, lossless=True)
            files = {"driving": "pose.mp4", "driving_mask": "pose_mask.mp4"}
            if options.pose_aug:
                scaled, factors = random_skeleton_scale(track, rng, options.skeleton_scale)
                aug = render_poses(scaled, limb_radius=options.limb_radius)
                aug_by_character = np.zeros_like(masks)
                for p, k in enumerate(assignment):
                    aug_by_character[k] = aug.masks[p]
                write_video(tmp / "pose_aug.mp4", aug.frames, clip.fps, lossless=True)
                write_video(tmp / "pose_mask_aug.mp4", mode_masks(aug_by_character, "animation", "driving", order),
                            clip.fps, lossless=True)  # fmt: skip
                files.update(driving_aug="pose_aug.mp4", driving_mask_aug="pose_mask_aug.mp4")
        meta = {"origin": clip.origin.to_json(), "video": rel, "clip": index, "characters": int(masks.shape[0]),
                "caption_source": caption_source}  # fmt: skip
        record = None
        if pose_skip is None:
            record = {"id": clip.id, "source": "pose", "mode": "animation", **files, "target": "target.mp4",
                      "reference": reference, "reference_mask": "reference_mask.png", "target_mask": "target_mask.mp4",
                      "fps": clip.fps, "caption": caption, "end_to_end": False, "frames": f, "height": h, "width": w,
                      "meta": meta}  # fmt: skip
            for name, boxes in (("hands", hands), ("faces", faces), ("ocr", ocr)):
                if boxes is not None:
                    record[name] = [[list(b) for b in frame] for frame in boxes]
        info = {"id": clip.id, "video": rel, "clip": index, "frames": f, "height": h, "width": w, "fps": clip.fps,
                "characters": int(masks.shape[0]), "persons": track.persons, "reference": reference,
                "caption": caption, "caption_source": caption_source, "order": order, "origin": clip.origin.to_json(),
                "hands": hands, "faces": faces, "ocr": ocr, "record": record,
                "pose_record_skipped": None if pose_skip is None else {"reason": pose_skip[0], "detail": pose_skip[1]}}  # fmt: skip
        write_json(tmp / "clip.json", info)


def _process_video(root: Path, rel: str, out: Path, components: PrepareComponents, options: PrepareOptions) -> dict:
    """Every clip of one video; writes the video's marker and returns it with ``new``: the clips written now."""
    key = item_key(rel)
    tally = Tally()
    clips: list[str] = []
    new = 0
    path = root / rel
    try:
        with VideoReader(path) as reader:
            n, fps0, (h0, w0) = reader.num_frames, reader.fps, reader.size
            if not fps0 or fps0 <= 0:
                raise Skip("video_no_fps", f"{rel}: the container gives no frame rate")
            plan = _clip_plan(n, fps0, options)
            if plan is None:
                available = resampled_length(n, fps0, options.fps)
                raise Skip("too_short", f"{rel}: {available} frames at {options.fps:g} fps; need {options.min_frames or options.frames}")
            window = _window(h0, w0, options)
            if window is None:
                raise Skip("too_small", f"{rel}: {h0}x{w0} has no {options.multiple}-pixel multiple inside")
            box, size = window
            length, starts = plan
            for index, start in enumerate(starts):
                cid = f"{key}_c{index}"
                folder = out / "clips" / cid
                if (folder / "clip.json").is_file():
                    clips.append(cid)
                    continue
                indices = clip_indices(n, fps0, length, start, options.fps)
                try:
                    raw = call("video", reader.read, indices)  # (L, H0, W0, 3); repeated indices repeat frames
                    frames = crop_resize(torch.from_numpy(raw).permute(0, 3, 1, 2), box, size).permute(0, 2, 3, 1).numpy()
                    origin = ClipOrigin(str(path), (h0, w0), float(fps0), tuple(indices),
                                        (int(box.top), int(box.left), int(box.height), int(box.width)), size)  # fmt: skip
                    clip = Clip(cid, np.ascontiguousarray(frames), options.fps, origin=origin)
                    _process_clip(clip, folder, rel, index, components, options)
                    clips.append(cid)
                    new += 1
                except Skip as exc:
                    tally.skip(exc.reason, exc.detail, video=rel, clip=cid)
    except VideoDecodeError as exc:
        tally.skip(f"video_{exc.reason}", exc.detail, video=rel)
    except Skip as exc:
        tally.skip(exc.reason, exc.detail, video=rel)
    marker = {"video": rel, "clips": clips, "skips": tally.details}
    write_json(out / "videos" / f"{key}.json", marker)
    return {**marker, "new": new}


# --------------------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------------------

# Per worker process: the components it built (models are loaded once per process, not per video).
_WORKER: dict[str, Any] = {}


def _init_worker(spec: Any) -> None:
    _WORKER["components"] = spec if isinstance(spec, PrepareComponents) else load_prepare_components(spec)


def _worker_video(root: Path, rel: str, out: Path, options: PrepareOptions) -> dict:
    return _process_video(root, rel, out, _WORKER["components"], options)


# --------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------


def prepare_videos(
    videos_dir: str | Path,
    out_dir: str | Path,
    components: str | Path | Mapping[str, Any] | PrepareComponents,
    options: PrepareOptions = PrepareOptions(),
    *,
    workers: int = 1,
    retry: Sequence[str] = (),
    progress: bool = True,
) -> PrepareReport:
    """Prepare (or continue preparing) every video under ``videos_dir`` into ``out_dir`` (module docstring).

    components: a preset name, a YAML/JSON file, a mapping (see `load_prepare_components`) or built components.
    With ``workers`` > 1 each worker process builds its own components from the spec (built components are
    pickled to them instead). retry: skip reasons whose videos are processed again.
    """
    start = time.perf_counter()
    root = Path(videos_dir).resolve()
    out = Path(out_dir).resolve()
    if not root.is_dir():
        raise ValueError(f"videos folder {root} does not exist")
    videos = find_videos(root)
    if not videos:
        raise ValueError(f"no videos under {root} (looked for {', '.join(VIDEO_SUFFIXES)})")
    if isinstance(components, PrepareComponents):
        built, spec_fp, spec = components, components.specs, components
        captions = components.specs.get("captioner", "none" if components.captioner is None else repr(components.captioner))
    else:
        raw = read_components(components, "prepare")
        built = load_prepare_components(raw) if workers <= 1 else None
        spec_fp, spec = fingerprint(raw), raw
        captions = "none" if raw.get("captioner") is None else describe_component(raw["captioner"])
    out.mkdir(parents=True, exist_ok=True)
    settings = {"version": _VERSION, "videos_dir": str(root), "options": asdict(options), "components": spec_fp}
    check_settings(out / SETTINGS_NAME, settings)
    remove_stale(out / "clips")
    remove_stale(out / "videos")

    retry = set(retry)
    markers: dict[str, dict] = {}
    todo: list[str] = []
    for rel in videos:
        marker_path = out / "videos" / f"{item_key(rel)}.json"
        if marker_path.is_file():
            marker = read_json(marker_path)
            if not any(s["reason"] in retry for s in marker["skips"]):
                markers[rel] = marker
                continue
        todo.append(rel)

    from tqdm import tqdm

    bar = tqdm(total=len(videos), initial=len(videos) - len(todo), unit="video", desc="prepare",
               disable=not progress, file=sys.stderr)  # fmt: skip
    try:
        if workers <= 1 or len(todo) <= 1:
            comps = built if built is not None else load_prepare_components(spec)
            for rel in todo:
                markers[rel] = _process_video(root, rel, out, comps, options)
                bar.update(1)
        else:
            # spawn, not fork: the parent may run decoder and torch threads.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=(spec,)) as pool:  # fmt: skip
                futures = {pool.submit(_worker_video, root, rel, out, options): rel for rel in todo}
                for future in as_completed(futures):
                    markers[futures[future]] = future.result()
                    bar.update(1)
    finally:
        bar.close()
    return _assemble(out, videos, markers, captions, start)


def _assemble(out: Path, videos: list[str], markers: dict[str, dict], captions: str, start: float) -> PrepareReport:
    tally = Tally()
    records: list[MotionRecord] = []
    new = 0
    for rel in videos:
        marker = markers[rel]
        new += marker.get("new", 0)
        for skip in marker["skips"]:
            tally.skip(skip["reason"], skip["detail"], **{k: v for k, v in skip.items() if k not in ("reason", "detail")})
        for cid in marker["clips"]:
            folder = out / "clips" / cid
            info = read_json(folder / "clip.json")
            tally.kept += 1
            if info["record"] is not None:
                records.append(parse_record(info["record"], folder))
            else:
                s = info["pose_record_skipped"]
                tally.skip(f"{s['reason']}", s["detail"], video=rel, clip=cid)
    manifest = out / MANIFEST_NAME
    if records:
        write_manifest(manifest, records)
    elif manifest.exists():
        manifest.unlink()
    report = PrepareReport(out, manifest, len(videos), tally.kept, new, len(records), dict(tally.skipped),
                           tally.details, captions, time.perf_counter() - start)  # fmt: skip
    write_json(out / REPORT_NAME, {**asdict(report), "out_dir": str(out), "manifest": str(manifest)})
    return report
