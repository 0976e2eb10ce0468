"""The interfaces through which models plug into the data engine, and loading them from a configuration file.

Every model is a small object with one method (a `typing.Protocol`); the engine never imports a model library.
Shipped implementations: VLM components over an OpenAI-compatible endpoint (`scail2.data.engine.vlm`), adapters
for user commands, HTTP endpoints and our own pipeline (`scail2.data.engine.adapters`), and deterministic
stand-ins for the synthetic videos (`scail2.data.engine.standins`).

``scail2-data prepare`` needs a segmenter, a keypoint estimator and optionally a captioner and an OCR hook;
``scail2-data motionpair`` needs the reference loop (selector, weaver, checker, image generator, character pool),
animation and/or replacement generators, and optionally a filter, a segmenter (for generators that do not report
their characters' masks) and a captioner (for forward pairs). A component raises `ComponentError` (or anything
else) when it cannot deliver; the engine records the reason and moves on.

The components of a run come from a components file (a preset under ``conf/components/<command>/``, a YAML/JSON
file or a mapping), read and built by the config system (`scail2.config.components`): only targets on its one
allow-list are built, a user's own classes once their package registers them (``scail2.config_targets``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from scail2.config.components import build_component, describe_component, read_components
from scail2.data.engine.clips import Clip, GeneratedVideo, PoseEstimator, PoseTrack, Segmenter
from scail2.data.records import BoxTrack

__all__ = [
    "AnimationRequest", "Animator", "Captioner", "CandidateSelector", "CharacterPool", "ComponentError",
    "FilterRequest", "GeneratedVideo", "ImageGenerator", "OCRDetector", "PoolImage", "PoseEstimator",
    "PromptWeaver", "QualityChecker", "ReplacementRequest", "Replacer", "Segmenter", "Verdict", "VideoFilter",
]  # fmt: skip


class ComponentError(RuntimeError):
    """A component that cannot deliver; ``reason`` is a short name counted in the engine's report."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


# --------------------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------------------


@runtime_checkable
class Captioner(Protocol):
    def caption(self, clip: Clip) -> str:
        """A non-empty description of the clip (the training prompt)."""
        ...


@runtime_checkable
class OCRDetector(Protocol):
    def detect(self, clip: Clip) -> BoxTrack:
        """Per clip frame the (x0, y0, x1, y1) pixel boxes of visible text (the loss ignores them)."""
        ...


# Segmenter.segment(clip) -> (K, F, H, W) bool and PoseEstimator.estimate(clip) -> PoseTrack are in
# `scail2.data.engine.clips` (shared with the preference builder, `scail2.preference`).


# --------------------------------------------------------------------------------------------------------
# motionpair: the reference-image loop
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolImage:
    id: str
    image: np.ndarray  # (H, W, 3) uint8


@dataclass(frozen=True)
class Verdict:
    ok: bool
    feedback: str = ""


@runtime_checkable
class CharacterPool(Protocol):
    def sample(self, rng: np.random.Generator, count: int) -> list[PoolImage]:
        """``count`` character images (draw only from ``rng``: the loop is seeded)."""
        ...


@runtime_checkable
class CandidateSelector(Protocol):
    def select(self, posture: np.ndarray, candidates: Sequence[np.ndarray]) -> int:
        """Index of the candidate character image that best fits the posture reference (a video's first frame)."""
        ...


@runtime_checkable
class PromptWeaver(Protocol):
    def weave(self, character: np.ndarray, posture: np.ndarray, feedback: str | None = None,
              previous: str | None = None) -> str:  # fmt: skip
        """The image generator's prompt: the character of ``character`` in the posture and framing of ``posture``,
        planned (character, background, posture). With ``feedback`` (the checker's) and the ``previous`` prompt:
        an edit instruction fixing what the checker found."""
        ...


@runtime_checkable
class ImageGenerator(Protocol):
    def generate(self, prompt: str, images: Sequence[np.ndarray], seed: int) -> np.ndarray:
        """(H, W, 3) uint8 from a prompt and reference images (character, posture; the previous result when editing)."""
        ...


@runtime_checkable
class QualityChecker(Protocol):
    def check(self, image: np.ndarray, character: np.ndarray, posture: np.ndarray, prompt: str) -> Verdict:
        """Whether ``image`` is a usable reference (identity of ``character``, posture of ``posture``, plausible)."""
        ...


# --------------------------------------------------------------------------------------------------------
# motionpair: generators and the filter
# --------------------------------------------------------------------------------------------------------


@dataclass
class AnimationRequest:
    """What a pose-driven animation generator gets.

    reference: (H', W', 3) uint8 character image. poses: the real clip's poses (clip pixels). pose_video:
    (F, H, W, 3) uint8 skeleton render of the poses (`scail2.data.engine.pose.render_poses`); pose_mask: its
    colour-coded mask video (binding colours, animation mode). height / width / frames / fps: the clip's, which
    the result must have. prompt: the clip's caption (may be ""). seed: fixes the generator's randomness.
    """

    reference: np.ndarray
    poses: PoseTrack
    pose_video: np.ndarray
    pose_mask: np.ndarray | None
    height: int
    width: int
    frames: int
    fps: float
    prompt: str
    seed: int


@dataclass
class ReplacementRequest:
    """What a replacement generator gets: replace the character inside ``mask`` of ``video`` by ``reference``.

    video: (F, H, W, 3) uint8 (the real clip, or the previous replacement's result for multi-character clips);
    mask: (F, H, W) bool silhouette of the character to replace; reference: (H', W', 3) uint8 new character;
    character: its index among the clip's characters; prompt, seed, fps as for animation.
    """

    video: np.ndarray
    mask: np.ndarray
    reference: np.ndarray
    character: int
    fps: float
    prompt: str
    seed: int


@runtime_checkable
class Animator(Protocol):
    def animate(self, request: AnimationRequest) -> GeneratedVideo:
        """(F, H, W, 3) uint8 of the reference character performing the poses; masks (K, F, H, W) when known."""
        ...


@runtime_checkable
class Replacer(Protocol):
    def replace(self, request: ReplacementRequest) -> GeneratedVideo:
        """The video with the masked character replaced; masks (1, F, H, W) of the new character when known."""
        ...


@dataclass
class FilterRequest:
    """A synthetic video to judge: frames (F, H, W, 3) uint8, its reference image(s), the mode and generator."""

    frames: np.ndarray
    fps: float
    references: list[np.ndarray]
    mode: str
    generator: str


@runtime_checkable
class VideoFilter(Protocol):
    def judge(self, request: FilterRequest) -> Verdict:
        """Keep (ok) or discard the synthetic video."""
        ...


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------


def check_keys(spec: Mapping[str, Any], required: Sequence[str], optional: Sequence[str], what: str) -> None:
    unknown = sorted(set(spec) - set(required) - set(optional))
    if unknown:
        raise ValueError(f"{what}: unknown key {unknown[0]!r}; known keys are {list(required) + list(optional)}")
    missing = [k for k in required if k not in spec]
    if missing:
        raise ValueError(f"{what}: {missing[0]} is missing; give an import path or {{_target_: ..., ...}} (or null)")


@dataclass
class PrepareComponents:
    segmenter: Segmenter
    keypoints: PoseEstimator
    captioner: Captioner | None = None
    ocr: OCRDetector | None = None
    specs: dict[str, str] = field(default_factory=dict)


_PREPARE_REQUIRED = ("segmenter", "keypoints", "captioner")
_PREPARE_OPTIONAL = ("ocr",)


def load_prepare_components(config: str | Path | Mapping[str, Any]) -> PrepareComponents:
    """Keys: ``segmenter``, ``keypoints``, ``captioner`` (required; ``captioner: null`` writes records without
    captions, said in the report), ``ocr`` (optional). Values: a target name or ``{_target_: name, **kwargs}``;
    ``config``: a preset of ``conf/components/prepare/``, a YAML/JSON file or a mapping."""
    spec = read_components(config, "prepare")
    check_keys(spec, _PREPARE_REQUIRED, _PREPARE_OPTIONAL, "prepare components")
    for key in ("segmenter", "keypoints"):
        if spec[key] is None:
            raise ValueError(f"prepare components: {key} is required (an import path or {{_target_: ...}})")
    built = PrepareComponents(
        segmenter=build_component(spec["segmenter"], "segmenter", Segmenter),
        keypoints=build_component(spec["keypoints"], "keypoints", PoseEstimator),
        captioner=build_component(spec["captioner"], "captioner", Captioner) if spec["captioner"] is not None else None,
        ocr=build_component(spec["ocr"], "ocr", OCRDetector) if spec.get("ocr") is not None else None,
    )
    built.specs = {k: (describe_component(v) if v is not None else "none") for k, v in spec.items()}
    return built


@dataclass
class AnimatorEntry:
    """A pose-driven animation generator and the source name its pairs get (e.g. ``scail_animation``)."""

    name: str
    source: str
    weight: float
    animator: Animator


@dataclass
class ReplacerEntry:
    """A replacement generator with the source names of its single- and multi-character pairs."""

    name: str
    weight: float
    replacer: Replacer
    source_single: str = "mocha_replacement_single"
    source_multi: str = "mocha_replacement_multi"


@dataclass
class MotionPairComponents:
    pool: CharacterPool
    selector: CandidateSelector
    weaver: PromptWeaver
    checker: QualityChecker
    image_generator: ImageGenerator
    animators: list[AnimatorEntry]
    replacers: list[ReplacerEntry]
    filter: VideoFilter | None = None
    segmenter: Segmenter | None = None
    captioner: Captioner | None = None
    specs: dict[str, Any] = field(default_factory=dict)


_MP_REQUIRED = ("pool", "selector", "weaver", "checker", "image_generator", "filter")
_MP_OPTIONAL = ("animators", "replacers", "segmenter", "captioner")


def _weight(entry: Mapping[str, Any], what: str) -> float:
    w = entry.get("weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
        raise ValueError(f"{what}: weight {w!r} must be a positive number")
    return float(w)


def load_motionpair_components(config: str | Path | Mapping[str, Any]) -> MotionPairComponents:
    """Keys: ``pool``, ``selector``, ``weaver``, ``checker``, ``image_generator``, ``filter`` (required;
    ``filter: null`` keeps every video, said in the report), ``animators`` (a list of ``{name, source, weight,
    animator}``), ``replacers`` (a list of ``{name, weight, replacer, source_single, source_multi}``), optional
    ``segmenter`` and ``captioner``. At least one animator or replacer is needed. ``config``: a preset of
    ``conf/components/motionpair/``, a YAML/JSON file or a mapping."""
    spec = read_components(config, "motionpair")
    check_keys(spec, _MP_REQUIRED, _MP_OPTIONAL, "motionpair components")
    for key in ("pool", "selector", "weaver", "checker", "image_generator"):
        if spec[key] is None:
            raise ValueError(f"motionpair components: {key} is required (an import path or {{_target_: ...}})")
    animators, replacers, names = [], [], set()
    for i, entry in enumerate(spec.get("animators") or []):
        what = f"animators[{i}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{what}: expected {{name, source, weight, animator}}, got {type(entry).__name__}")
        check_keys(entry, ("name", "source", "animator"), ("weight",), what)
        animators.append(AnimatorEntry(str(entry["name"]), str(entry["source"]), _weight(entry, what),
                                       build_component(entry["animator"], f"{what}.animator", Animator)))  # fmt: skip
    for i, entry in enumerate(spec.get("replacers") or []):
        what = f"replacers[{i}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{what}: expected {{name, weight, replacer, ...}}, got {type(entry).__name__}")
        check_keys(entry, ("name", "replacer"), ("weight", "source_single", "source_multi"), what)
        extra = {k: str(entry[k]) for k in ("source_single", "source_multi") if k in entry}
        replacers.append(ReplacerEntry(str(entry["name"]), _weight(entry, what),
                                       build_component(entry["replacer"], f"{what}.replacer", Replacer), **extra))  # fmt: skip
    for entry in [*animators, *replacers]:
        if entry.name in names:
            raise ValueError(f"motionpair components: generator name {entry.name!r} is used twice")
        names.add(entry.name)
    if not animators and not replacers:
        raise ValueError("motionpair components: give at least one entry under animators or replacers")
    optional = {k: spec.get(k) for k in ("segmenter", "captioner", "filter")}
    protocols = {"segmenter": Segmenter, "captioner": Captioner, "filter": VideoFilter}
    built = MotionPairComponents(
        pool=build_component(spec["pool"], "pool", CharacterPool),
        selector=build_component(spec["selector"], "selector", CandidateSelector),
        weaver=build_component(spec["weaver"], "weaver", PromptWeaver),
        checker=build_component(spec["checker"], "checker", QualityChecker),
        image_generator=build_component(spec["image_generator"], "image_generator", ImageGenerator),
        animators=animators,
        replacers=replacers,
        **{k: build_component(v, k, protocols[k]) for k, v in optional.items() if v is not None},
    )
    built.specs = _describe_tree(spec)
    return built


def _describe_tree(value: Any) -> Any:
    """Provenance text of a spec: import targets described, lists and plain mappings kept."""
    if isinstance(value, Mapping):
        if "_target_" in value:
            return describe_component(value)
        return {k: _describe_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_describe_tree(v) for v in value]
    return value if value is None or isinstance(value, (int, float, bool)) else str(value)
