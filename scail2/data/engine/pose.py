"""Skeleton videos from 2-D keypoints for pose-driven mode, and random skeleton scaling.

A `PoseTrack` (``scail2.data.engine.clips``: (P, F, J, 2) pixel keypoints, NaN = not detected) in one of
the layouts below is drawn as SCAIL's pose renders look: the OpenPose-18 body topology (neck-centred) with one
colour per limb — warm colours on the right side (red, oranges, yellow-green, greens), cool colours on the left
(cyan, blues, purples), grey and magenta for the head — drawn from the trunk outwards; 21-point hands as thin
edges coloured along the hue circle with blue keypoints; the face as white dots (eyebrows, eyes, mouth, as
SCAIL-Pose's 2-D overlay draws them). Every person is drawn with the same palette; which person is which comes
from the binding colours of the mask video (`render_poses` returns per-person region masks for it).

Pixel rule: a pixel is covered by a limb when its centre (x + 0.5, y + 0.5) lies within the limb's radius of the
segment between the two keypoints (a capsule); by a dot when within the dot's radius of the keypoint. Later
primitives are drawn over earlier ones, persons in track order.

SCAIL itself rasterises 3-D cylinders from NLF poses; the paper's best pose-driven numbers use SAM3D-Body meshes.
Those renders are not made here: bring your own render (any (F, H, W, 3) video) and its mask (see docs/data.md).
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from scail2.data.engine.clips import COCO_WHOLEBODY, SYNTH_LAYOUT, KeypointLayout, PoseTrack

RGB = tuple[int, int, int]

# ----------------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------------

_OP18 = ("nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
         "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
         "right_eye", "left_eye", "right_ear", "left_ear")  # fmt: skip
_OP25 = ("nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
         "left_wrist", "mid_hip", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
         "right_eye", "left_eye", "right_ear", "left_ear", "left_big_toe", "left_small_toe", "left_heel",
         "right_big_toe", "right_small_toe", "right_heel")  # fmt: skip


def _index(names: Sequence[str]) -> dict[str, int]:
    return {n: i for i, n in enumerate(names)}


_I18, _I25 = _index(_OP18), _index(_OP25)
_HEAD = ("nose", "right_eye", "left_eye", "right_ear", "left_ear")

# OpenPose BODY_18 (the COCO-18 order of the original OpenPose and of DWPose's body output).
OPENPOSE_BODY18 = KeypointLayout(
    name="openpose_body18",
    joints=_OP18,
    hands=((_I18["left_wrist"],), (_I18["right_wrist"],)),
    confusions=(((_I18["left_wrist"],), (_I18["right_wrist"],)), ((_I18["left_ankle"],), (_I18["right_ankle"],))),
    faces=(tuple(_I18[n] for n in _HEAD),),
)
# OpenPose BODY_25.
OPENPOSE_BODY25 = KeypointLayout(
    name="openpose_body25",
    joints=_OP25,
    hands=((_I25["left_wrist"],), (_I25["right_wrist"],)),
    confusions=(((_I25["left_wrist"],), (_I25["right_wrist"],)), ((_I25["left_ankle"],), (_I25["right_ankle"],))),
    faces=(tuple(_I25[n] for n in _HEAD),),
)
# OpenPose's whole-body output concatenated in its JSON order: BODY_25, face (70), left hand (21), right hand (21).
_F137, _LH137, _RH137 = tuple(range(25, 95)), tuple(range(95, 116)), tuple(range(116, 137))
OPENPOSE_137 = KeypointLayout(
    name="openpose_137",
    joints=_OP25 + tuple(f"face_{i}" for i in range(70)) + tuple(f"left_hand_{i}" for i in range(21))
    + tuple(f"right_hand_{i}" for i in range(21)),
    hands=(_LH137, _RH137),
    confusions=(((_I25["left_wrist"], *_LH137), (_I25["right_wrist"], *_RH137)),),
    faces=(tuple(_I25[n] for n in _HEAD) + _F137,),
)  # fmt: skip

LAYOUTS: dict[str, KeypointLayout] = {
    layout.name: layout for layout in (COCO_WHOLEBODY, OPENPOSE_BODY18, OPENPOSE_BODY25, OPENPOSE_137, SYNTH_LAYOUT)
}


def layout_by_name(name: str) -> KeypointLayout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown keypoint layout {name!r}; use one of {sorted(LAYOUTS)}")
    return LAYOUTS[name]


# ----------------------------------------------------------------------------------------------------
# Skeletons: what is drawn for a layout
# ----------------------------------------------------------------------------------------------------

# SCAIL's limb colours (OpenPose-18 topology), by limb.
_C = {
    "red": (255, 0, 0), "orange": (255, 85, 0), "golden_orange": (255, 170, 0), "yellow_green": (180, 255, 0),
    "green": (0, 255, 0), "green_blue": (0, 255, 85), "cyan": (0, 255, 255), "sky_blue": (0, 170, 255),
    "medium_blue": (0, 85, 255), "blue": (0, 0, 255), "purple_blue": (85, 0, 255), "medium_purple": (170, 0, 255),
    "grey": (150, 150, 150), "pink_magenta": (255, 0, 170), "dark_violet": (50, 0, 255),
}  # fmt: skip
# (joint a, joint b, colour) in OpenPose-18 names, in drawing order: from the trunk outwards.
_BODY_LIMBS = (
    ("neck", "right_shoulder", "red"), ("right_shoulder", "right_elbow", "orange"),
    ("right_elbow", "right_wrist", "golden_orange"),
    ("neck", "left_shoulder", "cyan"), ("left_shoulder", "left_elbow", "sky_blue"),
    ("left_elbow", "left_wrist", "medium_blue"),
    ("neck", "right_hip", "yellow_green"), ("right_hip", "right_knee", "green"), ("right_knee", "right_ankle", "green_blue"),
    ("neck", "left_hip", "blue"), ("left_hip", "left_knee", "purple_blue"), ("left_knee", "left_ankle", "medium_purple"),
    ("neck", "nose", "grey"), ("nose", "right_eye", "pink_magenta"), ("right_eye", "right_ear", "dark_violet"),
    ("nose", "left_eye", "pink_magenta"), ("left_eye", "left_ear", "dark_violet"),
)  # fmt: skip
# OpenPose's 21-point hand: wrist, then 4 points per finger from the thumb.
HAND_EDGES: tuple[tuple[int, int], ...] = tuple(
    (0 if j == 0 else 1 + 4 * f + j - 1, 1 + 4 * f + j) for f in range(5) for j in range(4)
)
HAND_EDGE_COLOURS: tuple[RGB, ...] = tuple(
    tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0)) for i in range(len(HAND_EDGES))
)
HAND_POINT_COLOUR: RGB = (0, 0, 255)
FACE_COLOUR: RGB = (255, 255, 255)
# Of the 68 (or 70) face landmarks: eyebrows 17-26 and eyes, mouth (and pupils) 36-; not the jaw line or nose.
_FACE_DRAWN = tuple(range(17, 27)) + tuple(range(36, 70))


@dataclass(frozen=True)
class Skeleton:
    """What `render_poses` draws for one layout.

    points: the skeleton's joints, each a layout index or a pair of indices (their midpoint, e.g. COCO's neck).
    limbs: pairs of skeleton joints, in drawing order, each with its colour. hands: layout indices of each
    21-point hand (OpenPose order). face: layout indices drawn as white dots.
    """

    layout: KeypointLayout
    points: tuple[int | tuple[int, int], ...]
    limbs: tuple[tuple[int, int, RGB], ...]
    hands: tuple[tuple[int, ...], ...] = ()
    face: tuple[int, ...] = ()


def _body_skeleton(layout: KeypointLayout, where: dict[str, int | tuple[int, int]], hands=(), face=()) -> Skeleton:
    points = tuple(where[n] for n in _OP18)
    limbs = tuple((_I18[a], _I18[b], _C[c]) for a, b, c in _BODY_LIMBS)
    return Skeleton(layout, points, limbs, tuple(hands), tuple(face))


def _coco_skeleton() -> Skeleton:
    coco = {n: i for i, n in enumerate(COCO_WHOLEBODY.joints)}
    where: dict[str, int | tuple[int, int]] = {n: coco[n] for n in _OP18 if n != "neck"}
    where["neck"] = (coco["left_shoulder"], coco["right_shoulder"])
    face = tuple(23 + i for i in _FACE_DRAWN if i < 68)
    return _body_skeleton(COCO_WHOLEBODY, where, COCO_WHOLEBODY.hands, face)


def _synth_skeleton() -> Skeleton:
    j = {n: i for i, n in enumerate(SYNTH_LAYOUT.joints)}
    limbs = (
        ("pelvis", "neck", "red"), ("neck", "elbow_r", "orange"), ("elbow_r", "hand_r", "golden_orange"),
        ("neck", "elbow_l", "sky_blue"), ("elbow_l", "hand_l", "medium_blue"),
        ("pelvis", "knee_r", "green"), ("knee_r", "foot_r", "green_blue"),
        ("pelvis", "knee_l", "purple_blue"), ("knee_l", "foot_l", "medium_purple"), ("neck", "head", "grey"),
    )  # fmt: skip
    return Skeleton(SYNTH_LAYOUT, tuple(range(len(SYNTH_LAYOUT.joints))), tuple((j[a], j[b], _C[c]) for a, b, c in limbs))


SKELETONS: dict[str, Skeleton] = {
    "coco_wholebody": _coco_skeleton(),
    "openpose_body18": _body_skeleton(OPENPOSE_BODY18, {n: i for i, n in enumerate(_OP18)}),
    "openpose_body25": _body_skeleton(OPENPOSE_BODY25, {n: _I25[n] for n in _OP18}),
    "openpose_137": _body_skeleton(OPENPOSE_137, {n: _I25[n] for n in _OP18}, (_LH137, _RH137),
                                   tuple(25 + i for i in _FACE_DRAWN)),
    "synth11": _synth_skeleton(),
}  # fmt: skip


def skeleton_for(layout: KeypointLayout) -> Skeleton:
    skeleton = SKELETONS.get(layout.name)
    if skeleton is None or skeleton.layout.joints != layout.joints:
        raise ValueError(f"no skeleton for the keypoint layout {layout.name!r}; known layouts: {sorted(SKELETONS)}")
    return skeleton


# ----------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------


@dataclass
class PoseRender:
    """frames: (F, H, W, 3) uint8 skeleton video on black. masks: (P, F, H, W) bool region of each person (what
    it drew, dilated by the margin with a square): draw them in the binding colours for the pose video's mask."""

    frames: np.ndarray
    masks: np.ndarray


class _Canvas:
    """One frame's image and the current person's region; primitives are drawn inside their bounding window."""

    def __init__(self, height: int, width: int):
        self.h, self.w = height, width
        self.image = np.zeros((height, width, 3), dtype=np.uint8)

    def _window(self, x0: float, y0: float, x1: float, y1: float, r: float):
        c0, c1 = max(0, math.floor(min(x0, x1) - r - 0.5)), min(self.w, math.ceil(max(x0, x1) + r + 0.5))
        r0, r1 = max(0, math.floor(min(y0, y1) - r - 0.5)), min(self.h, math.ceil(max(y0, y1) + r + 0.5))
        if c1 <= c0 or r1 <= r0:
            return None
        yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float64) + 0.5  # pixel centres
        return (slice(r0, r1), slice(c0, c1)), yy, xx

    def capsule(self, a: np.ndarray, b: np.ndarray, r: float) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """Pixels whose centre is within ``r`` of the segment a-b: (window, bool mask in the window)."""
        win = self._window(a[0], a[1], b[0], b[1], r)
        if win is None:
            return None
        sl, yy, xx = win
        dx, dy = b[0] - a[0], b[1] - a[1]
        length2 = dx * dx + dy * dy
        s = np.clip(((xx - a[0]) * dx + (yy - a[1]) * dy) / length2, 0.0, 1.0) if length2 > 0 else 0.0
        ex, ey = xx - (a[0] + s * dx), yy - (a[1] + s * dy)
        return sl, ex * ex + ey * ey <= r * r

    def paint(self, shape, colour: RGB, region: np.ndarray | None) -> None:
        if shape is None:
            return
        sl, inside = shape
        self.image[sl][inside] = colour
        if region is not None:
            region[sl] |= inside


def _resolve(person: np.ndarray, skeleton: Skeleton) -> np.ndarray:
    """(F, J, 2) layout keypoints -> (F, S, 2) skeleton joints (midpoints for pairs; NaN when a part is missing)."""
    cols = []
    for p in skeleton.points:
        cols.append(person[:, p] if isinstance(p, int) else (person[:, p[0]] + person[:, p[1]]) / 2)
    return np.stack(cols, axis=1)


def default_widths(height: int, width: int) -> tuple[float, float, float]:
    """(limb radius, hand-line radius, face-dot radius) in pixels for a frame size: about 1/128 of the shorter side
    for limbs (at least 1), and SCAIL-Pose's thin lines (1-2 px wide) for hands and the face."""
    short = min(height, width)
    thin = min(max(int(short / 300), 1), 2)
    return max(1.0, short / 128), thin / 2 + 0.25, thin / 2 + 0.25


def render_poses(
    track: PoseTrack,
    skeleton: Skeleton | None = None,
    *,
    limb_radius: float | None = None,
    hand_radius: float | None = None,
    face_radius: float | None = None,
    mask_margin: float | None = None,
    hands: bool = True,
    face: bool = True,
) -> PoseRender:
    """Draw every person of ``track`` on black, frame by frame (see the module docstring for the style and the
    pixel rule). Radii default to `default_widths`; ``mask_margin`` (default: the limb radius) dilates each person's
    region mask by that many pixels (rounded up) beyond what it drew. Undetected keypoints (NaN) leave out the limbs, hand edges and dots that need
    them."""
    skeleton = skeleton if skeleton is not None else skeleton_for(track.layout)
    h, w = track.height, track.width
    dl, dh, df = default_widths(h, w)
    limb_r = dl if limb_radius is None else float(limb_radius)
    hand_r = dh if hand_radius is None else float(hand_radius)
    face_r = df if face_radius is None else float(face_radius)
    margin = limb_r if mask_margin is None else float(mask_margin)
    if min(limb_r, hand_r, face_r) <= 0 or margin < 0:
        raise ValueError(f"radii must be positive and the margin >= 0; got {limb_r}, {hand_r}, {face_r}, {margin}")
    p_count, f_count = track.persons, track.frames
    frames = np.zeros((f_count, h, w, 3), dtype=np.uint8)
    masks = np.zeros((p_count, f_count, h, w), dtype=bool)
    kp = np.asarray(track.keypoints, dtype=np.float64)
    joints = [_resolve(kp[p], skeleton) for p in range(p_count)]  # (F, S, 2) each

    def finite(*points: np.ndarray) -> bool:
        return all(np.isfinite(q).all() for q in points)

    for f in range(f_count):
        canvas = _Canvas(h, w)
        for p in range(p_count):
            region = masks[p, f]  # a view: painting marks the person's pixels
            for a, b, colour in skeleton.limbs:
                pa, pb = joints[p][f, a], joints[p][f, b]
                if finite(pa, pb):
                    canvas.paint(canvas.capsule(pa, pb, limb_r), colour, region)
            if hands:
                for group in skeleton.hands:
                    pts = kp[p, f, list(group)]  # (21, 2)
                    for (i, j), colour in zip(HAND_EDGES, HAND_EDGE_COLOURS):
                        if finite(pts[i], pts[j]):
                            canvas.paint(canvas.capsule(pts[i], pts[j], hand_r), colour, region)
                    for q in pts:
                        if finite(q):
                            canvas.paint(canvas.capsule(q, q, hand_r), HAND_POINT_COLOUR, region)
            if face:
                for idx in skeleton.face:
                    q = kp[p, f, idx]
                    if finite(q):
                        canvas.paint(canvas.capsule(q, q, face_r), FACE_COLOUR, region)
        frames[f] = canvas.image
    if margin:
        masks = _dilate(masks, int(math.ceil(margin)))
    return PoseRender(frames, masks)


def _dilate(masks: np.ndarray, steps: int) -> np.ndarray:
    """Binary dilation over the last two axes with a (2 steps + 1)^2 square."""
    out = masks.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[..., 1:, :] |= out[..., :-1, :]
        grown[..., :-1, :] |= out[..., 1:, :]
        grown[..., :, 1:] |= out[..., :, :-1]
        grown[..., :, :-1] |= out[..., :, 1:]
        out = grown
    return out


# ----------------------------------------------------------------------------------------------------
# Skeleton scaling (the pose augmentation)
# ----------------------------------------------------------------------------------------------------


def scale_skeleton(track: PoseTrack, factors: Sequence[tuple[float, float]]) -> PoseTrack:
    """Scale each person about the centre of its keypoints' bounding box, per frame: q' = c + (q - c) * (sx, sy).

    factors: one (sx, sy) per person. The body grows or shrinks in place while its trajectory is kept (as
    SCAIL-Pose's whole-pose scaling). Undetected keypoints stay NaN; keypoints may leave the frame.
    """
    if len(factors) != track.persons:
        raise ValueError(f"{len(factors)} scale factors for {track.persons} persons; give one (sx, sy) per person")
    kp = np.array(track.keypoints, dtype=np.float64)  # (P, F, J, 2)
    for p, (sx, sy) in enumerate(factors):
        if not (sx > 0 and sy > 0):
            raise ValueError(f"scale factors must be positive; person {p} has ({sx}, {sy})")
        person = kp[p]  # (F, J, 2)
        with np.errstate(all="ignore"):
            lo, hi = np.nanmin(person, axis=1), np.nanmax(person, axis=1)  # (F, 2); NaN for empty frames
        centre = (lo + hi) / 2
        kp[p] = centre[:, None, :] + (person - centre[:, None, :]) * np.array([sx, sy])
    return replace(track, keypoints=kp)


def random_skeleton_scale(
    track: PoseTrack, rng: np.random.Generator, scale: tuple[float, float] = (0.8, 1.2), stretch: tuple[float, float] = (1.0, 1.0)
) -> tuple[PoseTrack, list[tuple[float, float]]]:
    """Scale each person by a factor drawn log-uniformly from ``scale``, its width/height ratio changed by a
    log-uniform draw from ``stretch``; returns the scaled track and the (sx, sy) factors used."""
    for name, (lo, hi) in (("scale", scale), ("stretch", stretch)):
        if not 0 < lo <= hi:
            raise ValueError(f"{name} range {(lo, hi)} must satisfy 0 < low <= high")
    factors = []
    for _ in range(track.persons):
        s = float(np.exp(rng.uniform(np.log(scale[0]), np.log(scale[1]))))
        r = float(np.exp(rng.uniform(np.log(stretch[0]), np.log(stretch[1]))))
        factors.append((s * math.sqrt(r), s / math.sqrt(r)))
    return scale_skeleton(track, factors), factors
