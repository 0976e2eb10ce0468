"""The latent cache: every record encoded once into safetensors shards plus a JSON index.

Layout of a cache folder::

    index.json                 settings, completed shards, one entry per sample, records that failed
    null_text.safetensors      umT5 of "" (1, text_len, text_dim), the text-dropout replacement
    shard-00000.safetensors    tensors "<key>/<name>" of up to `shard_size` samples
    ...

Per sample: ``latents`` (16, T, h, w), ``reference`` (16, 1, h, w), ``reference_mask`` (28, 1, h, w),
``driving`` / ``driving_aug`` (16, T, h/2, w/2), ``driving_mask`` / ``driving_mask_aug`` (28, T, h/2, w/2),
``text`` (L, text_dim) with only the caption's real rows (zero rows are restored on load), ``clip_tokens``
(257, image_dim), and ``hands`` / ``faces`` / ``ocr`` (1, T, h, w) coverage where the record has them.

The index records its ``kind`` ("motion"; the preference cache of `scail2.data.preference_data` is "preference")
and the ``version`` of the encoding rules it was built with. A cache of another kind or version is refused
with what to do (rebuild into a new folder), never read or extended: version 1 caches turned the white of
reference masks black, version 2 passes reference masks as given (animation-mode masks are drawn on white).

Choices that need pixels (orientation, clip start, reference frame, crop/stretch, skeleton scale) are
drawn once per record from the cache seed — the same draw `MotionPairDataset(fixed_seed=seed)` makes — and
the driving swap, which works on latents, is drawn at load time.

Resuming: a shard is written to a temporary name and renamed when complete, and the index lists only
renamed shards, so an interrupted run leaves nothing half-used; running the same command again skips the
records already cached (or already failed) and continues.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from scail2.data.buckets import Bucket, assign_bucket
from scail2.data.datasets import pixel_rng
from scail2.data.latents import LatentSample, encode_pixel_sample
from scail2.data.manifest import MotionRecord
from scail2.data.sample import (
    AugmentOptions,
    PixelSample,
    SampleError,
    can_run_forward,
    draw_pixel_choices,
    load_pixel_sample,
    record_meta,
)
from scail2.data.video import Backend
from scail2.utils.dtypes import DTYPES as _DTYPES

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
NULL_TEXT_NAME = "null_text.safetensors"
CACHE_KIND = "motion"
# 2: reference masks reach the 28-channel packing as given (animation-mode reference masks on white; a target
# mask frame used as the reference mask is redrawn on the reference background). 1: white turned black.
CACHE_VERSION = 2


@dataclass
class CacheIndex:
    """The parsed ``index.json`` of a cache folder."""

    root: Path
    settings: dict[str, Any]
    shards: list[str] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, root: str | Path) -> "CacheIndex":
        root = Path(root)
        path = root / INDEX_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path} not found; build the cache with `scail2-data cache MANIFEST {root} --encoders DIR`")
        data = json.loads(path.read_text())
        kind = data.get("kind", CACHE_KIND if "version" in data and "settings" in data else None)
        if kind != CACHE_KIND:
            hint = (
                "train DPO on it with data=preference data.cache_dir=... (PreferenceDataModule)"
                if kind == "preference"
                else "build a motion latent cache with `scail2-data cache MANIFEST DIR --encoders DIR`"
            )
            raise ValueError(f"{path} is a {kind or 'unknown'} cache, not a motion latent cache; {hint}")
        if data.get("version") != CACHE_VERSION:
            raise ValueError(
                f"{path} has cache version {data.get('version')}; this code reads version {CACHE_VERSION} (version "
                f"{CACHE_VERSION} passes reference masks unchanged, animation-mode masks drawn on white; older caches "
                f"turned their white black): rebuild it with `scail2-data cache MANIFEST NEW_DIR --encoders DIR` into a "
                f"new folder (or delete {root}); caches of different versions are never mixed"
            )
        return cls(root, data["settings"], data["shards"], data["samples"], data["failed"])

    def save(self) -> None:
        data = {
            "kind": CACHE_KIND,
            "version": CACHE_VERSION,
            "settings": self.settings,
            "shards": self.shards,
            "samples": self.samples,
            "failed": self.failed,
        }
        tmp = self.root / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.root / INDEX_NAME)  # atomic: readers see the old or the new index, never half

    def null_text(self) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.root / NULL_TEXT_NAME))["null_text"].float()

    def read_sample(self, entry: Mapping[str, Any], swap: bool) -> LatentSample:
        """Load one sample; the augmented driving signal replaces the original when ``swap``."""
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        key = entry["key"]
        names = ["latents", "reference", "reference_mask", "text", "clip_tokens", *entry["regions"]]
        use_aug = swap and entry["has_aug"]
        names += ["driving_aug", "driving_mask_aug"] if use_aug else ["driving", "driving_mask"]
        try:
            with safe_open(str(self.root / entry["shard"]), framework="pt") as fh:
                t = {name: fh.get_tensor(f"{key}/{name}").float() for name in names}
        except (OSError, SafetensorError, KeyError) as exc:
            raise SampleError("unreadable", "cache", f"{entry['shard']} {key}: {exc}") from None
        return LatentSample(
            id=entry["id"],
            source=entry["source"],
            mode=entry["mode"],
            end_to_end=entry["end_to_end"],
            history_allowed=entry["history_allowed"],
            forward=entry["forward"],
            bucket=Bucket(*entry["bucket"]),
            latents=t["latents"],
            reference=t["reference"],
            reference_mask=t["reference_mask"],
            driving=t["driving_aug" if use_aug else "driving"],
            driving_mask=t["driving_mask_aug" if use_aug else "driving_mask"],
            text=t["text"],
            text_len=entry["text_len"],
            clip_tokens=t["clip_tokens"],
            regions={name: t[name] for name in entry["regions"]},
            swapped=use_aug,
        )


@dataclass
class CacheReport:
    cached: int  # samples in the cache after this run
    added: int  # samples encoded by this run
    failed: int  # records that failed (all runs)
    skipped_done: int  # records already in the cache when this run started
    seconds: float


class _PixelJobs(Dataset):
    """Decoding in loader workers: item -> (record index, PixelSample or (reason, field, detail)).

    Each record is first checked as ``scail2-data validate`` checks it (``validate``; None skips that): a
    record validate flags is refused, not encoded. Any error of one record is that record's failure.
    """

    def __init__(self, records, pending, buckets, options, seed, backend, validate=None):
        self.records, self.pending, self.buckets = records, pending, buckets
        self.options, self.seed, self.backend, self.validate = options, seed, backend, validate

    def __len__(self) -> int:
        return len(self.pending)

    def __getitem__(self, i: int):
        index = self.pending[i]
        record = self.records[index]
        try:
            if self.validate is not None:
                refused = _validation_failure(record, self.validate)
                if refused is not None:
                    return index, refused
            meta = record_meta(record, self.backend)
            bucket = assign_bucket(meta.num_frames, meta.fps, meta.height, meta.width, self.buckets)
            if bucket is None:
                raise SampleError("too_short", "target", f"{meta.num_frames} frames at {meta.fps:g} fps fit no bucket")
            choices = draw_pixel_choices(record, meta, bucket, pixel_rng(0, record.id, self.seed), self.options)
            drivings = ("driving", "driving_aug") if (record.has_aug and not choices.forward) else ("driving",)
            return index, load_pixel_sample(record, bucket, choices, drivings, self.backend)
        except SampleError as exc:
            return index, (exc.reason, exc.field, exc.detail)
        except Exception as exc:  # noqa: BLE001 - one record's failure must not end the whole cache run
            return index, ("invalid", "<record>", f"{type(exc).__name__}: {exc}")


def _validation_failure(record: MotionRecord, options) -> tuple[str, str, str] | None:
    """(reason, field, detail) of the first problem `scail2.data.validate.validate_record` finds, or None."""
    from scail2.data.validate import validate_record

    report = validate_record(record, options)
    if report.ok:
        return None
    field_name, detail = report.problems[0]
    more = f" (and {len(report.problems) - 1} more: scail2-data validate lists them)" if len(report.problems) > 1 else ""
    first = detail.split(":", 1)[0]
    reason = first if first in ("missing", "empty", "unreadable", "truncated") else "invalid"
    return reason, field_name, detail + more


def _first(batch):
    return batch[0]


def _settings(buckets: Sequence[Bucket], options: AugmentOptions, seed: int, dtype: str, encoders: str) -> dict[str, Any]:
    return {
        "buckets": [[b.frames, b.height, b.width] for b in buckets],
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(options).items()},
        "seed": seed,
        "dtype": dtype,
        "encoders": encoders,
    }


def build_cache(
    records: Sequence[MotionRecord],
    out_dir: str | Path,
    encoders,
    buckets: Sequence[Bucket],
    options: AugmentOptions | None = None,
    seed: int = 0,
    dtype: str = "bfloat16",
    shard_size: int = 64,
    num_workers: int = 0,
    backend: Backend = "auto",
    encoders_name: str = "",
    progress: bool = True,
    validate: Any = "default",
) -> CacheReport:
    """Encode ``records`` into ``out_dir`` (created or resumed). ``encoders``: a loaded `Encoders`.

    A folder built with other settings (buckets, options, seed, dtype, encoders name) is refused rather than
    mixed. Every record is checked first as ``scail2-data validate`` checks it (``validate``: a
    `scail2.data.validate.ValidateOptions`, "default" for its defaults, None to skip): what validate flags is
    not cached. Returns counts; failures are listed in the index with their reason.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if dtype not in _DTYPES:
        raise ValueError(f"cache dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    if shard_size < 1:
        raise ValueError(f"shard_size {shard_size} must be >= 1")
    options = options if options is not None else AugmentOptions()
    buckets = [Bucket.parse(b) for b in buckets]
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    settings = _settings(buckets, options, seed, dtype, encoders_name)
    if (root / INDEX_NAME).exists():
        index = CacheIndex.load(root)
        if index.settings != settings:
            changed = sorted(k for k in settings if index.settings.get(k) != settings[k])
            raise ValueError(
                f"{root} holds a cache built with other settings ({', '.join(changed)} differ); "
                "use a new folder or delete this one"
            )
    else:
        index = CacheIndex(root, settings)
    for stale in root.glob("*.tmp"):  # leftovers of an interrupted run: never referenced by the index
        stale.unlink()
    null_path = root / NULL_TEXT_NAME
    if not null_path.exists():
        tmp = root / (NULL_TEXT_NAME + ".tmp")
        save_file({"null_text": encoders.text.null_embedding().float().cpu().contiguous()}, str(tmp))
        tmp.replace(null_path)

    done = {s["id"] for s in index.samples} | {f["id"] for f in index.failed}
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("the manifest has duplicate record ids; run `scail2-data validate` first")
    pending = [i for i, r in enumerate(records) if r.id not in done]
    skipped_done = len(records) - len(pending)
    store = _DTYPES[dtype]
    if validate == "default":
        from scail2.data.validate import ValidateOptions

        validate = ValidateOptions(min_frames=1)  # the buckets decide what is too short (reason too_short)
    jobs = _PixelJobs(records, pending, buckets, options, seed, backend, validate)
    loader = DataLoader(jobs, batch_size=1, num_workers=num_workers, collate_fn=_first)

    tensors: dict[str, torch.Tensor] = {}
    entries: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    added = 0

    def commit() -> None:
        nonlocal tensors, entries, failures
        if entries:
            name = f"shard-{len(index.shards):05d}.safetensors"
            tmp = root / (name + ".tmp")
            save_file(tensors, str(tmp))
            os.replace(tmp, root / name)
            index.shards.append(name)
            for e in entries:
                e["shard"] = name
            index.samples.extend(entries)
        index.failed.extend(failures)
        if entries or failures:
            index.save()
        tensors, entries, failures = {}, [], []

    bar = tqdm(total=len(pending), desc="caching", unit="rec", disable=not progress)
    for index_in_records, result in loader:
        record = records[index_in_records]
        if not isinstance(result, PixelSample):
            reason, field_name, detail = result
            log.warning("cache: skipping %s: %s: %s: %s", record.id, field_name, reason, detail)
            failures.append({"id": record.id, "source": record.source, "reason": reason, "field": field_name, "detail": detail})
        else:
            sample = encode_pixel_sample(result, encoders)
            key = f"s{len(entries)}"
            named = {
                "latents": sample.latents,
                "reference": sample.reference,
                "reference_mask": sample.reference_mask,
                "driving": sample.driving,
                "driving_mask": sample.driving_mask,
                "text": sample.text,
                "clip_tokens": sample.clip_tokens,
                **sample.regions,
            }
            if sample.driving_aug is not None:
                named["driving_aug"] = sample.driving_aug
                named["driving_mask_aug"] = sample.driving_mask_aug
            for name, value in named.items():
                tensors[f"{key}/{name}"] = value.to(store).contiguous()
            entries.append(
                {
                    "id": record.id,
                    "source": record.source,
                    "source_class": record.source_class,
                    "mode": record.mode,
                    "end_to_end": record.end_to_end,
                    "history_allowed": record.history_allowed,
                    "forward": sample.forward,
                    "has_aug": sample.driving_aug is not None,
                    "can_forward": can_run_forward(record),
                    "bucket": [sample.bucket.frames, sample.bucket.height, sample.bucket.width],
                    "key": key,
                    "text_len": sample.text_len,
                    "regions": sorted(sample.regions),
                }
            )
            added += 1
        bar.update(1)
        if len(entries) >= shard_size:
            commit()
    commit()
    bar.close()
    return CacheReport(len(index.samples), added, len(index.failed), skipped_done, time.perf_counter() - start)

