"""Reading and writing JSONL records: what every manifest of scail2 shares (motion pairs, preference pairs).

A manifest is one JSON object per line; paths in it are relative to its folder. Parsing is strict and the same
for every record type: a record type's ``parse(raw, base, line)`` reads its fields through `RecordFields`, which
raises `ManifestError` naming the line, the record id and the field for an unknown key, a missing required key
or a wrong type. Every record type is a `ManifestRecord` (the size fields and ``meta``, JSON writing).
`iter_jsonl` -> `parse_rows` -> `collect_records` read a file (bad lines are yielded, not
raised, so a validator can list them all); `write_jsonl` writes one atomically.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

from scail2.conditioning.condition import MODES

BoxTrack = list[list[tuple[float, float, float, float]]]  # per frame: list of (x0, y0, x1, y1) in pixels
# The size fields of every record type (`ManifestRecord`): its main video's frame count and size.
SIZE_FIELDS = ("frames", "height", "width")


class ManifestError(ValueError):
    """A record that cannot be parsed; ``str()`` names the line, the record id and the field."""

    def __init__(self, record_id: str | None, field_name: str, reason: str, line: int | None = None):
        self.record_id = record_id
        self.field = field_name
        self.reason = reason
        self.line = line
        where = f"line {line}: " if line is not None else ""
        super().__init__(f"{where}{record_id or '<no id>'}: {field_name}: {reason}")


def type_name(value: Any) -> str:
    """The JSON-ish name of a value's type, for error messages (``null`` for None)."""
    return "null" if value is None else type(value).__name__


def relative_path(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` in POSIX form, or the absolute path when it is not below ``base``."""
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


class RecordFields:
    """The fields of one raw JSON record while it is parsed.

    The constructor checks that ``raw`` is an object with only ``known`` keys and every ``required`` one; each
    method then checks some fields and stores them, converted, in ``values`` (the keyword arguments of the
    record's dataclass). Any failure raises `ManifestError` naming the line, the record id and the field.
    """

    def __init__(self, raw: Any, base: Path, line: int | None, known: Collection[str], required: Sequence[str]):
        record_id = raw.get("id") if isinstance(raw, dict) else None
        self.record_id = record_id if isinstance(record_id, str) else None
        self.base = base
        self.line = line
        self.required = tuple(required)
        self.values: dict[str, Any] = {}
        if not isinstance(raw, dict):
            self.fail("<record>", f"expected a JSON object, got {type_name(raw)}")
        unknown = sorted(set(raw) - set(known))
        if unknown:
            self.fail(unknown[0], f"unknown key; known keys are {sorted(known)} (put free-form data under 'meta')")
        missing = [k for k in self.required if k not in raw]
        if missing:
            self.fail(missing[0], "required key is missing")
        self.raw: dict[str, Any] = raw

    def fail(self, name: str, reason: str) -> NoReturn:
        raise ManifestError(self.record_id, name, reason, self.line)

    def given(self, name: str) -> bool:
        """Whether the record has a value for ``name`` (an optional field set to null is not given)."""
        return name in self.raw and not (self.raw[name] is None and name not in self.required)

    def strings(self, names: Iterable[str]) -> None:
        """String fields; ``id``, when among them, must not be empty."""
        for name in names:
            if name in self.raw:
                if not isinstance(self.raw[name], str):
                    self.fail(name, f"expected a string, got {type_name(self.raw[name])} {self.raw[name]!r}")
                self.values[name] = self.raw[name]
        if "id" in self.values and not self.values["id"]:
            self.fail("id", "empty id")

    def mode(self) -> None:
        mode = self.raw["mode"]
        if mode not in MODES:
            self.fail("mode", f"{mode!r} is not a mode; use one of {MODES}")
        self.values["mode"] = mode

    def fps(self, limits: tuple[float, float] | None = None) -> None:
        """A positive frame rate, within ``limits`` (inclusive) when given."""
        fps = self.raw["fps"]
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
            self.fail("fps", f"expected a positive number, got {type_name(fps)} {fps!r}")
        if limits is not None and not limits[0] <= fps <= limits[1]:
            self.fail("fps", f"{fps!r} is not a video frame rate; give the video's rate, between {limits[0]:g} and {limits[1]:g}")
        self.values["fps"] = float(fps)

    def paths(self, names: Iterable[str]) -> None:
        """Path fields, resolved against the manifest's folder."""
        for name in names:
            if not self.given(name):
                continue
            if not isinstance(self.raw[name], str) or not self.raw[name]:
                self.fail(name, f"expected a non-empty path string, got {type_name(self.raw[name])} {self.raw[name]!r}")
            self.values[name] = (self.base / self.raw[name]).resolve()

    def reference(self, video: str) -> None:
        """``reference``: a frame index into the field ``video`` (an int), or an image path."""
        ref = self.raw["reference"]
        if isinstance(ref, bool) or not isinstance(ref, (int, str)) or ref == "":
            self.fail("reference", f"expected a frame index into {video!r} (int) or an image path (string), got {type_name(ref)} {ref!r}")
        if isinstance(ref, int) and ref < 0:
            self.fail("reference", f"frame index {ref} is negative; use 0 <= index < frames of {video!r}")
        self.values["reference"] = ref if isinstance(ref, int) else (self.base / ref).resolve()

    def booleans(self, names: Iterable[str]) -> None:
        for name in names:
            if name in self.raw:
                if not isinstance(self.raw[name], bool):
                    self.fail(name, f"expected true or false, got {type_name(self.raw[name])} {self.raw[name]!r}")
                self.values[name] = self.raw[name]

    def positive_ints(self, names: Iterable[str]) -> None:
        for name in names:
            if name in self.raw and self.raw[name] is not None:
                v = self.raw[name]
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    self.fail(name, f"expected a positive integer, got {type_name(v)} {v!r}")
                self.values[name] = v

    def box_track(self, name: str, raw: Any) -> BoxTrack:
        """A per-frame list of [x0, y0, x1, y1] pixel boxes (x1 > x0, y1 > y0)."""
        if not isinstance(raw, list):
            self.fail(name, f"expected a per-frame list of [x0, y0, x1, y1] boxes, got {type_name(raw)}")
        track: BoxTrack = []
        for i, frame in enumerate(raw):
            if not isinstance(frame, list):
                self.fail(name, f"frame {i}: expected a list of boxes, got {type_name(frame)}")
            boxes = []
            for j, box in enumerate(frame):
                ok = isinstance(box, list) and len(box) == 4
                ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
                if not ok:
                    self.fail(name, f"frame {i} box {j}: expected [x0, y0, x1, y1] numbers, got {box!r}")
                x0, y0, x1, y1 = (float(v) for v in box)
                if not (x1 > x0 and y1 > y0):
                    self.fail(name, f"frame {i} box {j}: {box!r} is empty; need x1 > x0 and y1 > y0")
                boxes.append((x0, y0, x1, y1))
            track.append(boxes)
        return track

    def shared(self) -> None:
        """The fields of `ManifestRecord`: ``frames`` / ``height`` / ``width`` (positive integers) and ``meta``."""
        self.positive_ints(SIZE_FIELDS)
        self.meta()

    def meta(self) -> None:
        """``meta``: free-form data, a JSON object."""
        if "meta" in self.raw:
            if not isinstance(self.raw["meta"], dict):
                self.fail("meta", f"expected a JSON object, got {type_name(self.raw['meta'])}")
            self.values["meta"] = self.raw["meta"]

    def together(self, a: str, b: str, why: str) -> None:
        """``a`` and ``b`` (already read) are both given or both absent."""
        if (a in self.values) != (b in self.values):
            given, other = (a, b) if a in self.values else (b, a)
            self.fail(other, f"missing while {given} is given; {why}")


@dataclass(frozen=True, kw_only=True)
class ManifestRecord:
    """What every record type shares. Its own fields come first, these after them (keyword-only):

    frames / height / width: the frame count and size of the record's main video (the one that decides its
    bucket: a motion pair's target, a preference pair's preferred video); optional, read from the file when
    absent (`scail2.data.sample.video_meta`). meta: free-form data (a JSON object).
    """

    frames: int | None = None
    height: int | None = None
    width: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def json_value(self, name: str, value: Any, base: Path) -> Any:
        """The JSON form of field ``name``'s ``value`` (not None, not a path); record types override it for
        their own value types."""
        return value

    def to_json(self, base: Path) -> dict[str, Any]:
        """The JSON object of this record with paths relative to ``base`` (the manifest's folder): fields that
        are None (and an empty ``meta``) left out, the record type's own fields first."""
        shared = {f.name for f in fields(ManifestRecord)}
        ordered = sorted(fields(self), key=lambda f: f.name in shared)  # stable: declaration order otherwise
        out: dict[str, Any] = {}
        for f in ordered:
            value = getattr(self, f.name)
            if value is None or (f.name == "meta" and not value):
                continue
            out[f.name] = relative_path(value, base) if isinstance(value, Path) else self.json_value(f.name, value, base)
        return out


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line, parsed JSON or ManifestError)`` for every non-blank line; a bad line does not stop the others."""
    with open(path, encoding="utf-8") as fh:
        for number, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, ManifestError(None, "<json>", f"not valid JSON ({exc.msg} at column {exc.colno})", number)


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


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write one compact JSON object per line, atomically (a temporary file renamed over ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, separators=(",", ":")) + "\n")
    tmp.replace(path)
    return path
