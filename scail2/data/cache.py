"""The motion latent cache: every record encoded once into a sharded cache (`scail2.data.shards`) of kind "motion".

Per sample: ``latents`` (16, T, h, w), ``reference`` (16, 1, h, w), ``reference_mask`` (28, 1, h, w),
``driving`` / ``driving_aug`` (16, T, h/2, w/2), ``driving_mask`` / ``driving_mask_aug`` (28, T, h/2, w/2),
``text`` (L, text_dim) with only the caption's real rows (zero rows are restored on load), ``clip_tokens``
(257, image_dim), and ``hands`` / ``faces`` / ``ocr`` (1, T, h, w) coverage where the record has them.

The index records its ``kind`` ("motion"; the preference cache of `scail2.preference.cache` is "preference")
and the ``version`` of the encoding rules it was built with. A cache of another kind or version is refused
with what to do (rebuild into a new folder), never read or extended: version 1 caches turned the white of
reference masks black, version 2 passes reference masks as given (animation-mode masks are drawn on white).

Choices that need pixels (orientation, clip start, reference frame, crop/stretch, skeleton scale) are
drawn once per record from the cache seed — the same draw `MotionPairDataset(fixed_seed=seed)` makes — and
the driving swap, which works on latents, is drawn at load time.

Resuming: an interrupted run leaves nothing half-used; running the same command again skips the records
already cached (or already failed) and continues (`scail2.data.shards.build_sharded_cache`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
from scail2.data.shards import CacheFormat, CacheReport, Failure, ShardIndex, build_sharded_cache
from scail2.data.video import Backend

__all__ = ["CACHE_FORMAT", "CacheIndex", "CacheReport", "build_cache"]


# 2: reference masks reach the 28-channel packing as given (animation-mode reference masks on white; a target
# mask frame used as the reference mask is redrawn on the reference background). 1: white turned black.
CACHE_FORMAT = CacheFormat(
    kind="motion",
    name="motion latent cache",
    version=2,
    changes="version 2 passes reference masks unchanged, animation-mode masks drawn on white; older caches turned "
    "their white black",
    build="scail2-data cache MANIFEST DIR --encoders DIR",
    uses={"preference": "train DPO on it with data=preference data.cache_dir=DIR (PreferenceDataModule)"},
)


class CacheIndex(ShardIndex):
    """The index of a motion latent cache; `read_sample` loads one `LatentSample`."""

    format = CACHE_FORMAT

    def read_sample(self, entry: Mapping[str, Any], swap: bool) -> LatentSample:
        """Load one sample; the augmented driving signal replaces the original when ``swap``."""
        names = ["latents", "reference", "reference_mask", "text", "clip_tokens", *entry["regions"]]
        use_aug = swap and entry["has_aug"]
        names += ["driving_aug", "driving_mask_aug"] if use_aug else ["driving", "driving_mask"]
        t = self.read_tensors(entry, names)
        return LatentSample.from_cache(
            entry,
            t,
            "driving_aug" if use_aug else "driving",
            end_to_end=entry["end_to_end"],
            history_allowed=entry["history_allowed"],
            forward=entry["forward"],
            regions={name: t[name] for name in entry["regions"]},
            swapped=use_aug,
        )


@dataclass
class _DecodeMotion:
    """decode(record) of `build_sharded_cache` for motion records (pickled to loader workers).

    Each record is first checked as ``scail2-data validate`` checks it (``validate``; None skips that): a record
    validate flags is refused, not encoded.
    """

    buckets: Sequence[Bucket]
    options: AugmentOptions
    seed: int
    backend: Backend
    validate: Any = None

    def __call__(self, record: MotionRecord) -> PixelSample | Failure:
        if self.validate is not None:
            refused = _validation_failure(record, self.validate)
            if refused is not None:
                return refused
        meta = record_meta(record, self.backend)
        bucket = assign_bucket(meta.num_frames, meta.fps, meta.height, meta.width, self.buckets)
        if bucket is None:
            raise SampleError("too_short", "target", f"{meta.num_frames} frames at {meta.fps:g} fps fit no bucket")
        choices = draw_pixel_choices(record, meta, bucket, pixel_rng(0, record.id, self.seed), self.options)
        drivings = ("driving", "driving_aug") if (record.has_aug and not choices.forward) else ("driving",)
        return load_pixel_sample(record, bucket, choices, drivings, self.backend)


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
    options = options if options is not None else AugmentOptions()
    buckets = [Bucket.parse(b) for b in buckets]
    if validate == "default":
        from scail2.data.validate import ValidateOptions

        validate = ValidateOptions(min_frames=1)  # the buckets decide what is too short (reason too_short)

    def encode(record: MotionRecord, pixels: PixelSample) -> tuple[dict[str, Any], dict[str, Any]]:
        sample = encode_pixel_sample(pixels, encoders)
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
        entry = {
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
            "text_len": sample.text_len,
            "regions": sorted(sample.regions),
        }
        return entry, named

    return build_sharded_cache(
        CacheIndex,
        records,
        out_dir,
        _settings(buckets, options, seed, dtype, encoders_name),
        encoders.text.null_embedding,
        _DecodeMotion(buckets, options, seed, backend, validate),
        encode,
        dtype=dtype,
        shard_size=shard_size,
        num_workers=num_workers,
        progress=progress,
    )
