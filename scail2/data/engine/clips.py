"""What the data engine's models and the preference builder's components exchange: clips, poses, references.

- `Clip`: a video handed to a model (frames, and when known masks, hand boxes, its source record and `ClipOrigin`).
- `PoseTrack`: keypoints of every person over a clip in a `KeypointLayout` (`SYNTH_LAYOUT` for the synthetic
  figures of `scail2.data.synth`, `COCO_WHOLEBODY` for the common whole-body estimators).
- `Reference`: a reference appearance; `GeneratedVideo`: what a pose-driven generator returns.
- `PoseEstimator` and `Segmenter`: the two model interfaces both the engine and the preference builder use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from scail2.data.manifest import MotionRecord
from scail2.data.records import BoxTrack
from scail2.data.synth import JOINTS

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
class Segmenter(Protocol):
    def segment(self, video: Clip) -> np.ndarray:
        """(K, F, H, W) bool silhouette of each person, in the order of the poses the video was generated from."""
        ...
