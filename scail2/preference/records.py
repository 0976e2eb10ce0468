"""Preference pairs for Bias-Aware DPO (SPEC §7): the record format and its validation.

A preference manifest is one JSON object per line (JSONL; paths relative to its folder). A record holds the
shared **condition** — a reference frame (an index into the preferred video, or an image) and the driving
video x_a, with optional colour masks and a caption — the **preferred** video x_w, the **dispreferred** video
x_l, the per-frame hand boxes of both, the mode, the fps and the provenance (which estimators and generator
made the pair). The field reference is in ``docs/data.md``; `PreferenceRecord` is its typed form. Parsing is
as strict as the motion manifest's (both read their fields through `scail2.data.records.RecordFields`): unknown
keys, missing keys and wrong types raise `ManifestError` naming the line, the record id and the field.

Checks of the files are in `scail2.preference.validate`; decoding and datasets in `scail2.preference.data`, the
preference cache in `scail2.preference.cache`, the data module in `scail2.preference.datamodule`; the pair builder
(paper Eq. 4-7) is in `scail2.preference.builder`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from scail2.data.records import BoxTrack, ManifestError, ManifestRecord, RecordFields, collect_records, iter_jsonl
from scail2.data.records import parse_rows, type_name, write_jsonl

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
class PreferenceRecord(ManifestRecord):
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
    provenance: Provenance | None = None

    @property
    def has_masks(self) -> bool:
        return self.driving_mask is not None

    def video_fields(self) -> dict[str, Path]:
        """Every video path of the record by field name."""
        out = {"driving": self.driving, "preferred": self.preferred, "dispreferred": self.dispreferred}
        if self.driving_mask is not None:
            out["driving_mask"] = self.driving_mask
        return out

    def json_value(self, name: str, value: Any, base: Path) -> Any:
        if isinstance(value, Provenance):
            return value.to_json()
        if name in HAND_FIELDS:
            return [[list(b) for b in frame] for frame in value]
        return value


_REQUIRED = ("id", "mode", "fps", "driving", "preferred", "dispreferred", "reference", "preferred_hands", "dispreferred_hands")
_PATH_FIELDS = ("driving", "preferred", "dispreferred", "driving_mask", "reference_mask")
HAND_FIELDS = ("preferred_hands", "dispreferred_hands")


_KNOWN = {f.name for f in fields(PreferenceRecord)}
_PROVENANCE_KNOWN = {f.name for f in fields(Provenance)}


def parse_preference_record(raw: Any, base: Path, line: int | None = None) -> PreferenceRecord:
    """Parse one preference object; paths are resolved against ``base``. Raises `ManifestError`."""
    f = RecordFields(raw, base, line, _KNOWN, _REQUIRED)
    f.strings(("id", "source", "caption"))
    if f.values.get("source") == "":
        f.fail("source", f"empty source name; leave it out for the default {DEFAULT_SOURCE!r}")
    f.mode()
    f.fps()
    f.paths(_PATH_FIELDS)
    f.together("driving_mask", "reference_mask", "the condition's masks come together (give both or neither)")
    f.reference("preferred")
    for name in HAND_FIELDS:
        f.values[name] = f.box_track(name, f.raw[name])
    if f.raw.get("provenance") is not None:
        f.values["provenance"] = _parse_provenance(f)
    f.shared()
    return PreferenceRecord(**f.values)


def _parse_provenance(f: RecordFields) -> Provenance:
    prov = f.raw["provenance"]
    if not isinstance(prov, dict):
        f.fail("provenance", f"expected a JSON object, got {type_name(prov)}")
    bad = sorted(set(prov) - _PROVENANCE_KNOWN)
    if bad:
        f.fail(f"provenance.{bad[0]}", f"unknown key; known keys are {sorted(_PROVENANCE_KNOWN)}")
    for key, v in prov.items():
        if not isinstance(v, str):
            f.fail(f"provenance.{key}", f"expected a string, got {type_name(v)} {v!r}")
    return Provenance(**prov)


def iter_preference_manifest(path: str | Path) -> Iterator[tuple[int, PreferenceRecord | ManifestError]]:
    """Yield ``(line, record or ManifestError)`` for every line of a JSONL preference manifest; never raises
    on a bad record."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise ValueError(f"preference manifest {path} must be JSONL (a .jsonl file)")
    return parse_rows(iter_jsonl(path), parse_preference_record, path.resolve().parent)


def load_preference_manifest(path: str | Path) -> list[PreferenceRecord]:
    """Parse a preference manifest; raise on the first bad record or duplicate id."""
    return collect_records(iter_preference_manifest(path), path, "preference manifest")


def write_preference_manifest(path: str | Path, records: Iterable[PreferenceRecord]) -> Path:
    """Write records as JSONL with paths relative to the file's folder (atomically: temp file + rename)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise ValueError(f"preference manifest {path} must be a .jsonl file")
    base = path.resolve().parent
    return write_jsonl(path, (record.to_json(base) for record in records))
