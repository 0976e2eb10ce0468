"""Preference pairs for Bias-Aware DPO (SPEC §7): the record format and its validation.

A preference manifest is one JSON object per line (JSONL; paths relative to its folder). A record holds the
shared **condition** — a reference frame (an index into the preferred video, or an image) and the driving
video x_a, with optional colour masks and a caption — the **preferred** video x_w, the **dispreferred** video
x_l, the per-frame hand boxes of both, the mode, the fps and the provenance (which estimators and generator
made the pair). The field reference is in ``docs/data.md``; `PreferenceRecord` is its typed form. Parsing is
as strict as the motion manifest's (`scail2.data.manifest`, whose helpers it uses): unknown keys, missing keys
and wrong types raise `ManifestError` naming the line, the record id and the field.

Datasets, the preference cache and the data module are in `scail2.data.preference_data`; the pair builder
(paper Eq. 4-7) is in `scail2.data.preference_builder`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from scail2.data.batch import MODES
from scail2.data.buckets import assign_bucket
from scail2.data.manifest import (
    BoxTrack,
    ManifestError,
    _iter_jsonl,
    _parse_regions,
    _relative,
    _type_name,
    collect_records,
    parse_rows,
)
from scail2.data.transforms import TRAIN_FPS, resampled_length
from scail2.data.validate import (
    RecordReport,
    ValidateOptions,
    _check_palette,
    _check_reference_background,
    _check_video,
    _white_fraction,
)
from scail2.data.video import VideoDecodeError, read_image

# Every preference item is in this sampling class; weights may still name record sources.
PREFERENCE_CLASS = "preference"
DEFAULT_SOURCE = "preference"


# ----------------------------------------------------------------------------------------------------
# The record
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provenance:
    """What made a pair (free text per component, e.g. the component's import path and arguments).

    pose_estimator: P, which extracted the motion from the source video; weak_pose_estimator: P', which
    re-estimated the pose of x_a for the loser; generator: G; references: where ref_a / ref_b came from;
    source_record / source_manifest: the motion video the pair was built from.
    """

    pose_estimator: str = ""
    weak_pose_estimator: str = ""
    generator: str = ""
    references: str = ""
    source_record: str = ""
    source_manifest: str = ""

    def to_json(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if v}


@dataclass(frozen=True)
class PreferenceRecord:
    """One preference pair. Paths are absolute after parsing (resolved against the manifest's folder).

    driving: x_a, the driving video of the condition. preferred / dispreferred: x_w / x_l.
    reference: an ``int`` is a frame index into ``preferred`` (the paper samples the reference from x_w); a
    ``Path`` is a separate reference image. driving_mask (video) / reference_mask (image): colour-coded masks
    as in the motion manifest, both or neither. preferred_hands / dispreferred_hands: per frame of the videos a
    list of (x0, y0, x1, y1) pixel boxes (x1, y1 exclusive; a frame may have none).
    frames / height / width: the preferred video's frame count and size (optional; read from the file when absent).
    """

    id: str
    mode: str
    fps: float
    driving: Path
    preferred: Path
    dispreferred: Path
    reference: int | Path
    preferred_hands: BoxTrack
    dispreferred_hands: BoxTrack
    source: str = DEFAULT_SOURCE
    caption: str = ""
    driving_mask: Path | None = None
    reference_mask: Path | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    provenance: Provenance | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_masks(self) -> bool:
        return self.driving_mask is not None

    def video_fields(self) -> dict[str, Path]:
        """Every video path of the record by field name."""
        out = {"driving": self.driving, "preferred": self.preferred, "dispreferred": self.dispreferred}
        if self.driving_mask is not None:
            out["driving_mask"] = self.driving_mask
        return out

    def to_json(self, base: Path) -> dict[str, Any]:
        """The JSON object of this record with paths relative to ``base`` (the manifest's folder)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name == "meta" and not value):
                continue
            if isinstance(value, Path):
                value = _relative(value, base)
            elif isinstance(value, Provenance):
                value = value.to_json()
            elif f.name in _HAND_FIELDS:
                value = [[list(b) for b in frame] for frame in value]
            out[f.name] = value
        return out


_REQUIRED = ("id", "mode", "fps", "driving", "preferred", "dispreferred", "reference", "preferred_hands", "dispreferred_hands")
_PATH_FIELDS = ("driving", "preferred", "dispreferred", "driving_mask", "reference_mask")
_INT_FIELDS = ("frames", "height", "width")
_HAND_FIELDS = ("preferred_hands", "dispreferred_hands")
_KNOWN = {f.name for f in fields(PreferenceRecord)}
_PROVENANCE_KNOWN = {f.name for f in fields(Provenance)}


def parse_preference_record(raw: Any, base: Path, line: int | None = None) -> PreferenceRecord:
    """Parse one preference object; paths are resolved against ``base``. Raises `ManifestError`."""
    record_id = raw.get("id") if isinstance(raw, dict) else None
    record_id = record_id if isinstance(record_id, str) else None

    def fail(name: str, reason: str):
        raise ManifestError(record_id, name, reason, line)

    if not isinstance(raw, dict):
        fail("<record>", f"expected a JSON object, got {_type_name(raw)}")
    unknown = sorted(set(raw) - _KNOWN)
    if unknown:
        fail(unknown[0], f"unknown key; known keys are {sorted(_KNOWN)} (put free-form data under 'meta')")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        fail(missing[0], "required key is missing")

    values: dict[str, Any] = {}
    for name in ("id", "source", "caption"):
        if name in raw:
            if not isinstance(raw[name], str):
                fail(name, f"expected a string, got {_type_name(raw[name])} {raw[name]!r}")
            values[name] = raw[name]
    if not values["id"]:
        fail("id", "empty id")
    if values.get("source") == "":
        fail("source", f"empty source name; leave it out for the default {DEFAULT_SOURCE!r}")
    if raw["mode"] not in MODES:
        fail("mode", f"{raw['mode']!r} is not a mode; use one of {MODES}")
    values["mode"] = raw["mode"]
    fps = raw["fps"]
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        fail("fps", f"expected a positive number, got {_type_name(fps)} {fps!r}")
    values["fps"] = float(fps)
    for name in _PATH_FIELDS:
        if name not in raw or (raw[name] is None and name not in _REQUIRED):
            continue
        if not isinstance(raw[name], str) or not raw[name]:
            fail(name, f"expected a non-empty path string, got {_type_name(raw[name])} {raw[name]!r}")
        values[name] = (base / raw[name]).resolve()
    if ("driving_mask" in values) != ("reference_mask" in values):
        given = "driving_mask" if "driving_mask" in values else "reference_mask"
        other = "reference_mask" if given == "driving_mask" else "driving_mask"
        fail(other, f"missing while {given} is given; the condition's masks come together (give both or neither)")
    ref = raw["reference"]
    if isinstance(ref, bool) or not isinstance(ref, (int, str)) or ref == "":
        fail("reference", f"expected a frame index into 'preferred' (int) or an image path, got {_type_name(ref)} {ref!r}")
    if isinstance(ref, int) and ref < 0:
        fail("reference", f"frame index {ref} is negative; use 0 <= index < frames of 'preferred'")
    values["reference"] = ref if isinstance(ref, int) else (base / ref).resolve()
    for name in _HAND_FIELDS:
        if not isinstance(raw[name], list):
            fail(name, f"expected a per-frame list of [x0, y0, x1, y1] boxes, got {_type_name(raw[name])}")
        values[name] = _parse_regions(raw[name], name, base, fail).boxes
    for name in _INT_FIELDS:
        if name in raw and raw[name] is not None:
            v = raw[name]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                fail(name, f"expected a positive integer, got {_type_name(v)} {v!r}")
            values[name] = v
    if raw.get("provenance") is not None:
        prov = raw["provenance"]
        if not isinstance(prov, dict):
            fail("provenance", f"expected a JSON object, got {_type_name(prov)}")
        bad = sorted(set(prov) - _PROVENANCE_KNOWN)
        if bad:
            fail(f"provenance.{bad[0]}", f"unknown key; known keys are {sorted(_PROVENANCE_KNOWN)}")
        for key, v in prov.items():
            if not isinstance(v, str):
                fail(f"provenance.{key}", f"expected a string, got {_type_name(v)} {v!r}")
        values["provenance"] = Provenance(**prov)
    if "meta" in raw:
        if not isinstance(raw["meta"], dict):
            fail("meta", f"expected a JSON object, got {_type_name(raw['meta'])}")
        values["meta"] = raw["meta"]
    return PreferenceRecord(**values)


def iter_preference_manifest(path: str | Path) -> Iterator[tuple[int, PreferenceRecord | ManifestError]]:
    """Yield ``(line, record or ManifestError)`` for every line of a JSONL preference manifest; never raises
    on a bad record."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise ValueError(f"preference manifest {path} must be JSONL (a .jsonl file)")
    return parse_rows(_iter_jsonl(path), parse_preference_record, path.resolve().parent)


def load_preference_manifest(path: str | Path) -> list[PreferenceRecord]:
    """Parse a preference manifest; raise on the first bad record or duplicate id."""
    return collect_records(iter_preference_manifest(path), path, "preference manifest")


def write_preference_manifest(path: str | Path, records: Iterable[PreferenceRecord]) -> Path:
    """Write records as JSONL with paths relative to the file's folder (atomically: temp file + rename)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise ValueError(f"preference manifest {path} must be a .jsonl file")
    base = path.resolve().parent
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record.to_json(base), separators=(",", ":")) + "\n")
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------------
# Validation (the motion manifest's checks, reused)
# ----------------------------------------------------------------------------------------------------


def validate_preference_record(record: PreferenceRecord, options: ValidateOptions = ValidateOptions()) -> RecordReport:
    """Files exist and decode; frame counts, sizes and fps agree; reference, masks and hand boxes fit."""
    report = RecordReport(record.id)
    videos = {}
    for name, path in record.video_fields().items():
        info = _check_video(path, name, report, options, keep=name == "driving_mask")
        if info is not None:
            videos[name] = info
    main = videos.get("preferred")
    if main is not None:
        for name, info in videos.items():
            if name == "preferred":
                continue
            if info.frames != main.frames:
                report.add(
                    name, f"has {info.frames} frames but preferred has {main.frames}; every video of a pair needs the same count"
                )
            if info.size != main.size:
                h, w = info.size
                report.add(name, f"is {h}x{w} but preferred is {main.size[0]}x{main.size[1]}; videos of a pair need one size")
        for name in ("preferred", "dispreferred", "driving"):
            info = videos.get(name)
            if info is not None and info.fps > 0 and abs(info.fps - record.fps) > options.fps_tolerance * record.fps:
                report.add(name, f"container says {info.fps:g} fps but the record says fps={record.fps:g}")
        for meta_field, actual in (("frames", main.frames), ("height", main.size[0]), ("width", main.size[1])):
            declared = getattr(record, meta_field)
            if declared is not None and declared != actual:
                report.add(meta_field, f"record says {declared} but the preferred video has {actual}")
        available = resampled_length(main.frames, record.fps, TRAIN_FPS)
        if options.buckets:
            if assign_bucket(main.frames, record.fps, *main.size, options.buckets) is None:
                shortest = min(b.frames for b in options.buckets)
                report.add("preferred", f"too short: {available} frames at 16 fps; the shortest bucket needs {shortest}")
        elif available < options.min_frames:
            report.add("preferred", f"too short: {available} frames at 16 fps; need at least {options.min_frames}")
        for name in _HAND_FIELDS:
            track = getattr(record, name)
            if len(track) != main.frames:
                report.add(name, f"has boxes for {len(track)} frames but the videos have {main.frames}")
            h, w = main.size
            for i, frame in enumerate(track):
                bad = [b for b in frame if b[0] < -1 or b[1] < -1 or b[2] > w + 1 or b[3] > h + 1]
                if bad:
                    report.add(name, f"frame {i} box {list(bad[0])} lies outside the {h}x{w} video")
                    break
    mask = videos.get("driving_mask")
    if mask is not None and mask.sample is not None:
        _check_palette(mask.sample, "driving_mask", report, options)
        white = _white_fraction(mask.sample)
        if record.mode == "animation" and white > options.palette_tolerance:
            report.add("driving_mask", f"{white:.0%} white pixels in animation mode; the background must be black")
        if record.mode == "replacement" and white == 0:
            report.add("driving_mask", "no white pixels in replacement mode; the background must be white")

    ref_size = None
    if isinstance(record.reference, int):
        if main is not None and record.reference >= main.frames:
            report.add("reference", f"frame {record.reference} is past the end of the {main.frames}-frame preferred video")
        ref_size = main.size if main is not None else None
    else:
        try:
            ref_size = read_image(record.reference).shape[:2]
        except VideoDecodeError as exc:
            report.add("reference", f"{exc.reason}: {exc.detail}")
    if record.reference_mask is not None:
        try:
            ref_mask = read_image(record.reference_mask)
            if ref_size is not None and tuple(ref_mask.shape[:2]) != tuple(ref_size):
                h, w = ref_mask.shape[:2]
                report.add("reference_mask", f"is {h}x{w} but the reference is {ref_size[0]}x{ref_size[1]}")
            _check_palette(ref_mask[None], "reference_mask", report, options)
            _check_reference_background(ref_mask[None], record.mode, report, options)
        except VideoDecodeError as exc:
            report.add("reference_mask", f"{exc.reason}: {exc.detail}")
    return report


def validate_preference_manifest(path: str | Path, options: ValidateOptions = ValidateOptions()) -> Iterator[RecordReport]:
    """A report per record, in manifest order (parse errors and duplicate ids included)."""
    seen: dict[str, int] = {}
    for line, item in iter_preference_manifest(path):
        if isinstance(item, ManifestError):
            report = RecordReport(item.record_id or f"<line {line}>", line_number=line)
            report.add(item.field, item.reason)
        elif item.id in seen:
            report = RecordReport(item.id, line_number=line)
            report.add("id", f"duplicate id (first on line {seen[item.id]})")
        else:
            seen[item.id] = line
            report = validate_preference_record(item, options)
            report.line_number = line
        yield report
