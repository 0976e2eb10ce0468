"""Pipeline inputs: load, resize and check the reference image, the driving video and the masks.

Everything here runs without a model, so bad inputs fail before any weights are loaded.
:func:`prepare_inputs` returns a :class:`PreparedInputs` at the target resolution, which
``SCAIL2Pipeline.generate`` consumes.

Accepted forms (F frames, H x W pixels):

- image: a file path, a ``PIL.Image``, a uint8 array/tensor (H, W, 3), or a float tensor (3, H, W) in [-1, 1];
- video: a file path, a list of ``PIL.Image``, a uint8 array/tensor (F, H, W, 3), or a float tensor
  (F, 3, H, W) in [-1, 1];
- per-character masks: a bool (or 0/1) array/tensor (K, F, H, W) for the driving video and (K, H, W) or
  (K, 1, H, W) for the reference image, or lists of K file paths (white = inside).

Resizing (the official inference's rule, SPEC §3, :func:`resize_cover`): resize to cover the target size
with antialiased bicubic filtering (the side that fits is exact, the other is ``int(side * scale)``), then a
centre crop at ``delta // 2``. Masks go through the same resize before they are thresholded. The reference
image and mask are resized in floating point (the official code reads images as floats) and clamped to
[-1, 1]; driving videos and mask videos stay 8-bit (rounded back, as the official code does with decoded
frames). Mask inputs must have the
size of the image or video they belong to, so that both go through the same crop. The training data fits clips
differently on purpose (see ``docs/inference.md``).

Masks (SPEC §3): either colour-coded masks (a reference mask image and a driving mask video), used as given, or
per-character binary masks from which the colour masks are drawn at the input size (characters ordered left to
right by their first-frame driving box, palette slot i for the i-th character, the same colour in the reference
and the driving mask, backgrounds per mode: `scail2.conditioning.masks.MASK_BACKGROUNDS`), or no masks for
single-character animation, which conditions on the mode's backgrounds without characters (an all-white
reference mask and an all-black driving mask; see ``docs/inference.md``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import torch.nn.functional as F

from scail2.conditioning.condition import MODES
from scail2.conditioning.masks import (
    SIZE_MULTIPLE,
    character_masks_to_colour,
    character_order,
    check_spatial_size,
    palette_violation_fraction,
)
from scail2.conditioning.pixels import to_uint8, to_unit
from scail2.pipeline.segments import OVERLAP_FRAMES, SEGMENT_FRAMES, SegmentPlan, plan_segments

log = logging.getLogger(__name__)

# Largest fraction of mask pixels allowed off the palette (any channel between 64/255 and 225/255). Lossy
# video codecs smear colour edges over a pixel or two (4:2:0 chroma), which stays well below 5% at
# any practical size; more than that means the mask was not drawn with the palette (or is badly compressed).
PALETTE_TOLERANCE = 0.05
DEFAULT_FPS = 16.0  # the training frame rate, used when the driving video's rate is unknown
DEFAULT_AREA = 512 * 896  # pixels of the default resolution: the 512p training bucket
_RESIZE_CHUNK = 32  # frames resized at once, bounding the float32 working memory
_RANGE_SLACK = 1e-3


class PipelineInputError(ValueError):
    """An input the pipeline cannot use; the message names the value and the fix."""


# ------------------------------------------------------------------------------------------------ loading
def _is_path(x: Any) -> bool:
    return isinstance(x, (str, Path))


def _read_image_file(path: str | Path, what: str) -> np.ndarray:
    from scail2.data.video import VideoDecodeError, read_image

    try:
        return read_image(path)
    except VideoDecodeError as exc:
        raise PipelineInputError(
            f"cannot read the {what} {path}: {exc.reason} ({exc.detail}); pass a PNG/JPEG image"
        ) from exc


def _read_video_file(path: str | Path, what: str) -> tuple[np.ndarray, float | None]:
    from scail2.data.video import VideoDecodeError, VideoReader, is_image_path, read_image

    if is_image_path(path):  # a single-frame "video" given as an image file
        return _read_image_file(path, what)[None], None
    try:
        with VideoReader(path) as reader:
            return reader.read(), (reader.fps or None)
    except VideoDecodeError as exc:
        raise PipelineInputError(
            f"cannot read the {what} {path}: {exc.reason} ({exc.detail}); pass an mp4/webm/mkv video"
        ) from exc


def _check_float_range(x: torch.Tensor, what: str) -> None:
    if x.numel() == 0:
        raise PipelineInputError(f"the {what} is empty (shape {tuple(x.shape)})")
    lo, hi = torch.aminmax(x.detach())
    if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
        raise PipelineInputError(f"the {what} contains NaN or inf")
    if lo.item() < -1 - _RANGE_SLACK or hi.item() > 1 + _RANGE_SLACK:
        raise PipelineInputError(
            f"the {what} spans [{lo.item():.4g}, {hi.item():.4g}]; float inputs must be in [-1, 1] "
            "(x / 127.5 - 1 for 8-bit values), or pass uint8 (H, W, 3) arrays"
        )


def load_image(image: Any, what: str = "reference image") -> torch.Tensor:
    """An image input -> (3, H, W): uint8 for 8-bit inputs, float32 in [-1, 1] for float tensors."""
    if _is_path(image):
        image = _read_image_file(image, what)
    elif type(image).__module__.startswith("PIL."):
        image = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise PipelineInputError(
                f"the {what} is a {image.dtype} array; pass uint8 (H, W, 3) or a float tensor (3, H, W) in [-1, 1]"
            )
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor):
        raise PipelineInputError(
            f"the {what} is a {type(image).__name__}; pass a file path, a PIL image, a uint8 (H, W, 3) array or "
            "a float tensor (3, H, W) in [-1, 1]"
        )
    if image.dtype == torch.uint8:
        if image.ndim != 3 or image.shape[-1] != 3:
            raise PipelineInputError(f"the {what} has shape {tuple(image.shape)}; uint8 images must be (H, W, 3) RGB")
        return image.permute(2, 0, 1).contiguous()
    if not image.is_floating_point() or image.ndim != 3 or image.shape[0] != 3:
        raise PipelineInputError(
            f"the {what} is a {image.dtype} tensor of shape {tuple(image.shape)}; pass uint8 (H, W, 3) or float "
            "(3, H, W) in [-1, 1]"
        )
    _check_float_range(image, what)
    return image.float()


def load_video(video: Any, what: str = "driving video") -> tuple[torch.Tensor, float | None]:
    """A video input -> ((F, 3, H, W) uint8 or float32 in [-1, 1], frame rate if the input has one)."""
    fps = None
    if _is_path(video):
        video, fps = _read_video_file(video, what)
    elif isinstance(video, (list, tuple)):
        if not video:
            raise PipelineInputError(f"the {what} is an empty list; pass at least one frame")
        video = np.stack([np.asarray(load_image(frame, what).permute(1, 2, 0)) for frame in video])
    if isinstance(video, np.ndarray):
        if video.dtype != np.uint8:
            raise PipelineInputError(
                f"the {what} is a {video.dtype} array; pass uint8 (F, H, W, 3) or a float tensor (F, 3, H, W)"
            )
        video = torch.from_numpy(np.ascontiguousarray(video))
    if not isinstance(video, torch.Tensor):
        raise PipelineInputError(
            f"the {what} is a {type(video).__name__}; pass a file path, a list of PIL images, a uint8 "
            "(F, H, W, 3) array or a float tensor (F, 3, H, W) in [-1, 1]"
        )
    if video.dtype == torch.uint8:
        if video.ndim != 4 or video.shape[-1] != 3:
            raise PipelineInputError(f"the {what} has shape {tuple(video.shape)}; uint8 videos must be (F, H, W, 3)")
        return video.permute(0, 3, 1, 2).contiguous(), fps
    if not video.is_floating_point() or video.ndim != 4 or video.shape[1] != 3:
        raise PipelineInputError(
            f"the {what} is a {video.dtype} tensor of shape {tuple(video.shape)}; pass uint8 (F, H, W, 3) or "
            "float (F, 3, H, W) in [-1, 1]"
        )
    _check_float_range(video, what)
    return video.float(), fps


def _binary(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise PipelineInputError(f"the {what} is a {type(x).__name__}; pass a bool tensor or a list of file paths")
    if x.dtype != torch.bool:
        if x.numel() and not ((x == 0) | (x == 1)).all():
            raise PipelineInputError(
                f"the {what} has values other than 0 and 1; threshold soft masks first (e.g. masks > 0.5)"
            )
        x = x != 0
    return x


def load_character_masks(masks: Any, what: str, single_frame: bool) -> torch.Tensor:
    """Per-character masks -> bool (K, F, H, W); ``single_frame`` for the reference image (F = 1).

    File inputs are mask videos (or images) per character in which bright pixels (any channel > 127) are inside.
    """
    if isinstance(masks, (list, tuple)) and masks and all(_is_path(m) for m in masks):
        videos = []
        for path in masks:
            frames, _ = _read_video_file(path, what)  # (F, H, W, 3) uint8
            videos.append(torch.from_numpy(frames).amax(dim=-1) > 127)
        sizes = {tuple(v.shape) for v in videos}
        if len(sizes) != 1:
            raise PipelineInputError(f"the {what} files differ in frame count or size: {sorted(sizes)}")
        out = torch.stack(videos)
    else:
        out = _binary(masks, what)
        if single_frame and out.ndim == 3:
            out = out[:, None]
    if out.ndim != 4 or out.shape[0] < 1:
        layout = "(K, H, W) or (K, 1, H, W)" if single_frame else "(K, F, H, W)"
        raise PipelineInputError(f"the {what} have shape {tuple(out.shape)}; need {layout}, one mask per character")
    if single_frame and out.shape[1] != 1:
        raise PipelineInputError(f"the {what} have {out.shape[1]} frames; the reference image needs 1 per character")
    return out


# ----------------------------------------------------------------------------------------------- resizing
def cover_size(height: int, width: int, out_height: int, out_width: int) -> tuple[int, int]:
    """The size a ``height x width`` frame is resized to before the centre crop to ``out_height x out_width``:
    the side that fits the target exactly, the other ``int(side * scale)`` (the official
    ``resize_for_rectangle_crop``; never below the target, which float rounding could otherwise give)."""
    if width / height > out_width / out_height:
        return out_height, max(out_width, int(width * out_height / height))
    return max(out_height, int(height * out_width / width)), out_width


def resize_cover(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize (F, C, H, W) frames to cover ``height x width`` and centre crop to it, as the official inference
    does: antialiased bicubic resize to :func:`cover_size`, then the crop at ``(delta_h // 2, delta_w // 2)``.

    uint8 frames are resized in float32 and come back uint8, clamped to 0..255 and rounded (torchvision's rule for
    8-bit frames); float frames (in [-1, 1]) come back float32, clamped to [-1, 1]: bicubic filtering overshoots
    at sharp edges, which the official code passes on and the VAE here refuses (clamping changes no mask
    channel's on/off state). Frames already at the target size are returned unchanged.
    """
    if frames.ndim != 4 or not (frames.dtype == torch.uint8 or frames.is_floating_point()):
        raise PipelineInputError(
            f"resize_cover takes uint8 or float (F, C, H, W) frames; got {frames.dtype} {tuple(frames.shape)}"
        )
    _, _, h, w = frames.shape
    if (h, w) == (height, width):
        return frames
    rh, rw = cover_size(h, w, height, width)
    top, left = (rh - height) // 2, (rw - width) // 2
    out = []
    for chunk in frames.split(_RESIZE_CHUNK):
        x = F.interpolate(chunk.float(), size=(rh, rw), mode="bicubic", align_corners=False, antialias=True)
        x = x[:, :, top : top + height, left : left + width]
        out.append(x.clamp(0, 255).round().to(torch.uint8) if frames.dtype == torch.uint8 else x.clamp(-1.0, 1.0))
    return torch.cat(out)


def default_resolution(height: int, width: int, area: int = DEFAULT_AREA) -> tuple[int, int]:
    """The reference image's aspect ratio at about ``area`` pixels, each side a multiple of 32."""
    scale = math.sqrt(area / (height * width))
    snap = lambda v: max(SIZE_MULTIPLE, round(v * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE)  # noqa: E731
    return snap(height), snap(width)


# ------------------------------------------------------------------------------------------------- masks
def _check_palette(mask: torch.Tensor, what: str, tolerance: float) -> None:
    fractions = [palette_violation_fraction(to_unit(chunk)) * chunk.shape[0] for chunk in mask.split(_RESIZE_CHUNK)]
    fraction = sum(fractions) / mask.shape[0]
    if fraction > tolerance:
        raise PipelineInputError(
            f"{fraction:.1%} of the {what} pixels are not palette colours (tolerance {tolerance:.0%}): masks may "
            "only use black, white, blue, red, green, magenta, cyan and yellow (channels near 0 or 255); save "
            "mask videos losslessly (PNG frames, libx264rgb or ffv1) or pass per-character binary masks instead"
        )


def _colour_video(masks: torch.Tensor, mode: str, order: list[int], reference: bool = False) -> torch.Tensor:
    """(K, F, H, W) bool -> (F, 3, H, W) uint8 colour mask video, drawn in chunks of frames."""
    chunks = []
    for part in masks.split(_RESIZE_CHUNK, dim=1):
        colour = character_masks_to_colour(part, mode, order, reference=reference)  # (f, 3, H, W) in {-1, 1}
        chunks.append(to_uint8(colour))
    return torch.cat(chunks)


# ---------------------------------------------------------------------------------------------- prepared
@dataclass
class PreparedInputs:
    """Inputs at the target resolution, ready for ``SCAIL2Pipeline.generate``.

    Frame tensors are (F, 3, H, W): the reference side float32 in [-1, 1], the driving side uint8 (8-bit inputs,
    kept compact for long videos) or float32 in [-1, 1]. A mask of None means no characters: the mode's
    background (``MASK_BACKGROUNDS``).
    """

    reference: torch.Tensor  # (3, H, W)
    driving: torch.Tensor  # (F, 3, H, W), the frames the segments cover (F = plan.segments[-1].stop)
    reference_mask: torch.Tensor | None  # (3, H, W) colour mask, used as given
    driving_mask: torch.Tensor | None  # (F, 3, H, W) colour mask video
    mode: str
    plan: SegmentPlan
    fps: float
    character_order: list[int] | None = None  # palette slot i -> character index (per-character masks)
    extra_references: torch.Tensor | None = None  # (n, 3, H, W) further reference images
    extra_reference_masks: torch.Tensor | None = None  # (n, 3, H, W) their colour masks (None: backgrounds)

    @property
    def height(self) -> int:
        return self.reference.shape[-2]

    @property
    def width(self) -> int:
        return self.reference.shape[-1]

    @property
    def output_frames(self) -> int:
        return self.plan.output_frames


def prepare_inputs(
    reference_image: Any,
    driving_video: Any,
    *,
    mode: str = "animation",
    reference_mask: Any = None,
    driving_mask: Any = None,
    character_masks: Any = None,
    reference_character_masks: Any = None,
    order: str | Sequence[int] = "x",
    extra_reference_images: Sequence[Any] | None = None,
    extra_reference_masks: Sequence[Any] | None = None,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    segment_frames: int = SEGMENT_FRAMES,
    overlap_frames: int = OVERLAP_FRAMES,
    fps: float | None = None,
    palette_tolerance: float = PALETTE_TOLERANCE,
) -> PreparedInputs:
    """Load, check and resize every input; raises :class:`PipelineInputError` naming the bad value.

    Args:
        mode: "animation" (the reference character moves in the reference background) or "replacement" (the
            character replaces the person in the driving video's scene).
        reference_mask, driving_mask: colour-coded masks (give both or neither).
        character_masks, reference_character_masks: per-character binary masks (give both or neither), character
            k in both; ``order`` "x" (left to right in the first driving frame), "area", or an explicit
            permutation decides the palette slots.
        extra_reference_images, extra_reference_masks: further reference images (multi-reference) and their colour
            masks (one per image, or None for the mode's reference background), each of any size (resized like
            the reference).
        height, width: output size, multiples of 32; default: the reference's aspect ratio at about 512 x 896.
        num_frames: use only the first ``num_frames`` driving frames.
        segment_frames, overlap_frames: long-video segments (``scail2.pipeline.segments``).
        fps: output frame rate; default the driving video's, else 16.
        palette_tolerance: largest fraction of off-palette pixels accepted in colour masks.
    """
    colour_given = _check_mask_arguments(mode, reference_mask, driving_mask, character_masks, reference_character_masks)
    reference = load_image(reference_image, "reference image")
    driving, video_fps = load_video(driving_video, "driving video")
    height, width = _output_size(reference, height, width)
    plan = _segment_plan(driving.shape[0], num_frames, segment_frames, overlap_frames)
    frames_out = plan.segments[-1].stop  # frames the segments cover (from frame 0)

    # The reference side in floating point, the driving side in its own dtype (SPEC §3, official inference).
    ref_small = resize_cover(to_unit(reference)[None], height, width)[0]
    drive_small = resize_cover(driving[:frames_out], height, width)

    ref_mask = drive_mask = None
    perm = None
    if colour_given:
        ref_mask, drive_mask = _colour_masks(
            reference_mask, driving_mask, reference, driving, frames_out, height, width, palette_tolerance
        )
    elif character_masks is not None:
        ref_mask, drive_mask, perm = _drawn_masks(
            character_masks, reference_character_masks, reference, driving, frames_out, height, width, mode, order
        )
    extras, extra_masks = _extra_references(
        extra_reference_images, extra_reference_masks, height, width, palette_tolerance
    )

    return PreparedInputs(
        reference=ref_small,
        driving=drive_small,
        reference_mask=ref_mask,
        driving_mask=drive_mask,
        mode=mode,
        plan=plan,
        fps=float(fps or video_fps or DEFAULT_FPS),
        character_order=perm,
        extra_references=extras,
        extra_reference_masks=extra_masks,
    )


def _check_mask_arguments(
    mode: str, reference_mask: Any, driving_mask: Any, character_masks: Any, reference_character_masks: Any
) -> bool:
    """Check the mode and which masks are given (colour masks in pairs, per-character masks in pairs, not both;
    replacement needs one kind); returns whether colour masks are given."""
    if mode not in MODES:
        raise PipelineInputError(f"mode is {mode!r}; use one of {MODES}")
    colour_given = (reference_mask is not None, driving_mask is not None)
    binary_given = (character_masks is not None, reference_character_masks is not None)
    if colour_given[0] != colour_given[1]:
        missing = "driving_mask" if colour_given[0] else "reference_mask"
        raise PipelineInputError(f"colour masks need both a reference mask and a driving mask; {missing} is missing")
    if binary_given[0] != binary_given[1]:
        missing = "reference_character_masks" if binary_given[0] else "character_masks"
        raise PipelineInputError(
            f"per-character masks need both the driving masks and the reference masks; {missing} is missing"
        )
    if any(colour_given) and any(binary_given):
        raise PipelineInputError("pass either colour masks or per-character masks, not both")
    if mode == "replacement" and not (any(colour_given) or any(binary_given)):
        raise PipelineInputError(
            "replacement mode needs masks (the white environment switch tells where the driving scene stays "
            "visible): pass reference_mask + driving_mask or character_masks + reference_character_masks"
        )
    return all(colour_given)


def _output_size(reference: torch.Tensor, height: int | None, width: int | None) -> tuple[int, int]:
    """The output size: as given (both, multiples of 32), or the reference's aspect ratio at the default area."""
    if height is None and width is None:
        height, width = default_resolution(*reference.shape[-2:])
    elif height is None or width is None:
        raise PipelineInputError(f"give both height and width (got height={height}, width={width})")
    try:
        check_spatial_size(height, width, "output")
    except ValueError as exc:
        raise PipelineInputError(str(exc)) from None
    return height, width


def _segment_plan(total: int, num_frames: int | None, segment_frames: int, overlap_frames: int) -> SegmentPlan:
    """The segments that cover the first ``num_frames`` (default: all ``total``) driving frames; the frames they
    cannot cover are dropped with a warning."""
    if num_frames is not None:
        if not 1 <= num_frames <= total:
            raise PipelineInputError(
                f"num_frames is {num_frames} but the driving video has {total} frames; pass 1..{total}"
            )
    used = total if num_frames is None else num_frames
    try:
        plan = plan_segments(used, segment_frames, overlap_frames)
    except ValueError as exc:
        raise PipelineInputError(str(exc)) from None
    if plan.dropped_frames:
        rule = (
            "the VAE needs 4k+1 frames"
            if len(plan.segments) == 1
            else f"trailing frames do not fill a {segment_frames}-frame segment "
            f"(stride {segment_frames - overlap_frames})"
        )
        log.warning(
            "the driving video has %d frames; generating %d (%s), the last %d are dropped",
            used, plan.output_frames, rule, plan.dropped_frames,
        )
    return plan


def _colour_masks(
    reference_mask: Any, driving_mask: Any, reference: torch.Tensor, driving: torch.Tensor, frames_out: int,
    height: int, width: int, tolerance: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Given colour masks: loaded, checked against the palette at their own size, resized like their image."""
    rm = load_image(reference_mask, "reference mask")
    dm, _ = load_video(driving_mask, "driving mask")
    if dm.shape[0] != driving.shape[0]:
        raise PipelineInputError(
            f"the driving mask has {dm.shape[0]} frames but the driving video has {driving.shape[0]}; they must "
            "match frame for frame"
        )
    _check_same_size(rm.shape[-2:], reference.shape[-2:], "reference mask", "reference image")
    _check_same_size(dm.shape[-2:], driving.shape[-2:], "driving mask", "driving video")
    # Checked before resizing: bicubic filtering blends colours at every edge.
    _check_palette(rm[None], "reference mask", tolerance)
    _check_palette(dm[:frames_out], "driving mask", tolerance)
    return resize_cover(to_unit(rm)[None], height, width)[0], resize_cover(dm[:frames_out], height, width)


def _drawn_masks(
    character_masks: Any, reference_character_masks: Any, reference: torch.Tensor, driving: torch.Tensor,
    frames_out: int, height: int, width: int, mode: str, order: str | Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Colour masks drawn from per-character masks at the input size (backgrounds per mode), then resized like
    given colour masks; returns them and the palette order."""
    total = driving.shape[0]
    cm = load_character_masks(character_masks, "character masks", single_frame=False)
    rcm = load_character_masks(reference_character_masks, "reference character masks", single_frame=True)
    if cm.shape[0] != rcm.shape[0]:
        raise PipelineInputError(
            f"got {cm.shape[0]} driving character masks but {rcm.shape[0]} reference character masks; "
            "give one of each per character, in the same order"
        )
    if cm.shape[1] != total:
        raise PipelineInputError(
            f"the character masks have {cm.shape[1]} frames but the driving video has {total}; they must "
            "match frame for frame"
        )
    _check_same_size(cm.shape[-2:], driving.shape[-2:], "character masks", "driving video")
    _check_same_size(rcm.shape[-2:], reference.shape[-2:], "reference character masks", "reference image")
    cm = cm[:, :frames_out]
    try:
        perm = character_order(cm, order) if isinstance(order, str) else [int(i) for i in order]
        drive_mask = _colour_video(cm, mode, perm)  # (F, 3, H, W) uint8 at the input size
        ref_mask = character_masks_to_colour(rcm, mode, perm, reference=True)  # (1, 3, H, W) in {-1, 1}
    except ValueError as exc:
        raise PipelineInputError(str(exc)) from None
    return resize_cover(ref_mask, height, width)[0], resize_cover(drive_mask, height, width), perm


def _extra_references(
    images: Sequence[Any] | None, masks: Sequence[Any] | None, height: int, width: int, tolerance: float
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Extra reference images (n, 3, H, W) float32 and their colour masks (or None), resized like the reference."""
    if images is None:
        if masks is not None:
            raise PipelineInputError("extra_reference_masks need extra_reference_images (one mask per image)")
        return None, None
    images = list(images)
    masks = None if masks is None else list(masks)
    if not images:
        raise PipelineInputError("extra_reference_images is empty; pass None for no extra references")
    if masks is not None and len(masks) != len(images):
        raise PipelineInputError(
            f"got {len(masks)} extra reference masks for {len(images)} extra reference images; give one per image"
        )
    out, out_masks = [], []
    for i, source in enumerate(images):
        image = load_image(source, f"extra reference image {i}")
        out.append(resize_cover(to_unit(image)[None], height, width)[0])
        if masks is not None:
            mask = load_image(masks[i], f"extra reference mask {i}")
            _check_same_size(mask.shape[-2:], image.shape[-2:], f"extra reference mask {i}", f"extra reference image {i}")
            _check_palette(mask[None], f"extra reference mask {i}", tolerance)
            out_masks.append(resize_cover(to_unit(mask)[None], height, width)[0])
    return torch.stack(out), torch.stack(out_masks) if masks is not None else None


def _check_same_size(got: Sequence[int], want: Sequence[int], what: str, other: str) -> None:
    if tuple(got) != tuple(want):
        raise PipelineInputError(
            f"the {what} is {got[0]}x{got[1]} but the {other} is {want[0]}x{want[1]}; masks must have the size of "
            "the image or video they belong to"
        )
