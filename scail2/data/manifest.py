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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from scail2.data.records import BoxTrack, ManifestError, ManifestRecord, RecordFields, collect_records, iter_jsonl
from scail2.data.records import parse_rows, relative_path, type_name, write_jsonl

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

__all__ = [
    "BUILTIN_SOURCES", "FPS_RANGE", "PAPER_PAIR_COUNTS", "SOURCE_CLASSES", "BoxTrack", "ManifestError", "MotionRecord",
    "Regions", "group_by_source", "iter_manifest", "load_manifest", "parse_record", "write_manifest",
]  # fmt: skip


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
            return relative_path(self.video, base)
        return [[list(b) for b in frame] for frame in self.boxes or []]


@dataclass(frozen=True)
class MotionRecord(ManifestRecord):
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

    def json_value(self, name: str, value: Any, base: Path) -> Any:
        return value.to_json(base) if isinstance(value, Regions) else value


# ----------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------

_REQUIRED = ("id", "source", "mode", "driving", "target", "reference", "driving_mask", "reference_mask", "fps")
_PATH_FIELDS = ("driving", "target", "driving_mask", "reference_mask", "driving_aug", "driving_mask_aug", "target_mask")
_BOOL_FIELDS = ("end_to_end", "history_allowed")
_REGION_FIELDS = ("hands", "faces", "ocr")
_KNOWN = {f.name for f in fields(MotionRecord)}
# Parquet columns holding JSON text because their values mix types.
_JSON_COLUMNS = ("reference", "hands", "faces", "ocr", "meta")


def _parse_regions(fields_: RecordFields, name: str) -> Regions:
    raw = fields_.raw[name]
    if isinstance(raw, str):
        if not raw:
            fields_.fail(name, "empty path; give a mask video path or a per-frame list of boxes")
        return Regions(video=(fields_.base / raw).resolve())
    if not isinstance(raw, list):
        fields_.fail(name, f"expected a mask video path or a per-frame list of [x0, y0, x1, y1] boxes, got {type_name(raw)}")
    return Regions(boxes=fields_.box_track(name, raw))


def parse_record(raw: Any, base: Path, line: int | None = None) -> MotionRecord:
    """Parse one manifest object; paths are resolved against ``base``. Raises `ManifestError`."""
    f = RecordFields(raw, base, line, _KNOWN, _REQUIRED)
    f.strings(("id", "source", "caption"))
    if not f.values["source"]:
        f.fail("source", "empty source name")
    f.mode()
    f.paths(_PATH_FIELDS)
    f.reference("target")
    f.fps(FPS_RANGE)
    f.booleans(_BOOL_FIELDS)
    for name in _REGION_FIELDS:
        if f.given(name):
            f.values[name] = _parse_regions(f, name)
    f.shared()
    f.together("driving_aug", "driving_mask_aug", "the swap replaces the driving video and its mask together")
    return MotionRecord(**f.values)


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


def iter_manifest(path: str | Path) -> Iterator[tuple[int, MotionRecord | ManifestError]]:
    """Yield ``(line, record or ManifestError)`` for every record; never raises on a bad record."""
    path = Path(path)
    rows = _iter_parquet(path) if path.suffix == ".parquet" else iter_jsonl(path)
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
    return write_jsonl(path, rows)


def group_by_source(records: Sequence[MotionRecord]) -> dict[str, list[int]]:
    """Record indices by source name, in manifest order."""
    out: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        out.setdefault(r.source, []).append(i)
    return out
