"""Temporal and spatial transforms that keep videos, masks and boxes aligned.

Every spatial operation (bucket fit, random crop, stretch, skeleton scaling) is a `CropBox`: an
axis-aligned window in source pixels that is resized to the output size. Boxes compose, so a chain of
augmentations becomes one crop + one resize, applied identically to a video (bilinear), its masks
(nearest, so palette colours survive) and its region boxes (the same affine map). Windows may reach
outside the frame; the outside is filled with a given colour (black for videos and animation-mode masks).

Coordinates are continuous pixel edges: pixel column j covers [j, j + 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

TRAIN_FPS: float = 16.0
# Frames resized per interpolate call: bounds the float32 working memory of large videos.
_RESIZE_CHUNK = 16


# ----------------------------------------------------------------------------------------------------
# Time
# ----------------------------------------------------------------------------------------------------


def resampled_length(num_frames: int, fps: float, target_fps: float = TRAIN_FPS) -> int:
    """Number of frames of a ``num_frames`` video at ``fps`` once resampled to ``target_fps``."""
    if num_frames <= 0:
        return 0
    # The small epsilon keeps exact ratios (e.g. 33 frames at 32 fps -> 17) from rounding down.
    return int(math.floor((num_frames - 1) * target_fps / fps + 1e-6)) + 1


def clip_indices(num_frames: int, fps: float, clip_frames: int, start: int, target_fps: float = TRAIN_FPS) -> list[int]:
    """Source frame indices of a ``clip_frames`` clip starting at resampled frame ``start``.

    Resampled frame k sits at time k / target_fps and takes the nearest source frame; a source slower than
    ``target_fps`` repeats frames. Raises when the clip does not fit.
    """
    available = resampled_length(num_frames, fps, target_fps)
    if start < 0 or start + clip_frames > available:
        raise ValueError(
            f"clip of {clip_frames} frames at {start} does not fit a {num_frames}-frame {fps:g} fps video "
            f"({available} frames at {target_fps:g} fps)"
        )
    ratio = fps / target_fps
    return [min(int(math.floor((start + k) * ratio + 0.5)), num_frames - 1) for k in range(clip_frames)]


# ----------------------------------------------------------------------------------------------------
# Space
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropBox:
    """A window in source pixels (may extend past the frame) that is resized to the output size."""

    top: float
    left: float
    height: float
    width: float

    def rounded(self) -> "CropBox":
        """Integer window actually cut (every consumer uses this one, so all stay aligned)."""
        top, left = int(round(self.top)), int(round(self.left))
        return CropBox(top, left, max(1, int(round(self.height))), max(1, int(round(self.width))))

    def inner(self, top: float, left: float, height: float, width: float) -> "CropBox":
        """A sub-window given as fractions of this window (0..1 each), in source pixels."""
        return CropBox(
            self.top + top * self.height, self.left + left * self.width, height * self.height, width * self.width
        )

    def scaled_about(self, scale: float, centre_y: float, centre_x: float) -> "CropBox":
        """Zoom the output by ``scale`` about a source point: content grows (>1) or shrinks (<1) around it."""
        if scale <= 0:
            raise ValueError(f"scale {scale} must be positive")
        return CropBox(
            centre_y - (centre_y - self.top) / scale,
            centre_x - (centre_x - self.left) / scale,
            self.height / scale,
            self.width / scale,
        )


def cover_box(height: int, width: int, out_height: int, out_width: int) -> CropBox:
    """The centred window of a ``height x width`` frame with the output's aspect ratio (resize-to-cover)."""
    scale = max(out_height / height, out_width / width)
    crop_h, crop_w = out_height / scale, out_width / scale
    return CropBox((height - crop_h) / 2, (width - crop_w) / 2, crop_h, crop_w)


def _crop(frames: torch.Tensor, box: CropBox, fill: Sequence[float] | float) -> torch.Tensor:
    """Cut an integer window out of (F, C, H, W), padding with ``fill`` outside the frame."""
    f, c, h, w = frames.shape
    top, left, bh, bw = box.top, box.left, box.height, box.width
    y0, y1, x0, x1 = max(top, 0), min(top + bh, h), max(left, 0), min(left + bw, w)
    if y0 == top and x0 == left and y1 == top + bh and x1 == left + bw:
        return frames[:, :, y0:y1, x0:x1]
    fill_t = torch.as_tensor(fill, dtype=frames.dtype).reshape(-1, 1, 1)
    out = fill_t.expand(c, bh, bw).repeat(f, 1, 1, 1)  # (F, C, bh, bw)
    if y1 > y0 and x1 > x0:
        out[:, :, y0 - top : y1 - top, x0 - left : x1 - left] = frames[:, :, y0:y1, x0:x1]
    return out


def crop_resize(
    frames: torch.Tensor,
    box: CropBox,
    size: tuple[int, int],
    mode: str = "bilinear",
    fill: Sequence[float] | float = 0,
) -> torch.Tensor:
    """Crop ``box`` (rounded) from (F, C, H, W) frames and resize to ``size`` = (height, width).

    mode: "bilinear" (antialiased; videos) or "nearest" (masks: keeps palette colours exact).
    uint8 frames come back uint8 (rounded), float and bool frames (bool: "nearest" only) in their dtype.
    """
    if frames.ndim != 4 or not (frames.dtype in (torch.uint8, torch.bool) or frames.is_floating_point()):
        raise ValueError(f"crop_resize takes uint8, bool or float (F, C, H, W) frames; got {frames.dtype} {tuple(frames.shape)}")
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"unknown resize mode {mode!r}; use 'bilinear' (videos) or 'nearest' (masks)")
    if frames.dtype == torch.bool and mode != "nearest":
        raise ValueError("bool frames (masks) resize with mode='nearest'")
    cut = _crop(frames, box.rounded(), fill)
    if tuple(cut.shape[-2:]) == tuple(size):
        return cut.contiguous()
    out = []
    for chunk in cut.split(_RESIZE_CHUNK):
        if mode == "nearest":
            source = chunk.to(torch.uint8) if chunk.dtype == torch.bool else chunk  # no bool interpolation
            x = F.interpolate(source, size=size, mode="nearest-exact")
            out.append(x.bool() if chunk.dtype == torch.bool else x)
        else:
            x = F.interpolate(chunk.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
            out.append(x.round_().clamp_(0, 255).to(torch.uint8) if chunk.dtype == torch.uint8 else x.to(chunk.dtype))
    return torch.cat(out)


def transform_boxes(boxes: np.ndarray, box: CropBox, size: tuple[int, int]) -> np.ndarray:
    """Map (N, 4) x0, y0, x1, y1 source boxes through `crop_resize` with the same ``box`` and ``size``.

    Boxes are clipped to the output frame; boxes that fall outside become empty (x1 <= x0).
    """
    r = box.rounded()
    sy, sx = size[0] / r.height, size[1] / r.width
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    out[:, [0, 2]] = (out[:, [0, 2]] - r.left) * sx
    out[:, [1, 3]] = (out[:, [1, 3]] - r.top) * sy
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, size[1])
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, size[0])
    return out


def rasterize_boxes(track: Sequence[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """Per-frame (N, 4) boxes in output pixels -> bool (F, H, W); a pixel is in when its centre is."""
    h, w = size
    out = torch.zeros(len(track), h, w, dtype=torch.bool)
    for i, boxes in enumerate(track):
        for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
            # Pixel j is inside when x0 <= j + 0.5 < x1.
            c0, c1 = max(0, math.ceil(x0 - 0.5)), min(w, math.ceil(x1 - 0.5))
            r0, r1 = max(0, math.ceil(y0 - 0.5)), min(h, math.ceil(y1 - 0.5))
            if c1 > c0 and r1 > r0:
                out[i, r0:r1, c0:c1] = True
    return out


def random_crop_stretch(
    rng: np.random.Generator, crop_scale: tuple[float, float], stretch: tuple[float, float]
) -> tuple[float, float, float, float]:
    """A random crop window as fractions (top, left, height, width) of the frame.

    ``crop_scale`` bounds the side fraction kept; ``stretch`` bounds the width/height ratio change (a
    non-unit ratio stretches the content once the window is resized back to the bucket).
    """
    side = rng.uniform(*crop_scale)
    ratio = math.exp(rng.uniform(math.log(stretch[0]), math.log(stretch[1])))
    height = min(1.0, side / math.sqrt(ratio))
    width = min(1.0, side * math.sqrt(ratio))
    return float(rng.uniform(0, 1 - height)), float(rng.uniform(0, 1 - width)), height, width


def content_centre(frames: torch.Tensor, threshold: int = 40) -> tuple[float, float] | None:
    """Centre (y, x) of the bounding box of non-black pixels over all frames of uint8 (F, 3, H, W)."""
    on = (frames.amax(dim=1) > threshold).any(dim=0)  # (H, W)
    if not on.any():
        return None
    rows = torch.nonzero(on.any(dim=1)).flatten()
    cols = torch.nonzero(on.any(dim=0)).flatten()
    return (rows[0].item() + rows[-1].item() + 1) / 2, (cols[0].item() + cols[-1].item() + 1) / 2


# ----------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------


def threshold_region(frames: torch.Tensor) -> torch.Tensor:
    """A region mask video, uint8 (F, 3, H, W) -> bool (F, H, W) (white / bright = inside)."""
    return frames.amax(dim=1) > 127


def region_to_latent(mask: torch.Tensor, stride: int = 8) -> torch.Tensor:
    """bool/float (F, H, W) region mask -> (1, T, H/stride, W/stride) float coverage on the latent grid.

    Latent frame 0 covers pixel frame 0 and latent frame t > 0 covers frames 4t-3 .. 4t (the VAE's temporal
    stride); a pixel counts when it is inside in any of those frames. Then area averaging per latent cell.
    """
    f, h, w = mask.shape
    if (f - 1) % 4:
        raise ValueError(f"region mask has {f} frames; need 4k+1 (e.g. {(f - 1) // 4 * 4 + 1} or {(f - 1) // 4 * 4 + 5})")
    x = mask.float()
    groups = [x[:1]] + ([x[1:].reshape(-1, 4, h, w).amax(dim=1)] if f > 1 else [])
    x = torch.cat(groups)  # (T, H, W)
    x = F.interpolate(x[None], size=(-(-h // stride), -(-w // stride)), mode="area")[0]
    return x[None]  # (1, T, h, w)
