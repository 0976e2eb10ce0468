"""A small, real dataset drawn procedurally: videos, masks, boxes, captions and a manifest.

Characters are articulated figures (torso, head, two-segment arms and legs drawn as capsules) with their
own colour, texture, proportions and, for some, hands: small blobs of a distinct colour at the arm ends.
A *motion* is a root trajectory plus joint-angle curves; two characters performing one motion move the
same way with their own bodies. Backgrounds are textured (checkers, stripes, tiles, gradients with noise).

Pairs, as the training data has them (driving = synthetic, target = real):

- ``scail_animation`` / ``wananimate_animation``: one character; the driving video is another character
  doing the same motion over another background (wananimate: closer, slower shots).
- ``mocha_replacement_single`` / ``mocha_replacement_multi``: the same scene and motion with the
  character(s) swapped; driving masks have the white environment switch.
- ``pose``: the driving video is a skeleton render of the motion (end_to_end false).

Each record gets a colour-coded driving mask, a target mask, a reference (a target frame, or for some
records a separate image), hand and face boxes, a caption, and for some an augmented driving video + mask
(the swap) and an OCR-like sign with its mask video. Masks are drawn on the official backgrounds of their
mode (`scail2.conditioning.masks.MASK_BACKGROUNDS`): animation: driving and target masks on black, the
reference mask on white; replacement: driving and target masks on white, the reference mask on black.
The drawing API (`random_character`, `random_motion`, `pose_joints`, `random_background`, `draw_posed`,
`joint_box`, `scene_caption`, `colour_mask_video`) is public: the synthetic preference components draw with it.
Everything is a function of the seed and the pair index; `generate_dataset` records the drawing version and
options in ``synth.json`` and `ensure_dataset` refuses a folder drawn by another version or with other options.
`pair_truth` draws a pair's exact ground truth again from those (character silhouettes, the backgrounds of the
target, the driving video and the reference, joints), for measurements against it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from scail2.conditioning.masks import character_masks_to_colour, character_order
from scail2.data.manifest import MotionRecord, Regions, write_manifest
from scail2.data.video import write_image, write_video

# Version of what `generate_dataset` draws, recorded in <out>/synth.json. 2: reference masks on the reference
# background of the mode (white in animation mode); version 1 drew every reference mask on black.
SYNTH_VERSION = 2
SYNTH_STAMP = "synth.json"

# `SynthOptions.travel`: the largest root speed (widths per second) and the time (s) at which a travelling root
# passes its drawn position (the middle of a 17-frame clip at 16 fps).
MAX_TRAVEL = 0.5
TRAVEL_MIDPOINT_S = 0.5

SYNTH_SOURCES: tuple[str, ...] = (
    "scail_animation",
    "mocha_replacement_single",
    "pose",
    "wananimate_animation",
    "mocha_replacement_multi",
)


def synth_source_class(source: str) -> str:
    """The sampling class (`scail2.data.manifest.SOURCE_CLASSES`) of the records of a synthetic source."""
    if source not in SYNTH_SOURCES:
        raise ValueError(f"{source!r} is not a synthetic source; use a name from {list(SYNTH_SOURCES)}")
    return "pose" if source == "pose" else ("replacement" if source.startswith("mocha_replacement") else "animation")


# Named colours whose words the captions use.
_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "pink": (240, 110, 180),
    "white": (235, 235, 235),
    "brown": (130, 80, 40),
}
_TEXTURES = ("plain", "striped", "checkered", "dotted")
_BACKGROUNDS = ("checkered", "striped", "tiled", "gradient")
# Skeleton limb colours of the pose renders (one per limb, as pose renders use).
_LIMB_COLOURS = np.array(
    [[255, 0, 0], [255, 128, 0], [255, 255, 0], [0, 255, 0], [0, 255, 255], [0, 0, 255], [128, 0, 255], [255, 0, 255], [255, 255, 255]],
    dtype=np.float32,
)


@dataclass(frozen=True)
class SynthOptions:
    """pairs: number of records; frames: 4k+1 per video; sizes: (height, width) list, each divisible by 32
    (records cycle through it); fps: frame rate written; seed: every pixel is a function of it.
    lossy: write the RGB videos as 4:2:0 H.264 (CRF 18) like real data; by default they are RGB-lossless,
    so decoded frames are exactly the drawn ones (the encoder may pick different bytes, never other pixels).
    Masks are always lossless.
    first_index: index of the first pair (pairs ``first_index .. first_index + pairs - 1``; every pair is a
    function of (seed, index), so sets of disjoint indices share no character, motion or background).
    scene_references: separate reference images are drawn in a scene instead of over a plain wall: in
    animation mode the reference character at rest in the target's scene (the background the output keeps), and
    every replacement pair gets one, the reference character in another scene (so its background is not the
    driving video's, which the output keeps). Then the environment switch of each mode can be measured.
    travel: the characters walk across the frame: each pair's cast moves its root by up to ``travel`` of the
    width per second (speed uniform in [travel / 2, travel], one direction per pair, passing its drawn position at
    half a second), drawn from a stream of its own, so 0 (the default) draws exactly what it drew before. The
    driving video's characters perform the same motion, so where the target's characters are in each frame is
    in the driving video, and a still reference drifts away from it.
    clips_per_cast: pairs come in runs of this many that share one cast and scene, like clips cut from one
    longer recording of each cast: pair ``index`` is drawn as cast ``index // clips_per_cast`` (its source, mode,
    characters, backgrounds, sign and reference choice) performing a motion of its own (joint curves, sway and bob
    drawn from a stream of the pair, each character kept at the cast's root position; with ``travel``, the pair's
    own speed and direction). Then a reference does not tell which motion its target performs: only the driving
    video does. 1 (the default) draws exactly what it drew before. Cast indices are drawn like pair indices, so
    sets of disjoint pair indices share no cast only if their cast indices are disjoint too (the held-out sets of
    `scail2.lit.data.SyntheticDataModule`, one cast per pair from index 1,000,000 on, share none with its
    training pairs).
    sources: the source kinds drawn, in turn: pair ``index`` (with ``clips_per_cast``, cast ``index //
    clips_per_cast``) is drawn as ``sources[index % len(sources)]``; names from `SYNTH_SOURCES` (which is the
    default, every kind in turn), a name repeated to draw it more often, e.g. ``("mocha_replacement_single",)``
    for replacement pairs only. A dataset of one source family is a task of its own: the mix (animation pairs
    that take the reference's background, pose renders without one) stays out of it.
    These are recorded in ``synth.json`` only when set, so folders drawn with the defaults keep their stamp."""

    pairs: int = 20
    frames: int = 17
    sizes: tuple[tuple[int, int], ...] = ((64, 64),)
    fps: float = 16.0
    seed: int = 0
    lossy: bool = False
    first_index: int = 0
    scene_references: bool = False
    travel: float = 0.0
    clips_per_cast: int = 1
    sources: tuple[str, ...] = SYNTH_SOURCES

    def __post_init__(self) -> None:
        if isinstance(self.sources, str) or not self.sources:
            raise ValueError(f"sources {self.sources!r} must be a non-empty sequence of names from {list(SYNTH_SOURCES)}")
        object.__setattr__(self, "sources", tuple(self.sources))  # a list given (a config's) is kept as a tuple
        unknown = [s for s in self.sources if s not in SYNTH_SOURCES]
        if unknown:
            raise ValueError(f"sources {unknown} are not synthetic sources; use names from {list(SYNTH_SOURCES)}")
        if self.clips_per_cast < 1:
            raise ValueError(f"clips_per_cast {self.clips_per_cast} must be >= 1 (1: every pair has a cast of its own)")
        if self.pairs < 1:
            raise ValueError(f"pairs {self.pairs} must be >= 1")
        if self.first_index < 0:
            raise ValueError(f"first_index {self.first_index} must be >= 0")
        if not 0.0 <= self.travel <= MAX_TRAVEL:
            raise ValueError(f"travel {self.travel} must be in [0, {MAX_TRAVEL}] (widths per second)")
        if self.frames < 5 or (self.frames - 1) % 4:
            lo = max(5, (self.frames - 1) // 4 * 4 + 1)
            raise ValueError(f"frames {self.frames}; need 4k+1 >= 5 (e.g. {lo} or {lo + 4})")
        for h, w in self.sizes:
            if h < 32 or w < 32 or h % 32 or w % 32:
                raise ValueError(f"size {h}x{w}; height and width must be multiples of 32 (e.g. 64x64, 64x96)")


# ----------------------------------------------------------------------------------------------------
# Characters and motions
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Character:
    colour: str
    texture: str
    scale: float  # figure height as a fraction of the frame height
    thickness: float  # limb radius as a fraction of the figure height
    proportions: tuple[float, float, float]  # torso, arm, leg length factors
    hand_colour: tuple[int, int, int] | None  # None: no hands drawn
    hand_size: float = 1.3  # hand blob radius as a multiple of the limb radius


@dataclass(frozen=True)
class Motion:
    x0: float  # root x as a fraction of the width
    y0: float  # pelvis y as a fraction of the height
    sway: tuple[float, float, float]  # amplitude (fraction of width), frequency (Hz), phase
    bob: tuple[float, float]  # amplitude (fraction of height), frequency (Hz)
    joints: np.ndarray  # (8, 4): base, amplitude, frequency, phase of lean, shoulders, elbows, hips, knees
    velocity: float = 0.0  # travel of the root in widths per second, through x0 at t = TRAVEL_MIDPOINT_S


def random_character(rng: np.random.Generator, scale: tuple[float, float], exclude: Sequence[str] = ()) -> Character:
    """A random figure of height ``scale`` (a range, as a fraction of the frame) in a colour not in ``exclude``."""
    names = [c for c in _COLOURS if c not in exclude]
    colour = names[int(rng.integers(len(names)))]
    hands = rng.random() < 0.6
    hand_colour = tuple(int(v) for v in rng.integers(0, 256, 3)) if hands else None
    return Character(
        colour=colour,
        texture=_TEXTURES[int(rng.integers(len(_TEXTURES)))],
        scale=float(rng.uniform(*scale)),
        thickness=float(rng.uniform(0.035, 0.06)),
        proportions=tuple(float(v) for v in rng.uniform(0.85, 1.15, 3)),
        hand_colour=hand_colour,
    )


def random_motion(rng: np.random.Generator, x0: float, speed: float) -> Motion:
    """A random motion rooted at ``x0`` (a fraction of the width); ``speed`` scales every frequency."""
    joints = np.stack(
        [
            [0.0, rng.uniform(0.0, 0.15), rng.uniform(0.3, 1.0) * speed, rng.uniform(0, 2 * math.pi)],  # lean
            [rng.uniform(0.2, 0.6), rng.uniform(0.3, 1.3), rng.uniform(0.4, 1.5) * speed, rng.uniform(0, 2 * math.pi)],  # L shoulder
            [rng.uniform(0.2, 0.6), rng.uniform(0.3, 1.3), rng.uniform(0.4, 1.5) * speed, rng.uniform(0, 2 * math.pi)],  # R shoulder
            [rng.uniform(0.1, 0.6), rng.uniform(0.2, 0.9), rng.uniform(0.4, 1.5) * speed, rng.uniform(0, 2 * math.pi)],  # L elbow
            [rng.uniform(0.1, 0.6), rng.uniform(0.2, 0.9), rng.uniform(0.4, 1.5) * speed, rng.uniform(0, 2 * math.pi)],  # R elbow
            [rng.uniform(0.05, 0.2), rng.uniform(0.1, 0.45), rng.uniform(0.4, 1.2) * speed, rng.uniform(0, 2 * math.pi)],  # hips
            [rng.uniform(0.0, 0.3), rng.uniform(0.1, 0.5), rng.uniform(0.4, 1.2) * speed, rng.uniform(0, 2 * math.pi)],  # L knee
            [rng.uniform(0.0, 0.3), rng.uniform(0.1, 0.5), rng.uniform(0.4, 1.2) * speed, rng.uniform(0, 2 * math.pi)],  # R knee
        ]
    )
    return Motion(
        x0=x0,
        y0=float(rng.uniform(0.45, 0.55)),
        sway=(float(rng.uniform(0.0, 0.12)), float(rng.uniform(0.2, 0.8) * speed), float(rng.uniform(0, 2 * math.pi))),
        bob=(float(rng.uniform(0.0, 0.03)), float(rng.uniform(0.5, 1.5) * speed)),
        joints=joints,
    )


def _direction(angle: np.ndarray) -> np.ndarray:
    """Unit vector (x, y) of an angle measured from straight down (image y points down)."""
    return np.stack([np.sin(angle), np.cos(angle)], axis=-1)


def pose_joints(motion: Motion, character: Character, t: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
    """Joint positions (F, 2) in pixels (x, y) for every joint of one character performing a motion."""
    fh = character.scale * height
    torso_f, arm_f, leg_f = character.proportions
    angles = motion.joints[:, 0:1] + motion.joints[:, 1:2] * np.sin(2 * math.pi * motion.joints[:, 2:3] * t + motion.joints[:, 3:4])
    lean, sh_l, sh_r, el_l, el_r, hip, kn_l, kn_r = angles
    amp, freq, phase = motion.sway
    x = (motion.x0 + amp * np.sin(2 * math.pi * freq * t + phase) + motion.velocity * (t - TRAVEL_MIDPOINT_S)) * width
    y = motion.y0 * height + motion.bob[0] * height * np.sin(2 * math.pi * motion.bob[1] * t)
    pelvis = np.stack([x, y], axis=-1)
    up = -_direction(lean)  # the torso points up from the pelvis
    neck = pelvis + up * (0.3 * torso_f * fh)
    head = neck + up * (0.12 * fh)
    upper, lower = 0.16 * arm_f * fh, 0.15 * arm_f * fh
    thigh, shin = 0.22 * leg_f * fh, 0.21 * leg_f * fh
    # Left limbs swing to -x, right limbs to +x; elbows and knees bend relative to their parent segment.
    elbow_l = neck + _direction(-sh_l) * upper
    elbow_r = neck + _direction(sh_r) * upper
    hand_l = elbow_l + _direction(-sh_l - el_l) * lower
    hand_r = elbow_r + _direction(sh_r + el_r) * lower
    knee_l = pelvis + _direction(-hip) * thigh
    knee_r = pelvis + _direction(hip) * thigh
    foot_l = knee_l + _direction(-hip + kn_l) * shin
    foot_r = knee_r + _direction(hip - kn_r) * shin
    return {
        "pelvis": pelvis, "neck": neck, "head": head, "elbow_l": elbow_l, "elbow_r": elbow_r, "hand_l": hand_l,
        "hand_r": hand_r, "knee_l": knee_l, "knee_r": knee_r, "foot_l": foot_l, "foot_r": foot_r,
    }  # fmt: skip


# Joint names of `pose_joints` / `draw_posed`, in the order pose arrays use.
JOINTS: tuple[str, ...] = (
    "pelvis", "neck", "head", "elbow_l", "elbow_r", "hand_l", "hand_r", "knee_l", "knee_r", "foot_l", "foot_r",
)  # fmt: skip

_LIMBS = (
    ("pelvis", "neck"),
    ("neck", "elbow_l"),
    ("elbow_l", "hand_l"),
    ("neck", "elbow_r"),
    ("elbow_r", "hand_r"),
    ("pelvis", "knee_l"),
    ("knee_l", "foot_l"),
    ("pelvis", "knee_r"),
    ("knee_r", "foot_r"),
)


# ----------------------------------------------------------------------------------------------------
# Drawing (numpy, whole frames at once)
# ----------------------------------------------------------------------------------------------------


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5  # pixel centres
    return yy, xx


def _capsules(p: np.ndarray, q: np.ndarray, radius: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """bool (F, H, W): pixels within ``radius`` of the segments p[f] -> q[f] (each (F, 2) x, y)."""
    px, py = p[:, 0, None, None], p[:, 1, None, None]
    dx, dy = (q[:, 0] - p[:, 0])[:, None, None], (q[:, 1] - p[:, 1])[:, None, None]
    length2 = np.maximum(dx * dx + dy * dy, 1e-6)
    s = np.clip(((xx - px) * dx + (yy - py) * dy) / length2, 0.0, 1.0)
    ex, ey = xx - (px + s * dx), yy - (py + s * dy)
    return ex * ex + ey * ey <= radius * radius


def _discs(c: np.ndarray, radius: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    return (xx - c[:, 0, None, None]) ** 2 + (yy - c[:, 1, None, None]) ** 2 <= radius * radius


def _texture(kind: str, yy: np.ndarray, xx: np.ndarray, period: float) -> np.ndarray:
    """(H, W) brightness factor in [0.55, 1] for a body texture."""
    if kind == "striped":
        return np.where(np.floor(yy / period) % 2 == 0, 1.0, 0.6)
    if kind == "checkered":
        return np.where((np.floor(yy / period) + np.floor(xx / period)) % 2 == 0, 1.0, 0.55)
    if kind == "dotted":
        return np.where(((yy % period) - period / 2) ** 2 + ((xx % period) - period / 2) ** 2 < (period / 3) ** 2, 0.6, 1.0)
    return np.ones_like(yy)


def random_background(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, str]:
    """A textured (H, W, 3) float32 background in [0, 255] and its caption word."""
    kind = _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]
    yy, xx = _grid(height, width)
    a, b = rng.uniform(30, 200, 3), rng.uniform(30, 200, 3)
    cell = float(rng.uniform(4, 12)) * height / 64
    if kind == "checkered":
        t = ((np.floor(yy / cell) + np.floor(xx / cell)) % 2)[..., None]
    elif kind == "striped":
        angle = rng.uniform(0, math.pi)
        t = (np.floor((xx * math.cos(angle) + yy * math.sin(angle)) / cell) % 2)[..., None]
    elif kind == "tiled":
        tiles = rng.uniform(0, 1, (int(height / cell) + 2, int(width / cell) + 2))
        t = tiles[(yy / cell).astype(int), (xx / cell).astype(int)][..., None]
    else:
        t = ((yy / height) * 0.7 + (xx / width) * 0.3)[..., None]
    image = a * (1 - t) + b * t + rng.normal(0, 6, (height, width, 3))
    return image.clip(0, 255).astype(np.float32), kind


@dataclass
class DrawnScene:
    """What `draw_posed` returns."""

    frames: np.ndarray  # (F, H, W, 3) uint8
    masks: np.ndarray  # (K, F, H, W) bool, visible part of each character
    hands: list[list[tuple[float, float, float, float]]]  # per frame boxes
    faces: list[list[tuple[float, float, float, float]]]


def joint_box(c: np.ndarray, r: float, height: int, width: int) -> tuple[float, float, float, float] | None:
    """The (x0, y0, x1, y1) box of radius ``r`` about the pixel point ``c`` (x, y), clipped to the frame; None
    when the point is not finite (undetected) or the clipped box is under a pixel wide."""
    if not np.isfinite(c).all():  # an undetected joint (NaN, from a pose estimate) has no box
        return None
    x0, y0, x1, y1 = max(0.0, c[0] - r), max(0.0, c[1] - r), min(float(width), c[0] + r), min(float(height), c[1] + r)
    return (round(x0, 2), round(y0, 2), round(x1, 2), round(y1, 2)) if x1 - x0 >= 1 and y1 - y0 >= 1 else None


def _draw_scene(
    background: np.ndarray, cast: Sequence[tuple[Character, Motion]], t: np.ndarray
) -> DrawnScene:
    """Draw characters (back to front, in order) over a background; also return masks and boxes."""
    height, width = background.shape[:2]
    return draw_posed(background, [(c, pose_joints(m, c, t, height, width)) for c, m in cast])


def draw_posed(background: np.ndarray, cast: Sequence[tuple[Character, dict[str, np.ndarray]]]) -> DrawnScene:
    """Draw characters at given joint positions (back to front, in order) over an (H, W, 3) background.

    cast: per character its appearance and its joints by name (`JOINTS`), each (F, 2) pixel (x, y). A NaN
    joint is not drawn, nor are the limbs and hand blob that end at it (an undetected keypoint).
    Returns frames (F, H, W, 3) uint8, visible masks (K, F, H, W) and per-frame hand and face boxes.
    """
    if not cast:
        raise ValueError("draw_posed needs at least one character (got an empty cast)")
    height, width = background.shape[:2]
    yy, xx = _grid(height, width)
    f = len(cast[0][1]["pelvis"])
    canvas = np.repeat(background[None], f, axis=0)  # (F, H, W, 3)
    silhouettes = []
    hands: list[list] = [[] for _ in range(f)]
    faces: list[list] = [[] for _ in range(f)]
    for character, joints in cast:
        fh = character.scale * height
        radius = max(0.9, character.thickness * fh)
        body = np.zeros((f, height, width), dtype=bool)
        for a, b in _LIMBS:
            body |= _capsules(joints[a], joints[b], radius, yy, xx)
        head_r = max(1.2, 0.07 * fh)
        body |= _discs(joints["head"], head_r, yy, xx)
        shade = _texture(character.texture, yy, xx, max(2.0, 0.08 * fh))[None, ..., None]
        colour = np.array(_COLOURS[character.colour], dtype=np.float32)
        canvas = np.where(body[..., None], colour * shade, canvas)
        silhouette = body
        if character.hand_colour is not None:
            hand_r = max(1.0, radius * character.hand_size)
            hand = _discs(joints["hand_l"], hand_r, yy, xx) | _discs(joints["hand_r"], hand_r, yy, xx)
            canvas = np.where(hand[..., None], np.array(character.hand_colour, dtype=np.float32), canvas)
            silhouette = body | hand
            for i in range(f):
                for name in ("hand_l", "hand_r"):
                    box = joint_box(joints[name][i], hand_r, height, width)
                    if box:
                        hands[i].append(box)
        for i in range(f):
            box = joint_box(joints["head"][i], head_r, height, width)
            if box:
                faces[i].append(box)
        silhouettes.append(silhouette)
    masks = np.stack(silhouettes)  # (K, F, H, W)
    # Visible parts: a character is hidden where any later (nearer) one is drawn.
    later = np.zeros_like(masks[0])
    for k in range(len(masks) - 1, -1, -1):
        masks[k] &= ~later
        later |= silhouettes[k]
    return DrawnScene(canvas.round().clip(0, 255).astype(np.uint8), masks, hands, faces)


def _draw_skeleton(cast: Sequence[tuple[Character, Motion]], t: np.ndarray, height: int, width: int, thickness: float, palette_shift: int) -> tuple[np.ndarray, np.ndarray]:
    """A pose render (limbs in per-limb colours on black) and per-character masks (K, F, H, W)."""
    yy, xx = _grid(height, width)
    f = len(t)
    canvas = np.zeros((f, height, width, 3), dtype=np.float32)
    masks = []
    for character, motion in cast:
        joints = pose_joints(motion, character, t, height, width)
        radius = max(0.7, thickness * height)
        region = np.zeros((f, height, width), dtype=bool)
        for li, (a, b) in enumerate(_LIMBS):
            limb = _capsules(joints[a], joints[b], radius, yy, xx)
            canvas = np.where(limb[..., None], _LIMB_COLOURS[(li + palette_shift) % len(_LIMB_COLOURS)], canvas)
            region |= _capsules(joints[a], joints[b], radius + 1.5, yy, xx)
        head = _discs(joints["head"], radius * 1.8, yy, xx)
        canvas = np.where(head[..., None], np.float32(255), canvas)
        masks.append(region | _discs(joints["head"], radius * 1.8 + 1.5, yy, xx))
    return canvas.astype(np.uint8), np.stack(masks)


def colour_mask_video(masks: np.ndarray, mode: str, order: list[int], reference: bool = False) -> np.ndarray:
    """(K, F, H, W) bool -> uint8 (F, H, W, 3) colour-coded mask video."""
    video = character_masks_to_colour(torch.from_numpy(masks), mode, order, reference=reference).numpy()  # (F, 3, H, W)
    # Values are exactly -1 or 1: map to 0 / 255.
    return np.where(video > 0, 255, 0).astype(np.uint8).transpose(0, 2, 3, 1).copy()


def _draw_sign(background: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paint a text-like sign (dark strokes on a light panel) into an (H, W, 3) background, in place;
    return its (H, W) bool mask."""
    height, width, _ = background.shape
    sh, sw = max(6, height // 6), max(12, width // 3)
    y0, x0 = int(rng.integers(0, max(1, height // 4))), int(rng.integers(0, max(1, width - sw)))
    panel = np.full((sh, sw, 3), 230.0, dtype=np.float32)
    strokes = rng.random((sh, sw)) < 0.3
    strokes[:: max(2, sh // 3)] = False
    panel[strokes] = 20.0
    background[y0 : y0 + sh, x0 : x0 + sw] = panel
    mask = np.zeros((height, width), dtype=bool)
    mask[y0 : y0 + sh, x0 : x0 + sw] = True
    return mask


# ----------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------

_ACTIONS = ("dancing", "waving", "walking", "jumping", "turning", "moving")


def scene_caption(cast: Sequence[Character], action: str, background: str, close: bool) -> str:
    """The caption of a scene: its characters, what they do and the background's word (`random_background`)."""
    people = " and ".join(f"a {c.colour} {c.texture} character" for c in cast)
    shot = "close-up shot of " if close else ""
    return f"{shot}{people} {action} in front of a {background} background"


def _to_rgb_u8(mask_video: np.ndarray) -> np.ndarray:
    return np.repeat((mask_video * 255).astype(np.uint8)[..., None], 3, axis=-1)


@dataclass
class _PairPlan:
    source: str
    mode: str
    end_to_end: bool
    multi: int
    close: bool
    image_reference: bool
    aug: bool
    sign: bool
    history_allowed: bool
    files: dict[str, str] = field(default_factory=dict)


def _plan(index: int, rng: np.random.Generator, sources: Sequence[str] = SYNTH_SOURCES) -> _PairPlan:
    source = sources[index % len(sources)]
    mode = "replacement" if source.startswith("mocha_replacement") else "animation"
    multi = int(rng.integers(2, 4)) if source == "mocha_replacement_multi" else (int(rng.integers(1, 3)) if source == "pose" else 1)
    return _PairPlan(
        source=source,
        mode=mode,
        end_to_end=source != "pose",
        multi=multi,
        close=source == "wananimate_animation",
        # Every third animation pair gets a separate reference image (and then no target mask).
        image_reference=mode == "animation" and source != "pose" and index % 3 == 0,
        aug=rng.random() < 0.6,
        sign=mode == "replacement" and rng.random() < 0.5,
        history_allowed=rng.random() < 0.75,
    )


def _cast_scale(plan: _PairPlan) -> tuple[float, float]:
    return (0.8, 1.0) if plan.close else (0.45, 0.65)


def _draw_real_cast(rng: np.random.Generator, plan: _PairPlan) -> list[tuple[Character, Motion]]:
    """The character(s) and motion(s) of a pair's target video (the first draws after the plan)."""
    speed = 0.5 if plan.close else 1.0
    xs = np.linspace(0.25, 0.75, plan.multi) if plan.multi > 1 else np.array([rng.uniform(0.4, 0.6)])
    motions = [random_motion(rng, float(x), speed) for x in xs]
    return [(random_character(rng, _cast_scale(plan)), m) for m in motions]


def _with_travel(cast: list[tuple[Character, Motion]], seed: int, index: int, travel: float) -> list[tuple[Character, Motion]]:
    """The cast with its roots travelling (`SynthOptions.travel`), drawn from the pair's own travel stream."""
    if travel == 0.0:
        return cast
    rng = np.random.default_rng([seed, index, 13])
    velocity = float(rng.uniform(travel / 2, travel)) * (1.0 if rng.random() < 0.5 else -1.0)
    return [(c, replace(m, velocity=velocity)) for c, m in cast]


def _own_motions(cast: list[tuple[Character, Motion]], plan: _PairPlan, seed: int, index: int) -> list[tuple[Character, Motion]]:
    """The cast performing the motions of pair ``index`` (`SynthOptions.clips_per_cast`), drawn from a stream of
    the pair; every character keeps its root position."""
    rng = np.random.default_rng([seed, index, 17])
    speed = 0.5 if plan.close else 1.0
    return [(c, random_motion(rng, m.x0, speed)) for c, m in cast]


def _cast_and_plan(
    seed: int, index: int, clips_per_cast: int, sources: Sequence[str] = SYNTH_SOURCES
) -> tuple[np.random.Generator, _PairPlan, list[tuple[Character, Motion]], int]:
    """The generator (after the cast's draws), plan, target cast (motions not yet travelling) and cast index of
    pair ``index``."""
    cast_index = index // clips_per_cast
    rng = np.random.default_rng([seed, cast_index])
    plan = _plan(cast_index, rng, sources)
    cast = _draw_real_cast(rng, plan)
    if clips_per_cast > 1:
        cast = _own_motions(cast, plan, seed, index)
    return rng, plan, cast, cast_index


def target_cast(
    seed: int, index: int, travel: float = 0.0, clips_per_cast: int = 1, sources: Sequence[str] = SYNTH_SOURCES
) -> list[tuple[Character, Motion]]:
    """The cast of the target video of pair ``index`` of a dataset generated with ``seed`` (and ``travel``,
    ``clips_per_cast``, ``sources``; no drawing)."""
    _, _, cast, _ = _cast_and_plan(seed, index, clips_per_cast, sources)
    return _with_travel(cast, seed, index, travel)


def target_joints(
    seed: int, index: int, frames: int, fps: float, height: int, width: int, travel: float = 0.0, clips_per_cast: int = 1,
    sources: Sequence[str] = SYNTH_SOURCES,
) -> list[tuple[Character, dict[str, np.ndarray]]]:
    """Per character of pair ``index``'s target video: its appearance and joints (`JOINTS` -> (F, 2) pixels)."""
    t = np.arange(frames) / fps
    cast = target_cast(seed, index, travel, clips_per_cast, sources)
    return [(c, pose_joints(m, c, t, height, width)) for c, m in cast]


def joints_at(
    seed: int, index: int, times: Sequence[float], height: int, width: int, travel: float = 0.0, clips_per_cast: int = 1,
    sources: Sequence[str] = SYNTH_SOURCES,
) -> list[tuple[Character, dict[str, np.ndarray]]]:
    """Like `target_joints`, at given times in seconds (e.g. the source frames of a clip cut from the video)."""
    t = np.asarray(times, dtype=np.float64)
    cast = target_cast(seed, index, travel, clips_per_cast, sources)
    return [(c, pose_joints(m, c, t, height, width)) for c, m in cast]


@dataclass
class _DrawnPair:
    """Everything `make_pair` writes for one pair, drawn but not yet written (uint8 frames, bool masks)."""

    plan: _PairPlan
    real_cast: list[tuple[Character, Motion]]
    order: list[int]
    target: DrawnScene
    target_background: np.ndarray  # (H, W, 3) float32 in [0, 255], the sign painted in
    driving_background: np.ndarray  # (H, W, 3); the target's in replacement mode; black for pose renders
    driving: tuple[np.ndarray, np.ndarray]  # frames (F, H, W, 3), masks (K, F, H, W)
    aug: tuple[np.ndarray, np.ndarray] | None
    reference_frame: int | None  # the target frame that is the reference, or None for a separate image
    reference: np.ndarray  # (H, W, 3) uint8
    reference_masks: np.ndarray  # (K, H, W) bool, visible part of each character in the reference
    reference_background: np.ndarray  # (H, W, 3) float32, the reference's background
    sign_mask: np.ndarray | None
    caption: str


def _draw_pair(
    index: int, height: int, width: int, frames: int, fps: float, seed: int, scene_references: bool = False,
    travel: float = 0.0, clips_per_cast: int = 1, sources: Sequence[str] = SYNTH_SOURCES,
) -> _DrawnPair:
    # The cast's draws (everything but the pair's own motion and travel) come from the cast index's streams.
    rng, plan, real_cast, cast_index = _cast_and_plan(seed, index, clips_per_cast, sources)
    t = np.arange(frames) / fps
    scale = _cast_scale(plan)
    real_cast = _with_travel(real_cast, seed, index, travel)  # the driving cast moves the same way
    # The synthetic character differs in colour from the real one it replaces.
    synth_cast = [(random_character(rng, scale, exclude=[c.colour]), m) for c, m in real_cast]
    aug_cast = [(random_character(rng, scale, exclude=[c.colour]), m) for c, m in real_cast]
    bg_real, bg_word = random_background(rng, height, width)
    bg_synth, _ = random_background(rng, height, width)
    bg_aug, _ = random_background(rng, height, width)
    if plan.mode == "replacement":
        bg_synth = bg_aug = bg_real  # the same scene, characters swapped

    # The sign belongs to the scene: painted into the shared background before anyone is drawn over it.
    sign_mask = _draw_sign(bg_real, np.random.default_rng([seed, cast_index, 7])) if plan.sign else None
    real = _draw_scene(bg_real, real_cast, t)
    order = character_order(torch.from_numpy(real.masks), "x")

    def synthetic(cast, background, shift):
        if plan.end_to_end:
            drawn = _draw_scene(background, cast, t)
            return drawn.frames, drawn.masks
        thickness = 0.02 if shift == 0 else 0.03
        return _draw_skeleton(cast, t, height, width, thickness, shift)

    driving = synthetic(synth_cast, bg_synth, 0)
    aug = synthetic(aug_cast, bg_aug, 3) if plan.aug else None
    separate = plan.image_reference or (scene_references and plan.mode == "replacement")
    if separate:
        # A separate reference image: the real character(s) at rest pose over a plain wall, or with
        # scene_references in a scene (animation: the target's; replacement: another one).
        wall = np.full((height, width, 3), rng.uniform(60, 200, 3), dtype=np.float32)
        if scene_references:
            scene = np.random.default_rng([seed, cast_index, 11])
            wall = bg_real if plan.mode == "animation" else random_background(scene, height, width)[0]
        still = _draw_scene(wall, real_cast, np.zeros(1))
        reference, reference_masks, reference_bg, reference_frame = still.frames[0], still.masks[:, 0], wall, None
    else:
        reference_frame = int(rng.integers(frames))
        reference, reference_masks, reference_bg = real.frames[reference_frame], real.masks[:, reference_frame], bg_real
    caption = scene_caption([c for c, _ in real_cast], _ACTIONS[int(rng.integers(len(_ACTIONS)))], bg_word, plan.close)
    return _DrawnPair(
        plan=plan, real_cast=real_cast, order=order, target=real, target_background=bg_real,
        driving_background=bg_synth if plan.end_to_end else np.zeros_like(bg_synth), driving=driving, aug=aug, reference_frame=reference_frame, reference=reference,
        reference_masks=reference_masks, reference_background=reference_bg, sign_mask=sign_mask, caption=caption,
    )  # fmt: skip


def make_pair(
    out_dir: Path, index: int, height: int, width: int, frames: int, fps: float, seed: int, lossy: bool = False,
    scene_references: bool = False, travel: float = 0.0, clips_per_cast: int = 1, sources: Sequence[str] = SYNTH_SOURCES,
) -> MotionRecord:
    """Draw and write every file of pair ``index``; return its record (paths absolute)."""
    rgb = {"lossless": not lossy}
    drawn = _draw_pair(index, height, width, frames, fps, seed, scene_references, travel, clips_per_cast, sources)
    plan, order, real = drawn.plan, drawn.order, drawn.target
    rid = f"{plan.source}_{index:05d}"
    folder = out_dir / "pairs" / rid
    files: dict[str, Path] = {}
    files["target"] = write_video(folder / "target.mp4", real.frames, fps, **rgb)
    video, masks = drawn.driving
    files["driving"] = write_video(folder / "driving.mp4", video, fps, **rgb)
    files["driving_mask"] = write_video(folder / "driving_mask.mp4", colour_mask_video(masks, plan.mode, order), fps, lossless=True)
    if drawn.aug is not None:
        video, masks = drawn.aug
        files["driving_aug"] = write_video(folder / "driving_aug.mp4", video, fps, **rgb)
        files["driving_mask_aug"] = write_video(
            folder / "driving_mask_aug.mp4", colour_mask_video(masks, plan.mode, order), fps, lossless=True
        )
    ref_mask = colour_mask_video(drawn.reference_masks[:, None], plan.mode, order, reference=True)[0]
    if drawn.reference_frame is None:
        files["reference"] = write_image(folder / "reference.png", drawn.reference)
        reference: int | Path = files["reference"]
    else:
        reference = drawn.reference_frame
    if drawn.reference_frame is not None or plan.mode == "replacement":
        files["target_mask"] = write_video(folder / "target_mask.mp4", colour_mask_video(real.masks, plan.mode, order), fps, lossless=True)
    files["reference_mask"] = write_image(folder / "reference_mask.png", ref_mask)
    ocr = None
    if drawn.sign_mask is not None:
        sign_video = np.repeat(drawn.sign_mask[None], frames, axis=0)
        files["ocr"] = write_video(folder / "ocr_mask.mp4", _to_rgb_u8(sign_video), fps, lossless=True)
        ocr = Regions(video=files["ocr"])

    has_hands = any(c.hand_colour is not None for c, _ in drawn.real_cast)
    return MotionRecord(
        id=rid,
        source=plan.source,
        mode=plan.mode,
        driving=files["driving"],
        target=files["target"],
        reference=reference,
        driving_mask=files["driving_mask"],
        reference_mask=files["reference_mask"],
        fps=fps,
        caption=drawn.caption,
        end_to_end=plan.end_to_end,
        history_allowed=plan.history_allowed,
        hands=Regions(boxes=real.hands) if has_hands else None,
        faces=Regions(boxes=real.faces),
        ocr=ocr,
        driving_aug=files.get("driving_aug"),
        driving_mask_aug=files.get("driving_mask_aug"),
        target_mask=files.get("target_mask"),
        frames=frames,
        height=height,
        width=width,
        meta={"synthetic": True, "characters": plan.multi},
    )


@dataclass
class PairTruth:
    """The exact ground truth of one synthetic pair (`pair_truth`); masks are the visible part of each
    character (K characters, back to front), backgrounds (H, W, 3) float32 in [0, 255] as drawn (before any
    character), joints as `target_joints`."""

    index: int
    source: str
    mode: str
    end_to_end: bool
    masks: np.ndarray  # (K, F, H, W) bool: the target's characters
    reference_masks: np.ndarray  # (K, H, W) bool: the characters in the reference
    reference_frame: int | None  # the target frame used as the reference (None: a separate image)
    target_background: np.ndarray
    driving_background: np.ndarray  # the driving video's (the target's in replacement mode; black for pose renders)
    reference_background: np.ndarray
    joints: list[dict[str, np.ndarray]]  # per character: `JOINTS` -> (F, 2) pixel (x, y)
    characters: list[Character]

    @property
    def kept_background(self) -> np.ndarray:
        """The background the output keeps: the reference's in animation mode, the driving video's in
        replacement mode (SPEC: the environment switch)."""
        return self.driving_background if self.mode == "replacement" else self.reference_background

    @property
    def other_background(self) -> np.ndarray:
        """The background the output must not take (the other input's)."""
        return self.reference_background if self.mode == "replacement" else self.driving_background


def pair_truth(
    seed: int, index: int, frames: int, fps: float, height: int, width: int, scene_references: bool = False,
    travel: float = 0.0, clips_per_cast: int = 1, sources: Sequence[str] = SYNTH_SOURCES,
) -> PairTruth:
    """The ground truth of pair ``index`` of a dataset drawn with ``seed`` and these settings (drawn again, the
    same way `make_pair` draws it; nothing is read from disk)."""
    drawn = _draw_pair(index, height, width, frames, fps, seed, scene_references, travel, clips_per_cast, sources)
    t = np.arange(frames) / fps
    return PairTruth(
        index=index, source=drawn.plan.source, mode=drawn.plan.mode, end_to_end=drawn.plan.end_to_end,
        masks=drawn.target.masks, reference_masks=drawn.reference_masks, reference_frame=drawn.reference_frame,
        target_background=drawn.target_background, driving_background=drawn.driving_background,
        reference_background=drawn.reference_background,
        joints=[pose_joints(m, c, t, height, width) for c, m in drawn.real_cast],
        characters=[c for c, _ in drawn.real_cast],
    )  # fmt: skip


def pair_index(record_id: str) -> int:
    """The pair index of a synthetic record id (``<source>_<index>``, as `make_pair` names it)."""
    tail = record_id.rsplit("_", 1)[-1]
    if not tail.isdigit():
        raise ValueError(f"{record_id!r} is not a synthetic record id (<source>_<index>, e.g. scail_animation_00003)")
    return int(tail)


def _stamp(options: SynthOptions) -> dict:
    fields_ = asdict(options)
    fields_["sizes"] = [list(size) for size in options.sizes]
    # Recorded only when set, so that folders drawn before these options existed keep their stamp.
    for name in ("first_index", "scene_references", "travel", "clips_per_cast", "sources"):
        if fields_[name] == SynthOptions.__dataclass_fields__[name].default:
            del fields_[name]
    if "sources" in fields_:
        fields_["sources"] = list(options.sources)
    return {"version": SYNTH_VERSION, **fields_}


def generate_dataset(out_dir: str | Path, options: SynthOptions | None = None) -> Path:
    """Write ``options.pairs`` pairs under ``out_dir`` and ``out_dir/manifest.jsonl``; return the manifest path.
    ``out_dir/synth.json`` records `SYNTH_VERSION` and the options."""
    options = options if options is not None else SynthOptions()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(options.pairs):
        height, width = options.sizes[i % len(options.sizes)]
        index = options.first_index + i
        records.append(
            make_pair(
                out, index, height, width, options.frames, options.fps, options.seed, options.lossy,
                options.scene_references, options.travel, options.clips_per_cast, options.sources,
            )  # fmt: skip
        )
    manifest = write_manifest(out / "manifest.jsonl", records)
    (out / SYNTH_STAMP).write_text(json.dumps(_stamp(options), indent=1) + "\n")  # last: marks a complete dataset
    return manifest


def ensure_dataset(out_dir: str | Path, options: SynthOptions | None = None) -> Path:
    """The manifest of the synthetic dataset in ``out_dir``, drawn first when the folder holds none; a folder
    drawn by another `SYNTH_VERSION` or with other options is refused (its masks or pairs would silently stand
    for these), with what to delete."""
    options = options if options is not None else SynthOptions()
    out = Path(out_dir)
    stamp_path, manifest = out / SYNTH_STAMP, out / "manifest.jsonl"
    if not stamp_path.exists():
        if manifest.exists():
            raise ValueError(
                f"{out} holds synthetic videos without {SYNTH_STAMP}, drawn by an older version (before version "
                f"{SYNTH_VERSION}, reference masks were drawn on black in every mode); delete {out.parent} (it is "
                "regenerated on the next run) or point the data root elsewhere"
            )
        return generate_dataset(out, options)
    recorded, ours = json.loads(stamp_path.read_text()), _stamp(options)
    if recorded != ours:
        differ = sorted(k for k in ours.keys() | recorded.keys() if ours.get(k) != recorded.get(k))
        detail = ", ".join(f"{k}: {recorded.get(k)!r} there, {ours.get(k)!r} here" for k in differ)
        raise ValueError(
            f"{out} holds synthetic videos drawn with other settings ({detail}); delete {out.parent} (it is "
            "regenerated on the next run) or point the data root elsewhere"
        )
    return manifest.resolve()
