"""Map-style datasets indexed by `SampleKey`, yielding `LatentSample` (collate with `collate_samples`).

- `MotionPairDataset` (a `RawPairDataset`): the slow path. Decodes raw videos, cuts the clip, fits the bucket, builds the
  28-channel masks and runs the frozen encoders, per sample.
- `LatentCacheDataset` (a `CachedPairDataset`): the fast path. Reads what ``scail2-data cache`` wrote.

A sample that cannot be produced (missing, empty, unreadable or truncated file, clip longer than the
video, files that disagree) is replaced by another item of the same source and bucket, chosen from the
draw's seed; each failure is counted per (source, reason) in `skip_counts()` and travels with the sample
into ``MotionBatch.meta["skips"]``. Nothing decoded is kept between samples.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch.utils.data import Dataset

from scail2.data.buckets import Bucket, assign_bucket
from scail2.data.latents import LatentSample, encode_pixel_sample, merge_skip_counts
from scail2.data.manifest import MotionRecord
from scail2.data.sample import (
    AugmentOptions,
    SampleError,
    VideoMeta,
    draw_pixel_choices,
    draw_swap,
    load_pixel_sample,
    record_meta,
)
from scail2.data.shards import ShardIndex
from scail2.data.video import Backend

if TYPE_CHECKING:
    from scail2.encoders.bundle import Encoders

log = logging.getLogger(__name__)

# Stream labels mixed into a draw's seed, so the streams are independent of each other.
_PIXEL_STREAM, _SWAP_STREAM, _REPLACE_STREAM = 1, 2, 3


def stable_hash(text: str) -> int:
    """A process-independent 63-bit hash (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def pixel_rng(seed: int, record_id: str, fixed_seed: int | None) -> np.random.Generator:
    """RNG of the pixel choices: per draw, or per record when ``fixed_seed`` is set (what the cache uses)."""
    if fixed_seed is None:
        return np.random.default_rng([seed, _PIXEL_STREAM])
    return np.random.default_rng([fixed_seed, stable_hash(record_id), _PIXEL_STREAM])


def swap_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SWAP_STREAM])


class PairDatasetBase(Dataset):
    """Items with a source, a source class and a bucket; replacement of failed samples; skip counters.

    Subclasses fill ``item_sources``, ``item_classes``, ``item_buckets`` and implement `_load`.
    """

    max_attempts: int
    item_sources: list[str]
    item_classes: list[str]
    item_buckets: list[Bucket]

    def __init__(self, max_attempts: int = 8):
        if max_attempts < 1:
            raise ValueError(f"max_attempts {max_attempts} must be >= 1")
        self.max_attempts = max_attempts
        self._skips: dict[str, dict[str, int]] = {}
        self._excluded: dict[str, dict[str, int]] = {}
        self._by_source_bucket: dict[tuple[str, Bucket], list[int]] = {}
        self._by_bucket: dict[Bucket, list[int]] = {}

    def _index_items(self) -> None:
        self._by_source_bucket.clear()
        self._by_bucket.clear()
        for i, (source, bucket) in enumerate(zip(self.item_sources, self.item_buckets)):
            self._by_source_bucket.setdefault((source, bucket), []).append(i)
            self._by_bucket.setdefault(bucket, []).append(i)

    def __len__(self) -> int:
        return len(self.item_sources)

    def _load(self, item: int, seed: int) -> LatentSample:
        raise NotImplementedError

    def item_name(self, item: int) -> str:
        raise NotImplementedError

    def _count(self, table: dict[str, dict[str, int]], source: str, reason: str) -> None:
        table.setdefault(source, {}).setdefault(reason, 0)
        table[source][reason] += 1

    def skip_counts(self) -> dict[str, dict[str, int]]:
        """``{source: {reason: count}}`` of this process: items excluded at start-up plus samples replaced.

        With worker processes each worker counts its own; the per-batch counts in
        ``MotionBatch.meta["skips"]`` (summed by `MotionDataLoader.skip_counts`) cover all of them.
        """
        out: dict[str, dict[str, int]] = {}
        merge_skip_counts(out, self._excluded)
        merge_skip_counts(out, self._skips)
        return out

    def excluded_counts(self) -> dict[str, dict[str, int]]:
        """Items dropped when the dataset was built (unreadable headers, too short for every bucket)."""
        return {s: dict(r) for s, r in self._excluded.items()}

    def _replacement(self, item: int, seed: int, attempt: int, tried: set[int]) -> tuple[int, int]:
        rng = np.random.default_rng([seed, _REPLACE_STREAM, attempt])
        bucket = self.item_buckets[item]
        pool = [i for i in self._by_source_bucket[(self.item_sources[item], bucket)] if i not in tried]
        if not pool:  # the whole source failed in this bucket: any source of the bucket keeps the batch shape
            pool = [i for i in self._by_bucket[bucket] if i not in tried]
        if not pool:
            return -1, 0
        return pool[int(rng.integers(len(pool)))], int(rng.integers(0, 2**62))

    def __getitem__(self, key) -> LatentSample:
        item, seed = int(key.item), int(key.seed)
        skips: list[tuple[str, str]] = []
        tried: set[int] = set()
        errors: list[str] = []
        for attempt in range(self.max_attempts):
            try:
                sample = self._load(item, seed)
            except SampleError as exc:
                source = self.item_sources[item]
                self._count(self._skips, source, exc.reason)
                skips.append((source, exc.reason))
                errors.append(f"{self.item_name(item)}: {exc}")
                log.warning("skipping %s (%s): %s", self.item_name(item), source, exc)
                tried.add(item)
                item, seed = self._replacement(item, seed, attempt, tried)
                if item < 0:
                    break
                continue
            sample.skips = skips
            return sample
        raise RuntimeError(
            f"{len(errors)} samples in a row failed (max_attempts={self.max_attempts}); the data is likely broken, "
            "run `scail2-data validate`:\n  " + "\n  ".join(errors)
        )


class RawPairDataset(PairDatasetBase):
    """Records of raw videos -> samples encoded on the fly: what the motion and preference raw datasets share.

    Each record goes to the bucket of the closest aspect ratio and the longest clip it can fill (records too short
    for all, or whose main video cannot be opened, are excluded and counted). encoders_root / encoders: the frozen
    encoders, loaded lazily per process from ``encoders_root`` (an already loaded ``encoders`` object is used in
    this process only and dropped when pickled to workers). Subclasses implement `record_meta`, `record_class`
    and `_load`.
    """

    def __init__(
        self,
        records: Sequence,
        buckets: Sequence[Bucket | Mapping | str],
        encoders_root: str | Path | None = None,
        backend: Backend = "auto",
        max_attempts: int = 8,
        encoders: "Encoders | None" = None,
        encoder_kwargs: Mapping | None = None,
    ):
        super().__init__(max_attempts)
        if encoders_root is None and encoders is None:
            raise ValueError(f"{type(self).__name__} needs encoders_root (a folder for Encoders.from_pretrained) or encoders")
        self.encoders_root = Path(encoders_root) if encoders_root is not None else None
        self.encoder_kwargs = dict(encoder_kwargs or {})
        self._encoders = encoders
        self.backend = backend
        self.buckets = [Bucket.parse(b) for b in buckets]
        if not self.buckets:
            raise ValueError("no buckets given; e.g. buckets=[Bucket(frames=81, height=512, width=896)]")
        self.records: list = []
        self.metas: list[VideoMeta] = []
        self.item_buckets = []
        for record in records:
            try:
                meta = self.record_meta(record)
            except SampleError as exc:
                log.warning("excluding %s: %s", record.id, exc)
                self._count(self._excluded, record.source, exc.reason)
                continue
            bucket = assign_bucket(meta.num_frames, meta.fps, meta.height, meta.width, self.buckets)
            if bucket is None:
                log.info("excluding %s: %d frames at %g fps is shorter than every bucket", record.id, meta.num_frames, meta.fps)
                self._count(self._excluded, record.source, "too_short")
                continue
            self.records.append(record)
            self.metas.append(meta)
            self.item_buckets.append(bucket)
        if not self.records:
            raise ValueError(f"no usable records (excluded: {self._excluded}); check the manifest with `scail2-data validate`")
        self.item_sources = [r.source for r in self.records]
        self.item_classes = [self.record_class(r) for r in self.records]
        self._index_items()

    def record_meta(self, record) -> VideoMeta:
        """Frame count, fps and size of the record's main video (raises `SampleError`)."""
        raise NotImplementedError

    def record_class(self, record) -> str:
        """The sampling class of a record (`scail2.data.sampling.mix_groups`)."""
        raise NotImplementedError

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.encoders_root is not None:
            state["_encoders"] = None  # reloaded in each worker: large and not meant to be pickled
        return state

    @property
    def encoders(self) -> "Encoders":
        if self._encoders is None:
            from scail2.encoders.bundle import Encoders

            self._encoders = Encoders.from_pretrained(self.encoders_root, **self.encoder_kwargs)
        return self._encoders

    def item_name(self, item: int) -> str:
        return self.records[item].id

    def null_text(self):
        """umT5 of the empty caption, (1, text_len, text_dim) float32."""
        return self.encoders.text.null_embedding().float().cpu()


class MotionPairDataset(RawPairDataset):
    """Raw videos -> `LatentSample` (decode, clip, masks, encoders) for each `SampleKey`.

    records: parsed manifest records. buckets: the allowed `Bucket` shapes (see `RawPairDataset`).
    fixed_seed: None draws pixel choices (clip, crop, reference frame, orientation) per draw; an int fixes
    them per record, as the latent cache does with its seed.
    """

    def __init__(
        self,
        records: Sequence[MotionRecord],
        buckets: Sequence[Bucket],
        encoders_root: str | Path | None = None,
        options: AugmentOptions | None = None,
        fixed_seed: int | None = None,
        backend: Backend = "auto",
        max_attempts: int = 8,
        encoders: "Encoders | None" = None,
        encoder_kwargs: Mapping | None = None,
    ):
        super().__init__(records, buckets, encoders_root, backend, max_attempts, encoders, encoder_kwargs)
        self.options = options if options is not None else AugmentOptions()
        self.fixed_seed = fixed_seed

    def record_meta(self, record: MotionRecord) -> VideoMeta:
        return record_meta(record, self.backend)

    def record_class(self, record: MotionRecord) -> str:
        return record.source_class

    def _load(self, item: int, seed: int) -> LatentSample:
        record, meta, bucket = self.records[item], self.metas[item], self.item_buckets[item]
        choices = draw_pixel_choices(record, meta, bucket, pixel_rng(seed, record.id, self.fixed_seed), self.options)
        swap = draw_swap(record.end_to_end, record.has_aug, choices.forward, swap_rng(seed), self.options)
        pixels = load_pixel_sample(record, bucket, choices, ("driving_aug",) if swap else ("driving",), self.backend)
        return encode_pixel_sample(pixels, self.encoders)


class CachedPairDataset(PairDatasetBase):
    """What the cache datasets share: one item per sample of a sharded cache's index (`ShardIndex`), the
    records that failed when the cache was built counted as excluded, the cache's ``null_text``. Subclasses
    implement `entry_class` and `_load`. Shards are opened per access (memory-mapped safetensors), so workers
    hold no decoded data."""

    def __init__(self, index: ShardIndex, max_attempts: int = 8):
        super().__init__(max_attempts)
        self.index = index
        self.cache_dir = index.root
        for failure in index.failed:
            self._count(self._excluded, failure["source"], failure["reason"])
        self.entries = list(index.samples)
        if not self.entries:
            raise ValueError(f"the {index.format.name} {index.root} has no samples (failed: {len(index.failed)})")
        self.item_sources = [e["source"] for e in self.entries]
        self.item_classes = [self.entry_class(e) for e in self.entries]
        self.item_buckets = [Bucket(*e["bucket"]) for e in self.entries]
        self._index_items()

    def entry_class(self, entry: Mapping[str, Any]) -> str:
        """The sampling class of a cached sample (`scail2.data.sampling.mix_groups`)."""
        raise NotImplementedError

    def item_name(self, item: int) -> str:
        return self.entries[item]["id"]

    def null_text(self):
        """umT5 of the empty caption, (1, text_len, text_dim) float32, as the cache stored it."""
        return self.index.null_text()


class LatentCacheDataset(CachedPairDataset):
    """Cached latents (``scail2-data cache``) -> `LatentSample`; only the driving swap is drawn per sample."""

    def __init__(self, cache_dir: str | Path, options: AugmentOptions | None = None, max_attempts: int = 8):
        from scail2.data.cache import CacheIndex  # the cache module builds on this one

        super().__init__(CacheIndex.load(cache_dir), max_attempts)
        self.options = options if options is not None else AugmentOptions()

    def entry_class(self, entry: Mapping[str, Any]) -> str:
        return entry["source_class"]

    def _load(self, item: int, seed: int) -> LatentSample:
        entry = self.entries[item]
        swap = draw_swap(entry["end_to_end"], entry["has_aug"], entry["forward"], swap_rng(seed), self.options)
        return self.index.read_sample(entry, swap)
