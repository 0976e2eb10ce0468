"""Good/Same/Bad studies in the browser: the study folder, the raters' answers, and their analysis.

The study folder is what `scail2.bench.gsb.export_gsb` writes (``<benchmark run>/gsb``)::

    key.json                 which side of each pair is ours (read by the report only, never by the server)
    for_raters/              the sheet-based study (side-by-side videos, sheet.csv)
    study/study.json         the browser study: per pair its kind, metrics, frame rate, frame count and media
    study/P001/reference.png the reference image
    study/P001/driving.mp4   the driving video, re-timed to the results' frame rate (frame i beside frame i)
    study/P001/a.mp4, b.mp4  the two results: a = the left half of the sheet video, b = the right half
    answers.sqlite           raters (id, token, seed) and every answer given (``scail2-bench study serve``)
    report/                  ``scail2-bench study report``

Blinding: each rater has a seed (recorded in answers.sqlite) that draws the rater's case order and, per case,
whether a or b is shown on the left (`rater_plan`). An answer is stored as the rater saw it (``left`` / ``same``
/ ``right``) with the video that was on the left; the report un-blinds it with key.json (whose ``left`` says
whether a is ours) and checks the stored side against the seed.

Analysis (`analyse_study`): the latest answer of each rater for each (case, metric) is one vote. Per metric:
G / S / B counts and rates, Wilson score intervals for each rate (scipy), the GSB score (G - B) / (G + S + B),
and inter-rater agreement over the cases that at least two raters answered: Krippendorff's alpha for nominal
data (1 = perfect agreement, 0 = chance level) and the raw fraction of agreeing rater pairs. The intervals treat
votes as independent; several raters on one case are correlated, so with many raters per case they are narrower
than a case-level interval would be.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import secrets
import sqlite3
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from scail2.bench.cases import Case
from scail2.bench.gsb import GSB_COLUMNS, GSBCounts, applicable_columns, load_key, unblind

STUDY_DIR = "study"
MANIFEST = "study.json"
ANSWERS_DB = "answers.sqlite"
REPORT_DIR = "report"
MANIFEST_VERSION = 1
DB_SCHEMA_VERSION = 1
REPORT_SCHEMA = "scail2-study/1"
KINDS: tuple[str, ...] = ("single", "multi", "replacement")
KIND_LABELS: dict[str, str] = {
    "single": "single-character animation",
    "multi": "multi-character animation",
    "replacement": "character replacement",
}
# What the page shows per role, and the video (a or b) behind "left" and "right".
ROLES: tuple[str, ...] = ("reference", "driving", "left", "right")
SHOWN_ANSWERS: tuple[str, ...] = ("left", "same", "right")
OUTCOME_LETTER = {"good": "G", "same": "S", "bad": "B"}
_COUNT_FIELD = {"G": "good", "S": "same", "B": "bad"}
_RATER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_PAIR_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class StudyError(ValueError):
    """A study folder, database or request that cannot be used; the message names the value and the fix."""


# --------------------------------------------------------------------------------------------- export side


def write_study_pair(
    root: Path, pair: str, case: Case, a: np.ndarray, b: np.ndarray, fps: float
) -> dict[str, Any]:
    """Write one pair's media under ``root/<pair>/`` and return its manifest entry.

    a, b: uint8 (F, H, W, 3) results of one size (the left and right halves of the sheet video). The driving
    video is cut to the same frames, resized to their height and written at their frame rate, so frame i of every
    video is shown together; when it is shorter, every video of the pair is cut to its length.
    """
    from scail2.bench.scoring import align_to, load_image_source, read_frames
    from scail2.data.video import write_image, write_video

    folder = root / pair
    folder.mkdir(parents=True, exist_ok=True)
    driving, _ = read_frames(case.driving, max_frames=len(a))
    n = min(len(a), len(driving))
    a, b = _even(a[:n]), _even(b[:n])
    # The driving video keeps its aspect at the results' height (even sizes for H.264).
    height = a.shape[1]
    width = max(2, round(driving.shape[2] * height / driving.shape[1] / 2) * 2)
    driving = align_to(driving[:n], height, width)
    write_image(folder / "reference.png", load_image_source(case.reference))
    # faststart: the index first, so the browser starts playing (and seeking) before the whole file arrived.
    write_video(folder / "driving.mp4", driving, fps, faststart=True)
    write_video(folder / "a.mp4", a, fps, faststart=True)
    write_video(folder / "b.mp4", b, fps, faststart=True)
    return {
        "pair": pair,
        "kind": case.kind,
        "columns": list(applicable_columns(case)),
        "fps": float(fps),
        "frames": int(n),
        "width": int(a.shape[2]),
        "height": int(a.shape[1]),
        "media": {
            "reference": f"{pair}/reference.png",
            "driving": f"{pair}/driving.mp4",
            "a": f"{pair}/a.mp4",
            "b": f"{pair}/b.mp4",
        },
    }


def _even(frames: np.ndarray) -> np.ndarray:
    """Crop an odd row / column (yuv420p needs even sizes)."""
    h, w = frames.shape[1:3]
    return frames[:, : h - h % 2, : w - w % 2]


def write_study_manifest(root: Path, entries: Sequence[Mapping[str, Any]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / MANIFEST
    record = {"version": MANIFEST_VERSION, "pairs": list(entries)}
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- the folder


@dataclass(frozen=True)
class StudyPair:
    pair: str
    kind: str
    columns: tuple[str, ...]
    fps: float
    frames: int
    media: dict[str, Path]  # reference / driving / a / b -> resolved file inside the study folder


@dataclass(frozen=True)
class Study:
    folder: Path  # the study folder (the export's gsb/), resolved
    pairs: tuple[StudyPair, ...]
    digest: str  # SHA-256 of study.json: ties answers.sqlite to this export

    @property
    def database(self) -> Path:
        return self.folder / ANSWERS_DB

    def pair(self, pair_id: str) -> StudyPair:
        for p in self.pairs:
            if p.pair == pair_id:
                return p
        raise KeyError(pair_id)


def load_study(folder: str | Path) -> Study:
    """Read and check ``folder/study/study.json``: every media file must exist inside ``folder/study``."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise StudyError(f"study folder {folder} does not exist; pass the gsb/ folder of a benchmark run")
    manifest = folder / STUDY_DIR / MANIFEST
    if not manifest.is_file():
        if (folder / "gsb" / STUDY_DIR / MANIFEST).is_file():
            raise StudyError(f"{folder} is a benchmark run folder; pass its study folder {folder / 'gsb'}")
        raise StudyError(
            f"{folder} has no {STUDY_DIR}/{MANIFEST}; pass the gsb/ folder that scail2-bench exports with "
            "gsb.baseline_dir=... (exports made before the browser study existed need a new export)"
        )
    raw = manifest.read_bytes()
    try:
        record = json.loads(raw)
    except ValueError as exc:
        raise StudyError(f"cannot read {manifest}: {exc}; re-export the study") from exc
    if not isinstance(record, dict) or record.get("version") != MANIFEST_VERSION or not record.get("pairs"):
        raise StudyError(f"{manifest} is not a study manifest (version {MANIFEST_VERSION} with pairs); re-export it")
    media_root = (folder / STUDY_DIR).resolve()
    pairs = []
    for entry in record["pairs"]:
        pairs.append(_study_pair(entry, media_root, manifest))
    ids = [p.pair for p in pairs]
    if len(set(ids)) != len(ids):
        raise StudyError(f"{manifest} lists a pair twice ({sorted(i for i in ids if ids.count(i) > 1)}); re-export it")
    return Study(folder.resolve(), tuple(pairs), hashlib.sha256(raw).hexdigest())


def _study_pair(entry: Any, media_root: Path, manifest: Path) -> StudyPair:
    try:
        pair = str(entry["pair"])
        kind, columns = str(entry["kind"]), tuple(entry["columns"])
        fps, frames, media = float(entry["fps"]), int(entry["frames"]), dict(entry["media"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StudyError(f"{manifest}: malformed pair entry {entry!r} ({exc}); re-export the study") from exc
    if not _PAIR_ID.fullmatch(pair):
        raise StudyError(f"{manifest}: pair id {pair!r} is not a plain name (letters, digits, _ and -)")
    if kind not in KINDS or not columns or any(c not in GSB_COLUMNS for c in columns):
        raise StudyError(f"{manifest}: pair {pair} has kind {kind!r} / columns {columns}; re-export the study")
    if not (fps > 0 and math.isfinite(fps)) or frames < 1:
        raise StudyError(f"{manifest}: pair {pair} has fps {fps} and {frames} frames; re-export the study")
    resolved = {}
    for role in ("reference", "driving", "a", "b"):
        name = media.get(role)
        if not isinstance(name, str) or not name or Path(name).is_absolute():
            raise StudyError(f"{manifest}: pair {pair} {role} is {name!r}; it must be a path inside {media_root}")
        path = (media_root / name).resolve()  # follows links: a link out of the folder is refused too
        if not path.is_relative_to(media_root):
            raise StudyError(
                f"{manifest}: pair {pair} {role} {name!r} points outside the study folder {media_root}; "
                "the server only serves files inside it"
            )
        if not path.is_file():
            raise StudyError(f"{manifest}: pair {pair} {role} file {path} is missing; re-export the study")
        resolved[role] = path
    return StudyPair(pair, kind, columns, fps, frames, resolved)


# ----------------------------------------------------------------------------------------------- blinding


@dataclass(frozen=True)
class Slot:
    """One case as a rater sees it: its position in the rater's order and the video shown on the left."""

    position: int
    pair: str
    left: str  # "a" or "b"

    @property
    def right(self) -> str:
        return "b" if self.left == "a" else "a"

    def video(self, role: str) -> str:
        """'left' / 'right' -> 'a' / 'b'; 'reference' / 'driving' unchanged."""
        return {"left": self.left, "right": self.right}.get(role, role)


def rater_plan(pairs: Iterable[str], seed: int) -> list[Slot]:
    """The rater's case order and sides, drawn from ``seed`` alone (the same seed gives the same plan)."""
    rng = random.Random(seed)
    order = sorted(pairs)
    rng.shuffle(order)
    return [Slot(i, pair, "a" if rng.random() < 0.5 else "b") for i, pair in enumerate(order)]


# ------------------------------------------------------------------------------------------------ answers


@dataclass(frozen=True)
class Rater:
    rater: str
    token: str  # the secret in the rater's link
    seed: int
    created: str


@dataclass(frozen=True)
class Answer:
    id: int
    rater: str
    pair: str
    metric: str
    answer: str  # as shown: left / same / right
    left_video: str  # a or b: the video that was on the left
    time: str  # UTC, ISO 8601 with milliseconds


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS raters (
    rater TEXT PRIMARY KEY,
    token TEXT NOT NULL UNIQUE,
    seed INTEGER NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS answers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rater TEXT NOT NULL REFERENCES raters(rater),
    pair TEXT NOT NULL,
    metric TEXT NOT NULL,
    answer TEXT NOT NULL CHECK (answer IN ('left', 'same', 'right')),
    left_video TEXT NOT NULL CHECK (left_video IN ('a', 'b')),
    time TEXT NOT NULL
);
"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class AnswerStore:
    """answers.sqlite: the raters and every answer (append-only; the latest answer of a cell counts).

    One connection shared by the server's threads behind a lock; every answer is committed before the request
    that gave it is answered, so a crash or a closed browser loses nothing that the page showed as saved.
    """

    def __init__(self, path: str | Path, study_digest: str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")  # readers (a report) never block the server's writes
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            raise StudyError(f"{self.path} is not a study database ({exc}); move it away to start a new one") from exc
        if not meta:
            with self._db:
                self._db.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [("schema", str(DB_SCHEMA_VERSION)), ("study_digest", study_digest), ("created", _now())],
                )
        elif meta.get("schema") != str(DB_SCHEMA_VERSION):
            raise StudyError(f"{self.path} has schema {meta.get('schema')!r}; this version reads {DB_SCHEMA_VERSION}")
        elif meta.get("study_digest") != study_digest:
            raise StudyError(
                f"{self.path} holds answers for another export of this study (study/study.json changed since); "
                "restore the export it belongs to, or move the database away to start a new study"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "AnswerStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # raters

    def raters(self) -> list[Rater]:
        with self._lock:
            rows = self._db.execute("SELECT rater, token, seed, created FROM raters ORDER BY created, rater").fetchall()
        return [Rater(*row) for row in rows]

    def add_rater(self, rater: str, seed: int | None = None) -> Rater:
        """A new rater with a fresh token and a seed (random unless given)."""
        if not isinstance(rater, str) or not _RATER_ID.fullmatch(rater):
            raise StudyError(
                f"rater id {rater!r} is not usable; use 1-64 letters, digits, '_', '.', '@' or '-' (e.g. alice)"
            )
        record = Rater(rater, secrets.token_urlsafe(18), secrets.randbelow(2**31) if seed is None else int(seed),
                       _now())  # fmt: skip
        with self._lock:
            try:
                with self._db:
                    self._db.execute("INSERT INTO raters VALUES (?, ?, ?, ?)", (record.rater, record.token,
                                                                                record.seed, record.created))
            except sqlite3.IntegrityError as exc:
                raise StudyError(f"rater {rater!r} exists already; pick another id") from exc
        return record

    def ensure_raters(self, raters: Sequence[str]) -> list[Rater]:
        """The named raters, created when new; existing ones keep their token and seed (so links keep working)."""
        known = {r.rater: r for r in self.raters()}
        return [known[r] if r in known else self.add_rater(r) for r in raters]

    # answers

    def record(self, rater: str, pair: str, metric: str, answer: str, left_video: str) -> Answer:
        if answer not in SHOWN_ANSWERS or left_video not in ("a", "b"):
            raise StudyError(f"answer {answer!r} / left video {left_video!r}; use left|same|right and a|b")
        time = _now()
        with self._lock, self._db:
            cursor = self._db.execute(
                "INSERT INTO answers (rater, pair, metric, answer, left_video, time) VALUES (?, ?, ?, ?, ?, ?)",
                (rater, pair, metric, answer, left_video, time),
            )
        return Answer(cursor.lastrowid, rater, pair, metric, answer, left_video, time)

    def history(self, rater: str | None = None) -> list[Answer]:
        """Every answer in the order given (one rater's with ``rater``)."""
        query = "SELECT id, rater, pair, metric, answer, left_video, time FROM answers"
        with self._lock:
            if rater is None:
                rows = self._db.execute(query + " ORDER BY id").fetchall()
            else:
                rows = self._db.execute(query + " WHERE rater = ? ORDER BY id", (rater,)).fetchall()
        return [Answer(*row) for row in rows]

    def latest(self, rater: str | None = None) -> dict[tuple[str, str, str], Answer]:
        """(rater, pair, metric) -> the last answer given for it."""
        return {(a.rater, a.pair, a.metric): a for a in self.history(rater)}


def open_store(study: Study) -> AnswerStore:
    return AnswerStore(study.database, study.digest)


# ----------------------------------------------------------------------------------------------- analysis


@dataclass
class Vote:
    """One counted answer, un-blinded."""

    rater: str
    pair: str
    case_id: str
    kind: str
    metric: str
    answer: str  # as shown
    left_video: str
    left: str  # who was on the left: ours / baseline
    outcome: str  # G / S / B
    time: str


@dataclass
class MetricStats:
    counts: GSBCounts
    intervals: dict[str, tuple[float, float]]  # G / S / B -> (low, high)
    alpha: float  # Krippendorff's alpha (nominal) over cases with >= 2 votes; nan when undefined
    agreement: float  # fraction of agreeing rater pairs over those cases
    cases_with_two: int  # cases with votes of at least two raters

    def to_json(self) -> dict[str, Any]:
        c = self.counts
        return {
            "good": c.good, "same": c.same, "bad": c.bad, "unrated": c.unrated, "rated": c.rated,
            "rates": c.rates(), "intervals": {k: list(v) for k, v in self.intervals.items()}, "score": c.score,
            "alpha": self.alpha, "agreement": self.agreement, "cases_with_two_raters": self.cases_with_two,
        }  # fmt: skip


@dataclass
class StudyReport:
    ours: str
    baseline: str
    confidence: float
    raters: list[dict[str, Any]]  # rater, seed, answers, complete cases
    cases: int
    columns: dict[str, MetricStats]  # over every case
    by_kind: dict[str, dict[str, MetricStats]]
    votes: list[Vote] = field(default_factory=list)
    answers_given: int = 0  # every click, changed answers included

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": REPORT_SCHEMA,
            "ours": self.ours,
            "baseline": self.baseline,
            "confidence": self.confidence,
            "cases": self.cases,
            "raters": self.raters,
            "answers_given": self.answers_given,
            "columns": {m: s.to_json() for m, s in self.columns.items()},
            "by_kind": {k: {m: s.to_json() for m, s in v.items()} for k, v in self.by_kind.items()},
            "votes": [vars(v) for v in self.votes],
        }


def wilson_interval(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials (nan, nan when n = 0)."""
    if n == 0:
        return (math.nan, math.nan)
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def krippendorff_alpha_nominal(units: Iterable[Sequence[Any]]) -> float:
    """Krippendorff's alpha for nominal values; ``units`` are the values given to each unit (any count).

    Units with fewer than two values are not pairable and drop out. nan when fewer than two pairable values
    exist or every value is the same category (no disagreement is expected, so none can be measured).
    """
    coincidence: Counter = Counter()
    for values in units:
        m = len(values)
        if m < 2:
            continue
        counts = Counter(values)
        for c, nc in counts.items():
            for k, nk in counts.items():
                pairs = nc * (nc - 1) if c == k else nc * nk
                coincidence[c, k] += pairs / (m - 1)
    totals: Counter = Counter()
    for (c, _), value in coincidence.items():
        totals[c] += value
    n = sum(totals.values())
    if n < 2:
        return math.nan
    observed = sum(v for (c, k), v in coincidence.items() if c != k)
    expected = sum(totals[c] * totals[k] for c in totals for k in totals if c != k) / (n - 1)
    if expected == 0:
        return math.nan
    return 1.0 - observed / expected


def pairwise_agreement(units: Iterable[Sequence[Any]]) -> float:
    """Fraction of rater pairs, over all units with at least two values, that gave the same value."""
    agree = total = 0
    for values in units:
        counts = Counter(values)
        m = len(values)
        total += m * (m - 1) // 2
        agree += sum(c * (c - 1) // 2 for c in counts.values())
    return agree / total if total else math.nan


def collect_votes(study: Study, key: Mapping[str, Any], store: AnswerStore) -> tuple[list[Vote], int]:
    """The latest answer of each rater per (case, metric), un-blinded; and the number of answers ever given.

    Every answer is checked: its pair and metric exist in the study, and the video stored as shown on the left
    is the one the rater's seed puts there.
    """
    key_pairs = {p["pair"]: p for p in key["pairs"]}
    missing = [p.pair for p in study.pairs if p.pair not in key_pairs]
    if missing:
        raise StudyError(f"key.json has no entry for the study's pair(s) {missing}; the key belongs to another export")
    raters = {r.rater: r for r in store.raters()}
    plans = {name: {s.pair: s for s in rater_plan((p.pair for p in study.pairs), r.seed)} for name, r in raters.items()}
    history = store.history()
    latest: dict[tuple[str, str, str], Answer] = {}
    for a in history:
        where = f"{store.path} answer {a.id} (rater {a.rater}, pair {a.pair}, {a.metric!r})"
        if a.rater not in plans or a.pair not in plans[a.rater]:
            raise StudyError(f"{where}: unknown rater or pair; the database belongs to another study")
        if a.metric not in study.pair(a.pair).columns:
            raise StudyError(f"{where}: the metric does not apply to this pair; the database was edited")
        if plans[a.rater][a.pair].left != a.left_video:
            raise StudyError(
                f"{where}: video {a.left_video} is recorded on the left but the rater's seed puts "
                f"{plans[a.rater][a.pair].left} there; the database was edited or its seeds changed"
            )
        latest[a.rater, a.pair, a.metric] = a
    votes = []
    for (rater, pair, metric), a in sorted(latest.items()):
        entry = key_pairs[pair]
        a_is = entry["left"]  # a = the left half of the sheet video
        left = a_is if a.left_video == "a" else ("baseline" if a_is == "ours" else "ours")
        outcome = OUTCOME_LETTER[unblind(a.answer, left)]
        votes.append(Vote(rater, pair, entry["case_id"], entry["kind"], metric, a.answer, a.left_video, left,
                          outcome, a.time))  # fmt: skip
    return votes, len(history)


def analyse_study(folder: str | Path, confidence: float = 0.95) -> StudyReport:
    """Un-blind every rater's answers with key.json and compute rates, intervals and agreement per metric."""
    if not 0.0 < confidence < 1.0:
        raise StudyError(f"confidence is {confidence}; use a level between 0 and 1 (e.g. 0.95)")
    study = load_study(folder)
    if not study.database.is_file():
        raise StudyError(
            f"{study.database} does not exist: no rater has answered yet (start `scail2-bench study serve`)"
        )
    key = load_key(study.folder / "key.json")
    with open_store(study) as store:
        votes, given = collect_votes(study, key, store)
        raters = store.raters()
    by_rater = defaultdict(list)
    for v in votes:
        by_rater[v.rater].append(v)
    active = [r for r in raters if by_rater[r.rater]]  # raters who never answered are not counted as unrated

    def stats(pairs: Sequence[StudyPair], metric: str) -> MetricStats:
        counts = GSBCounts()
        units: dict[str, list[str]] = defaultdict(list)
        wanted = {p.pair for p in pairs if metric in p.columns}
        for v in votes:
            if v.metric == metric and v.pair in wanted:
                name = _COUNT_FIELD[v.outcome]
                setattr(counts, name, getattr(counts, name) + 1)
                units[v.pair].append(v.outcome)
        counts.unrated = len(wanted) * len(active) - counts.rated
        intervals = {
            "G": wilson_interval(counts.good, counts.rated, confidence),
            "S": wilson_interval(counts.same, counts.rated, confidence),
            "B": wilson_interval(counts.bad, counts.rated, confidence),
        }
        return MetricStats(
            counts, intervals, krippendorff_alpha_nominal(units.values()), pairwise_agreement(units.values()),
            sum(1 for u in units.values() if len(u) >= 2),
        )  # fmt: skip

    metrics = [m for m in GSB_COLUMNS if any(m in p.columns for p in study.pairs)]
    columns = {m: stats(study.pairs, m) for m in metrics}
    by_kind = {}
    for kind in KINDS:
        pairs = [p for p in study.pairs if p.kind == kind]
        if pairs:
            by_kind[kind] = {m: stats(pairs, m) for m in GSB_COLUMNS if any(m in p.columns for p in pairs)}
    needed = {p.pair: len(p.columns) for p in study.pairs}
    rater_rows = []
    for r in raters:
        answered = Counter(v.pair for v in by_rater[r.rater])
        rater_rows.append({
            "rater": r.rater, "seed": r.seed, "answers": len(by_rater[r.rater]),
            "complete_cases": sum(1 for p, n in answered.items() if n == needed[p]), "created": r.created,
        })  # fmt: skip
    return StudyReport(
        ours=key.get("ours", "ours"),
        baseline=key.get("baseline", "baseline"),
        confidence=confidence,
        raters=rater_rows,
        cases=len(study.pairs),
        columns=columns,
        by_kind=by_kind,
        votes=votes,
        answers_given=given,
    )


def metric_key(metric: str) -> str:
    """'Motion Accuracy' -> 'motion_accuracy' (MLflow metric names, CSV keys)."""
    return metric.lower().replace(" ", "_")
