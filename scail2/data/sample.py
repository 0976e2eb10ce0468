"""One training sample in pixel space: the random choices, decoding, clip cutting and spatial transforms.

The pipeline for a record and a bucket is

    draw_pixel_choices  -> orientation (reverse / forward), clip start, reference frame, crop/stretch or
                           skeleton scale of the driving video
    load_pixel_sample   -> decode exactly the frames needed, fit everything to the bucket, keep masks and
                           region boxes aligned, return uint8 tensors (`PixelSample`)

The latent stage (`scail2.data.latents`) encodes a `PixelSample`. Choices that need pixels are drawn here;
the driving swap works on latents and is drawn at load time (`draw_swap`), so a latent cache can keep the
pixel choices fixed and still swap per draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scail2.conditioning.masks import video_mask_to_reference
from scail2.data.buckets import Bucket
from scail2.data.manifest import MotionRecord
from scail2.data.transforms import (
    TRAIN_FPS,
    CropBox,
    clip_indices,
    content_centre,
    cover_box,
    crop_resize,
    random_crop_stretch,
    rasterize_boxes,
    resampled_length,
    threshold_region,
    transform_boxes,
)
from scail2.data.video import Backend, VideoDecodeError, VideoReader, read_image

# Why a sample was skipped; the datasets count skips per (source, reason).
SKIP_REASONS: tuple[str, ...] = ("missing", "empty", "unreadable", "truncated", "too_short", "mismatch", "invalid")
REGION_NAMES: tuple[str, ...] = ("hands", "faces", "ocr")


class SampleError(RuntimeError):
    """A record that cannot produce a sample; ``reason`` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, field_name: str, detail: str):
        self.reason = reason
        self.field = field_name
        self.detail = detail
        super().__init__(f"{field_name}: {reason}: {detail}")


@dataclass(frozen=True)
class AugmentOptions:
    """Per-sample randomness of the training mix (SPEC §5-6; values marked 'ours' are not published).

    forward_fraction: share of eligible pairs (end-to-end, with a ``target_mask``) run forward, the synthetic
        video as the target and the real one driving (paper: about 5%).
    swap_p_end_to_end / swap_p_pose: probability of using ``driving_aug`` + ``driving_mask_aug`` instead of
        the driving video and its mask (official config: 0.56 / 0.75).
    crop_p, crop_scale, stretch: random crop (side fraction kept) and stretch (width/height ratio change) of
        end-to-end driving videos (ours: p 0.5, 0.8-1.0, 0.9-1.1).
    skeleton_scale_p, skeleton_scale: random scaling of pose renders about the character's centre
        (ours: p 0.5, 0.8-1.2).
    sample_reference: draw the reference frame anywhere in the target when the record has a ``target_mask``
        (paper: the reference is sampled from the target); otherwise the record's ``reference`` is used.
    """

    forward_fraction: float = 0.05
    swap_p_end_to_end: float = 0.56
    swap_p_pose: float = 0.75
    crop_p: float = 0.5
    crop_scale: tuple[float, float] = (0.8, 1.0)
    stretch: tuple[float, float] = (0.9, 1.1)
    skeleton_scale_p: float = 0.5
    skeleton_scale: tuple[float, float] = (0.8, 1.2)
    sample_reference: bool = True

    def __post_init__(self) -> None:
        for name in ("forward_fraction", "swap_p_end_to_end", "swap_p_pose", "crop_p", "skeleton_scale_p"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"AugmentOptions.{name} = {v}; need a probability in [0, 1]")
        for name in ("crop_scale", "stretch", "skeleton_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"AugmentOptions.{name} = {(lo, hi)}; need 0 < low <= high")
        if self.crop_scale[1] > 1:
            raise ValueError(f"AugmentOptions.crop_scale = {self.crop_scale}; a crop keeps at most the whole frame (<= 1)")

    @classmethod
    def none(cls) -> "AugmentOptions":
        """No randomness besides clip start and reference frame: every pair reverse, no swap, no crop/scale."""
        return cls(forward_fraction=0.0, swap_p_end_to_end=0.0, swap_p_pose=0.0, crop_p=0.0, skeleton_scale_p=0.0)


@dataclass(frozen=True)
class VideoMeta:
    """What the sampler needs to know about a record's target video before decoding it."""

    num_frames: int
    fps: float
    height: int
    width: int

    @property
    def frames_at_train_fps(self) -> int:
        return resampled_length(self.num_frames, self.fps, TRAIN_FPS)


def record_meta(record: MotionRecord, backend: Backend = "auto") -> VideoMeta:
    """Frame count and size of the target: from the record when given, else from the file's header.

    Raises `SampleError` (reason ``missing`` / ``empty`` / ``unreadable``) when the file cannot be opened.
    """
    return video_meta(record, "target", backend)


def video_meta(record, field_name: str, backend: Backend = "auto") -> VideoMeta:
    """`VideoMeta` of the record's video ``field_name`` at the record's fps: the record's ``frames`` /
    ``height`` / ``width`` when all are given, else the file's header. Raises `SampleError`."""
    if record.frames is not None and record.height is not None and record.width is not None:
        return VideoMeta(record.frames, record.fps, record.height, record.width)
    try:
        with VideoReader(getattr(record, field_name), backend) as reader:
            return VideoMeta(reader.num_frames, record.fps, *reader.size)
    except VideoDecodeError as exc:
        raise SampleError(exc.reason, field_name, exc.detail) from None


@dataclass(frozen=True)
class PixelChoices:
    """The random decisions that need pixels (fixed in a latent cache)."""

    forward: bool  # synthetic video as the target, the real one driving
    clip_start: int  # first clip frame, in frames at 16 fps
    reference_frame: int | None  # a frame of the (oriented) target; None = the record's own reference
    crop: tuple[float, float, float, float] | None  # driving crop window as fractions (top, left, h, w)
    skeleton_scale: float | None  # pose renders: zoom about the character's centre


def can_run_forward(record: MotionRecord) -> bool:
    """Forward use needs the real video's mask (to drive with it) and an end-to-end pair."""
    return record.end_to_end and record.target_mask is not None


def draw_pixel_choices(
    record: MotionRecord, meta: VideoMeta, bucket: Bucket, rng: np.random.Generator, options: AugmentOptions
) -> PixelChoices:
    """Draw `PixelChoices` in a fixed order (so a seed always gives the same sample)."""
    u_forward, u_crop, u_scale = rng.random(3).tolist()
    forward = can_run_forward(record) and u_forward < options.forward_fraction
    span = meta.frames_at_train_fps - bucket.frames
    if span < 0:
        raise SampleError(
            "too_short",
            "target",
            f"{meta.num_frames} frames at {meta.fps:g} fps give {meta.frames_at_train_fps} at 16 fps; "
            f"the bucket needs {bucket.frames}",
        )
    clip_start = int(rng.integers(0, span + 1))
    ref_draw = int(rng.integers(0, meta.num_frames))
    if forward or (options.sample_reference and record.target_mask is not None):
        reference_frame: int | None = ref_draw
    else:
        reference_frame = None
    crop = None
    window = random_crop_stretch(rng, options.crop_scale, options.stretch)
    if record.end_to_end and u_crop < options.crop_p:
        crop = window
    scale_draw = float(np.exp(rng.uniform(np.log(options.skeleton_scale[0]), np.log(options.skeleton_scale[1]))))
    skeleton_scale = scale_draw if (not record.end_to_end and u_scale < options.skeleton_scale_p) else None
    return PixelChoices(forward, clip_start, reference_frame, crop, skeleton_scale)


def draw_swap(end_to_end: bool, has_aug: bool, forward: bool, rng: np.random.Generator, options: AugmentOptions) -> bool:
    """Whether to use the augmented driving video and mask (the swap) for this draw."""
    p = options.swap_p_end_to_end if end_to_end else options.swap_p_pose
    u = float(rng.random())  # always drawn, so the stream does not depend on eligibility
    return has_aug and not forward and u < p


@dataclass
class PixelSample:
    """Decoded, clipped and bucket-fitted tensors of one sample (uint8 RGB, channels first).

    target: (F, 3, H, W); reference / reference_mask: (3, H, W); drivings: name -> (video, mask), each
    (F, 3, H, W), names ``driving`` and/or ``driving_aug``; regions: name -> bool (F, H, W) on the target grid;
    extra_references / extra_reference_masks: (n, 3, H, W) further reference images and their masks (optional).
    A mask of None means no characters: the mode's background (`scail2.conditioning.masks.MASK_BACKGROUNDS`).
    Reference masks are drawn as reference masks of the mode (animation: on white) and reach the encoders as
    they are.
    """

    id: str
    source: str
    mode: str
    end_to_end: bool
    history_allowed: bool
    caption: str
    forward: bool
    bucket: Bucket
    target: torch.Tensor
    reference: torch.Tensor
    reference_mask: torch.Tensor | None
    drivings: dict[str, tuple[torch.Tensor, torch.Tensor | None]]
    regions: dict[str, torch.Tensor] = field(default_factory=dict)
    extra_references: torch.Tensor | None = None
    extra_reference_masks: torch.Tensor | None = None


def _to_tchw(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).permute(0, 3, 1, 2)  # (F, H, W, 3) -> (F, 3, H, W)


class VideoReads:
    """Opens each file once, maps decode failures to `SampleError` naming the record's field, closes everything
    on exit. ``with VideoReads(backend) as io: frames = io.read(io.open(path, "target"), indices, "target")``."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.readers: list[VideoReader] = []

    def open(self, path: Path, field_name: str) -> VideoReader:
        try:
            reader = VideoReader(path, self.backend)
        except VideoDecodeError as exc:
            raise SampleError(exc.reason, field_name, exc.detail) from None
        self.readers.append(reader)
        return reader

    def read(self, reader: VideoReader, indices: Sequence[int], field_name: str) -> torch.Tensor:
        if max(indices) >= reader.num_frames:
            raise SampleError(
                "mismatch", field_name, f"has {reader.num_frames} frames; frame {max(indices)} was asked (the target is longer)"
            )
        try:
            return _to_tchw(reader.read(indices))
        except VideoDecodeError as exc:
            raise SampleError(exc.reason, field_name, exc.detail) from None

    def image(self, path: Path, field_name: str) -> torch.Tensor:
        try:
            return _to_tchw(read_image(path)[None])[0]
        except VideoDecodeError as exc:
            raise SampleError(exc.reason, field_name, exc.detail) from None

    def __enter__(self) -> "VideoReads":
        return self

    def __exit__(self, *exc) -> None:
        for reader in self.readers:
            reader.close()
        self.readers.clear()


def check_same_size(a: tuple[int, int], b: tuple[int, int], field_name: str, other: str) -> None:
    """Raise `SampleError` ("mismatch") when the (height, width) ``a`` of ``field_name`` is not ``b`` of ``other``."""
    if a != b:
        raise SampleError("mismatch", field_name, f"is {a[0]}x{a[1]} but {other} is {b[0]}x{b[1]}")


_BLACK = (0, 0, 0)
_WHITE = (255, 255, 255)


def mask_fill(mode: str) -> tuple[int, int, int]:
    """The colour that pads a driving mask cropped past its frame: the mode's driving background (animation:
    black, replacement: white, the environment switch)."""
    return _BLACK if mode == "animation" else _WHITE


def _file_roles(record: MotionRecord, forward: bool) -> tuple[tuple[str, str], tuple[str | None, str], dict[str, tuple]]:
    """Which files play target, reference-mask video and drivings: (target path, field), (mask video, field),
    {driving name: (video, field, mask, mask field)}. A forward sample swaps the two videos: the synthetic video
    becomes the target and the real one (with its mask) drives."""
    if forward:
        return (record.driving, "driving"), (record.driving_mask, "driving_mask"), {
            "driving": (record.target, "target", record.target_mask, "target_mask")
        }
    return (record.target, "target"), (record.target_mask, "target_mask"), {
        "driving": (record.driving, "driving", record.driving_mask, "driving_mask"),
        "driving_aug": (record.driving_aug, "driving_aug", record.driving_mask_aug, "driving_mask_aug"),
    }


def _reference(
    io: VideoReads, record: MotionRecord, choices: PixelChoices, frames: torch.Tensor, ref_index: int | None,
    tbox: CropBox, size: tuple[int, int], target_field: str, mask_video: tuple[str | None, str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference image and its mask at ``size``: a frame of the target clip's video (decoded with the clip, the
    last of ``frames``) with its mask from the mask video or the record's reference mask, or the record's own
    reference image."""
    th, tw = frames.shape[-2:]
    if ref_index is not None:
        reference = crop_resize(frames[-1:], tbox, size)[0]
        if choices.reference_frame is not None:
            ref_mask_video, ref_mask_field = mask_video
            ref_mask_src = io.read(io.open(ref_mask_video, ref_mask_field), [ref_index], ref_mask_field)
            check_same_size(tuple(ref_mask_src.shape[-2:]), (th, tw), ref_mask_field, target_field)
            # A frame of a video's mask is drawn on the driving side's background: redraw it on the
            # reference side's (animation: black -> white; replacement: white -> black).
            ref_mask_src = video_mask_to_reference(ref_mask_src, record.mode)
        else:
            ref_mask_src = io.image(record.reference_mask, "reference_mask")[None]
            check_same_size(tuple(ref_mask_src.shape[-2:]), (th, tw), "reference_mask", "the target")
        return reference, crop_resize(ref_mask_src, tbox, size, mode="nearest")[0]
    image = io.image(record.reference, "reference")
    rbox = cover_box(image.shape[-2], image.shape[-1], *size)
    ref_mask_src = io.image(record.reference_mask, "reference_mask")
    check_same_size(tuple(ref_mask_src.shape[-2:]), tuple(image.shape[-2:]), "reference_mask", "the reference image")
    return crop_resize(image[None], rbox, size)[0], crop_resize(ref_mask_src[None], rbox, size, mode="nearest")[0]


def _driving(
    io: VideoReads, files: tuple, indices: list[int], choices: PixelChoices, size: tuple[int, int], fill: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One driving video and its mask at ``size`` (cover crop, then the choices' crop and skeleton scale)."""
    video_path, video_field, mask_path, mask_field = files
    video = io.read(io.open(video_path, video_field), indices, video_field)
    dh, dw = video.shape[-2:]
    dbox = cover_box(dh, dw, *size)
    if choices.crop is not None:
        dbox = dbox.inner(*choices.crop)
    if choices.skeleton_scale is not None:
        centre = content_centre(video)  # the rendered character(s): non-black pixels
        cy, cx = centre if centre is not None else (dh / 2, dw / 2)
        dbox = dbox.scaled_about(choices.skeleton_scale, cy, cx)
    mask = io.read(io.open(mask_path, mask_field), indices, mask_field)
    check_same_size(tuple(mask.shape[-2:]), (dh, dw), mask_field, video_field)
    return crop_resize(video, dbox, size), crop_resize(mask, dbox, size, mode="nearest", fill=fill)


def _regions(
    io: VideoReads, record: MotionRecord, indices: list[int], n: int, target_hw: tuple[int, int], tbox: CropBox,
    size: tuple[int, int],
) -> dict[str, torch.Tensor]:
    """The record's hand / face / OCR regions of the clip at ``size``: from mask videos or per-frame boxes."""
    regions: dict[str, torch.Tensor] = {}
    for name in REGION_NAMES:
        spec = getattr(record, name)
        if spec is None:
            continue
        if spec.video is not None:
            region = io.read(io.open(spec.video, name), indices, name)
            check_same_size(tuple(region.shape[-2:]), target_hw, name, "the target")
            regions[name] = threshold_region(crop_resize(region, tbox, size, mode="nearest"))
        else:
            track = spec.boxes or []
            if len(track) < n:
                raise SampleError("mismatch", name, f"has boxes for {len(track)} frames; the target has {n}")
            regions[name] = rasterize_boxes([transform_boxes(np.asarray(track[i]), tbox, size) for i in indices], size)
    return regions


def load_pixel_sample(
    record: MotionRecord,
    bucket: Bucket,
    choices: PixelChoices,
    drivings: Sequence[str] = ("driving",),
    backend: Backend = "auto",
) -> PixelSample:
    """Decode and transform one sample. ``drivings``: which driving signals to load (``driving``,
    ``driving_aug``); a forward sample only has ``driving`` (the real video). Raises `SampleError`.
    """
    size = (bucket.height, bucket.width)
    (target_path, target_field), mask_video, driving_files = _file_roles(record, choices.forward)
    wanted = [d for d in drivings if d in driving_files and driving_files[d][0] is not None]
    if not wanted:
        raise ValueError(f"record {record.id}: none of the driving signals {list(drivings)} exists")

    with VideoReads(backend) as io:
        target_reader = io.open(target_path, target_field)
        n = target_reader.num_frames
        try:
            indices = clip_indices(n, record.fps, bucket.frames, choices.clip_start)
        except ValueError as exc:
            raise SampleError("too_short", target_field, str(exc)) from None

        # The reference frame is decoded in the same pass as the clip.
        ref_index = choices.reference_frame
        if ref_index is None and isinstance(record.reference, int):
            ref_index = record.reference
        if ref_index is not None and ref_index >= n:
            raise SampleError("mismatch", "reference", f"frame {ref_index} asked but {target_field} has {n} frames")
        frames = io.read(target_reader, indices + ([ref_index] if ref_index is not None else []), target_field)
        # Sizes come from decoded frames (asking the reader first would decode frame 0 an extra time).
        th, tw = frames.shape[-2:]
        tbox = cover_box(th, tw, *size)
        target = crop_resize(frames[: len(indices)], tbox, size)
        reference, reference_mask = _reference(io, record, choices, frames, ref_index, tbox, size, target_field, mask_video)
        fill = mask_fill(record.mode)
        loaded = {name: _driving(io, driving_files[name], indices, choices, size, fill) for name in wanted}
        regions = _regions(io, record, indices, n, (th, tw), tbox, size)

    return PixelSample(
        id=record.id,
        source=record.source,
        mode=record.mode,
        end_to_end=record.end_to_end,
        history_allowed=record.history_allowed,
        caption=record.caption,
        forward=choices.forward,
        bucket=bucket,
        target=target,
        reference=reference,
        reference_mask=reference_mask,
        drivings=loaded,
        regions=regions,
    )

