"""The pluggable parts of the preference-pair builder (SPEC §7, paper Eq. 4-7) and the synthetic ones shipped.

The builder (`scail2.preference.builder`) needs

- a pose estimator P and a less accurate one P' (`PoseEstimator.estimate(video) -> PoseTrack`, the data
  engine's interface, `scail2.data.engine.clips`),
- a pose-driven generator G (`Generator.generate(poses, reference, seed) -> GeneratedVideo`),
- a source of reference appearances ref_a / ref_b (`ReferenceSource.sample(rng, height, width, persons)`),
- optionally a segmenter for the colour masks when G does not report them (`Segmenter.segment(video)`).

Each is a small Protocol; real ones (SDPose as P, ViTPose as P', Wan-Animate as G) are adapters a user writes
around their models (``docs/data.md`` shows the interface). Components are named in a components file and built
by the config system under its allow-list of exact names (`scail2.config.components`), so a configuration file
cannot run arbitrary code; a user's own classes are registered by their package (``scail2.config_targets``).

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
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np

from scail2.data.datasets import stable_hash
from scail2.data.engine.clips import SYNTH_LAYOUT, Clip, GeneratedVideo, PoseEstimator, PoseTrack, Reference
from scail2.data.manifest import MotionRecord
from scail2.data.synth import (
    draw_posed,
    joint_box,
    pose_joints,
    random_background,
    random_character,
    random_motion,
    scene_caption,
    target_joints,
)

# ----------------------------------------------------------------------------------------------------
# Interfaces (P and the segmenter are the data engine's: `scail2.data.engine.clips`)
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# Synthetic components
# ----------------------------------------------------------------------------------------------------


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
            ours = [b for c, j in cast if (b := joint_box(j["head"][i], max(1.2, 0.07 * c.scale * height), height, width))]
            theirs = record.faces.boxes[i]
            if len(ours) != len(theirs) or not np.allclose(np.asarray(ours), np.asarray(theirs), atol=0.011):
                raise ValueError(
                    f"{record.id}: the poses recomputed with synth seed {self.synth_seed} do not match the record's "
                    f"face boxes (frame {i}); give the --seed the dataset was generated with "
                    "(pose_estimator: {_target_: scail2.preference.components.SyntheticPoses, synth_seed: S})"
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
        rng = np.random.default_rng([self.seed, stable_hash(video.id)])
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
            c = random_character(rng, (0.45, 0.65))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))  # drawn always: a fixed stream
            c = c if c.hand_colour is not None else replace(c, hand_colour=colour)
            characters.append(c if self.hand_size is None else replace(c, hand_size=float(self.hand_size)))
        background, kind = random_background(rng, height, width)
        xs = np.linspace(0.25, 0.75, persons) if persons > 1 else np.array([0.5])
        rest = [(c, pose_joints(random_motion(rng, float(x), 1.0), c, np.zeros(1), height, width)) for c, x in zip(characters, xs)]
        image = draw_posed(background, rest).frames[0]
        words = "-".join(f"{c.colour}.{c.texture}" for c in characters)
        ref_id = f"synthetic:{words}@{kind}:{hashlib.blake2b(image.tobytes(), digest_size=4).hexdigest()}"
        caption = scene_caption(characters, "moving", kind, close=False)
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
