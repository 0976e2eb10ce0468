"""Good/Same/Bad (GSB) human studies: blinded side-by-side export and the aggregation of returned sheets.

Export (`export_gsb`): for every case with a baseline video, one mp4 with our video and the baseline's side by
side, the sides drawn at random (seeded); the pairs are numbered in a shuffled order so the case order leaks
nothing. Raters get ``for_raters/`` (the videos, ``sheet.csv``, ``README.txt``); the key that says which side
is ours (``key.json``) stays with the experimenter. The same export also writes the browser study
(``study/``: per pair the reference image, the driving video and the two results as separate videos, for
``scail2-bench study serve``; see `scail2.bench.study`).

Sheet: one row per pair; the columns are the paper's study metrics (App. C). Motion Accuracy and Identity
Consistency apply to every pair; Physical Plausibility to single-character animation, Identity Isolation to
multi-character cases, Environment Integration to replacement. Cells that do not apply hold ``n/a``. A rater
writes ``L`` (left better), ``R`` (right better) or ``S`` (about the same) in every other cell.

Aggregation (`aggregate_gsb`): every filled cell of every returned sheet is one vote; with the key, L/R become
G (ours better) or B (baseline better). Rates are over the filled cells of a column; blank cells are counted
as unrated. The GSB score of a column is (G - B) / (G + S + B).
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from scail2.bench.cases import Case

MOTION_ACCURACY = "Motion Accuracy"
IDENTITY_CONSISTENCY = "Identity Consistency"
PHYSICAL_PLAUSIBILITY = "Physical Plausibility"
IDENTITY_ISOLATION = "Identity Isolation"
ENVIRONMENT_INTEGRATION = "Environment Integration"
GSB_COLUMNS: tuple[str, ...] = (
    MOTION_ACCURACY,
    IDENTITY_CONSISTENCY,
    PHYSICAL_PLAUSIBILITY,
    IDENTITY_ISOLATION,
    ENVIRONMENT_INTEGRATION,
)
NOT_APPLICABLE = "n/a"
# What a rater may write (case-insensitive) and what it means before un-blinding.
ANSWERS: dict[str, str] = {
    "l": "left", "left": "left", "r": "right", "right": "right", "s": "same", "same": "same", "=": "same",
}  # fmt: skip
KEY_VERSION = 1

# What each column asks (paper App. C); the raters' README and the browser study show these texts.
COLUMN_HELP: dict[str, str] = {
    MOTION_ACCURACY: "how faithfully the motion follows the driving motion, frame by frame.",
    IDENTITY_CONSISTENCY: "how well the character keeps the reference image's appearance.",
    PHYSICAL_PLAUSIBILITY: "gravity, support, momentum; no hovering, morphing objects or objects passing through "
    "the body.",
    IDENTITY_ISOLATION: "no limbs merging into another character, clothing kept apart.",
    ENVIRONMENT_INTEGRATION: "the new character fits the scene; background and interactions kept.",
}
_COLUMN_SCOPE = {PHYSICAL_PLAUSIBILITY: " (single character)", IDENTITY_ISOLATION: " (several characters)",
                 ENVIRONMENT_INTEGRATION: " (replacement)"}  # fmt: skip

RATER_README = (
    """\
Good/Same/Bad study: {count} pairs.

Each video in pairs/ shows two results of the same task side by side (LEFT and RIGHT). The sides are in random
order. For each pair, fill one row of sheet.csv: in every column that does not say n/a, write

    L  if the LEFT video is better,
    R  if the RIGHT video is better,
    S  if they are about the same.

Columns:
"""
    + "".join(f"- {c}{_COLUMN_SCOPE.get(c, '')}: {COLUMN_HELP[c]}\n" for c in GSB_COLUMNS)
    + "Leave the comment column free for remarks. Return the filled sheet.csv.\n"
)


class GSBSheetError(ValueError):
    """A returned sheet that cannot be read; the message names the file, the row, the column and the fix."""


def applicable_columns(case: Case) -> tuple[str, ...]:
    """The study columns that apply to a case (paper App. C)."""
    columns = [MOTION_ACCURACY, IDENTITY_CONSISTENCY]
    if case.mode == "animation" and case.characters == 1:
        columns.append(PHYSICAL_PLAUSIBILITY)
    if case.characters > 1:
        columns.append(IDENTITY_ISOLATION)
    if case.mode == "replacement":
        columns.append(ENVIRONMENT_INTEGRATION)
    return tuple(columns)


# ------------------------------------------------------------------------------------------------- export


@dataclass(frozen=True)
class GSBPair:
    pair: str  # P001, ... (shuffled order)
    case_id: str
    kind: str
    left: str  # "ours" or "baseline"
    columns: tuple[str, ...]


@dataclass
class GSBExport:
    folder: Path
    sheet: Path
    key: Path
    pairs: list[GSBPair]
    missing_baseline: list[str] = field(default_factory=list)  # case ids without a baseline video
    study: Path | None = None  # study/study.json, the browser study's manifest (None with study=False)


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int) -> np.ndarray:
    """Two uint8 (F, H, W, 3) videos of one size -> (F, H', 2W + gap, 3), padded to even sizes for H.264."""
    f, h, w, _ = left.shape
    out_h, out_w = h + h % 2, 2 * w + gap
    out_w += out_w % 2
    frames = np.zeros((f, out_h, out_w, 3), dtype=np.uint8)
    frames[:, :h, :w] = left
    frames[:, :h, w + gap : 2 * w + gap] = right
    return frames


def export_gsb(
    pairs: Sequence[tuple[Case, Path]],
    baseline_dir: str | Path,
    out_dir: str | Path,
    *,
    ours_name: str = "ours",
    baseline_name: str = "baseline",
    seed: int = 0,
    gap: int = 8,
    study: bool = True,
) -> GSBExport:
    """Write the blinded study for ``pairs`` of (case, our video) against ``baseline_dir/<case id>.<ext>``.

    The baseline video is resized to cover our size and centre-cropped, and both are cut to the shorter length.
    ``study`` also writes the browser study under ``out_dir/study`` (`scail2.bench.study.write_study_pair`).
    """
    from scail2.bench.cases import find_video
    from scail2.bench.scoring import align_to, read_frames
    from scail2.data.video import write_video

    baseline_dir = Path(baseline_dir).expanduser()
    if not baseline_dir.is_dir():
        raise FileNotFoundError(f"gsb.baseline_dir {baseline_dir} is not a folder; put one video per case id there")
    if gap < 0:
        raise ValueError(f"gsb.gap is {gap}; use 0 or more pixels")
    available = []
    missing = []
    for case, ours in pairs:
        baseline = find_video(baseline_dir, case.file_stem)
        if baseline is None:
            missing.append(case.id)
        else:
            available.append((case, ours, baseline))
    if not available:
        raise FileNotFoundError(
            f"no baseline video in {baseline_dir} matches a case id (expected e.g. {pairs[0][0].file_stem}.mp4); "
            "name the baseline's videos after the case ids"
        )
    rng = random.Random(seed)
    rng.shuffle(available)
    out = Path(out_dir)
    raters = out / "for_raters"
    (raters / "pairs").mkdir(parents=True, exist_ok=True)
    exported = []
    entries = []
    width = max(3, len(str(len(available))))
    for index, (case, ours, baseline) in enumerate(available, start=1):
        pair_id = f"P{index:0{width}d}"
        ours_frames, fps = read_frames(ours)
        base_frames, _ = read_frames(baseline, max_frames=len(ours_frames))
        n = min(len(ours_frames), len(base_frames))
        ours_frames = ours_frames[:n]
        base_frames = align_to(base_frames[:n], *ours_frames.shape[1:3])
        left = "ours" if rng.random() < 0.5 else "baseline"
        sides = (ours_frames, base_frames) if left == "ours" else (base_frames, ours_frames)
        write_video(raters / "pairs" / f"{pair_id}.mp4", side_by_side(*sides, gap=gap), fps)
        exported.append(GSBPair(pair_id, case.id, case.kind, left, applicable_columns(case)))
        if study:
            from scail2.bench.study import write_study_pair

            entries.append(write_study_pair(out / "study", pair_id, case, *sides, fps))

    sheet = raters / "sheet.csv"
    with sheet.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["pair", "video", *GSB_COLUMNS, "comment"])
        for p in exported:
            cells = ["" if c in p.columns else NOT_APPLICABLE for c in GSB_COLUMNS]
            writer.writerow([p.pair, f"pairs/{p.pair}.mp4", *cells, ""])
    (raters / "README.txt").write_text(RATER_README.format(count=len(exported)), encoding="utf-8")
    key = out / "key.json"
    record = {
        "version": KEY_VERSION,
        "ours": ours_name,
        "baseline": baseline_name,
        "baseline_dir": str(baseline_dir),
        "seed": seed,
        "pairs": [asdict(p) for p in exported],
    }
    key.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    manifest = None
    if study:
        from scail2.bench.study import write_study_manifest

        manifest = write_study_manifest(out / "study", entries)
    return GSBExport(raters, sheet, key, exported, missing, manifest)


# ---------------------------------------------------------------------------------------------- aggregation


@dataclass
class GSBCounts:
    good: int = 0
    same: int = 0
    bad: int = 0
    unrated: int = 0

    @property
    def rated(self) -> int:
        return self.good + self.same + self.bad

    def rates(self) -> dict[str, float]:
        """G / S / B as fractions of the rated cells (nan when none is rated)."""
        n = self.rated
        nan = float("nan")
        return {"G": self.good / n if n else nan, "S": self.same / n if n else nan, "B": self.bad / n if n else nan}

    @property
    def score(self) -> float:
        """(G - B) / (G + S + B): +1 = ours always better, -1 = baseline always better."""
        return (self.good - self.bad) / self.rated if self.rated else float("nan")


@dataclass
class GSBSummary:
    ours: str
    baseline: str
    sheets: list[str]
    columns: dict[str, GSBCounts]  # over every pair
    by_kind: dict[str, dict[str, GSBCounts]]  # kind -> column -> counts

    def to_json(self) -> dict:
        def block(counts: dict[str, GSBCounts]) -> dict:
            return {
                c: {**asdict(v), "rated": v.rated, "rates": v.rates(), "score": v.score} for c, v in counts.items()
            }

        return {
            "ours": self.ours,
            "baseline": self.baseline,
            "sheets": self.sheets,
            "columns": block(self.columns),
            "by_kind": {k: block(v) for k, v in self.by_kind.items()},
        }


def load_key(path: str | Path) -> dict:
    path = Path(path)
    try:
        key = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GSBSheetError(f"cannot read the GSB key {path}: {exc}; pass the key.json written by the export") from exc
    if key.get("version") != KEY_VERSION or "pairs" not in key:
        raise GSBSheetError(f"{path} is not a GSB key (version {KEY_VERSION} with 'pairs'); pass the export's key.json")
    return key


def aggregate_gsb(key_path: str | Path, sheets: Sequence[str | Path]) -> GSBSummary:
    """Un-blind returned sheets with the key and count G / S / B per column (and per case kind)."""
    if not sheets:
        raise ValueError("no sheets given; pass the returned sheet.csv files")
    key = load_key(key_path)
    pairs = {p["pair"]: p for p in key["pairs"]}
    columns = {c: GSBCounts() for c in GSB_COLUMNS}
    by_kind: dict[str, dict[str, GSBCounts]] = {}
    for sheet in sheets:
        seen: set[str] = set()
        for line, row in _read_sheet(Path(sheet)):
            pair_id = (row.get("pair") or "").strip()
            if pair_id not in pairs:
                raise GSBSheetError(
                    f"{sheet} line {line}: pair {pair_id!r} is not in the key {key_path}; was the sheet exported "
                    "with another key?"
                )
            if pair_id in seen:
                raise GSBSheetError(f"{sheet} line {line}: pair {pair_id} appears twice; keep one row per pair")
            seen.add(pair_id)
            pair = pairs[pair_id]
            kind = by_kind.setdefault(pair["kind"], {})
            for column in GSB_COLUMNS:
                cell = (row.get(column) or "").strip().lower()
                applies = column in pair["columns"]
                if not applies:
                    if cell not in ("", NOT_APPLICABLE):
                        raise GSBSheetError(
                            f"{sheet} line {line} ({pair_id}), column {column!r}: {row[column]!r} was given but the "
                            f"column does not apply to a {pair['kind']} case; leave it {NOT_APPLICABLE}"
                        )
                    continue
                counts = kind.setdefault(column, GSBCounts())
                if cell in ("", NOT_APPLICABLE):
                    columns[column].unrated += 1
                    counts.unrated += 1
                    continue
                if cell not in ANSWERS:
                    raise GSBSheetError(
                        f"{sheet} line {line} ({pair_id}), column {column!r}: {row[column]!r} is not an answer; write "
                        "L (left better), R (right better) or S (about the same)"
                    )
                outcome = unblind(ANSWERS[cell], pair["left"])
                for target in (columns[column], counts):
                    setattr(target, outcome, getattr(target, outcome) + 1)
        # Pairs a sheet left out count as unrated in every column that applies to them.
        for pair_id in pairs.keys() - seen:
            pair = pairs[pair_id]
            kind = by_kind.setdefault(pair["kind"], {})
            for column in pair["columns"]:
                columns[column].unrated += 1
                kind.setdefault(column, GSBCounts()).unrated += 1
    applicable = {c for p in pairs.values() for c in p["columns"]}
    return GSBSummary(
        ours=key.get("ours", "ours"),
        baseline=key.get("baseline", "baseline"),
        sheets=[str(s) for s in sheets],
        columns={c: v for c, v in columns.items() if c in applicable},
        by_kind=by_kind,
    )


def unblind(answer: str, left: str) -> str:
    """'left' / 'right' / 'same' with ``left`` (who is on the left: 'ours' or 'baseline') -> 'good' (ours
    better) / 'same' / 'bad'."""
    if answer == "same":
        return "same"
    winner = left if answer == "left" else ("baseline" if left == "ours" else "ours")
    return "good" if winner == "ours" else "bad"


def _read_sheet(path: Path):
    try:
        handle = path.open(newline="", encoding="utf-8-sig")  # spreadsheet exports often add a BOM
    except OSError as exc:
        raise GSBSheetError(f"cannot read sheet {path}: {exc}") from exc
    with handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in ("pair", *GSB_COLUMNS) if c not in header]
        if missing:
            raise GSBSheetError(
                f"sheet {path} lacks the column(s) {missing}; return the exported sheet.csv with its header"
            )
        for line, row in enumerate(reader, start=2):
            if any((v or "").strip() for v in row.values()):
                yield line, row


# ------------------------------------------------------------------------------------------------- outputs


def write_gsb_results(summary: GSBSummary, out_dir: str | Path) -> dict[str, Path]:
    """gsb_results.json / .csv / .md and gsb_rates.png under ``out_dir``."""
    from scail2.bench.report import gsb_bar_chart

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "gsb_results.json", "csv": out / "gsb_results.csv", "md": out / "gsb_results.md"}
    files["json"].write_text(json.dumps(summary.to_json(), indent=1) + "\n", encoding="utf-8")
    with files["csv"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["kind", "column", "G", "S", "B", "unrated", "G_rate", "S_rate", "B_rate", "score"])
        groups = [("all", summary.columns)] + sorted(summary.by_kind.items())
        for kind, counts in groups:
            for column, c in counts.items():
                r = c.rates()
                writer.writerow([kind, column, c.good, c.same, c.bad, c.unrated, r["G"], r["S"], r["B"], c.score])
    lines = [
        f"# GSB study: {summary.ours} vs {summary.baseline}",
        "",
        f"{len(summary.sheets)} sheet(s). G = {summary.ours} better, S = same, B = {summary.baseline} better; "
        "rates over rated cells; score = (G - B) / (G + S + B). Protocol: blinded side-by-side GSB "
        "(scail2.bench.gsb).",
        "",
        "| column | G | S | B | rated | unrated | score |",
        "|---|---|---|---|---|---|---|",
    ]
    for column, c in summary.columns.items():
        r = c.rates()
        lines.append(
            f"| {column} | {r['G']:.1%} ({c.good}) | {r['S']:.1%} ({c.same}) | {r['B']:.1%} ({c.bad}) | {c.rated} | "
            f"{c.unrated} | {c.score:+.3f} |"
        )
    files["md"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    files["png"] = gsb_bar_chart(summary, out / "gsb_rates.png")
    return files
