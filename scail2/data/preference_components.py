"""The pluggable parts of the preference-pair builder (SPEC §7, paper Eq. 4-7) and the synthetic ones shipped.

The builder (`scail2.data.preference_builder`) needs

- a pose estimator P and a less accurate one P' (`PoseEstimator.estimate(video) -> PoseTrack`),
- a pose-driven generator G (`Generator.generate(poses, reference, seed) -> GeneratedVideo`),
- a source of reference appearances ref_a / ref_b (`ReferenceSource.sample(rng, height, width, persons)`),
- optionally a segmenter for the colour masks when G does not report them (`Segmenter.segment(video)`).

Each is a small Protocol; real ones (SDPose as P, ViTPose as P', Wan-Animate as G) are adapters a user writes
around their models (``docs/data.md`` shows the interface). Components are chosen by import path, restricted
to allowed prefixes (`instantiate`), so a configuration file cannot run arbitrary code.

Shipped, so the builder runs on a ``scail2-data synth`` dataset without any model:

- `SyntheticPoses` (P): the exact joints of a synthetic video — recomputed from the synth seed for a dataset's
  target videos (checked against the record's face boxes), read from the clip for videos rendered here.
- `NoisyPoses` (P'): another estimator's poses with seeded estimation errors: joint jitter (more on hands),
  left/right hand or foot confusions and dropped hands.
- `SyntheticRenderer` (G): the synthetic dataset's own figure renderer (`scail2.data.synth.draw_posed`) drawing
  a given pose sequence with a reference's characters over its background (animation mode).
- `SyntheticReferences`: random characters (always with hands) over a random background.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np

from scail2.data.manifest import BoxTrack, MotionRecord
# The synthetic dataset's own drawing functions (private ones included): the shipped components render and
# describe figures exactly as `scail2-data synth` does.
from scail2.data.synth import (
    JOINTS,
    _background,
    _box,
    _caption,
    _pose,
    _random_character,
    _random_motion,
    draw_posed,
    target_joints,
)

# ----------------------------------------------------------------------------------------------------
# Data passed between components
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeypointLayout:
    """Names of a pose format's keypoints and the groups the builder needs.

    hands: keypoint indices of each hand (a hand box is drawn around each group's detected points).
    confusions: (left group, right group) pairs a weak estimator may swap (left/right confusions).
    faces: keypoint indices of the face (one group per face; a face box is drawn around its detected points).
    """

    name: str
    joints: tuple[str, ...]
    hands: tuple[tuple[int, ...], ...]
    confusions: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = ()
    faces: tuple[tuple[int, ...], ...] = ()


_SYNTH_INDEX = {name: i for i, name in enumerate(JOINTS)}

# The synthetic figures' joints (`scail2.data.synth.JOINTS`); each hand is one keypoint at the arm's end.
SYNTH_LAYOUT = KeypointLayout(
    name="synth11",
    joints=JOINTS,
    hands=((_SYNTH_INDEX["hand_l"],), (_SYNTH_INDEX["hand_r"],)),
    # Swapping both arms of a figure whose arms share the neck draws the same pixels; swapping the hands
    # alone crosses the forearms, a visible error of the kind pose estimators make.
    confusions=(
        ((_SYNTH_INDEX["hand_l"],), (_SYNTH_INDEX["hand_r"],)),
        ((_SYNTH_INDEX["foot_l"],), (_SYNTH_INDEX["foot_r"],)),
    ),
    faces=((_SYNTH_INDEX["head"],),),
)

_BODY17 = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
           "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
           "right_knee", "left_ankle", "right_ankle")  # fmt: skip
_FEET6 = ("left_big_toe", "left_small_toe", "left_heel", "right_big_toe", "right_small_toe", "right_heel")
_LEFT_HAND = tuple(range(91, 112))
_RIGHT_HAND = tuple(range(112, 133))

# COCO-WholeBody (133 keypoints: body 0-16, feet 17-22, face 23-90, left hand 91-111, right hand 112-132), the
# output format of the common whole-body estimators (DWPose, ViTPose-WholeBody, SDPose).
COCO_WHOLEBODY = KeypointLayout(
    name="coco_wholebody",
    joints=_BODY17 + _FEET6 + tuple(f"face_{i}" for i in range(68))
    + tuple(f"left_hand_{i}" for i in range(21)) + tuple(f"right_hand_{i}" for i in range(21)),
    hands=(_LEFT_HAND, _RIGHT_HAND),
    confusions=(((9, *_LEFT_HAND), (10, *_RIGHT_HAND)), ((15, 17, 18, 19), (16, 20, 21, 22))),
    faces=((0, 1, 2, 3, 4, *range(23, 91)),),  # nose, eyes, ears and the 68 face landmarks
)  # fmt: skip


@dataclass(frozen=True)
class PoseTrack:
    """Poses of every person over a clip.

    keypoints: (P, F, J, 2) float pixel coordinates (x, y) of J = len(layout.joints) keypoints; NaN marks a
    keypoint that was not detected. height / width: the frame size the coordinates refer to; fps: frame rate.
    """

    keypoints: np.ndarray
    layout: KeypointLayout
    height: int
    width: int
    fps: float

    def __post_init__(self) -> None:
        k = self.keypoints
        if k.ndim != 4 or k.shape[-1] != 2 or k.shape[2] != len(self.layout.joints):
            raise ValueError(
                f"keypoints have shape {tuple(k.shape)}; need (persons, frames, {len(self.layout.joints)}, 2) "
                f"for the {self.layout.name} layout"
            )

    @property
    def persons(self) -> int:
        return self.keypoints.shape[0]

    @property
    def frames(self) -> int:
        return self.keypoints.shape[1]

    def hand_boxes(self, pad: float = 0.25, min_size: float = 8.0) -> BoxTrack:
        """Per frame one (x0, y0, x1, y1) box per detected hand: the bounding box of the hand's detected
        keypoints, grown by ``pad`` of its longer side on each side, at least ``min_size`` pixels wide and high,
        clipped to the frame. Hands with no detected keypoint get no box."""
        return self.group_boxes(self.layout.hands, pad, min_size)

    def face_boxes(self, pad: float = 0.25, min_size: float = 8.0) -> BoxTrack:
        """Per frame one box per detected face (the layout's ``faces`` groups), built like `hand_boxes`."""
        return self.group_boxes(self.layout.faces, pad, min_size)

    def group_boxes(self, groups: Sequence[Sequence[int]], pad: float = 0.25, min_size: float = 8.0) -> BoxTrack:
        """Per frame one box per person and keypoint group with at least one detected keypoint (see `hand_boxes`)."""
        out: BoxTrack = [[] for _ in range(self.frames)]
        for person in self.keypoints:  # (F, J, 2)
            for group in groups:
                points = person[:, list(group)]  # (F, G, 2)
                for f in range(self.frames):
                    pts = points[f][np.isfinite(points[f]).all(axis=-1)]
                    if not len(pts):
                        continue
                    (x0, y0), (x1, y1) = pts.min(axis=0), pts.max(axis=0)
                    half = max(max(x1 - x0, y1 - y0) * (0.5 + pad), min_size / 2)
                    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                    box = (max(0.0, cx - half), max(0.0, cy - half),
                           min(float(self.width), cx + half), min(float(self.height), cy + half))  # fmt: skip
                    if box[2] - box[0] >= 1 and box[3] - box[1] >= 1:
                        out[f].append(tuple(round(float(v), 2) for v in box))
        return out


@dataclass(frozen=True)
class ClipOrigin:
    """Where a clip's frames come from: the source video, its frame size (height, width) and frame rate, the source
    frame of each clip frame, and the integer window of the source frame (top, left, height, width in source
    pixels; it may reach outside the frame) resized to the clip's (height, width). Lets a component relate the clip
    to its source (the synthetic stand-ins recompute their ground truth from it)."""

    path: str
    source_size: tuple[int, int]
    fps: float
    frame_indices: tuple[int, ...]
    window: tuple[int, int, int, int]
    size: tuple[int, int]

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "source_size": list(self.source_size), "fps": self.fps,
                "frame_indices": list(self.frame_indices), "window": list(self.window), "size": list(self.size)}  # fmt: skip

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "ClipOrigin":
        return cls(str(raw["path"]), tuple(int(v) for v in raw["source_size"]), float(raw["fps"]),
                   tuple(int(i) for i in raw["frame_indices"]), tuple(int(v) for v in raw["window"]),
                   tuple(int(v) for v in raw["size"]))  # fmt: skip


@dataclass
class Clip:
    """A video handed to an estimator or segmenter.

    id: unique within a build ("<pair id>/driving", ...; the source record's id for a source video), so a
    seeded component can derive its randomness from it. frames: (F, H, W, 3) uint8 RGB.
    masks: (K, F, H, W) bool visible silhouette of each person, when known. hand_boxes: per frame boxes, when
    known. generated_from: the pose sequence a generated clip was rendered from. record: the manifest record a
    source clip was read from (None for generated clips). origin: where a clip cut from a video comes from.
    """

    id: str
    frames: np.ndarray
    fps: float
    masks: np.ndarray | None = None
    hand_boxes: BoxTrack | None = None
    generated_from: PoseTrack | None = None
    record: MotionRecord | None = None
    origin: ClipOrigin | None = None


@dataclass(frozen=True)
class Reference:
    """A reference appearance (ref_a / ref_b of Eq. 4-6).

    image: (H, W, 3) uint8, what an image-conditioned generator reads. caption: a description of the character(s)
    and scene, used as the pair's caption when given. appearance: an optional generator-specific description
    (the synthetic renderer reads `SyntheticAppearance` from it; real generators ignore it).
    """

    id: str
    image: np.ndarray
    caption: str = ""
    appearance: Any = None


@dataclass
class GeneratedVideo:
    """What a generator returns: frames (F, H, W, 3) uint8, and when it knows them, the persons' silhouettes
    (K, F, H, W) bool and per-frame hand boxes (otherwise the segmenter and P provide them)."""

    frames: np.ndarray
    masks: np.ndarray | None = None
    hand_boxes: BoxTrack | None = None


# ----------------------------------------------------------------------------------------------------
# Interfaces
# ----------------------------------------------------------------------------------------------------


@runtime_checkable
class PoseEstimator(Protocol):
    def estimate(self, video: Clip) -> PoseTrack:
        """Poses of every person in every frame of ``video`` (same frame count and pixel frame)."""
        ...


@runtime_checkable
class Generator(Protocol):
    mode: str  # "animation" (reference scene) or "replacement" (the driving scene, character swapped)

    def generate(self, poses: PoseTrack, reference: Reference, seed: int) -> GeneratedVideo:
        """A video of the reference's character(s) performing ``poses`` (F = poses.frames frames).
        ``seed`` fixes the generator's randomness: x_w and x_l are generated with the same one."""
        ...


@runtime_checkable
class ReferenceSource(Protocol):
    def sample(self, rng: np.random.Generator, height: int, width: int, persons: int) -> Reference:
        """A reference appearance with ``persons`` characters (draw only from ``rng``: builds are seeded)."""
        ...


@runtime_checkable
class Segmenter(Protocol):
    def segment(self, video: Clip) -> np.ndarray:
        """(K, F, H, W) bool silhouette of each person, in the order of the poses the video was generated from."""
        ...


# ----------------------------------------------------------------------------------------------------
# Synthetic components
# ----------------------------------------------------------------------------------------------------


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


class SyntheticPoses:
    """P for synthetic data: exact joints, no model.

    For a video rendered by `SyntheticRenderer` the joints are the poses it was drawn from
    (``video.generated_from``). For a target video of a ``scail2-data synth`` dataset they are recomputed from
    the dataset's seed (``synth_seed``, the ``--seed`` given to ``scail2-data synth``) and the record's index, and
    checked against the record's face boxes, so a wrong seed is an error rather than wrong poses.
    """

    def __init__(self, synth_seed: int = 0):
        self.synth_seed = int(synth_seed)
        self.layout = SYNTH_LAYOUT

    def estimate(self, video: Clip) -> PoseTrack:
        if video.generated_from is not None:
            return video.generated_from
        record = video.record
        if record is None or not record.meta.get("synthetic"):
            raise ValueError(
                f"{video.id}: SyntheticPoses knows only target videos of `scail2-data synth` datasets and videos "
                "rendered by SyntheticRenderer; use a real pose estimator for other data"
            )
        try:
            index = int(record.id.rsplit("_", 1)[-1])
        except ValueError:
            raise ValueError(f"{record.id}: not a `scail2-data synth` record id (<source>_<index>)") from None
        f, h, w = video.frames.shape[:3]
        cast = target_joints(self.synth_seed, index, f, video.fps, h, w)
        keypoints = np.stack([np.stack([j[name] for name in self.layout.joints], axis=1) for _, j in cast])  # (P, F, J, 2)
        if record.faces is not None and record.faces.boxes is not None:
            self._check_faces(record, cast, f, h, w)
        return PoseTrack(keypoints, self.layout, h, w, video.fps)

    def _check_faces(self, record: MotionRecord, cast, frames: int, height: int, width: int) -> None:
        for i in range(min(frames, len(record.faces.boxes))):
            # Face boxes as `scail2.data.synth` draws them: a box of the head radius around the head joint.
            ours = [b for c, j in cast if (b := _box(j["head"][i], max(1.2, 0.07 * c.scale * height), height, width))]
            theirs = record.faces.boxes[i]
            if len(ours) != len(theirs) or not np.allclose(np.asarray(ours), np.asarray(theirs), atol=0.011):
                raise ValueError(
                    f"{record.id}: the poses recomputed with synth seed {self.synth_seed} do not match the record's "
                    f"face boxes (frame {i}); give the --seed the dataset was generated with "
                    "(pose_estimator: {_target_: scail2.data.preference_components.SyntheticPoses, synth_seed: S})"
                )


class NoisyPoses:
    """P': ``base``'s poses with seeded estimation errors, per person and frame.

    jitter: std of the Gaussian offset of every keypoint, as a fraction of the frame height; hand_jitter: extra
    std on hand keypoints (estimators are least accurate on hands); confusion_p: probability that a left/right
    group of the layout (hands, feet) is swapped; hand_drop_p: probability that a hand is not detected (NaN).
    The noise is a function of ``seed`` and the clip's id, so a build is reproducible and resumable.
    """

    def __init__(
        self,
        base: PoseEstimator | None = None,
        seed: int = 0,
        jitter: float = 0.01,
        hand_jitter: float = 0.03,
        confusion_p: float = 0.1,
        hand_drop_p: float = 0.1,
    ):
        for name, p in (("confusion_p", confusion_p), ("hand_drop_p", hand_drop_p)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"NoisyPoses.{name} = {p}; need a probability in [0, 1]")
        if jitter < 0 or hand_jitter < 0:
            raise ValueError(f"NoisyPoses jitter {jitter} / hand_jitter {hand_jitter} must be >= 0")
        self.base = base if base is not None else SyntheticPoses()
        self.seed = int(seed)
        self.jitter, self.hand_jitter = float(jitter), float(hand_jitter)
        self.confusion_p, self.hand_drop_p = float(confusion_p), float(hand_drop_p)

    def estimate(self, video: Clip) -> PoseTrack:
        track = self.base.estimate(video)
        layout = track.layout
        rng = np.random.default_rng([self.seed, _stable_hash(video.id)])
        kp = np.array(track.keypoints, dtype=np.float64)  # (P, F, J, 2), a copy
        p, f = kp.shape[:2]
        # Every draw is made whatever the probabilities, so changing one knob leaves the others' draws alone.
        kp += rng.normal(0.0, 1.0, kp.shape) * (self.jitter * track.height)
        hand_joints = sorted({i for group in layout.hands for i in group})
        hand_noise = rng.normal(0.0, 1.0, (p, f, len(hand_joints), 2)) * (self.hand_jitter * track.height)
        kp[:, :, hand_joints] += hand_noise
        swaps = rng.random((p, f, len(layout.confusions))) < self.confusion_p
        for pi, fi, ci in zip(*np.nonzero(swaps)):
            left, right = (list(g) for g in layout.confusions[ci])
            kp[pi, fi, left], kp[pi, fi, right] = kp[pi, fi, right].copy(), kp[pi, fi, left].copy()
        drops = rng.random((p, f, len(layout.hands))) < self.hand_drop_p
        for pi, fi, hi in zip(*np.nonzero(drops)):
            kp[pi, fi, list(layout.hands[hi])] = np.nan
        return replace(track, keypoints=kp)


@dataclass(frozen=True)
class SyntheticAppearance:
    """The synthetic renderer's reading of a reference: characters (`scail2.data.synth.Character`) and an
    (H, W, 3) float32 background in [0, 255]."""

    characters: tuple[Any, ...]
    background: np.ndarray
    background_kind: str


class SyntheticReferences:
    """Random synthetic characters (each with hands: the DPO loss looks at hands) over a random background;
    the reference image shows them standing over it.

    hand_size: hand blob radius as a multiple of the limb radius (None: the motion data's 1.3). Larger hands make
    hand errors visible at small resolutions (a 64x64 frame has an 8x8 latent grid, where default hands cover
    about half a latent pixel).
    """

    def __init__(self, hand_size: float | None = None):
        if hand_size is not None and hand_size <= 0:
            raise ValueError(f"SyntheticReferences.hand_size is {hand_size}; need a positive multiple of the limb radius")
        self.hand_size = hand_size

    def sample(self, rng: np.random.Generator, height: int, width: int, persons: int) -> Reference:

        characters = []
        for _ in range(persons):
            c = _random_character(rng, (0.45, 0.65))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))  # drawn always: a fixed stream
            c = c if c.hand_colour is not None else replace(c, hand_colour=colour)
            characters.append(c if self.hand_size is None else replace(c, hand_size=float(self.hand_size)))
        background, kind = _background(rng, height, width)
        xs = np.linspace(0.25, 0.75, persons) if persons > 1 else np.array([0.5])
        rest = [(c, _pose(_random_motion(rng, float(x), 1.0), c, np.zeros(1), height, width)) for c, x in zip(characters, xs)]
        image = draw_posed(background, rest).frames[0]
        words = "-".join(f"{c.colour}.{c.texture}" for c in characters)
        ref_id = f"synthetic:{words}@{kind}:{hashlib.blake2b(image.tobytes(), digest_size=4).hexdigest()}"
        caption = _caption(characters, "moving", kind, close=False)
        return Reference(ref_id, image, caption, SyntheticAppearance(tuple(characters), background, kind))


class SyntheticRenderer:
    """G for synthetic data: draws the poses (synth11 layout) with the reference's characters over its
    background, with `scail2.data.synth.draw_posed`. Deterministic (``seed`` is not needed); reports the
    silhouettes and the hand boxes of what it drew. Undetected keypoints (NaN) are left out of the drawing."""

    mode = "animation"

    def generate(self, poses: PoseTrack, reference: Reference, seed: int) -> GeneratedVideo:
        if poses.layout != SYNTH_LAYOUT:
            raise ValueError(f"SyntheticRenderer draws {SYNTH_LAYOUT.name} poses; got the {poses.layout.name} layout")
        appearance = reference.appearance
        if not isinstance(appearance, SyntheticAppearance):
            raise ValueError(
                f"reference {reference.id} has no SyntheticAppearance; use SyntheticReferences with SyntheticRenderer"
            )
        if len(appearance.characters) < poses.persons:
            raise ValueError(f"reference {reference.id} has {len(appearance.characters)} characters for {poses.persons} persons")
        if appearance.background.shape[:2] != (poses.height, poses.width):
            h, w = appearance.background.shape[:2]
            raise ValueError(f"reference {reference.id} is {h}x{w} but the poses are in a {poses.height}x{poses.width} frame")
        cast = [
            (appearance.characters[p], {name: poses.keypoints[p, :, i] for i, name in enumerate(poses.layout.joints)})
            for p in range(poses.persons)
        ]
        drawn = draw_posed(appearance.background, cast)
        return GeneratedVideo(drawn.frames, drawn.masks, drawn.hands)


# ----------------------------------------------------------------------------------------------------
# Choosing components by import path
# ----------------------------------------------------------------------------------------------------

# scail2's component classes; a user's own package is admitted with --allow PREFIX.
DEFAULT_ALLOWED_PREFIXES: tuple[str, ...] = (
    "scail2.data.preference_components.",
    "scail2.data.preference_builder.",
    "scail2.data.engine.",
)


def instantiate(
    spec: str | Mapping[str, Any], allowed_prefixes: Sequence[str] = DEFAULT_ALLOWED_PREFIXES, what: str = "component"
) -> Any:
    """Build a component from ``"package.module.Class"`` or ``{"_target_": "package.module.Class", **kwargs}``.

    Only targets under ``allowed_prefixes`` are imported (a config file names code; it must not name any
    code), and a target must be a class defined in the module it is named from: not a function (such as this
    one, or a command's ``main``) and not a name that module imported from elsewhere. Keyword values that are
    themselves ``{"_target_": ...}`` mappings are built first, under the same rule.
    """
    if isinstance(spec, str):
        target, kwargs = spec, {}
    elif isinstance(spec, Mapping):
        if "_target_" not in spec:
            raise ValueError(f"{what}: {dict(spec)!r} has no _target_; give {{_target_: package.module.Class, ...}}")
        target = spec["_target_"]
        kwargs = {k: v for k, v in spec.items() if k != "_target_"}
    else:
        raise ValueError(f"{what}: expected an import path or a mapping with _target_, got {type(spec).__name__}")
    if not isinstance(target, str) or "." not in target:
        raise ValueError(
            f"{what}: _target_ {target!r} is not a dotted import path like scail2.data.preference_components.NoisyPoses"
        )
    if not any(target.startswith(prefix) for prefix in allowed_prefixes):
        raise ValueError(
            f"{what}: {target!r} is outside the allowed import prefixes {list(allowed_prefixes)}; "
            f"allow its package explicitly (e.g. --allow {target.split('.')[0]}.)"
        )
    module_name, _, attr = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{what}: cannot import {target!r}: {exc}") from None
    if not inspect.isclass(obj) or obj.__module__ != module_name:
        where = f"defined in {obj.__module__}" if inspect.isclass(obj) else f"a {type(obj).__name__}, not a class"
        raise ValueError(
            f"{what}: {target!r} is {where}; a component must be a class named by the module that defines it"
        )
    built = {
        k: instantiate(v, allowed_prefixes, f"{what}.{k}") if isinstance(v, Mapping) and "_target_" in v else v
        for k, v in kwargs.items()
    }
    try:
        return obj(**built)
    except TypeError as exc:
        raise ValueError(f"{what}: {target}({', '.join(built)}) failed: {exc}") from None


def describe(spec: str | Mapping[str, Any]) -> str:
    """A short, stable text for a component spec (what the pair records as provenance)."""
    if isinstance(spec, str):
        return spec
    args = ", ".join(f"{k}={describe(v) if isinstance(v, Mapping) else v!r}" for k, v in sorted(spec.items()) if k != "_target_")
    return f"{spec['_target_']}({args})"
