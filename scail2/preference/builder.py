"""Build Bias-Aware DPO preference pairs from motion videos (SPEC §7, paper Eq. 4-7).

For a source motion video x (the ``target`` of a motion-manifest record), with pose estimator P, a less accurate
estimator P', generator G and two reference appearances ref_a, ref_b:

    x_a = G(P(x), ref_a)         the driving video of the condition
    x_w = G(P(x), ref_b)         preferred: the motion as P saw it
    x_l = G(P'(x_a), ref_b)      dispreferred: one more round of estimation error, same appearance

and the reference frame is sampled from x_w. x_w and x_l share ref_b and the generator seed, so they differ
only through P' — the bias DPO should teach the model to undo. Hand boxes of x_w and x_l come from G when it
reports them, else from P run on each video; colour masks from G, else from the segmenter (optional).

Output folder::

    build.json                        settings (source manifest, seed, components); a resume must match them
    manifest.jsonl                    the preference manifest (`scail2.preference.records`), accepted pairs in order
    pairs/pref_00000/                 driving.mp4, preferred.mp4, dispreferred.mp4, [driving_mask.mp4,
                                      reference_mask.png,] record.json
    pairs/pref_00003.skip.json        a candidate the filter rejected (or whose source could not be used)

Candidate i uses source record ``i mod len(records)`` and the random stream (seed, i): it is the same on every
run. A pair is written to a hidden temporary folder and renamed when complete, so an interrupted run leaves no
half pair; running again skips the pairs and rejections already on disk and produces the identical set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scail2.conditioning.masks import character_order
from scail2.config.components import build_component, describe_component, read_components
from scail2.data.engine.clips import Clip, PoseEstimator, Reference, Segmenter
from scail2.data.engine.components import check_keys
from scail2.data.manifest import MotionRecord, load_manifest
from scail2.data.records import BoxTrack
from scail2.data.synth import colour_mask_video
from scail2.data.transforms import rasterize_boxes
from scail2.data.video import VideoDecodeError, VideoReader, write_image, write_video
from scail2.preference.components import Generator, ReferenceSource
from scail2.preference.records import PreferenceRecord, Provenance, parse_preference_record, write_preference_manifest

log = logging.getLogger(__name__)

BUILD_NAME = "build.json"
MANIFEST_NAME = "manifest.jsonl"
_BUILD_VERSION = 1


# ----------------------------------------------------------------------------------------------------
# Candidates and the filter hook
# ----------------------------------------------------------------------------------------------------


@dataclass
class CandidatePair:
    """A generated pair before it is written; what a filter sees.

    driving / preferred / dispreferred: x_a / x_w / x_l as `Clip` (frames (F, H, W, 3) uint8).
    preferred_hands / dispreferred_hands: per-frame (x0, y0, x1, y1) boxes. reference_index: the frame of x_w
    used as the reference image.
    """

    id: str
    index: int
    source: MotionRecord
    driving: Clip
    preferred: Clip
    dispreferred: Clip
    reference_index: int
    preferred_hands: BoxTrack
    dispreferred_hands: BoxTrack
    reference_a: Reference
    reference_b: Reference


PairFilter = Callable[[CandidatePair], bool]  # True keeps the pair


class SkipCandidate(Exception):
    """A candidate that cannot be built from its source (e.g. P finds nobody); recorded and counted as failed."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def hand_region(pair: CandidatePair) -> np.ndarray:
    """bool (F, H, W): pixels inside any hand box of the winner or the loser (a pixel is in when its centre is)."""
    h, w = pair.preferred.frames.shape[1:3]
    per_frame = zip(pair.preferred_hands, pair.dispreferred_hands)
    tracks = [np.asarray(list(a) + list(b), dtype=np.float64).reshape(-1, 4) for a, b in per_frame]  # (N, 4) per frame
    return rasterize_boxes(tracks, (h, w)).numpy()


class MinHandDifference:
    """Keep a pair only when winner and loser differ inside the hands: the mean absolute pixel difference
    (in [0, 1]) over the union of both videos' hand boxes is at least ``min_difference``. Pairs without any hand
    box are rejected (the hand-masked DPO loss has nothing to compare on them)."""

    def __init__(self, min_difference: float = 0.02):
        if not 0.0 <= min_difference <= 1.0:
            raise ValueError(f"min_difference {min_difference} is a mean pixel difference in [0, 1]")
        self.min_difference = float(min_difference)

    def difference(self, pair: CandidatePair) -> float:
        region = hand_region(pair)  # (F, H, W)
        if not region.any():
            return 0.0
        winner, loser = pair.preferred.frames.astype(np.float32), pair.dispreferred.frames.astype(np.float32)
        diff = np.abs(winner - loser).mean(-1) / 255.0  # (F, H, W)
        return float(diff[region].mean())

    def __call__(self, pair: CandidatePair) -> bool:
        return self.difference(pair) >= self.min_difference


# ----------------------------------------------------------------------------------------------------
# Components
# ----------------------------------------------------------------------------------------------------

_REQUIRED_COMPONENTS = ("pose_estimator", "weak_pose_estimator", "generator", "references")
_OPTIONAL_COMPONENTS = ("segmenter", "filter")
_PROTOCOLS = {"pose_estimator": PoseEstimator, "weak_pose_estimator": PoseEstimator, "generator": Generator,
              "references": ReferenceSource, "segmenter": Segmenter}  # fmt: skip


@dataclass
class PreferenceComponents:
    """The instantiated components and, per component, the text recorded as provenance."""

    pose_estimator: PoseEstimator
    weak_pose_estimator: PoseEstimator
    generator: Generator
    references: ReferenceSource
    segmenter: Segmenter | None = None
    filter: PairFilter | None = None
    specs: dict[str, str] | None = None


def load_components(config: str | Path | Mapping[str, Any]) -> PreferenceComponents:
    """Components from a preset of ``conf/components/preference/`` (``synthetic``: ground-truth poses,
    `NoisyPoses`, the synthetic renderer and references, for a ``scail2-data synth`` dataset of seed 0), a
    ``.yaml``/``.yml``/``.json`` file or a mapping with keys pose_estimator, weak_pose_estimator, generator,
    references and optionally segmenter and filter; each value is a target name or ``{_target_: name, **kwargs}``,
    built by the config system under its allow-list (`scail2.config.components`)."""
    spec = read_components(config, "preference")
    check_keys(spec, _REQUIRED_COMPONENTS, _OPTIONAL_COMPONENTS, "components")
    missing = [k for k in _REQUIRED_COMPONENTS if spec[k] is None]
    if missing:
        raise ValueError(f"components: {missing[0]} is null; give a target name or {{_target_: ..., ...}}")
    built: dict[str, Any] = {}
    for key in _REQUIRED_COMPONENTS + _OPTIONAL_COMPONENTS:
        if spec.get(key) is None:
            continue
        obj = build_component(spec[key], key, _PROTOCOLS.get(key))
        if key == "filter" and not callable(obj):
            raise ValueError(f"components: filter {describe_component(spec[key])} is not callable (pair -> bool)")
        built[key] = obj
    if built["generator"].mode not in ("animation", "replacement"):
        raise ValueError(f"components: generator mode {built['generator'].mode!r}; use 'animation' or 'replacement'")
    specs = {k: describe_component(spec[k]) for k in built}
    return PreferenceComponents(**built, specs=specs)


# ----------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildOptions:
    """pairs: accepted pairs wanted; seed: every candidate's randomness derives from (seed, candidate index);
    max_candidates: candidates tried at most (default 4 x pairs; rejected ones count); max_frames: use at most
    the first frames of each source video; lossless: write RGB-lossless videos (pixels exactly as generated)."""

    pairs: int = 100
    seed: int = 0
    max_candidates: int | None = None
    max_frames: int | None = None
    lossless: bool = True

    def __post_init__(self) -> None:
        if self.pairs < 1:
            raise ValueError(f"pairs {self.pairs} must be >= 1")
        if self.max_candidates is not None and self.max_candidates < self.pairs:
            raise ValueError(f"max_candidates {self.max_candidates} is fewer than pairs {self.pairs}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames {self.max_frames} must be >= 1")

    @property
    def candidates(self) -> int:
        return self.max_candidates if self.max_candidates is not None else 4 * self.pairs


@dataclass
class BuildReport:
    manifest: Path
    pairs: int  # accepted pairs in the manifest
    written: int  # pairs written by this run
    existing: int  # pairs found from earlier runs
    rejected: int  # candidates the filter rejected in this run
    rejected_before: int  # rejections found from earlier runs
    failed: int  # candidates whose source could not be used: unreadable, nobody found (all runs)
    candidates: int  # candidate indices looked at
    seconds: float


def _pair_id(index: int) -> str:
    return f"pref_{index:05d}"


def read_source(record: MotionRecord, max_frames: int | None = None) -> Clip:
    """The record's target video (the motion x), at most its first ``max_frames`` frames, as a `Clip`."""
    with VideoReader(record.target) as reader:
        n = reader.num_frames if max_frames is None else min(reader.num_frames, max_frames)
        frames = reader.read(range(n))
    return Clip(id=record.id, frames=frames, fps=record.fps, record=record)


def _check_clip(video: Clip, frames: int, size: tuple[int, int] | None, what: str) -> None:
    """A generated clip has the poses' frame count and, when ``size`` is given, that (H, W)."""
    if video.frames.ndim != 4 or video.frames.dtype != np.uint8 or video.frames.shape[-1] != 3:
        got = f"{video.frames.dtype} {tuple(video.frames.shape)}"
        raise ValueError(f"{what}: the generator returned {got}; need uint8 (F, H, W, 3)")
    if video.frames.shape[0] != frames:
        raise ValueError(f"{what}: the generator returned {video.frames.shape[0]} frames for {frames} poses")
    if size is not None and tuple(video.frames.shape[1:3]) != size:
        got = tuple(video.frames.shape[1:3])
        raise ValueError(
            f"{what}: the generator returned {got[0]}x{got[1]} frames but x_a is {size[0]}x{size[1]}; a pair needs one size"
        )


def make_candidate(
    record: MotionRecord, index: int, components: PreferenceComponents, options: BuildOptions
) -> CandidatePair:
    """Generate candidate ``index`` from ``record`` (Eq. 4-7); a function of (options.seed, index) only."""
    pid = _pair_id(index)
    rng = np.random.default_rng([options.seed, index])
    source = read_source(record, options.max_frames)
    f, h, w = source.frames.shape[:3]
    P, P_weak, G = components.pose_estimator, components.weak_pose_estimator, components.generator
    poses = P.estimate(source)
    if poses.persons == 0:
        raise SkipCandidate("no_person", f"{record.id}: the pose estimator found nobody in the source video")
    ref_a = components.references.sample(rng, h, w, poses.persons)
    ref_b = components.references.sample(rng, h, w, poses.persons)
    seed_a, seed_b = (int(s) for s in rng.integers(0, 2**31, size=2))
    reference_index = int(rng.integers(f))

    def generate(track, reference, seed, role, size) -> Clip:
        out = G.generate(track, reference, seed)
        clip = Clip(f"{pid}/{role}", out.frames, source.fps, out.masks, out.hand_boxes, generated_from=track)
        _check_clip(clip, f, size, role)
        return clip

    # G may work at its own resolution; the three videos of a pair must agree with each other.
    driving = generate(poses, ref_a, seed_a, "driving", None)  # x_a = G(P(x), ref_a)
    size = tuple(driving.frames.shape[1:3])
    preferred = generate(poses, ref_b, seed_b, "preferred", size)  # x_w = G(P(x), ref_b)
    # x_l = G(P'(x_a), ref_b): the generator seed of x_w as well, so only the pose differs.
    dispreferred = generate(P_weak.estimate(driving), ref_b, seed_b, "dispreferred", size)
    for clip in (driving, preferred, dispreferred):
        if clip.masks is None and components.segmenter is not None:
            clip.masks = components.segmenter.segment(clip)

    def hands(clip: Clip) -> BoxTrack:
        return clip.hand_boxes if clip.hand_boxes is not None else P.estimate(clip).hand_boxes()

    return CandidatePair(pid, index, record, driving, preferred, dispreferred, reference_index,
                         hands(preferred), hands(dispreferred), ref_a, ref_b)  # fmt: skip


def _write_pair(
    pair: CandidatePair, out: Path, components: PreferenceComponents, options: BuildOptions, source_manifest: Path
) -> PreferenceRecord:
    """Write a pair's files into a hidden folder, then rename it into place (atomic on one filesystem)."""
    final = out / "pairs" / pair.id
    tmp = out / "pairs" / f".{pair.id}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fps = pair.preferred.fps
    mode = components.generator.mode
    for role in ("driving", "preferred", "dispreferred"):
        write_video(tmp / f"{role}.mp4", getattr(pair, role).frames, fps, lossless=options.lossless)
    masks: dict[str, Path] = {}
    if pair.driving.masks is not None and pair.preferred.masks is not None:
        # Slots by left-to-right order in x_w's first frame, shared by the driving and the reference mask, so
        # each person keeps its colour (as the motion data does).
        order = character_order(torch.from_numpy(pair.preferred.masks), "x")
        write_video(tmp / "driving_mask.mp4", colour_mask_video(pair.driving.masks, mode, order), fps, lossless=True)
        k = pair.reference_index
        reference_mask = colour_mask_video(pair.preferred.masks[:, k : k + 1], mode, order, reference=True)[0]
        write_image(tmp / "reference_mask.png", reference_mask)
        masks = {"driving_mask": final / "driving_mask.mp4", "reference_mask": final / "reference_mask.png"}
    specs = components.specs or {}
    f, h, w = pair.preferred.frames.shape[:3]
    record = PreferenceRecord(
        id=pair.id,
        mode=mode,
        fps=fps,
        driving=final / "driving.mp4",
        preferred=final / "preferred.mp4",
        dispreferred=final / "dispreferred.mp4",
        reference=pair.reference_index,
        preferred_hands=[[tuple(float(v) for v in b) for b in frame] for frame in pair.preferred_hands],
        dispreferred_hands=[[tuple(float(v) for v in b) for b in frame] for frame in pair.dispreferred_hands],
        caption=pair.reference_b.caption or pair.source.caption,
        frames=f,
        height=h,
        width=w,
        provenance=Provenance(
            pose_estimator=specs.get("pose_estimator", ""),
            weak_pose_estimator=specs.get("weak_pose_estimator", ""),
            generator=specs.get("generator", ""),
            references=specs.get("references", ""),
            source_record=pair.source.id,
            source_manifest=str(source_manifest),
        ),
        meta={"candidate": pair.index, "reference_a": pair.reference_a.id, "reference_b": pair.reference_b.id},
        **masks,
    )
    (tmp / "record.json").write_text(json.dumps(record.to_json(out)))
    if final.exists():  # a folder without record.json cannot come from a rename; clear whatever it is
        shutil.rmtree(final)
    os.replace(tmp, final)
    return record


def _write_skip(out: Path, pid: str, reason: str, detail: str) -> None:
    path = out / "pairs" / f"{pid}.skip.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"reason": reason, "detail": detail}))
    tmp.replace(path)


def _load_pair(out: Path, pid: str) -> PreferenceRecord:
    return parse_preference_record(json.loads((out / "pairs" / pid / "record.json").read_text()), out.resolve())


def build_preferences(
    source_manifest: str | Path,
    out_dir: str | Path,
    components: PreferenceComponents,
    options: BuildOptions = BuildOptions(),
    progress: Callable[[str], None] | None = None,
) -> BuildReport:
    """Build (or resume building) ``options.pairs`` preference pairs from the motion videos of ``source_manifest``.

    Candidates are tried in index order until ``options.pairs`` are accepted or ``options.candidates`` were tried;
    the filter (``components.filter``) may reject a candidate, which is recorded and counted. A folder built with
    other settings (source, seed, frames, components) is refused. ``progress`` receives one line per candidate.
    """
    start = time.perf_counter()
    source_manifest = Path(source_manifest).resolve()
    records = load_manifest(source_manifest)
    out = Path(out_dir).resolve()
    (out / "pairs").mkdir(parents=True, exist_ok=True)
    # Candidate i reads record i mod len(records): the record list is part of the settings a resume must match.
    records_hash = hashlib.blake2b("\n".join(r.id for r in records).encode(), digest_size=8).hexdigest()
    settings = {"version": _BUILD_VERSION, "source_manifest": str(source_manifest), "source_records": records_hash,
                "seed": options.seed, "max_frames": options.max_frames, "lossless": options.lossless,
                "components": components.specs}  # fmt: skip
    build_file = out / BUILD_NAME
    if build_file.exists():
        before = json.loads(build_file.read_text())
        changed = sorted(k for k in settings if before.get(k) != settings[k])
        if changed:
            raise ValueError(
                f"{out} holds pairs built with other settings ({', '.join(changed)} differ); use a new folder or delete it"
            )
    else:
        tmp = build_file.with_name(BUILD_NAME + ".tmp")
        tmp.write_text(json.dumps(settings, indent=1))
        tmp.replace(build_file)
    for stale in (out / "pairs").glob(".*.tmp-*"):  # half-written pairs of an interrupted run
        shutil.rmtree(stale, ignore_errors=True)

    accepted: list[PreferenceRecord] = []
    written = existing = rejected = rejected_before = failed = 0
    looked = 0
    for index in range(options.candidates):
        if len(accepted) >= options.pairs:
            break
        looked += 1
        pid = _pair_id(index)
        if (out / "pairs" / pid / "record.json").exists():
            accepted.append(_load_pair(out, pid))
            existing += 1
            continue
        skip = out / "pairs" / f"{pid}.skip.json"
        if skip.exists():
            reason = json.loads(skip.read_text())["reason"]
            rejected_before += reason == "rejected"
            failed += reason != "rejected"
            continue
        record = records[index % len(records)]
        try:
            pair = make_candidate(record, index, components, options)
        except (VideoDecodeError, SkipCandidate) as exc:
            # Recorded like a rejection, so a resumed run does not try the candidate again.
            log.warning("preference: %s: skipping source %s: %s", pid, record.id, exc)
            _write_skip(out, pid, exc.reason, str(exc))
            failed += 1
            continue
        if components.filter is not None and not components.filter(pair):
            _write_skip(out, pid, "rejected", f"{record.id}: rejected by the filter")
            rejected += 1
            if progress:
                progress(f"{pid}: rejected ({record.id})")
            continue
        accepted.append(_write_pair(pair, out, components, options, source_manifest))
        written += 1
        if progress:
            progress(f"{pid}: written ({record.id})")
    manifest = write_preference_manifest(out / MANIFEST_NAME, accepted)
    seconds = time.perf_counter() - start
    return BuildReport(manifest, len(accepted), written, existing, rejected, rejected_before, failed, looked, seconds)
