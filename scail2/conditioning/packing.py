"""In-context packing: latents, history and masks -> the tensors and RoPE factors SCAIL-2 consumes.

The sequence is ``[extra refs (n)][reference (1)][video (T)][driving (T, half resolution)]`` and each segment
gets the mode-specific position offsets of SPEC §4 (token units of the full-resolution grid):

==============  =================  =================
segment         animation          replacement
==============  =================  =================
extra ref i     (i, 0, 0)          (i, 120, 0)
reference       (n, 0, 0)          (n, 120, 0)
video frame f   (n+1+f, 0, 0)      (n+f, 0, 0)
driving f       (n+1+f, 0, 120)    (n+f, 0, 120)
==============  =================  =================

Driving tokens cover 2x2 full-resolution tokens and use the pooled frequencies of that window.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from scail2.conditioning.condition import Condition, check_mode
from scail2.models.rope import grid_positions, rope_frequencies

# Position shift (in tokens) separating the reference (replacement mode) and the driving segment.
SEGMENT_SHIFT = 120
HISTORY_FRAMES = 2  # latent frames kept clean when history is on (= 5 pixel frames)
DRIVING_POOL = 2


@dataclass
class SCAIL2Inputs:
    """Everything ``SCAIL2Transformer.forward`` takes besides timestep and text/CLIP context."""

    video: torch.Tensor  # (B, 20, T, h, w)
    reference: torch.Tensor  # (B, 20, n+1, h, w)
    reference_mask: torch.Tensor  # (B, 28, n+1, h, w)
    driving: torch.Tensor  # (B, 20, T, h/2, w/2)
    driving_mask: torch.Tensor  # (B, 28, T, h/2, w/2)
    rope: torch.Tensor  # (B | 1, L, head_dim/2, 2)

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def with_video(self, video: torch.Tensor) -> "SCAIL2Inputs":
        """Same conditioning with another noisy video (the denoising loop changes only this)."""
        return SCAIL2Inputs(video, self.reference, self.reference_mask, self.driving, self.driving_mask, self.rope)


@dataclass(frozen=True)
class SegmentOffsets:
    t0: int
    h0: int
    w0: int


def segment_offsets(mode: str, num_extra_refs: int = 0) -> dict[str, list[SegmentOffsets] | SegmentOffsets]:
    """Position offsets of every segment for one sample (the SPEC §4 table)."""
    check_mode(mode)
    n = num_extra_refs
    ref_h = SEGMENT_SHIFT if mode == "replacement" else 0
    video_t = n + 1 if mode == "animation" else n
    return {
        "extra_refs": [SegmentOffsets(i, ref_h, 0) for i in range(n)],
        "reference": SegmentOffsets(n, ref_h, 0),
        "video": SegmentOffsets(video_t, 0, 0),
        "driving": SegmentOffsets(video_t, 0, SEGMENT_SHIFT),
    }


@dataclass(frozen=True)
class SequenceLayout:
    """Tokens of one sample's packed sequence by segment: what the backbone's cost depends on.

    ``reference`` covers the extra references and the reference (n + 1 frames), ``video`` the noisy video (the
    tokens the output head runs on), ``driving`` the half-resolution driving video; reference and driving
    tokens go through the mask embedding.
    """

    reference: int
    video: int
    driving: int

    @property
    def total(self) -> int:
        return self.reference + self.video + self.driving

    @property
    def mask_tokens(self) -> int:
        """Tokens that go through the mask embedding (reference and driving)."""
        return self.reference + self.driving


def sequence_layout(
    num_frames: int, height: int, width: int, patch_size: tuple[int, int, int] = (1, 2, 2), num_extra_refs: int = 0
) -> SequenceLayout:
    """The `SequenceLayout` of a video latent of ``num_frames`` x ``height`` x ``width`` (T x h x w) packed with
    ``num_extra_refs`` extra references, patchified as the backbone does (the reference frames and the video
    together, the driving video on the half-resolution grid)."""
    pt, ph, pw = patch_size
    per_frame = (height // ph) * (width // pw)
    plain = (num_extra_refs + 1 + num_frames) // pt * per_frame
    video = num_frames // pt * per_frame
    driving = num_frames // pt * ((height // DRIVING_POOL) // ph) * ((width // DRIVING_POOL) // pw)
    return SequenceLayout(reference=plain - video, video=video, driving=driving)


def sequence_positions(mode: str, num_frames: int, height: int, width: int, num_extra_refs: int = 0):
    """Token positions of the packed sequence for one sample.

    ``height`` x ``width`` is the full-resolution token grid (latent size / patch). Returns ``(plain, driving)``:
    ``plain`` (L_ref + L_video, 3) positions of reference and video tokens, ``driving`` (L_drive, 3) top-left
    full-resolution positions of the 2x2 windows of the driving tokens.
    """
    if height % DRIVING_POOL or width % DRIVING_POOL:
        raise ValueError(f"token grid {height}x{width} must be even so the driving grid is exactly half of it")
    off = segment_offsets(mode, num_extra_refs)
    ref = off["reference"]
    # Extra refs and the reference are consecutive frames t = 0..n with the same spatial offset.
    refs = grid_positions(num_extra_refs + 1, height, width, 0, ref.h0, ref.w0)
    vid = off["video"]
    video = grid_positions(num_frames, height, width, vid.t0, vid.h0, vid.w0)
    drv = off["driving"]
    driving = grid_positions(
        num_frames, height // DRIVING_POOL, width // DRIVING_POOL, drv.t0, drv.h0, drv.w0, stride=DRIVING_POOL
    )
    return torch.cat([refs, video]), driving


def sequence_rope(
    modes: list[str],
    num_frames: int,
    height: int,
    width: int,
    head_dim: int,
    num_extra_refs: int = 0,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """RoPE factors ``(1 | B, L, head_dim/2, 2)`` of the packed sequence; one row per distinct mode layout."""
    cache: dict[str, torch.Tensor] = {}
    for mode in dict.fromkeys(modes):
        plain, driving = sequence_positions(mode, num_frames, height, width, num_extra_refs)
        cache[mode] = torch.cat(
            [
                rope_frequencies(plain, head_dim, theta),
                rope_frequencies(driving, head_dim, theta, pool=DRIVING_POOL),
            ]
        )
    if len(cache) == 1:
        return cache[modes[0]][None].to(device)
    return torch.stack([cache[m] for m in modes]).to(device)


def history_mask(
    batch: int,
    num_frames: int,
    keep: torch.Tensor | bool,
    device=None,
    dtype=torch.float32,
    history_frames: int = HISTORY_FRAMES,
) -> torch.Tensor:
    """(B, 1, T, 1, 1) mask: 1 on the first ``history_frames`` latent frames of the samples with ``keep`` (a bool
    for the whole batch or one per sample), else 0. Training keeps `HISTORY_FRAMES`; the sampler passes the
    length of its clean history."""
    keep_t = torch.as_tensor(keep, device=device).reshape(-1).expand(batch).to(dtype)
    frames = (torch.arange(num_frames, device=device) < history_frames).to(dtype)
    return (keep_t[:, None] * frames[None]).view(batch, 1, num_frames, 1, 1)


def with_mask_channels(latent: torch.Tensor, mask: torch.Tensor | float) -> torch.Tensor:
    """cat([latent (B, 16, T, h, w), mask as 4 identical channels]) -> (B, 20, T, h, w)."""
    b, _, t, h, w = latent.shape
    m = torch.as_tensor(mask, dtype=latent.dtype, device=latent.device)
    return torch.cat([latent, m.expand(b, 4, t, h, w)], dim=1)  # a (B, 1, T, 1, 1) or scalar mask broadcasts


def pack_inputs(
    noisy: torch.Tensor,
    history: torch.Tensor,
    cond: Condition,
    head_dim: int,
    patch_size: tuple[int, int, int] = (1, 2, 2),
    theta: float = 10000.0,
    rope: torch.Tensor | None = None,
) -> SCAIL2Inputs:
    """Build the SCAIL-2 model inputs from a noisy video latent and its conditioning.

    Args:
        noisy: (B, 16, T, h, w) noisy video latent (history frames already replaced by clean latents).
        history: (B, 1, T, 1, 1) history mask from :func:`history_mask` (1 on clean history frames).
        cond: the `Condition` of the batch: reference (B, 16, 1, h, w) and its mask (B, 28, 1, h, w), driving
            (B, 16, T, h/2, w/2) and its mask (B, 28, T, h/2, w/2), modes, optional extra references
            (B, n, 16, 1, h, w) with masks (B, n, 28, 1, h, w). Its text and CLIP tokens go to the model
            directly (``context``, ``clip_tokens``), not through the packing.
        rope: precomputed factors for this layout (the sampler reuses them across steps).
    """
    b, c, t, h, w = noisy.shape
    if cond.batch_size != b:
        raise ValueError(f"the condition has a batch of {cond.batch_size} for a noisy latent of batch {b}")
    expect = {
        "reference": (cond.reference, (b, c, 1, h, w)),
        "reference_mask": (cond.reference_mask, (b, 28, 1, h, w)),
        "driving": (cond.driving, (b, c, t, h // 2, w // 2)),
        "driving_mask": (cond.driving_mask, (b, 28, t, h // 2, w // 2)),
        "history": (history, (b, 1, t, 1, 1)),
    }
    for name, (tensor, shape) in expect.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}; expected {shape} for a video latent of shape "
                f"{tuple(noisy.shape)} (driving latents are encoded at half resolution, masks have 28 channels)"
            )
    if h % (2 * patch_size[1]) or w % (2 * patch_size[2]):
        raise ValueError(
            f"latent size {h}x{w} must be divisible by {2 * patch_size[1]} (pixel size divisible by 32)"
        )
    refs, ref_masks = cond.reference, cond.reference_mask
    n = cond.num_extra_references
    if n:
        extra, extra_masks = cond.extra_references, cond.extra_reference_masks
        if tuple(extra.shape) != (b, n, c, 1, h, w) or tuple(extra_masks.shape) != (b, n, 28, 1, h, w):
            raise ValueError(
                f"extra_references {tuple(extra.shape)} / extra_reference_masks {tuple(extra_masks.shape)}; "
                f"expected {(b, n, c, 1, h, w)} / {(b, n, 28, 1, h, w)}"
            )
        # (B, n, C, 1, h, w) -> (B, C, n, h, w), placed before the reference frame.
        refs = torch.cat([extra.squeeze(3).transpose(1, 2), refs], dim=2)
        ref_masks = torch.cat([extra_masks.squeeze(3).transpose(1, 2), ref_masks], dim=2)
    if rope is None:
        rope = sequence_rope(
            cond.modes, t // patch_size[0], h // patch_size[1], w // patch_size[2], head_dim, n, theta, noisy.device
        )
    return SCAIL2Inputs(
        video=with_mask_channels(noisy, history),
        reference=with_mask_channels(refs, 1.0),
        reference_mask=ref_masks,
        driving=with_mask_channels(cond.driving, 1.0),
        driving_mask=cond.driving_mask,
        rope=rope,
    )
