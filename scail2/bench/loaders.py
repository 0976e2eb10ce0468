"""Benchmark layouts on disk -> lists of `Case`.

Three layouts (specified in docs/benchmarks-quality.md):

- ``xdance``: the X-Dance release. Reference images either as ``images/NNNNN.<ext>`` or in category folders
  (``Ref-<category>/*.png``: Ref-Cartoon-Movie, Ref-Female-Upper-Body ...; any other folder, such as the
  dataset card's ``assets/``, is not a category), driving clips as ``videos/NNNNN/{video.mp4, pose.mp4,
  prompt.txt}``. Pairs follow the dataset: an image and a clip of the same id form a case. Image and video of a
  pair show different people: every case is a cross-identity case without ground truth.
- ``studio``: a Studio-Bench-style layout that users fill: ``ROOT/<split>/<case id>/`` with ``reference.<ext>``,
  ``driving.<ext>`` and optionally ``ground_truth``, ``reference_mask``, ``driving_mask``, ``prompt.txt`` and
  ``case.json``; splits ``self_driven``, ``cross_driven`` and ``replacement``.
- ``synthetic``: the output of ``scail2-data synth`` (``ROOT/manifest.jsonl``), for tests and demos.

Every loader checks the whole tree first and raises one `BenchmarkLayoutError` listing every problem it found
(missing videos, missing references, stray mask halves), each with the path and the fix.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from scail2.bench.cases import (
    IMAGE_SUFFIXES,
    TASKS,
    BenchmarkLayoutError,
    Case,
    VideoFrame,
    find_image,
    find_video,
)

log = logging.getLogger(__name__)

LAYOUTS: tuple[str, ...] = ("xdance", "studio", "synthetic")
XDANCE_CATEGORY_PREFIX = "Ref-"  # X-Dance's reference categories: Ref-Cartoon-Movie, Ref-Female-Upper-Body, ...
XDANCE_DRIVING: dict[str, str] = {"video": "video.mp4", "pose": "pose.mp4"}  # dataset.driving -> file
XDANCE_PAIRINGS: tuple[str, ...] = ("auto", "by_id", "cross", "file")
# Studio-Bench-style split folder of each task (dataset.split overrides it).
STUDIO_SPLITS: dict[str, str] = {
    "self_driven": "self_driven",
    "cross_identity": "cross_driven",
    "replacement": "replacement",
}
STUDIO_CASE_KEYS: frozenset[str] = frozenset({"characters", "category"})
_MAX_LISTED = 10  # problems listed in one error message


def _raise_problems(what: str, root: Path, problems: Sequence[str], hint: str) -> None:
    if not problems:
        return
    listed = "\n".join(f"  - {p}" for p in problems[:_MAX_LISTED])
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    raise BenchmarkLayoutError(f"{what} at {root} is broken ({len(problems)} problem(s)):\n{listed}{more}\n{hint}")


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8").strip() if path.is_file() else ""


def _check_root(root: Path, layout: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise BenchmarkLayoutError(
            f"{layout} benchmark root {root} is not a folder; set benchmark.dataset.root to the benchmark's folder "
            "(layouts: docs/benchmarks-quality.md)"
        )
    return root


# ------------------------------------------------------------------------------------------------- X-Dance


def _xdance_references(root: Path) -> tuple[dict[str, Path], bool]:
    """Reference images by id, and whether they came from ``images/`` (ids = stems) or category folders
    (ids ``<category>/<stem>``). Only ``Ref-*`` folders are categories; others (``assets/`` ...) are ignored."""
    images = root / "images"
    if images.is_dir():
        refs = {p.stem: p for p in sorted(images.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        if not refs:
            raise BenchmarkLayoutError(f"X-Dance images folder {images} has no images ({', '.join(IMAGE_SUFFIXES)})")
        return refs, True
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    categories = [p for p in folders if p.name.startswith(XDANCE_CATEGORY_PREFIX)]
    ignored = [p.name for p in folders if p not in categories and p.name != "videos"]
    if ignored:
        log.info("X-Dance %s: folders %s are not reference categories (Ref-*) and are not read", root, ignored)
    refs = {}
    for folder in categories:
        for image in sorted(folder.iterdir()):
            if image.suffix.lower() in IMAGE_SUFFIXES:
                refs[f"{folder.name}/{image.stem}"] = image
    if not refs:
        raise BenchmarkLayoutError(
            f"X-Dance root {root} has no reference images: expected images/NNNNN.png or category folders "
            f"{XDANCE_CATEGORY_PREFIX}<category>/*.png (Ref-Female-Whole-Body/, ...) next to videos/"
            + (f"; the folders {ignored} are not categories" if ignored else "")
        )
    return refs, False


def _refs_by_stem(references: dict[str, Path], problems: list[str]) -> dict[str, str]:
    """Clip id -> reference id, by image stem (the dataset's pairing: an image and a clip share an id)."""
    by_stem: dict[str, str] = {}
    for ref, path in references.items():
        stem = path.stem
        if stem in by_stem:
            problems.append(f"two reference images are named {stem}: {by_stem[stem]} and {ref}; ids must be unique")
        by_stem[stem] = ref
    return by_stem


def load_xdance(
    root: str | Path, *, driving: str = "video", pairing: str = "auto", pairs_file: str | Path | None = None
) -> list[Case]:
    """Cases of an X-Dance folder (cross-identity: no ground truth).

    driving: "video" (``video.mp4``, end-to-end) or "pose" (``pose.mp4``, pose-driven).
    pairing: "by_id" pairs the reference image ``NNNNN`` (in ``images/`` or in a ``Ref-*`` category folder) with
    ``videos/NNNNN`` (the dataset's own pairs; case id ``NNNNN``); "file" reads ``pairs_file``, a CSV with
    columns ``reference`` (image path relative to the root) and ``video`` (a video id); "cross" pairs every
    reference with every video (case id ``<reference id>__<video id>``), only when asked for; "auto" is
    "by_id" when image ids name clips, else an error that asks for "cross" or "file".
    """
    root = _check_root(Path(root), "X-Dance")
    if driving not in XDANCE_DRIVING:
        raise ValueError(f"benchmark.dataset.driving is {driving!r}; X-Dance offers {sorted(XDANCE_DRIVING)}")
    if pairing not in XDANCE_PAIRINGS:
        raise ValueError(f"benchmark.dataset.pairing is {pairing!r}; use one of {XDANCE_PAIRINGS}")
    videos_dir = root / "videos"
    if not videos_dir.is_dir():
        raise BenchmarkLayoutError(
            f"X-Dance root {root} has no videos/ folder; expected videos/NNNNN/{{video.mp4, pose.mp4, prompt.txt}}"
        )
    wanted = XDANCE_DRIVING[driving]
    problems: list[str] = []
    videos: dict[str, tuple[Path, str]] = {}
    folders = sorted(p for p in videos_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in folders:
        path = folder / wanted
        if not path.is_file():
            problems.append(f"videos/{folder.name} has no {wanted} (benchmark.dataset.driving={driving} reads it)")
            continue
        videos[folder.name] = (path, _read_text(folder / "prompt.txt"))
    if not folders:
        raise BenchmarkLayoutError(f"X-Dance videos folder {videos_dir} has no clip folders (videos/NNNNN/{wanted})")
    references, from_images = _xdance_references(root)
    stems = _refs_by_stem(references, problems) if pairing in ("auto", "by_id") else {}
    if pairing == "auto":
        if not any(f.name in stems for f in folders):
            raise BenchmarkLayoutError(
                f"the {len(references)} reference images of {root} do not name its clips (no image is called like a "
                f"videos/ folder, e.g. {folders[0].name}.png), so the dataset defines no pairing here: set "
                f"benchmark.dataset.pairing=cross (every reference with every clip: {len(references)} x "
                f"{len(videos)} cases) or pairing=file with a CSV of reference,video pairs"
            )
        pairing = "by_id"

    pairs: list[tuple[str, str]] = []  # (reference id, video id)
    if pairing == "by_id":
        for vid in (f.name for f in folders):
            if vid not in stems:
                others = ", ".join(IMAGE_SUFFIXES[1:])
                where = f"images/{vid}.png" if from_images else f"{XDANCE_CATEGORY_PREFIX}<category>/{vid}.png"
                problems.append(f"no reference image for video {vid}: expected {where} (or {others})")
            elif vid in videos:
                pairs.append((stems[vid], vid))
    elif pairing == "cross":
        pairs = [(ref, vid) for ref in references for vid in videos]
    else:
        pairs = _read_pairs_file(root, pairs_file, references, videos, problems)
    _raise_problems(
        "X-Dance benchmark",
        root,
        problems,
        "Fix the files, or restrict the run with benchmark.dataset.cases=[...] (layout: docs/benchmarks-quality.md).",
    )
    cases = []
    for ref, vid in pairs:
        case_id = vid if pairing == "by_id" else f"{ref}__{vid}"
        path, prompt = videos[vid]
        category = ref.split("/")[0] if "/" in ref else ""
        cases.append(Case(id=case_id, reference=references[ref], driving=path, prompt=prompt, category=category))
    return cases


def _read_pairs_file(
    root: Path,
    pairs_file: str | Path | None,
    references: dict[str, Path],
    videos: dict[str, tuple[Path, str]],
    problems: list[str],
) -> list[tuple[str, str]]:
    if pairs_file is None:
        raise ValueError("benchmark.dataset.pairing=file needs benchmark.dataset.pairs_file=<CSV with reference,video>")
    path = Path(pairs_file).expanduser()
    if not path.is_file():
        raise BenchmarkLayoutError(f"pairs file {path} does not exist; write a CSV with columns reference,video")
    by_path = {p.resolve(): ref for ref, p in references.items()}
    pairs = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"reference", "video"} <= set(reader.fieldnames):
            raise BenchmarkLayoutError(f"pairs file {path} has columns {reader.fieldnames}; it needs reference,video")
        for line, row in enumerate(reader, start=2):
            ref = by_path.get((root / row["reference"]).resolve())
            if ref is None:
                problems.append(f"{path.name} line {line}: reference image {row['reference']!r} is not under {root}")
            elif row["video"] not in videos:
                video = row["video"]
                problems.append(f"{path.name} line {line}: video id {video!r} has no videos/{video}/ clip")
            else:
                pairs.append((ref, row["video"]))
    return pairs


# -------------------------------------------------------------------------------------- Studio-Bench style


def _studio_case(folder: Path, split: str, mode: str, need_truth: bool, problems: list[str]) -> Case | None:
    name = f"{split}/{folder.name}"
    try:
        reference = find_image(folder, "reference")
        driving = find_video(folder, "driving")
        truth = find_video(folder, "ground_truth")
        ref_mask = find_image(folder, "reference_mask")
        drive_mask = find_video(folder, "driving_mask")
    except BenchmarkLayoutError as exc:
        problems.append(str(exc))
        return None
    bad = len(problems)
    if driving is None:
        problems.append(f"{name} has no driving video (driving.mp4)")
    if need_truth and truth is None:
        problems.append(f"{name} has no ground_truth.mp4 (the {split} split scores against it)")
    if reference is None and truth is None:
        problems.append(
            f"{name} has no reference image (reference.png); only self-driven cases with a ground truth may omit it"
        )
    if (ref_mask is None) != (drive_mask is None):
        missing = "driving_mask.mp4" if drive_mask is None else "reference_mask.png"
        problems.append(f"{name} has one mask but no {missing}; give both masks or neither")
    if mode == "replacement" and ref_mask is None and drive_mask is None:
        problems.append(f"{name} has no masks; replacement needs reference_mask.png and driving_mask.mp4")
    meta: dict = {}
    if (folder / "case.json").is_file():
        try:
            meta = json.loads((folder / "case.json").read_text(encoding="utf-8"))
        except ValueError as exc:
            problems.append(f"{name}/case.json is not valid JSON ({exc})")
        else:
            if not isinstance(meta, dict) or set(meta) - STUDIO_CASE_KEYS:
                keys = sorted(set(meta) - STUDIO_CASE_KEYS) if isinstance(meta, dict) else meta
                problems.append(f"{name}/case.json has unknown keys {keys}; allowed: {sorted(STUDIO_CASE_KEYS)}")
            elif not isinstance(meta.get("characters", 1), int) or meta.get("characters", 1) < 1:
                problems.append(f"{name}/case.json characters is {meta['characters']!r}; need an integer >= 1")
    if len(problems) > bad:
        return None
    return Case(
        id=folder.name,
        reference=reference if reference is not None else VideoFrame(truth, 0),
        driving=driving,
        ground_truth=truth,
        reference_mask=ref_mask,
        driving_mask=drive_mask,
        prompt=_read_text(folder / "prompt.txt"),
        mode=mode,
        characters=int(meta.get("characters", 1)),
        category=str(meta.get("category", "")),
    )


def load_studio(root: str | Path, task: str, split: str | None = None) -> list[Case]:
    """Cases of a Studio-Bench-style folder: ``ROOT/<split>/<case id>/`` (docs/benchmarks-quality.md).

    task "self_driven" needs a ground truth per case (reference image optional: default its first frame);
    "replacement" runs in replacement mode and needs both masks; "cross_identity" needs a reference image.
    split: the folder under ROOT (default ``STUDIO_SPLITS[task]``).
    """
    root = _check_root(Path(root), "Studio-Bench")
    if task not in TASKS:
        raise ValueError(f"benchmark.task is {task!r}; use one of {TASKS}")
    split = split or STUDIO_SPLITS[task]
    folder = root / split
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise BenchmarkLayoutError(
            f"Studio-Bench root {root} has no {split}/ split folder (found: {found}); create {folder}/<case id>/ "
            "folders or set benchmark.dataset.split"
        )
    mode = "replacement" if task == "replacement" else "animation"
    problems: list[str] = []
    cases = []
    for case_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        case = _studio_case(case_dir, split, mode, need_truth=task == "self_driven", problems=problems)
        if case is not None:
            cases.append(case)
    hint = "Layout: docs/benchmarks-quality.md (Studio-Bench-style layout)."
    _raise_problems("Studio-Bench benchmark", root, problems, hint)
    if not cases:
        raise BenchmarkLayoutError(
            f"Studio-Bench split {folder} has no case folders; add {folder}/<case id>/driving.mp4 ..."
        )
    return cases


# ------------------------------------------------------------------------------------------------ synthetic


def load_synthetic(root: str | Path, task: str) -> list[Case]:
    """Cases from ``scail2-data synth`` output (``ROOT/manifest.jsonl``).

    self_driven: animation records (end-to-end and pose); reference = the target's first frame, with the first
    frame of the target mask and the driving mask when the record has a target mask; ground truth = target.
    replacement: replacement records with their own reference and masks; ground truth = target.
    cross_identity: single-character animation records; the driving video of record i with the reference of
    record i+1 (cyclic), no masks, no ground truth.
    """
    from scail2.data.manifest import load_manifest

    root = _check_root(Path(root), "synthetic")
    manifest = root / "manifest.jsonl"
    if not manifest.is_file():
        raise BenchmarkLayoutError(
            f"synthetic benchmark root {root} has no manifest.jsonl; create the data with `scail2-data synth {root}`"
        )
    if task not in TASKS:
        raise ValueError(f"benchmark.task is {task!r}; use one of {TASKS}")
    records = load_manifest(manifest)

    def characters(record) -> int:
        return int(record.meta.get("characters", 1))

    def reference_of(record) -> Path | VideoFrame:
        return VideoFrame(record.target, record.reference) if isinstance(record.reference, int) else record.reference

    cases = []
    if task == "self_driven":
        for r in (r for r in records if r.mode == "animation"):
            masked = r.target_mask is not None
            cases.append(
                Case(
                    id=r.id,
                    reference=VideoFrame(r.target, 0),
                    driving=r.driving,
                    ground_truth=r.target,
                    reference_mask=VideoFrame(r.target_mask, 0) if masked else None,
                    driving_mask=r.driving_mask if masked else None,
                    prompt=r.caption,
                    characters=characters(r),
                    category=r.source,
                )
            )
    elif task == "replacement":
        for r in (r for r in records if r.mode == "replacement"):
            cases.append(
                Case(
                    id=r.id,
                    reference=reference_of(r),
                    driving=r.driving,
                    ground_truth=r.target,
                    reference_mask=r.reference_mask,
                    driving_mask=r.driving_mask,
                    prompt=r.caption,
                    mode="replacement",
                    characters=characters(r),
                    category=r.source,
                )
            )
    else:
        singles = [r for r in records if r.mode == "animation" and characters(r) == 1]
        if len(singles) < 2:
            raise BenchmarkLayoutError(
                f"{manifest} has {len(singles)} single-character animation record(s); cross-identity pairs need at "
                "least 2 (generate more with `scail2-data synth --pairs 10`)"
            )
        for i, driving in enumerate(singles):
            ref = singles[(i + 1) % len(singles)]
            cases.append(
                Case(
                    id=f"{ref.id}__{driving.id}",
                    reference=reference_of(ref),
                    driving=driving.driving,
                    prompt=driving.caption,
                    category=driving.source,
                )
            )
    if not cases:
        raise BenchmarkLayoutError(
            f"{manifest} has no records for the {task} task; generate more pairs (`scail2-data synth --pairs 10`)"
        )
    return cases


def select_cases(cases: Sequence[Case], ids: Sequence[str] = (), max_cases: int | None = None) -> list[Case]:
    """Keep the cases named in ``ids`` (all when empty), in the benchmark's order, then the first ``max_cases``."""
    selected = list(cases)
    if ids:
        known = {c.id for c in cases}
        unknown = [i for i in ids if i not in known]
        if unknown:
            sample = sorted(known)[:8]
            raise ValueError(f"benchmark.dataset.cases names unknown case ids {unknown}; known ids include {sample}")
        wanted = set(ids)
        selected = [c for c in cases if c.id in wanted]
    if max_cases is not None:
        if max_cases < 1:
            raise ValueError(f"benchmark.dataset.max_cases is {max_cases}; use a positive number or null for all")
        selected = selected[:max_cases]
    return selected
