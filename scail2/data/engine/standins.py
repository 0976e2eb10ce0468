"""Deterministic stand-ins for the models of the engine, for videos cut from a ``scail2-data synth`` dataset.

They need no model and give exact results, so the whole engine runs (and is tested) on CPU:

- `SyntheticSegmenter` / `SyntheticKeypoints`: the masks and joints a clip's figures were drawn with, recomputed
  from the dataset seed and the source video's name (``<source>_<index>.mp4``, as the dataset names its pairs)
  through the clip's `ClipOrigin` (source frames, window, size). For generated videos they return what the
  generator reported (masks) or drew from (poses).
- `SyntheticCaptioner`: a fixed-form description naming the source.
- `SyntheticAnimator`: draws the poses as thick figures in the reference image's colour over the reference image
  (a stand-in for a pose-driven generator), reporting its masks.
- `SyntheticReplacer`: repaints the masked character in the reference's colour (a stand-in for a replacement
  generator), reporting its mask.

None of them is meant for real videos; each refuses a clip it cannot explain.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from scail2.data.engine.components import AnimationRequest, ComponentError, ReplacementRequest
from scail2.data.engine.pose import render_poses
from scail2.data.engine.clips import SYNTH_LAYOUT, Clip, ClipOrigin, GeneratedVideo, PoseTrack
from scail2.data.synth import draw_posed, joints_at
from scail2.data.transforms import CropBox, cover_box, crop_resize


def clip_origin(clip: Clip) -> ClipOrigin | None:
    """The clip's origin, or the one recorded in its manifest record's ``meta["origin"]`` (prepared records)."""
    if clip.origin is not None:
        return clip.origin
    if clip.record is not None and isinstance(clip.record.meta.get("origin"), dict):
        return ClipOrigin.from_json(clip.record.meta["origin"])
    return None


def _synth_index(origin: ClipOrigin, what: str) -> int:
    stem = Path(origin.path).stem
    try:
        return int(stem.rsplit("_", 1)[-1])
    except ValueError:
        raise ComponentError("unsupported", f"{what}: {origin.path} is not named like a synth pair (<source>_<index>)") from None


def _cast(seed: int, origin: ClipOrigin, frames: int, what: str):
    index = _synth_index(origin, what)
    times = np.asarray(origin.frame_indices[:frames], dtype=np.float64) / origin.fps
    h0, w0 = origin.source_size
    return joints_at(seed, index, times, h0, w0)


class SyntheticSegmenter:
    """Exact per-character masks of a clip cut from a synth dataset's video (``synth_seed`` = the dataset's seed)."""

    def __init__(self, synth_seed: int = 0):
        self.synth_seed = int(synth_seed)

    def segment(self, video: Clip) -> np.ndarray:
        if video.masks is not None:
            return video.masks
        origin = clip_origin(video)
        if origin is None:
            raise ComponentError("unsupported", f"segmenter {video.id}: no clip origin; SyntheticSegmenter knows only clips of synth videos")
        f, h, w = video.frames.shape[:3]
        cast = _cast(self.synth_seed, origin, f, f"segmenter {video.id}")
        h0, w0 = origin.source_size
        masks = draw_posed(np.zeros((h0, w0, 3), dtype=np.float32), cast).masks  # (K, F, H0, W0) visible parts
        top, left, wh, ww = origin.window
        box = CropBox(top, left, wh, ww)
        out = crop_resize(torch.from_numpy(masks), box, (h, w), mode="nearest")  # K as the channel axis
        return out.numpy().astype(bool)


class SyntheticKeypoints:
    """Exact joints (synth11 layout) of a clip cut from a synth dataset's video, in clip pixels."""

    def __init__(self, synth_seed: int = 0):
        self.synth_seed = int(synth_seed)

    def estimate(self, video: Clip) -> PoseTrack:
        if video.generated_from is not None:
            return video.generated_from
        origin = clip_origin(video)
        if origin is None:
            raise ComponentError("unsupported", f"keypoints {video.id}: no clip origin; SyntheticKeypoints knows only clips of synth videos")
        f, h, w = video.frames.shape[:3]
        cast = _cast(self.synth_seed, origin, f, f"keypoints {video.id}")
        top, left, wh, ww = origin.window
        kp = np.stack([np.stack([j[name] for name in SYNTH_LAYOUT.joints], axis=1) for _, j in cast])  # (P, F, J, 2)
        kp = kp.astype(np.float64).copy()
        # Through the window-and-resize of the clip (pixel edges: x' = (x - left) * w / ww).
        kp[..., 0] = (kp[..., 0] - left) * (w / ww)
        kp[..., 1] = (kp[..., 1] - top) * (h / wh)
        return PoseTrack(kp, SYNTH_LAYOUT, h, w, video.fps)


class SyntheticCaptioner:
    def caption(self, clip: Clip) -> str:
        origin = clip_origin(clip)
        name = Path(origin.path).stem if origin is not None else clip.id
        return f"synthetic figures moving in front of a textured background ({name})"


def _reference_colour(image: np.ndarray) -> np.ndarray:
    """Mean colour of the reference image's central quarter, pushed away from grey so the figure stands out."""
    h, w = image.shape[:2]
    centre = image[h // 4 : h - h // 4 or h, w // 4 : w - w // 4 or w].reshape(-1, 3).astype(np.float64)
    colour = centre.mean(axis=0)
    return np.clip((colour - colour.mean()) * 1.5 + colour.mean(), 0, 255)


class SyntheticAnimator:
    """Draws the poses with thick limbs (``thickness``: radius as a fraction of the frame height) in the reference
    image's colour over the reference image fitted to the clip (cover and centre crop). Deterministic."""

    def __init__(self, thickness: float = 0.05):
        self.thickness = float(thickness)

    def animate(self, request: AnimationRequest) -> GeneratedVideo:
        h, w = request.height, request.width
        ref = torch.from_numpy(request.reference).permute(2, 0, 1)[None]  # (1, 3, H', W')
        background = crop_resize(ref, cover_box(ref.shape[2], ref.shape[3], h, w), (h, w))[0].permute(1, 2, 0).numpy()
        render = render_poses(request.poses, limb_radius=max(1.0, self.thickness * h), mask_margin=0, hands=False, face=False)
        colour = _reference_colour(request.reference).round().astype(np.uint8)
        frames = np.repeat(background[None], request.frames, axis=0).copy()
        for person in render.masks:  # persons in track order, later ones in front
            frames[person] = colour
        visible = render.masks.copy()
        for k in range(len(visible) - 1):
            visible[k] &= ~render.masks[k + 1 :].any(axis=0)
        return GeneratedVideo(frames, visible)


class SyntheticReplacer:
    """Repaints the masked character in the reference's colour, with the original shading kept (a darker pixel
    stays darker). Reports the mask as the new character's silhouette."""

    def replace(self, request: ReplacementRequest) -> GeneratedVideo:
        if request.mask.shape != request.video.shape[:3]:
            raise ComponentError("bad_input", f"mask {request.mask.shape} does not match the video {request.video.shape[:3]}")
        colour = _reference_colour(request.reference)
        shade = request.video.astype(np.float64).mean(axis=-1, keepdims=True) / 255.0  # (F, H, W, 1)
        painted = np.clip(colour * (0.5 + 0.5 * shade), 0, 255).round().astype(np.uint8)
        frames = np.where(request.mask[..., None], painted, request.video)
        return GeneratedVideo(frames, request.mask[None].copy())
