"""The training-pair manifest: one JSON object per line (JSONL), optionally Parquet.

A record describes one motion pair in *reverse-driving* orientation: ``driving`` is the synthetic video
(or a rendered pose video) that carries the motion, ``target`` is the real video the model learns to
produce. Paths are relative to the manifest's folder (absolute paths are accepted too). The full field
reference is in ``docs/data.md``; `MotionRecord` is its typed form.

Parsing is strict: unknown keys, missing required keys and wrong types raise `ManifestError`, which names
the line, the record id and the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from scail2.data.batch import MODES

# Sources of the paper's data mix (SPEC §6); any other name is accepted as a user-defined source.
BUILTIN_SOURCES: tuple[str, ...] = (
    "scail_animation",
    "wananimate_animation",
    "mocha_replacement_single",
    "mocha_replacement_multi",
    "pose",
)

# Pair counts of MotionPair-60K per source (paper Tab. 4) and the pose-extraction pool; used in the docs
# and as a reference when choosing per-source weights.
PAPER_PAIR_COUNTS: Mapping[str, int] = {
    "scail_animation": 31_895,
    "wananimate_animation": 13_847,
    "mocha_replacement_single": 9_249,
    "mocha_replacement_multi": 4_385,
    "pose": 100_000,
}

# Frame rates a record may declare (frames per second); outside this a value is a typo or corrupt (1e-320).
FPS_RANGE: tuple[float, float] = (1.0, 1000.0)

# The three sampling classes of the training mix (paper App. A: 60 / 20 / 20).
SOURCE_CLASSES: tuple[str, ...] = ("animation", "replacement", "pose")

BoxTrack = list[list[tuple[float, float, float, float]]]  # per frame: list of (x0, y0, x1, y1) in pixels


class ManifestError(ValueError):
    """A record that cannot be parsed; ``str()`` names the line, the record id and the field."""

    def __init__(self, record_id: str | None, field_name: str, reason: str, line: int | None = None):
        self.record_id = record_id
        self.field = field_name
        self.reason = reason
        self.line = line
        where = f"line {line}: " if line is not None else ""
        super().__init__(f"{where}{record_id or '<no id>'}: {field_name}: {reason}")


@dataclass(frozen=True)
class Regions:
    """Hand / face / OCR regions of the target video: per-frame boxes or a binary mask video (not both).

    boxes: one list per target frame of (x0, y0, x1, y1) boxes in target pixels (x1, y1 exclusive).
    video: a mask video (white = inside), same frame count and size as the target.
    """

    boxes: BoxTrack | None = None
    video: Path | None = None

    def to_json(self, base: Path) -> Any:
        if self.video is not None:
            return _relative(self.video, base)
        return [[list(b) for b in frame] for frame in self.boxes or []]


@dataclass(frozen=True)
class MotionRecord:
    """One training pair. Paths are absolute after parsing (resolved against the manifest's folder).

    reference: an ``int`` is a frame index into the target video (the reference frame is that frame and
    ``reference_mask`` is its mask); a ``Path`` is a separate reference image.
    target_mask: colour-coded mask video of the target (optional). With it the dataset may sample the
    reference frame anywhere in the target and may run the pair forward (synthetic video as the target).
    frames / height / width: the target's frame count and size (optional; read from the file when absent).
    """

    id: str
    source: str
    mode: str
    driving: Path
    target: Path
    reference: int | Path
    driving_mask: Path
    reference_mask: Path
    fps: float
    caption: str = ""
    end_to_end: bool = True
    history_allowed: bool = True
    hands: Regions | None = None
    faces: Regions | None = None
    ocr: Regions | None = None
    driving_aug: Path | None = None
    driving_mask_aug: Path | None = None
    target_mask: Path | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def source_class(self) -> str:
        """The sampling class: 'pose' for rendered-pose driving, else the mode ('animation' | 'replacement')."""
        return "pose" if not self.end_to_end else self.mode

    @property
    def has_aug(self) -> bool:
        return self.driving_aug is not None

    def video_fields(self) -> dict[str, Path]:
        """Every video path of the record by field name (regions given as videos included)."""
        out = {"driving": self.driving, "target": self.target, "driving_mask": self.driving_mask}
        for name in ("driving_aug", "driving_mask_aug", "target_mask"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        for name in ("hands", "faces", "ocr"):
            region = getattr(self, name)
            if region is not None and region.video is not None:
                out[name] = region.video
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
            elif isinstance(value, Regions):
                value = value.to_json(base)
            out[f.name] = value
        return out


# ----------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------

_REQUIRED = ("id", "source", "mode", "driving", "target", "reference", "driving_mask", "reference_mask", "fps")
_PATH_FIELDS = ("driving", "target", "driving_mask", "reference_mask", "driving_aug", "driving_mask_aug", "target_mask")
_BOOL_FIELDS = ("end_to_end", "history_allowed")
_INT_FIELDS = ("frames", "height", "width")
_REGION_FIELDS = ("hands", "faces", "ocr")
_KNOWN = {f.name for f in fields(MotionRecord)}
# Parquet columns holding JSON text because their values mix types.
_JSON_COLUMNS = ("reference", "hands", "faces", "ocr", "meta")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


def _parse_regions(raw: Any, name: str, base: Path, fail) -> Regions:
    if isinstance(raw, str):
        if not raw:
            fail(name, "empty path; give a mask video path or a per-frame list of boxes")
        return Regions(video=(base / raw).resolve())
    if not isinstance(raw, list):
        fail(name, f"expected a mask video path or a per-frame list of [x0, y0, x1, y1] boxes, got {_type_name(raw)}")
    track: BoxTrack = []
    for i, frame in enumerate(raw):
        if not isinstance(frame, list):
            fail(name, f"frame {i}: expected a list of boxes, got {_type_name(frame)}")
        boxes = []
        for j, box in enumerate(frame):
            ok = isinstance(box, list) and len(box) == 4
            ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
            if not ok:
                fail(name, f"frame {i} box {j}: expected [x0, y0, x1, y1] numbers, got {box!r}")
            x0, y0, x1, y1 = (float(v) for v in box)
            if not (x1 > x0 and y1 > y0):
                fail(name, f"frame {i} box {j}: {box!r} is empty; need x1 > x0 and y1 > y0")
            boxes.append((x0, y0, x1, y1))
        track.append(boxes)
    return Regions(boxes=track)


def parse_record(raw: Any, base: Path, line: int | None = None) -> MotionRecord:
    """Parse one manifest object; paths are resolved against ``base``. Raises `ManifestError`."""
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
    if not values["source"]:
        fail("source", "empty source name")
    mode = raw["mode"]
    if mode not in MODES:
        fail("mode", f"{mode!r} is not a mode; use one of {MODES}")
    values["mode"] = mode
    for name in _PATH_FIELDS:
        if name not in raw or (raw[name] is None and name not in _REQUIRED):
            continue
        if not isinstance(raw[name], str) or not raw[name]:
            fail(name, f"expected a non-empty path string, got {_type_name(raw[name])} {raw[name]!r}")
        values[name] = (base / raw[name]).resolve()
    ref = raw["reference"]
    if isinstance(ref, bool) or not isinstance(ref, (int, str)) or ref == "":
        fail("reference", f"expected a target frame index (int) or an image path (string), got {_type_name(ref)} {ref!r}")
    if isinstance(ref, int) and ref < 0:
        fail("reference", f"frame index {ref} is negative; use 0 <= index < target frames")
    values["reference"] = ref if isinstance(ref, int) else (base / ref).resolve()
    fps = raw["fps"]
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        fail("fps", f"expected a positive number, got {_type_name(fps)} {fps!r}")
    if not FPS_RANGE[0] <= fps <= FPS_RANGE[1]:
        fail("fps", f"{fps!r} is not a video frame rate; give the video's rate, between {FPS_RANGE[0]:g} and {FPS_RANGE[1]:g}")
    values["fps"] = float(fps)
    for name in _BOOL_FIELDS:
        if name in raw:
            if not isinstance(raw[name], bool):
                fail(name, f"expected true or false, got {_type_name(raw[name])} {raw[name]!r}")
            values[name] = raw[name]
    for name in _INT_FIELDS:
        if name in raw and raw[name] is not None:
            v = raw[name]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                fail(name, f"expected a positive integer, got {_type_name(v)} {v!r}")
            values[name] = v
    for name in _REGION_FIELDS:
        if name in raw and raw[name] is not None:
            values[name] = _parse_regions(raw[name], name, base, fail)
    if "meta" in raw:
        if not isinstance(raw["meta"], dict):
            fail("meta", f"expected a JSON object, got {_type_name(raw['meta'])}")
        values["meta"] = raw["meta"]
    if ("driving_aug" in values) != ("driving_mask_aug" in values):
        given = "driving_aug" if "driving_aug" in values else "driving_mask_aug"
        other = "driving_mask_aug" if given == "driving_aug" else "driving_aug"
        fail(other, f"missing while {given} is given; the swap replaces the driving video and its mask together")
    return MotionRecord(**values)


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as fh:
        for number, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as exc:
                # Yielded, not raised: the lines after a bad one are still read.
                yield number, ManifestError(None, "<json>", f"not valid JSON ({exc.msg} at column {exc.colno})", number)


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # optional dependency
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow), or convert it to JSONL") from exc
    for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        # Parquet stores absent optional columns as nulls; a null is "not given".
        row = {k: v for k, v in row.items() if v is not None}
        for key in _JSON_COLUMNS:
            if isinstance(row.get(key), str):
                try:
                    row[key] = json.loads(row[key])
                except json.JSONDecodeError as exc:
                    row = ManifestError(None, key, f"Parquet column is not JSON text ({exc.msg})", number)
                    break
        yield number, row


def parse_rows(rows: Iterable[tuple[int, Any]], parse: Callable[[Any, Path, int], Any], base: Path) -> Iterator[tuple[int, Any]]:
    """``(line, record or ManifestError)`` for raw rows (``(line, dict or ManifestError)``) through ``parse``."""
    for number, raw in rows:
        if isinstance(raw, ManifestError):
            yield number, raw
            continue
        try:
            yield number, parse(raw, base, number)
        except ManifestError as exc:
            yield number, exc


def collect_records(items: Iterable[tuple[int, Any]], path: str | Path, what: str = "manifest") -> list[Any]:
    """The records of ``(line, record or ManifestError)`` items; raise on the first bad record or duplicate id."""
    records: list[Any] = []
    seen: dict[str, int] = {}
    for number, item in items:
        if isinstance(item, ManifestError):
            raise item
        if item.id in seen:
            raise ManifestError(item.id, "id", f"duplicate id (first on line {seen[item.id]})", number)
        seen[item.id] = number
        records.append(item)
    if not records:
        raise ValueError(f"{what} {path} has no records")
    return records


def iter_manifest(path: str | Path) -> Iterator[tuple[int, MotionRecord | ManifestError]]:
    """Yield ``(line, record or ManifestError)`` for every record; never raises on a bad record."""
    path = Path(path)
    rows = _iter_parquet(path) if path.suffix == ".parquet" else _iter_jsonl(path)
    return parse_rows(rows, parse_record, path.resolve().parent)


def load_manifest(path: str | Path) -> list[MotionRecord]:
    """Parse a manifest (``.jsonl``, or ``.parquet`` with pyarrow); raise on the first bad record or duplicate id."""
    return collect_records(iter_manifest(path), path)


def write_manifest(path: str | Path, records: Iterable[MotionRecord]) -> Path:
    """Write records as JSONL (or Parquet for a ``.parquet`` path) with paths relative to its folder."""
    path = Path(path)
    base = path.resolve().parent
    rows = [r.to_json(base) for r in records]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ImportError(f"writing {path} needs pyarrow (pip install pyarrow); write .jsonl instead") from exc
        # Mixed-type columns (reference: int or path; regions: path or boxes) are stored as JSON text.
        for row in rows:
            for key in _JSON_COLUMNS:
                if key in row:
                    row[key] = json.dumps(row[key])
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, separators=(",", ":")) + "\n")
    tmp.replace(path)
    return path


def group_by_source(records: Sequence[MotionRecord]) -> dict[str, list[int]]:
    """Record indices by source name, in manifest order."""
    out: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        out.setdefault(r.source, []).append(i)
    return out
