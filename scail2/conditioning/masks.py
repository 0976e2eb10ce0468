"""Colour-coded character masks: RGB mask videos <-> the 28-channel latent masks of the model.

A mask video is an RGB video in [-1, 1] drawn with a small palette (SPEC §3):

- black: the background here should not be visible;
- white: the background should be visible (the environment switch);
- blue, red, green, magenta, cyan, yellow: binding slots, one colour per character. Character k has the
  same colour in the reference mask and in the driving mask.

The white background marks the side whose environment is kept (`MASK_BACKGROUNDS`): in animation mode the
reference mask is drawn on white and the driving mask on black; in replacement mode the reference mask on
black and the driving mask on white. A given reference mask reaches the packing unchanged: its white pixels
light the white channel.

A colour channel is "on" above 225/255. Each pixel gives 7 binary channels, in the order of
`MASK_CHANNELS`; after area interpolation to the latent grid they become fractional coverage. Four
consecutive frames are stacked along channels (the VAE's temporal stride), so the model's mask input has
7 x 4 = 28 channels: channel ``7 * j + c`` is colour ``c`` in sub-frame ``j`` of a latent frame.

Two directions live here:

- mask video -> latent masks: `driving_mask_to_latent`, `reference_mask_to_latent` (built from
  `colour_to_channels` and `pack_temporal`);
- per-character binary masks -> mask video: `character_masks_to_colour` (with `character_order` and
  `character_colours`, so one colour assignment can be shared by the reference and the driving mask), and
  `background_mask` (no characters) and `video_mask_to_reference` (a frame of a driving-side mask video
  redrawn on the reference side's background).

Shapes: F = pixel frames (4k + 1), T = latent frames (k + 1), H x W = pixels, h x w = latent grid.
Functions take one sample; the latent functions also accept a leading batch dimension.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import torch
import torch.nn.functional as F

from scail2.conditioning.condition import check_mode
from scail2.conditioning.pixels import to_unit, unit_level

# Order of the 7 mask channels (channel c of every 7-channel block).
MASK_CHANNELS: tuple[str, ...] = ("white", "red", "green", "blue", "yellow", "magenta", "cyan")

# Binding slots in the order the model was trained with: the i-th character (after ordering) gets
# BINDING_PALETTE[i % 6], so a 7th character reuses blue.
BINDING_PALETTE: tuple[str, ...] = ("blue", "red", "green", "magenta", "cyan", "yellow")

# 8-bit RGB of every colour a mask video may contain.
COLOUR_RGB: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "black": (0, 0, 0),
        "white": (255, 255, 255),
        "red": (255, 0, 0),
        "green": (0, 255, 0),
        "blue": (0, 0, 255),
        "yellow": (255, 255, 0),
        "magenta": (255, 0, 255),
        "cyan": (0, 255, 255),
    }
)

# A channel is on above this 8-bit level (225/255); ON_THRESHOLD is the same level in [-1, 1] units.
ON_LEVEL = 225
ON_THRESHOLD: float = unit_level(ON_LEVEL)
# Values within this distance of the threshold count as the threshold itself (off). It is about 1/800 of
# an 8-bit level: it only absorbs float rounding of x / 127.5 - 1, so an 8-bit 225 stays off whichever way
# it was mapped, while the quarter-level values that 0.5x bilinear downsampling produces are unaffected.
_THRESHOLD_TOLERANCE = 1e-5

# Tolerance of the [-1, 1] range check (float rounding of the caller's normalisation, not real overshoot).
_RANGE_TOLERANCE = 1e-3

# Background colour of (reference mask, driving mask) per mode: white marks the side whose environment is kept.
MASK_BACKGROUNDS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {"animation": ("white", "black"), "replacement": ("black", "white")}
)

MASK_COLOURS = len(MASK_CHANNELS)  # 7
SUBFRAMES = 4  # pixel frames per latent frame (VAE temporal stride)
LATENT_MASK_CHANNELS = MASK_COLOURS * SUBFRAMES  # 28
FRAME_MULTIPLE = 4  # frames must be 4k + 1
SIZE_MULTIPLE = 32  # H, W: VAE stride 8, driving at half resolution, patch 2


# ----------------------------------------------------------------------------------------------------
# Validation shared with the packing and data layers
# ----------------------------------------------------------------------------------------------------


def check_frame_count(n: int, what: str = "mask video") -> int:
    """Raise unless ``n`` is 4k + 1; return the number of latent frames k + 1."""
    if n >= 1 and (n - 1) % FRAME_MULTIPLE == 0:
        return (n - 1) // FRAME_MULTIPLE + 1
    lower = (n - 1) // FRAME_MULTIPLE * FRAME_MULTIPLE + 1
    upper = lower + FRAME_MULTIPLE
    hint = f"e.g. {lower} or {upper}" if lower >= 1 else f"e.g. {max(upper, 1)}"
    raise ValueError(f"{what} has {n} frames; need 4k+1 ({hint})")


def check_spatial_size(h: int, w: int, what: str = "mask", multiple: int = SIZE_MULTIPLE) -> None:
    """Raise unless height and width are positive multiples of ``multiple`` (32 for every video input)."""
    for name, size in (("height", h), ("width", w)):
        if size >= multiple and size % multiple == 0:
            continue
        lower = size // multiple * multiple
        upper = lower + multiple
        hint = f"{lower} or {upper}" if lower > 0 else f"{upper}"
        raise ValueError(f"{what} {name} {size} is not divisible by {multiple}; resize or crop to {hint}")


def _check_rgb(x: torch.Tensor, what: str) -> torch.Tensor:
    """Check an RGB tensor (..., 3, H, W) in [-1, 1]; return it as float32."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} is a {type(x).__name__}; need a torch.Tensor (..., 3, H, W) in [-1, 1]")
    if not x.is_floating_point():
        raise ValueError(
            f"{what} has dtype {x.dtype}; need float values in [-1, 1]: map 8-bit values with x / 127.5 - 1"
        )
    if x.ndim < 3 or x.shape[-3] != 3:
        shape = tuple(x.shape)
        if x.ndim >= 3 and x.shape[-1] == 3:
            raise ValueError(
                f"{what} has shape {shape}, which looks channels-last; need (..., 3, H, W): use x.movedim(-1, -3)"
            )
        if x.ndim < 3:
            raise ValueError(f"{what} has shape {shape}; need (..., 3, H, W) RGB in [-1, 1]")
        raise ValueError(
            f"{what} has {x.shape[-3]} channels at dim -3 (shape {shape}); need 3 (RGB) as (..., 3, H, W): "
            "drop an alpha channel with x[..., :3, :, :] or repeat a grey mask to 3 channels"
        )
    if x.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)}); need at least one pixel")
    # One precision for the threshold everywhere. bfloat16 keeps only about half an 8-bit level near the
    # threshold, so callers should map 8-bit masks to [-1, 1] in float32 and pass them in float32.
    x = x.to(torch.float32)
    lo, hi = torch.aminmax(x)
    lo, hi = lo.item(), hi.item()
    if not (math.isfinite(lo) and math.isfinite(hi)):  # amin/amax propagate NaN
        raise ValueError(f"{what} contains NaN or inf; need finite values in [-1, 1]")
    if lo < -1 - _RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
        raise ValueError(
            f"{what} values span [{lo:.4g}, {hi:.4g}]; expected [-1, 1]: map 8-bit values with x / 127.5 - 1 "
            "(and [0, 1] values with 2 * x - 1)"
        )
    return x


# ----------------------------------------------------------------------------------------------------
# Mask video -> latent masks
# ----------------------------------------------------------------------------------------------------


def _threshold_channels(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) float32 in [-1, 1] -> (..., 7, H, W) float32 0/1, without validation."""
    on = x > ON_THRESHOLD + _THRESHOLD_TOLERANCE
    r, g, b = on.unbind(-3)
    nr, ng, nb = ~r, ~g, ~b
    # Same order as MASK_CHANNELS; a primary excludes the other two primaries (red = R & !G & !B).
    channels = (
        r & g & b,  # white
        r & ng & nb,  # red
        nr & g & nb,  # green
        nr & ng & b,  # blue
        r & g & nb,  # yellow
        r & ng & b,  # magenta
        nr & g & b,  # cyan
    )
    return torch.stack(channels, dim=-3).to(torch.float32)


def colour_to_channels(frames: torch.Tensor) -> torch.Tensor:
    """Threshold a colour-coded mask into its 7 binary channels.

    frames: (F, 3, H, W) (any leading dims) RGB in [-1, 1]. Returns (F, 7, H, W) float32 with values 0/1,
    channels in `MASK_CHANNELS` order. A black pixel (or any other combination, e.g. no channel on) gives
    all zeros; every pixel lights at most one channel.
    """
    return _threshold_channels(_check_rgb(frames, "mask video"))


def pack_temporal(x: torch.Tensor) -> torch.Tensor:
    """Stack groups of 4 frames along channels: (F, 7, h, w) -> (28, T, h, w), T = (F - 1) / 4 + 1.

    Frame 0 is repeated 4 times (the VAE encodes the first frame alone), then frames 1.. are grouped by 4:
    channel ``7 * j + c`` of latent frame t holds colour c of sub-frame j. A single frame (F = 1) gives 4
    identical 7-channel blocks, (28, 1, h, w). A leading batch dim is kept: (B, F, 7, h, w) -> (B, 28, T, h, w).
    """
    if x.ndim not in (4, 5) or x.shape[-3] != MASK_COLOURS:
        raise ValueError(
            f"pack_temporal got shape {tuple(x.shape)}; need (F, 7, h, w) or (B, F, 7, h, w) "
            "with the 7 channels of colour_to_channels"
        )
    *lead, n, c, h, w = x.shape
    t = check_frame_count(n, "mask video")
    first = x[..., :1, :, :, :].expand(*lead, SUBFRAMES, c, h, w)
    x = torch.cat([first, x[..., 1:, :, :, :]], dim=-4)  # (..., 4T, 7, h, w)
    x = x.reshape(*lead, t, SUBFRAMES * c, h, w)  # (..., T, 28, h, w): channel 7*j + c
    return x.transpose(-4, -3).contiguous()  # (..., 28, T, h, w)


def _ceil_halvings(h: int, w: int, n: int = 3) -> tuple[int, int]:
    """Latent grid of the VAE: n stride-2 stages, each rounding up."""
    for _ in range(n):
        h, w = -(-h // 2), -(-w // 2)
    return h, w


def _area_to_latent(channels: torch.Tensor) -> torch.Tensor:
    """(N, 7, H, W) -> (N, 7, h, w) fractional coverage on the VAE latent grid."""
    size = _ceil_halvings(*channels.shape[-2:])
    return F.interpolate(channels, size=size, mode="area")


def driving_mask_to_latent(video: torch.Tensor) -> torch.Tensor:
    """Driving mask video -> packed latent mask on the half-resolution driving grid.

    video: (F, 3, H, W) or (B, F, 3, H, W) RGB in [-1, 1], F = 4k + 1, H and W divisible by 32.
    Returns (28, T, H/16, W/16) (or (B, 28, T, H/16, W/16)) float32 coverage in [0, 1].

    The driving video is encoded at half resolution, so its mask is first downsampled 0.5x in pixel space
    (bilinear, align_corners=False) and thresholded afterwards: a pixel is on only where the 2x2 average
    clears the threshold. Then area interpolation to the latent grid and temporal packing.
    """
    if not isinstance(video, torch.Tensor) or video.ndim not in (4, 5):
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"driving mask has shape {shape}; need (F, 3, H, W) or (B, F, 3, H, W) in [-1, 1]")
    video = _check_rgb(video, "driving mask")
    batched = video.ndim == 5
    if not batched:
        video = video.unsqueeze(0)
    b, n, _, height, width = video.shape
    check_frame_count(n, "driving mask")
    check_spatial_size(height, width, "driving mask")
    frames = video.reshape(b * n, 3, height, width)
    # Explicit size (not scale_factor=0.5): identical for even sizes, and it states the output grid.
    half = F.interpolate(frames, size=(height // 2, width // 2), mode="bilinear", align_corners=False)
    latent = _area_to_latent(_threshold_channels(half))  # (B*F, 7, H/16, W/16)
    packed = pack_temporal(latent.reshape(b, n, *latent.shape[1:]))  # (B, 28, T, H/16, W/16)
    return packed if batched else packed[0]


def reference_mask_to_latent(image: torch.Tensor) -> torch.Tensor:
    """Reference mask image -> packed latent mask on the full-resolution latent grid.

    image: (3, H, W), (1, 3, H, W) or a batch (B, 1, 3, H, W), RGB in [-1, 1], H and W divisible by 32.
    Returns (28, 1, H/8, W/8) (or (B, 28, 1, H/8, W/8)) float32 coverage in [0, 1]: the thresholded
    full-resolution channels are area-interpolated and repeated in all 4 sub-frame blocks.
    """
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4, 5):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(
            f"reference mask has shape {shape}; need (3, H, W), (1, 3, H, W) or (B, 1, 3, H, W) in [-1, 1]"
        )
    image = _check_rgb(image, "reference mask")
    batched = image.ndim == 5
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if not batched:
        image = image.unsqueeze(0)
    b, n, _, height, width = image.shape
    if n != 1:
        raise ValueError(
            f"reference mask has {n} frames; need a single image (3, H, W) or (1, 3, H, W); "
            "for a batch of images use (B, 1, 3, H, W)"
        )
    check_spatial_size(height, width, "reference mask")
    latent = _area_to_latent(_threshold_channels(image.reshape(b, 3, height, width)))  # (B, 7, H/8, W/8)
    packed = pack_temporal(latent.unsqueeze(1))  # (B, 28, 1, H/8, W/8)
    return packed if batched else packed[0]


def palette_violation_fraction(frames: torch.Tensor, low: int = 64) -> float:
    """Fraction of pixels whose colour is not confidently one of the 8 palette colours.

    frames: (..., 3, H, W) RGB in [-1, 1]. A channel is confidently on when the mask rule reads it as on
    (above 225/255) and confidently off below ``low``/255 (64 by default). A pixel is off-palette when any
    channel lies in between, i.e. in [low, 225] in 8-bit units. Compression noise near pure colours (a 255
    decoded as 240, a 0 decoded as 20) does not count; mid-grey, orange (255, 165, 0), or a colour faded to
    200 that the threshold would silently read as off do count. Returns a Python float in [0, 1].
    """
    if not 0 < low <= ON_LEVEL:
        raise ValueError(f"palette_violation_fraction low={low}; need an 8-bit level in (0, {ON_LEVEL}], e.g. 64")
    x = _check_rgb(frames, "mask video")
    confidently_on = x > ON_THRESHOLD + _THRESHOLD_TOLERANCE
    confidently_off = x < unit_level(low)
    ambiguous = ~(confidently_on | confidently_off)  # (..., 3, H, W)
    return ambiguous.any(dim=-3).float().mean().item()


# ----------------------------------------------------------------------------------------------------
# Per-character binary masks -> mask video
# ----------------------------------------------------------------------------------------------------


def _check_character_masks(masks: torch.Tensor) -> torch.Tensor:
    """Check (K, F, H, W) binary masks; return them as bool."""
    if not isinstance(masks, torch.Tensor) or masks.ndim != 4:
        shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(
            f"character masks have shape {shape}; need (K, F, H, W), one boolean video per character "
            "(add a frame dim for single images: masks[:, None])"
        )
    if masks.dtype == torch.bool:
        return masks
    if masks.numel() and not ((masks == 0) | (masks == 1)).all():
        raise ValueError(
            f"character masks have dtype {masks.dtype} with values other than 0 and 1; "
            "need boolean masks: threshold soft masks first, e.g. masks > 0.5"
        )
    return masks != 0


def character_order(masks: torch.Tensor, by: str = "x") -> list[int]:
    """Order characters for palette assignment; returns ``perm`` with perm[i] = index of the i-th character.

    masks: (K, F, H, W) bool. Only the first frame is used. ``by="x"``: left to right by the centre x of the
    first-frame bounding box; ``by="area"``: largest first-frame area first. Ties keep index order.
    Characters absent from the first frame go last, in index order.
    """
    masks = _check_character_masks(masks)
    first = masks[:, 0]  # (K, H, W)
    k, _, width = first.shape
    visible = first.flatten(1).any(dim=1).tolist()
    if by == "x":
        columns = first.any(dim=1)  # (K, W) occupied columns
        index = torch.arange(width, device=first.device)
        left = torch.where(columns, index, width).amin(dim=1)
        right = torch.where(columns, index, -1).amax(dim=1)
        key = (left + right).tolist()  # twice the centre x, kept integer
    elif by == "area":
        key = (-first.flatten(1).sum(dim=1)).tolist()
    else:
        raise ValueError(
            f"unknown character order {by!r}; use 'x' (left to right), 'area' (largest first) "
            "or pass an explicit permutation of the character indices"
        )
    return sorted(range(k), key=lambda i: (not visible[i], key[i] if visible[i] else 0, i))


def character_colours(order: Sequence[int]) -> list[str]:
    """Colour name of each character (indexed by character) for an ordering from `character_order`.

    The i-th character of ``order`` gets BINDING_PALETTE[i % 6]. Use the same ``order`` for the reference
    mask and the driving mask so character k has one colour in both.
    """
    order = list(order)
    colours = [""] * len(order)
    for slot, character in enumerate(order):
        colours[character] = BINDING_PALETTE[slot % len(BINDING_PALETTE)]
    return colours


def _resolve_order(masks: torch.Tensor, order: str | Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(order, str):
        return character_order(masks, order)
    perm = order.tolist() if isinstance(order, torch.Tensor) else [int(i) for i in order]
    k = masks.shape[0]
    if sorted(perm) != list(range(k)):
        raise ValueError(
            f"order {perm} is not a permutation of range({k}); pass each of the {k} character indices "
            f"exactly once, e.g. {list(range(k))}, or use 'x' / 'area'"
        )
    return perm


def mask_background(mode: str, reference: bool) -> str:
    """The background colour of a mask drawn for ``mode``: the reference mask's (``reference``) or the driving
    mask's. Animation: reference white, driving black; replacement: reference black, driving white."""
    ref, drive = MASK_BACKGROUNDS[check_mode(mode, "mask mode")]
    return ref if reference else drive


def _rgb(name: str, device: torch.device | None = None) -> torch.Tensor:
    """(3, 1, 1) float32 in {-1, 1} of a palette colour."""
    return to_unit(torch.tensor(COLOUR_RGB[name], dtype=torch.uint8, device=device)).view(3, 1, 1)


def background_mask(mode: str, reference: bool, height: int, width: int, frames: int = 1) -> torch.Tensor:
    """A mask with no characters: (F, 3, H, W) float32 of the mode's reference or driving background (see
    `mask_background`), what an input without masks is conditioned on."""
    return _rgb(mask_background(mode, reference)).expand(frames, 3, height, width).clone()


def video_mask_to_reference(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Redraw a frame of a driving-side mask (a target or driving mask video) as a reference mask of ``mode``.

    mask: (..., 3, H, W) uint8, or float in [-1, 1]. Pixels of the driving background (black in animation,
    white in replacement) become the reference background (white in animation, black in replacement);
    character colours stay. A pixel is white when all three channels are on and black when none is (the
    thresholding of `colour_to_channels`). Returns the same dtype.
    """
    ref_bg, drive_bg = MASK_BACKGROUNDS[check_mode(mode, "mask mode")]
    if mask.dtype == torch.uint8:
        on = mask > ON_LEVEL
        levels = {"white": 255, "black": 0}
    else:
        on = _check_rgb(mask, "mask") > ON_THRESHOLD + _THRESHOLD_TOLERANCE
        levels = {"white": 1.0, "black": -1.0}
    background = on.all(dim=-3, keepdim=True) if drive_bg == "white" else ~on.any(dim=-3, keepdim=True)
    return mask.masked_fill(background, levels[ref_bg])


def character_masks_to_colour(
    masks: torch.Tensor,
    mode: str,
    order: str | Sequence[int] | torch.Tensor = "x",
    *,
    reference: bool = False,
) -> torch.Tensor:
    """Draw per-character binary masks as a colour-coded mask video.

    masks: (K, F, H, W) bool, one video per character (F = 1 for a reference image).
    mode: "animation" or "replacement"; with ``reference`` it picks the background (`mask_background`):
        animation draws the driving mask on black and the reference mask on white, replacement the driving
        mask on white (the environment switch) and the reference mask on black.
    order: "x" or "area" (see `character_order`) or an explicit permutation (perm[i] = the character that
        gets palette slot i). Compute it once, e.g. ``character_order(driving_masks)``, and pass it to both
        the reference and the driving call so every character keeps its colour.
    reference: draw the reference mask (the other background of the mode).
    Returns (F, 3, H, W) float32 with values in {-1, 1}.

    Overlaps: characters are drawn in index order, each over the previous ones, so where masks overlap
    the highest character index wins. Pass characters back to front (nearest last) to keep the nearer one.
    """
    masks = _check_character_masks(masks)
    background = mask_background(mode, reference)
    colours = character_colours(_resolve_order(masks, order))
    _, n, height, width = masks.shape
    out = _rgb(background, masks.device).expand(n, 3, height, width).clone()  # (F, 3, H, W)
    for character, colour in enumerate(colours):
        out = torch.where(masks[character].unsqueeze(1), _rgb(colour, masks.device), out)
    return out
