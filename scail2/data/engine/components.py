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
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from scail2.data.engine.clips import Clip, GeneratedVideo, PoseEstimator, PoseTrack, Segmenter
from scail2.data.records import BoxTrack

__all__ = [
    "DEFAULT_ALLOWED_PREFIXES", "AnimationRequest", "Animator", "Captioner", "CandidateSelector", "CharacterPool",
    "ComponentError", "describe", "instantiate",
    "FilterRequest", "GeneratedVideo", "ImageGenerator", "OCRDetector", "PoolImage", "PoseEstimator",
    "PromptWeaver", "QualityChecker", "ReplacementRequest", "Replacer", "Segmenter", "Verdict", "VideoFilter",
]  # fmt: skip


class ComponentError(RuntimeError):
    """A component that cannot deliver; ``reason`` is a short name counted in the engine's report."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


# ----------------------------------------------------------------------------------------------------
# Choosing components by import path
# ----------------------------------------------------------------------------------------------------

# scail2's component classes; a user's own package is admitted with --allow PREFIX.
DEFAULT_ALLOWED_PREFIXES: tuple[str, ...] = (
    "scail2.data.engine.",
    "scail2.preference.components.",
    "scail2.preference.builder.",
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
            f"{what}: _target_ {target!r} is not a dotted import path like scail2.preference.components.NoisyPoses"
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


def read_spec(config: str | Path | Mapping[str, Any], presets: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A components mapping from a preset name, a ``.yaml``/``.yml``/``.json`` file or a mapping."""
    if isinstance(config, Mapping):
        return dict(config)
    text = str(config)
    if Path(text).suffix in (".yaml", ".yml", ".json"):
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"components file {path} not found")
        if path.suffix == ".json":
            spec = json.loads(path.read_text())
        else:
            import yaml

            spec = yaml.safe_load(path.read_text())
        if not isinstance(spec, dict):
            raise ValueError(f"components file {path} must hold a mapping of component name -> spec")
        return spec
    if text not in presets:
        raise ValueError(f"unknown components preset {text!r}; use one of {sorted(presets)} or a YAML/JSON file")
    return dict(presets[text])


def build(spec: Any, protocol: type | None, what: str, allowed: Sequence[str]) -> Any:
    obj = instantiate(spec, allowed, what=what)
    if protocol is not None and not isinstance(obj, protocol):
        raise ValueError(f"components: {what} {describe(spec)} does not implement {protocol.__name__}")
    return obj


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


def prepare_presets() -> dict[str, dict[str, Any]]:
    here = "scail2.data.engine.standins"
    return {
        # For videos cut from a `scail2-data synth` dataset (seed 0): exact masks and keypoints, a caption from the
        # drawn scene. Tests and demos only.
        "synthetic": {
            "segmenter": {"_target_": f"{here}.SyntheticSegmenter", "synth_seed": 0},
            "keypoints": {"_target_": f"{here}.SyntheticKeypoints", "synth_seed": 0},
            "captioner": f"{here}.SyntheticCaptioner",
        }
    }


def load_prepare_components(
    config: str | Path | Mapping[str, Any], allowed: Sequence[str] = DEFAULT_ALLOWED_PREFIXES
) -> PrepareComponents:
    """Keys: ``segmenter``, ``keypoints``, ``captioner`` (required; ``captioner: null`` writes records without
    captions, said in the report), ``ocr`` (optional). Values: an import path or ``{_target_: path, **kwargs}``."""
    spec = read_spec(config, prepare_presets())
    check_keys(spec, _PREPARE_REQUIRED, _PREPARE_OPTIONAL, "prepare components")
    for key in ("segmenter", "keypoints"):
        if spec[key] is None:
            raise ValueError(f"prepare components: {key} is required (an import path or {{_target_: ...}})")
    built = PrepareComponents(
        segmenter=build(spec["segmenter"], Segmenter, "segmenter", allowed),
        keypoints=build(spec["keypoints"], PoseEstimator, "keypoints", allowed),
        captioner=build(spec["captioner"], Captioner, "captioner", allowed) if spec["captioner"] is not None else None,
        ocr=build(spec["ocr"], OCRDetector, "ocr", allowed) if spec.get("ocr") is not None else None,
    )
    built.specs = {k: (describe(v) if v is not None else "none") for k, v in spec.items()}
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


def load_motionpair_components(
    config: str | Path | Mapping[str, Any], allowed: Sequence[str] = DEFAULT_ALLOWED_PREFIXES
) -> MotionPairComponents:
    """Keys: ``pool``, ``selector``, ``weaver``, ``checker``, ``image_generator``, ``filter`` (required;
    ``filter: null`` keeps every video, said in the report), ``animators`` (a list of ``{name, source, weight,
    animator}``), ``replacers`` (a list of ``{name, weight, replacer, source_single, source_multi}``), optional
    ``segmenter`` and ``captioner``. At least one animator or replacer is needed."""
    spec = read_spec(config, {})
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
                                       build(entry["animator"], Animator, f"{what}.animator", allowed)))  # fmt: skip
    for i, entry in enumerate(spec.get("replacers") or []):
        what = f"replacers[{i}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{what}: expected {{name, weight, replacer, ...}}, got {type(entry).__name__}")
        check_keys(entry, ("name", "replacer"), ("weight", "source_single", "source_multi"), what)
        extra = {k: str(entry[k]) for k in ("source_single", "source_multi") if k in entry}
        replacers.append(ReplacerEntry(str(entry["name"]), _weight(entry, what),
                                       build(entry["replacer"], Replacer, f"{what}.replacer", allowed), **extra))  # fmt: skip
    for entry in [*animators, *replacers]:
        if entry.name in names:
            raise ValueError(f"motionpair components: generator name {entry.name!r} is used twice")
        names.add(entry.name)
    if not animators and not replacers:
        raise ValueError("motionpair components: give at least one entry under animators or replacers")
    optional = {k: spec.get(k) for k in ("segmenter", "captioner", "filter")}
    protocols = {"segmenter": Segmenter, "captioner": Captioner, "filter": VideoFilter}
    built = MotionPairComponents(
        pool=build(spec["pool"], CharacterPool, "pool", allowed),
        selector=build(spec["selector"], CandidateSelector, "selector", allowed),
        weaver=build(spec["weaver"], PromptWeaver, "weaver", allowed),
        checker=build(spec["checker"], QualityChecker, "checker", allowed),
        image_generator=build(spec["image_generator"], ImageGenerator, "image_generator", allowed),
        animators=animators,
        replacers=replacers,
        **{k: build(v, protocols[k], k, allowed) for k, v in optional.items() if v is not None},
    )
    built.specs = _describe_tree(spec)
    return built


def _describe_tree(value: Any) -> Any:
    """Provenance text of a spec: import targets described, lists and plain mappings kept."""
    if isinstance(value, Mapping):
        if "_target_" in value:
            return describe(value)
        return {k: _describe_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_describe_tree(v) for v in value]
    return value if value is None or isinstance(value, (int, float, bool)) else str(value)
