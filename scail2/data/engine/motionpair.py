"""``scail2-data motionpair PREPARED_DIR OUT``: MotionPair-style training pairs from prepared clips (paper §3.2).

For each clip of a ``scail2-data prepare`` folder:

1. **Task.** A multi-character clip goes to a replacement generator (character by character: the paper's
   substitute for multi-character animation); a single-character clip goes to replacement with probability
   ``replacement_share`` (animation : replacement about 3 : 1), else to a pose-driven animation generator. The
   generator is drawn by weight. Every draw comes from the seed and the clip id.
2. **Reference loop** (per character to synthesise): the character pool gives ``candidates`` images; the
   Candidate Selector picks one for the posture reference (the clip's first frame, or the character's crop of it
   for replacement); the Prompt Weaver plans the prompt; the multi-reference image generator draws the character
   in that posture; the Quality Checker accepts it or says what is wrong, and the weaver turns that into an edit
   of the last result, for at most ``max_turns`` rounds.
3. **Generation.** Animation: the clip's skeleton render (`scail2.data.engine.pose.render_poses`) drives the
   generator with the new reference. Replacement: each character's mask in turn is replaced by its new reference.
4. **Filter.** The VLM filter keeps or discards the synthetic video; discards are counted per generator (the
   paper keeps the discard rate under 30%).
5. **Packaging** (reverse driving): the synthetic video drives, the real clip is the target, the reference frame
   is sampled from the target, and the target keeps its colour mask so the loader may sample the reference
   anywhere in it (and runs 5% of pairs forward by default, ``AugmentOptions.forward_fraction``).
   ``forward_fraction`` > 0 packages that share forward instead (synthetic as target; train those with
   ``forward_fraction=0`` to not flip twice). Masks use the real clip's binding order in every file; backgrounds
   follow SPEC §3 (animation: reference white, driving black; replacement: reference black, driving white).

Sources: each animation generator names its source (``scail_animation``, ``wananimate_animation`` ...); a
replacement generator's pairs are ``mocha_replacement_single`` / ``mocha_replacement_multi`` unless it names
others. ``manifest.jsonl`` holds the pairs and (``include_pose``) the prepared pose-driven records, so one manifest
has the three classes of the 60 / 20 / 20 mix. Resumable like ``prepare`` (``motionpair.json``, ``pairs/<id>/``,
``pairs/<id>.skip.json``, ``report.json``).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scail2.config.components import describe_component, read_components
from scail2.data.engine.components import (
    AnimationRequest,
    FilterRequest,
    MotionPairComponents,
    ReplacementRequest,
    Verdict,
    load_motionpair_components,
)
from scail2.data.engine.masks import match_masks, mode_masks
from scail2.data.engine.pose import render_poses
from scail2.data.engine.prepare import MANIFEST_NAME as PREPARED_MANIFEST
from scail2.data.engine.prepare import load_masks, load_poses
from scail2.data.engine.store import (
    Skip,
    Tally,
    atomic_folder,
    call,
    check_settings,
    fingerprint,
    read_json,
    remove_stale,
    stable_seed,
    write_json,
)
from scail2.data.manifest import MotionRecord, load_manifest, parse_record, write_manifest
from scail2.data.engine.clips import Clip, GeneratedVideo
from scail2.data.video import read_video, write_image, write_video

SETTINGS_NAME = "motionpair.json"
MANIFEST_NAME = "manifest.jsonl"
REPORT_NAME = "report.json"
_VERSION = 1


@dataclass(frozen=True)
class MotionPairOptions:
    """seed: every draw (task, generator, candidates, reference frame, orientation) derives from (seed, clip id);
    replacement_share: single-character clips sent to replacement; candidates: pool images shown to the selector;
    max_turns: generate-and-check rounds of the reference loop; forward_fraction: pairs packaged forward;
    include_pose: put the prepared pose-driven records into the manifest; lossless: RGB-lossless synthetic videos."""

    seed: int = 0
    replacement_share: float = 0.25
    candidates: int = 4
    max_turns: int = 3
    forward_fraction: float = 0.0
    include_pose: bool = True
    lossless: bool = False

    def __post_init__(self) -> None:
        for name in ("replacement_share", "forward_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} {getattr(self, name)} must be in [0, 1]")
        if self.candidates < 1 or self.max_turns < 1:
            raise ValueError(f"candidates {self.candidates} and max_turns {self.max_turns} must be >= 1")


@dataclass
class MotionPairReport:
    out_dir: Path
    manifest: Path
    clips: int
    pairs: int  # pairs in the manifest (all runs)
    new_pairs: int
    pose_records: int
    sources: dict[str, int]
    classes: dict[str, int]  # animation / replacement / pose records in the manifest
    generators: dict[str, dict[str, float]]  # per generator: kept, discarded, failed, discard_rate
    skipped: dict[str, int]
    details: list[dict[str, str]]
    filter: str
    seconds: float

    def summary(self) -> str:
        lines = [f"{self.out_dir}: {self.pairs} pairs ({self.new_pairs} new) from {self.clips} clips, "
                 f"{self.pose_records} pose records; {self.seconds:.1f} s",
                 "classes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.classes.items())),
                 "sources: " + ", ".join(f"{k} {v}" for k, v in sorted(self.sources.items())),
                 f"filter: {self.filter}"]  # fmt: skip
        for name, g in sorted(self.generators.items()):
            rate = "n/a" if g["discard_rate"] is None else f"{g['discard_rate']:.0%}"
            lines.append(f"  {name}: {g['kept']} kept, {g['discarded']} discarded (discard rate {rate}), {g['failed']} failed")
        if self.skipped:
            lines.append("skipped:")
            lines += [f"  {r}: {n}" for r, n in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0]))]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# The reference loop
# --------------------------------------------------------------------------------------------------------


def _check_image(image: Any, stage: str) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 8:
        got = f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}"
        raise Skip(f"{stage}_bad_output", f"returned {got}; need a uint8 (H, W, 3) image of at least 8x8")
    return image


def _check_text(text: Any, stage: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise Skip(f"{stage}_bad_output", f"returned {text!r}; need non-empty text")
    return text.strip()


def reference_loop(posture: np.ndarray, components: MotionPairComponents, rng: np.random.Generator,
                   options: MotionPairOptions, seed: int) -> tuple[np.ndarray, dict]:  # fmt: skip
    """A checked reference image for ``posture`` and the loop's transcript (candidates, choice, turns)."""
    candidates = call("pool", components.pool.sample, rng, options.candidates)
    if not candidates:
        raise Skip("pool_empty", "the character pool returned no image")
    choice = call("selector", components.selector.select, posture, [c.image for c in candidates])
    if isinstance(choice, bool) or not isinstance(choice, (int, np.integer)) or not 0 <= choice < len(candidates):
        raise Skip("selector_bad_output", f"choice {choice!r} is not a candidate index 0..{len(candidates) - 1}")
    character = candidates[int(choice)].image
    transcript: dict[str, Any] = {"candidates": [c.id for c in candidates], "choice": int(choice), "turns": []}
    prompt = _check_text(call("weaver", components.weaver.weave, character, posture), "weaver")
    images = [character, posture]
    feedback = ""
    for turn in range(options.max_turns):
        image = _check_image(call("image_generator", components.image_generator.generate, prompt, images, seed + turn),
                             "image_generator")  # fmt: skip
        verdict = call("checker", components.checker.check, image, character, posture, prompt)
        if not isinstance(verdict, Verdict):
            raise Skip("checker_bad_output", f"returned {type(verdict).__name__}, not a Verdict")
        transcript["turns"].append({"prompt": prompt, "ok": verdict.ok, "feedback": verdict.feedback})
        if verdict.ok:
            return image, transcript
        feedback = verdict.feedback
        if turn + 1 < options.max_turns:
            prompt = _check_text(call("weaver", components.weaver.weave, character, posture, feedback, prompt), "weaver")
            images = [image, character, posture]
    raise Skip("reference_rejected", f"the quality checker rejected {options.max_turns} results; last: {feedback!r}")


def _crop(frame: np.ndarray, mask: np.ndarray, pad: float = 0.15) -> np.ndarray:
    """The character's bounding box in ``frame`` (grown by ``pad``), or the whole frame when it is not visible."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return frame
    h, w = mask.shape
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    dy, dx = int((y1 - y0) * pad), int((x1 - x0) * pad)
    crop = frame[max(0, y0 - dy) : min(h, y1 + dy), max(0, x0 - dx) : min(w, x1 + dx)]
    return crop if min(crop.shape[:2]) >= 8 else frame


# --------------------------------------------------------------------------------------------------------
# One clip -> one pair
# --------------------------------------------------------------------------------------------------------


def _check_generated(video: Any, frames: int, size: tuple[int, int]) -> GeneratedVideo:
    if not isinstance(video, GeneratedVideo):
        raise Skip("generator_bad_output", f"returned {type(video).__name__}, not a GeneratedVideo")
    v = video.frames
    if not isinstance(v, np.ndarray) or v.dtype != np.uint8 or v.shape != (frames, *size, 3):
        got = f"{getattr(v, 'dtype', type(v).__name__)} {getattr(v, 'shape', '')}"
        raise Skip("generator_bad_output", f"returned {got}; need uint8 ({frames}, {size[0]}, {size[1]}, 3) like the clip")
    return video


def _pick(entries: Sequence[Any], rng: np.random.Generator) -> Any:
    weights = np.array([e.weight for e in entries], dtype=np.float64)
    return entries[int(rng.choice(len(entries), p=weights / weights.sum()))]


def _synthetic_masks(generated: GeneratedVideo, real: np.ndarray, components: MotionPairComponents, cid: str,
                     fps: float, person_character: list[int] | None = None) -> np.ndarray:  # fmt: skip
    """(K, F, H, W) masks of the synthetic video in the real characters' order."""
    k = real.shape[0]
    if generated.masks is not None:
        masks = np.asarray(generated.masks, dtype=bool)
        if masks.shape != (len(person_character or range(k)), *real.shape[1:]):
            raise Skip("generator_bad_output", f"reported masks of shape {masks.shape}; need {(k, *real.shape[1:])}")
        if person_character is None:
            return masks
        out = np.zeros_like(real)
        for p, c in enumerate(person_character):
            out[c] = masks[p]
        return out
    if components.segmenter is None:
        raise Skip("synthetic_no_masks", "the generator reports no masks and no segmenter is configured")
    clip = Clip(f"{cid}/synthetic", generated.frames, fps)
    masks = call("segmenter", components.segmenter.segment, clip)
    if not isinstance(masks, np.ndarray) or masks.ndim != 4 or masks.shape[1:] != real.shape[1:]:
        raise Skip("segmenter_bad_output", f"masks of shape {getattr(masks, 'shape', None)}; need (K, {', '.join(map(str, real.shape[1:]))})")
    masks = masks.astype(bool)
    assignment = match_masks(masks, real)
    if assignment is None:
        raise Skip("synthetic_unmatched", f"{masks.shape[0]} segmented characters do not pair up with the clip's {k}")
    out = np.zeros_like(real)
    for i, j in enumerate(assignment):
        out[j] = masks[i]
    return out


def _relative(path: Path, base: Path) -> str:
    return os.path.relpath(path, base)


def _process_clip(prepared: Path, cid: str, out: Path, components: MotionPairComponents, options: MotionPairOptions) -> dict:
    """Make the pair of one clip; returns ``{"pair", "generator", "status", ...}`` (status kept | skipped)."""
    pid = f"{cid}_p0"
    folder = out / "pairs" / pid
    skip_path = out / "pairs" / f"{pid}.skip.json"
    if (folder / "record.json").is_file():
        return {"pair": pid, "status": "kept", "new": False, **read_json(folder / "record.json")["meta"]["engine"]}
    clip_dir = prepared / "clips" / cid
    info = read_json(clip_dir / "clip.json")
    rng = np.random.default_rng(stable_seed(options.seed, cid))
    seed = int(rng.integers(0, 2**31 - 1))
    k = int(info["characters"])
    # The task and generator first, so the draws of one clip never depend on what the components answer.
    u_task, u_forward = rng.random(2)
    if k > 1 or (components.replacers and (not components.animators or u_task < options.replacement_share)):
        if not components.replacers:
            return _skip(skip_path, pid, "no_replacement_generator", f"{k} characters need a replacement generator", None)
        entry, mode = _pick(components.replacers, rng), "replacement"
        source = entry.source_multi if k > 1 else entry.source_single
    else:
        entry, mode = _pick(components.animators, rng), "animation"
        source = entry.source
    forward = u_forward < options.forward_fraction
    reference_index = int(rng.integers(info["frames"]))
    try:
        frames = read_video(clip_dir / "target.mp4")
        masks = load_masks(clip_dir / "characters.npz")
        f, h, w = frames.shape[:3]
        fps = float(info["fps"])
        transcripts = []
        if mode == "animation":
            track, person_character = load_poses(clip_dir / "poses.npz")
            if person_character is None:
                raise Skip("pose_unmatched", "the clip's poses do not pair up with its characters (see prepare's report)")
            reference, transcript = reference_loop(frames[0], components, rng, options, seed)
            transcripts.append(transcript)
            render = render_poses(track)
            by_character = np.zeros_like(masks)
            for p, c in enumerate(person_character):
                by_character[c] = render.masks[p]
            pose_mask = mode_masks(by_character, "animation", "driving", info["order"])
            request = AnimationRequest(reference, track, render.frames, pose_mask, h, w, f, fps, info["caption"], seed)
            generated = _check_generated(call("generator", entry.animator.animate, request), f, (h, w))
            synthetic = _synthetic_masks(generated, masks, components, cid, fps, person_character)
            references = [reference]
        else:
            video, reported, references = frames, [], []
            for c in range(k):
                reference, transcript = reference_loop(_crop(frames[0], masks[c, 0]), components, rng, options, seed + 97 * c)
                transcripts.append(transcript)
                request = ReplacementRequest(video, masks[c], reference, c, fps, info["caption"], seed + c)
                result = _check_generated(call("generator", entry.replacer.replace, request), f, (h, w))
                video = result.frames
                if result.masks is not None:
                    m = np.asarray(result.masks).astype(bool)
                    if m.shape not in ((f, h, w), (1, f, h, w)):
                        raise Skip("generator_bad_output", f"reported masks of shape {m.shape}; need (1, {f}, {h}, {w})")
                    reported.append(m.reshape(f, h, w))
                else:
                    reported.append(None)
                references.append(reference)
            generated = GeneratedVideo(video, np.stack(reported) if all(m is not None for m in reported) else None)
            synthetic = _synthetic_masks(generated, masks, components, cid, fps)
        verdict = Verdict(True, "no filter")
        if components.filter is not None:
            verdict = call("filter", components.filter.judge, FilterRequest(generated.frames, fps, references, mode, entry.name))
            if not isinstance(verdict, Verdict):
                raise Skip("filter_bad_output", f"returned {type(verdict).__name__}, not a Verdict")
            if not verdict.ok:
                return _skip(skip_path, pid, "discarded", verdict.feedback or "the filter discarded the video", entry.name)
        caption = info["caption"]
        if forward:
            if components.captioner is not None:
                caption = _check_text(call("caption", components.captioner.caption, Clip(f"{pid}/synthetic", generated.frames, fps)), "caption")
            else:
                caption = transcripts[0]["turns"][-1]["prompt"]
        engine = {"generator": entry.name, "orientation": "forward" if forward else "reverse", "clip": cid}
        _write_pair(folder, clip_dir, info, mode, source, frames, generated.frames, masks, synthetic, references,
                    reference_index, forward, caption, transcripts, verdict, engine, options)  # fmt: skip
    except Skip as exc:
        return _skip(skip_path, pid, exc.reason, exc.detail, entry.name)
    return {"pair": pid, "status": "kept", "new": True, **engine}


def _skip(path: Path, pid: str, reason: str, detail: str, generator: str | None) -> dict:
    value = {"pair": pid, "status": "skipped", "reason": reason, "detail": detail, "generator": generator}
    write_json(path, value)
    return value


def _write_pair(folder: Path, clip_dir: Path, info: dict, mode: str, source: str, real: np.ndarray, synthetic_frames: np.ndarray,
                real_masks: np.ndarray, synthetic_masks: np.ndarray, references: list[np.ndarray], reference_index: int,
                forward: bool, caption: str, transcripts: list, verdict: Verdict, engine: dict,
                options: MotionPairOptions) -> None:  # fmt: skip
    order = info["order"]
    fps = float(info["fps"])
    f, h, w = real.shape[:3]
    with atomic_folder(folder) as tmp:
        write_video(tmp / "synthetic.mp4", synthetic_frames, fps, lossless=options.lossless)
        for i, image in enumerate(references):
            write_image(tmp / f"generated_reference_{i}.png", image)
        write_json(tmp / "loop.json", {"transcripts": transcripts, "filter": {"ok": verdict.ok, "reason": verdict.feedback}})
        if forward:
            driving, target = clip_dir / "target.mp4", folder / "synthetic.mp4"
            driving_masks, reference_masks = real_masks, synthetic_masks
        else:
            driving, target = folder / "synthetic.mp4", clip_dir / "target.mp4"
            driving_masks, reference_masks = synthetic_masks, real_masks
        write_video(tmp / "driving_mask.mp4", mode_masks(driving_masks, mode, "driving", order), fps, lossless=True)
        ref = reference_masks[:, reference_index : reference_index + 1]
        write_image(tmp / "reference_mask.png", mode_masks(ref, mode, "reference", order)[0])
        record: dict[str, Any] = {
            "id": folder.name, "source": source, "mode": mode,
            "driving": _relative(driving, folder), "target": _relative(target, folder),
            "reference": reference_index, "driving_mask": "driving_mask.mp4", "reference_mask": "reference_mask.png",
            "fps": fps, "caption": caption, "end_to_end": True, "frames": f, "height": h, "width": w,
            "meta": {"engine": engine, "origin": info["origin"], "characters": int(info["characters"])},
        }  # fmt: skip
        if not forward:
            # The real clip's mask lets the loader sample the reference anywhere in the target.
            write_video(tmp / "target_mask.mp4", mode_masks(real_masks, mode, "driving", order), fps, lossless=True)
            record["target_mask"] = "target_mask.mp4"
            if info.get("ocr") is not None:
                record["ocr"] = info["ocr"]
        for name in ("hands", "faces"):  # the motion's boxes: the same in both videos up to synthesis error
            if info.get(name) is not None:
                record[name] = info[name]
        parse_record(record, folder)  # the record must parse before it is kept
        write_json(tmp / "record.json", record)


# --------------------------------------------------------------------------------------------------------
# Workers and the run
# --------------------------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(spec: Any) -> None:
    _WORKER["components"] = spec if isinstance(spec, MotionPairComponents) else load_motionpair_components(spec)


def _worker_clip(prepared: Path, cid: str, out: Path, options: MotionPairOptions) -> dict:
    return _process_clip(prepared, cid, out, _WORKER["components"], options)


def prepared_clips(prepared: Path) -> list[str]:
    """Clip ids of a prepared folder, in the order of its video markers."""
    ids: list[str] = []
    for marker in sorted((prepared / "videos").glob("*.json")):
        ids += read_json(marker)["clips"]
    return ids


def synthesize_pairs(
    prepared_dir: str | Path,
    out_dir: str | Path,
    components: str | Path | Mapping[str, Any] | MotionPairComponents,
    options: MotionPairOptions = MotionPairOptions(),
    *,
    workers: int = 1,
    retry: Sequence[str] = (),
    progress: bool = True,
) -> MotionPairReport:
    """Make (or continue making) one pair per prepared clip (module docstring); ``retry``: skip reasons to redo."""
    start = time.perf_counter()
    prepared = Path(prepared_dir).resolve()
    out = Path(out_dir).resolve()
    if not (prepared / "prepare.json").is_file():
        raise ValueError(f"{prepared} is not a prepared folder (no prepare.json); run scail2-data prepare first")
    clips = prepared_clips(prepared)
    if not clips:
        raise ValueError(f"{prepared} has no prepared clips; see its report.json for why")
    if isinstance(components, MotionPairComponents):
        built, spec, spec_fp = components, components, components.specs
        filter_text = "none" if components.filter is None else str(components.specs.get("filter", repr(components.filter)))
    else:
        raw = read_components(components, "motionpair")
        built = load_motionpair_components(raw) if workers <= 1 else None
        spec, spec_fp = raw, fingerprint(raw)
        filter_text = "none" if raw.get("filter") is None else describe_component(raw["filter"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "pairs").mkdir(exist_ok=True)
    check_settings(out / SETTINGS_NAME, {"version": _VERSION, "prepared_dir": str(prepared), "options": asdict(options),
                                          "components": spec_fp})  # fmt: skip
    remove_stale(out / "pairs")
    results: dict[str, dict] = {}
    todo: list[str] = []
    retry = set(retry)
    for cid in clips:
        skip = out / "pairs" / f"{cid}_p0.skip.json"
        if skip.is_file():
            value = read_json(skip)
            if value["reason"] not in retry:
                results[cid] = value
                continue
            skip.unlink()
        todo.append(cid)

    from tqdm import tqdm

    bar = tqdm(total=len(clips), initial=len(clips) - len(todo), unit="clip", desc="motionpair", disable=not progress,
               file=sys.stderr)  # fmt: skip
    try:
        if workers <= 1 or len(todo) <= 1:
            comps = built if built is not None else load_motionpair_components(spec)
            for cid in todo:
                results[cid] = _process_clip(prepared, cid, out, comps, options)
                bar.update(1)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=(spec,)) as pool:  # fmt: skip
                futures = {pool.submit(_worker_clip, prepared, cid, out, options): cid for cid in todo}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update(1)
    finally:
        bar.close()
    return _assemble(prepared, out, clips, results, options, filter_text, start)


def _assemble(prepared: Path, out: Path, clips: list[str], results: dict[str, dict], options: MotionPairOptions,
              filter_text: str, start: float) -> MotionPairReport:  # fmt: skip
    tally = Tally()
    records: list[MotionRecord] = []
    gen: dict[str, Counter] = {}
    new = 0
    for cid in clips:
        result = results[cid]
        name = result.get("generator")
        if result["status"] == "kept":
            folder = out / "pairs" / result["pair"]
            records.append(parse_record(read_json(folder / "record.json"), folder))
            new += bool(result.get("new"))
            gen.setdefault(name, Counter())["kept"] += 1
        else:
            tally.skip(result["reason"], result["detail"], clip=cid, **({"generator": name} if name else {}))
            if name:
                gen.setdefault(name, Counter())["discarded" if result["reason"] == "discarded" else "failed"] += 1
    pairs = len(records)
    pose = 0
    manifest_in = prepared / PREPARED_MANIFEST
    if options.include_pose and manifest_in.is_file():
        prepared_records = load_manifest(manifest_in)
        records += prepared_records
        pose = len(prepared_records)
    manifest = out / MANIFEST_NAME
    if records:
        write_manifest(manifest, records)
    generators = {}
    for name, c in gen.items():
        judged = c["kept"] + c["discarded"]
        generators[name] = {"kept": c["kept"], "discarded": c["discarded"], "failed": c["failed"],
                            "discard_rate": c["discarded"] / judged if judged else None}  # fmt: skip
    report = MotionPairReport(out, manifest, len(clips), pairs, new, pose, dict(Counter(r.source for r in records)),
                              dict(Counter(r.source_class for r in records)), generators, dict(tally.skipped),
                              tally.details, filter_text, time.perf_counter() - start)  # fmt: skip
    write_json(out / REPORT_NAME, {**asdict(report), "out_dir": str(out), "manifest": str(manifest)})
    return report
