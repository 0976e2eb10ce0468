"""The preference cache: every pair encoded once into a sharded cache (`scail2.data.shards`) of kind "preference".

Per pair: the winner's tensors as the motion cache stores them (``latents``, ``reference``, ``reference_mask``,
``driving``, ``driving_mask``, ``text``, ``clip_tokens``), ``hands`` (1, T, h, w) its hand coverage, and the
loser's ``loser_latents`` (16, T, h, w) and ``loser_hands`` (1, T, h, w). Clip starts are fixed per record from
the cache seed, as `PreferencePairDataset(fixed_seed=seed)` draws them; nothing is drawn at load time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from scail2.data.buckets import Bucket, assign_bucket
from scail2.data.datasets import CachedPairDataset
from scail2.data.latents import LatentSample
from scail2.data.sample import SampleError
from scail2.data.shards import CacheFormat, CacheReport, ShardIndex, build_sharded_cache
from scail2.data.video import Backend
from scail2.preference.data import (
    PreferencePixels,
    PreferenceSample,
    clip_start,
    encode_preference_pixels,
    load_preference_pixels,
    preference_meta,
)
from scail2.preference.records import PREFERENCE_CLASS, PreferenceRecord

if TYPE_CHECKING:
    from scail2.encoders.bundle import Encoders

# 2: reference masks as given (animation-mode masks on white), absent masks as the mode's backgrounds (version 1
# turned white reference-mask pixels black and used all-black masks for absent ones).
CACHE_FORMAT = CacheFormat(
    kind="preference",
    name="preference cache",
    version=2,
    changes="version 2 keeps reference masks as given, animation-mode masks on white",
    build="scail2-data preference-cache MANIFEST DIR --encoders DIR",
    uses={"motion": "pretrain on it with data=cache data.cache_dir=DIR (a motion latent cache, read by LatentCacheDataset)"},
)
# Tensors of one cached pair; "hands" / "loser_hands" are the (1, T, h, w) coverages.
CACHE_TENSORS = ("latents", "loser_latents", "reference", "reference_mask", "driving", "driving_mask", "text",
                 "clip_tokens", "hands", "loser_hands")  # fmt: skip


class PreferenceCacheIndex(ShardIndex):
    """The index of a preference cache; `read_sample` loads one `PreferenceSample`."""

    format = CACHE_FORMAT

    def read_sample(self, entry: Mapping[str, Any]) -> PreferenceSample:
        t = self.read_tensors(entry, CACHE_TENSORS)
        winner = LatentSample.from_cache(
            entry, t, end_to_end=True, history_allowed=False, forward=False, regions={"hands": t["hands"]}
        )
        return PreferenceSample(winner, t["loser_latents"], t["loser_hands"])


@dataclass
class _DecodePair:
    """decode(record) of `build_sharded_cache` for preference records (pickled to loader workers)."""

    buckets: Sequence[Bucket]
    seed: int
    backend: Backend

    def __call__(self, record: PreferenceRecord) -> PreferencePixels:
        meta = preference_meta(record, self.backend)
        bucket = assign_bucket(meta.num_frames, meta.fps, meta.height, meta.width, self.buckets)
        if bucket is None:
            raise SampleError("too_short", "preferred", f"{meta.num_frames} frames at {meta.fps:g} fps fit no bucket")
        start = clip_start(record.id, meta, bucket, 0, self.seed)
        return load_preference_pixels(record, bucket, start, self.backend)


def build_preference_cache(
    records: Sequence[PreferenceRecord],
    out_dir: str | Path,
    encoders: "Encoders",
    buckets: Sequence[Bucket | Mapping | str],
    seed: int = 0,
    dtype: str = "bfloat16",
    shard_size: int = 64,
    num_workers: int = 0,
    require_masks: bool = True,
    backend: Backend = "auto",
    encoders_name: str = "",
    progress: bool = False,
) -> CacheReport:
    """Encode preference pairs into ``out_dir`` (created or resumed), as ``scail2-data cache`` does for motion
    pairs: clip starts fixed per record from ``seed`` (as `PreferencePairDataset(fixed_seed=seed)`), complete
    shards only in the index. A folder built with other settings is refused; records already cached or failed
    are skipped."""
    buckets = [Bucket.parse(b) for b in buckets]
    if require_masks and any(not r.has_masks for r in records):
        first = next(r.id for r in records if not r.has_masks)
        raise ValueError(f"preference record {first} has no masks; add them or pass require_masks=False (masks without characters)")
    settings = {"buckets": [[b.frames, b.height, b.width] for b in buckets], "seed": seed, "dtype": dtype,
                "encoders": encoders_name, "require_masks": require_masks}  # fmt: skip

    def encode(record: PreferenceRecord, pixels: PreferencePixels) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        sample = encode_preference_pixels(pixels, encoders)
        w = sample.winner
        named = {"latents": w.latents, "loser_latents": sample.loser_latents, "reference": w.reference,
                 "reference_mask": w.reference_mask, "driving": w.driving, "driving_mask": w.driving_mask,
                 "text": w.text, "clip_tokens": w.clip_tokens, "hands": w.regions["hands"],
                 "loser_hands": sample.loser_hands}  # fmt: skip
        entry = {"id": record.id, "source": record.source, "mode": record.mode, "text_len": w.text_len,
                 "bucket": [w.bucket.frames, w.bucket.height, w.bucket.width]}  # fmt: skip
        return entry, named

    return build_sharded_cache(
        PreferenceCacheIndex,
        records,
        out_dir,
        settings,
        encoders.text.null_embedding,
        _DecodePair(buckets, seed, backend),
        encode,
        dtype=dtype,
        shard_size=shard_size,
        num_workers=num_workers,
        progress=progress,
    )


class PreferenceCacheDataset(CachedPairDataset):
    """Cached pairs (`build_preference_cache`) -> `PreferenceSample`; nothing is drawn per sample."""

    def __init__(self, cache_dir: str | Path, max_attempts: int = 8):
        super().__init__(PreferenceCacheIndex.load(cache_dir), max_attempts)

    def entry_class(self, entry: Mapping[str, Any]) -> str:
        return PREFERENCE_CLASS

    def _load(self, item: int, seed: int) -> PreferenceSample:  # type: ignore[override]
        return self.index.read_sample(self.entries[item])
