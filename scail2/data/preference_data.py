"""Preference pairs as training data: decoding, encoding, datasets, the preference cache, the data module.

It mirrors the motion data (`scail2.data.sample`, `latents`, `datasets`, `cache`, `datamodule`) and reuses it:
`load_preference_pixels` decodes a pair and fits it to a bucket with the same transforms (hand boxes go through
`transform_boxes` -> `rasterize_boxes` -> `region_to_latent` like motion hand boxes), `encode_preference_pixels`
runs the frozen encoders (the winner through `encode_pixel_sample`, so its tensors are what the motion path
produces for the same pixels), and `collate_preferences` stacks samples into a `PreferenceBatch` whose winner
is a `collate_samples` `MotionBatch`. `PreferencePairDataset` (raw videos) and `PreferenceCacheDataset`
(`build_preference_cache`: safetensors shards + index.json, resumable) are indexed by the motion
`MixBatchSampler`, and `PreferenceDataModule` serves them with a resumable order.

The only per-sample choice is the clip start (when a pair is longer than its bucket); the reference frame is
part of the pair. No history frames: DPO scores whole clips (`scail2.objectives.dpo`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from scail2.conditioning.pixels import to_unit
from scail2.data.batch import MotionBatch, PreferenceBatch
from scail2.data.buckets import PAPER_BUCKETS_512P, Bucket, assign_bucket
from scail2.data.datamodule import MotionDataLoader, SampledDataModule
from scail2.data.datasets import PairDatasetBase, pixel_rng
from scail2.data.latents import LatentSample, collate_samples, encode_pixel_sample
from scail2.data.manifest import BoxTrack
from scail2.data.preference import PREFERENCE_CLASS, PreferenceRecord, load_preference_manifest
from scail2.data.sample import PixelSample, SampleError, VideoMeta, _Reads, _same_size
from scail2.data.sampling import SampleKey
from scail2.data.transforms import (
    clip_indices,
    cover_box,
    crop_resize,
    rasterize_boxes,
    region_to_latent,
    transform_boxes,
)
from scail2.data.video import Backend, VideoDecodeError, VideoReader
from scail2.utils.dtypes import DTYPES as _DTYPES

if TYPE_CHECKING:
    from scail2.encoders.bundle import Encoders

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Pixels and latents
# ----------------------------------------------------------------------------------------------------


@dataclass
class PreferencePixels:
    """A decoded pair fitted to its bucket (uint8, channels first).

    winner: the condition and the preferred clip as a motion `PixelSample` (``regions["hands"]`` = the
    preferred video's hand boxes rasterised, bool (F, H, W)). loser: (F, 3, H, W) dispreferred clip.
    loser_hands: bool (F, H, W) the dispreferred video's hand boxes.
    """

    winner: PixelSample
    loser: torch.Tensor
    loser_hands: torch.Tensor


@dataclass
class PreferenceSample:
    """An encoded pair (no batch dim): ``winner`` as a motion `LatentSample` (hands in ``regions["hands"]``),
    loser_latents (16, T, h, w), loser_hands (1, T, h, w) coverage on the latent grid."""

    winner: LatentSample
    loser_latents: torch.Tensor
    loser_hands: torch.Tensor
    skips: list[tuple[str, str]] = field(default_factory=list)  # set by `PairDatasetBase` on replacement


_BLACK = (0, 0, 0)
_WHITE = (255, 255, 255)


def preference_meta(record: PreferenceRecord, backend: Backend = "auto") -> VideoMeta:
    """Frame count and size of the preferred video: from the record when given, else from the file's header."""
    if record.frames is not None and record.height is not None and record.width is not None:
        return VideoMeta(record.frames, record.fps, record.height, record.width)
    try:
        with VideoReader(record.preferred, backend) as reader:
            return VideoMeta(reader.num_frames, record.fps, *reader.size)
    except VideoDecodeError as exc:
        raise SampleError(exc.reason, "preferred", exc.detail) from None


def _hand_mask(track: BoxTrack, indices: Sequence[int], box, size: tuple[int, int], n: int, name: str) -> torch.Tensor:
    if len(track) < n:
        raise SampleError("mismatch", name, f"has boxes for {len(track)} frames; the videos have {n}")
    return rasterize_boxes([transform_boxes(np.asarray(track[i]), box, size) for i in indices], size)


def load_preference_pixels(
    record: PreferenceRecord, bucket: Bucket, clip_start: int, backend: Backend = "auto"
) -> PreferencePixels:
    """Decode one pair: a ``bucket.frames`` clip from ``clip_start`` (frames at 16 fps) of all three videos,
    each fitted to the bucket (resize-to-cover, centre crop); masks with nearest resizing, hand boxes through
    the same map. Reference masks are used as given; absent masks mean no characters (the mode's backgrounds,
    `scail2.conditioning.masks.MASK_BACKGROUNDS`). Raises `SampleError`."""
    size = (bucket.height, bucket.width)
    mask_fill = _BLACK if record.mode == "animation" else _WHITE
    with _Reads(backend) as io:
        reader = io.open(record.preferred, "preferred")
        n = reader.num_frames
        try:
            indices = clip_indices(n, record.fps, bucket.frames, clip_start)
        except ValueError as exc:
            raise SampleError("too_short", "preferred", str(exc)) from None
        ref_index = record.reference if isinstance(record.reference, int) else None
        if ref_index is not None and ref_index >= n:
            raise SampleError("mismatch", "reference", f"frame {ref_index} asked but preferred has {n} frames")
        # The reference frame is decoded in the same pass as the clip.
        frames = io.read(reader, indices + ([ref_index] if ref_index is not None else []), "preferred")
        th, tw = frames.shape[-2:]
        box = cover_box(th, tw, *size)
        preferred = crop_resize(frames[: len(indices)], box, size)
        loser_src = io.read(io.open(record.dispreferred, "dispreferred"), indices, "dispreferred")
        _same_size(tuple(loser_src.shape[-2:]), (th, tw), "dispreferred", "preferred")
        loser = crop_resize(loser_src, box, size)

        driving_src = io.read(io.open(record.driving, "driving"), indices, "driving")
        dbox = cover_box(*driving_src.shape[-2:], *size)
        driving = crop_resize(driving_src, dbox, size)
        if record.driving_mask is not None:
            mask_src = io.read(io.open(record.driving_mask, "driving_mask"), indices, "driving_mask")
            _same_size(tuple(mask_src.shape[-2:]), tuple(driving_src.shape[-2:]), "driving_mask", "driving")
            driving_mask = crop_resize(mask_src, dbox, size, mode="nearest", fill=mask_fill)
        else:
            driving_mask = None  # no characters: the mode's driving background

        if ref_index is not None:
            reference, rbox, ref_hw = crop_resize(frames[-1:], box, size)[0], box, (th, tw)
        else:
            image = io.image(record.reference, "reference")
            ref_hw = tuple(image.shape[-2:])
            rbox = cover_box(*ref_hw, *size)
            reference = crop_resize(image[None], rbox, size)[0]
        if record.reference_mask is not None:
            ref_mask_src = io.image(record.reference_mask, "reference_mask")
            _same_size(tuple(ref_mask_src.shape[-2:]), ref_hw, "reference_mask", "the reference")
            reference_mask = crop_resize(ref_mask_src[None], rbox, size, mode="nearest")[0]
        else:
            reference_mask = None  # no characters: the mode's reference background
        hands = _hand_mask(record.preferred_hands, indices, box, size, n, "preferred_hands")
        loser_hands = _hand_mask(record.dispreferred_hands, indices, box, size, n, "dispreferred_hands")

    winner = PixelSample(
        id=record.id,
        source=record.source,
        mode=record.mode,
        end_to_end=True,
        # DPO scores whole clips: no clean history frames (SPEC §7, `scail2.objectives.dpo`).
        history_allowed=False,
        caption=record.caption,
        forward=False,
        bucket=bucket,
        target=preferred,
        reference=reference,
        reference_mask=reference_mask,
        drivings={"driving": (driving, driving_mask)},
        regions={"hands": hands},
    )
    return PreferencePixels(winner, loser, loser_hands)


@torch.no_grad()
def encode_preference_pixels(pixels: PreferencePixels, encoders: "Encoders") -> PreferenceSample:
    """Run the frozen encoders on a pair; the winner goes through `encode_pixel_sample` unchanged."""
    winner = encode_pixel_sample(pixels.winner, encoders)
    loser = to_unit(pixels.loser).permute(1, 0, 2, 3)[None]  # (1, 3, F, H, W)
    loser_latents = encoders.vae.encode(loser)[0].float().cpu()  # (16, T, h, w)
    return PreferenceSample(winner, loser_latents, region_to_latent(pixels.loser_hands))


def collate_preferences(samples: Sequence[PreferenceSample]) -> PreferenceBatch:
    """Stack pairs of one bucket: the winners with `collate_samples` (``winner.hand_mask`` from the preferred
    boxes, ``winner.meta`` with ids and skip counts), the losers' latents and hand coverage beside them."""
    winner = collate_samples([replace(s.winner, skips=s.skips) for s in samples])
    return PreferenceBatch(
        winner=winner,
        loser_latents=torch.stack([s.loser_latents for s in samples]),  # (B, 16, T, h, w)
        loser_hand_mask=torch.stack([s.loser_hands for s in samples]),  # (B, 1, T, h, w)
    )


# ----------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------


def _clip_start(record_id: str, meta: VideoMeta, bucket: Bucket, seed: int, fixed_seed: int | None) -> int:
    """The clip's first frame (at 16 fps): the only per-sample choice of a preference pair."""
    span = meta.frames_at_train_fps - bucket.frames
    if span < 0:
        detail = f"{meta.frames_at_train_fps} frames at 16 fps; the bucket needs {bucket.frames}"
        raise SampleError("too_short", "preferred", detail)
    return int(pixel_rng(seed, record_id, fixed_seed).integers(0, span + 1))


class PreferencePairDataset(PairDatasetBase):
    """Raw preference videos -> `PreferenceSample` per `SampleKey` (decode, fit the bucket, encode).

    records: parsed preference records; buckets: allowed clip shapes (each record goes to the closest aspect
    ratio and longest clip it fills; records too short for all are excluded and counted as ``too_short``).
    encoders_root / encoders: the frozen encoders, loaded lazily per process (as `MotionPairDataset`).
    fixed_seed: None draws the clip start per draw; an int fixes it per record (what the cache stores).
    require_masks: refuse records without driving/reference masks (the policy was trained with masks);
    False conditions such records on masks without characters (the mode's backgrounds).
    """

    def __init__(
        self,
        records: Sequence[PreferenceRecord],
        buckets: Sequence[Bucket | Mapping | str],
        encoders_root: str | Path | None = None,
        fixed_seed: int | None = None,
        require_masks: bool = True,
        backend: Backend = "auto",
        max_attempts: int = 8,
        encoders: "Encoders | None" = None,
        encoder_kwargs: Mapping | None = None,
    ):
        super().__init__(max_attempts)
        if encoders_root is None and encoders is None:
            raise ValueError("PreferencePairDataset needs encoders_root (a folder for Encoders.from_pretrained) or encoders")
        self.encoders_root = Path(encoders_root) if encoders_root is not None else None
        self.encoder_kwargs = dict(encoder_kwargs or {})
        self._encoders = encoders
        self.fixed_seed = fixed_seed
        self.backend = backend
        self.buckets = [Bucket.parse(b) for b in buckets]
        if not self.buckets:
            raise ValueError("no buckets given; e.g. buckets=[Bucket(frames=81, height=512, width=896)]")
        if require_masks:
            maskless = [r.id for r in records if not r.has_masks]
            if maskless:
                raise ValueError(
                    f"{len(maskless)} preference records have no driving_mask/reference_mask (first: {maskless[0]}); "
                    "add the masks, or pass require_masks=False to condition them on masks without characters"
                )
        self.records: list[PreferenceRecord] = []
        self.metas: list[VideoMeta] = []
        self.item_buckets = []
        for record in records:
            try:
                meta = preference_meta(record, backend)
            except SampleError as exc:
                log.warning("excluding %s: %s", record.id, exc)
                self._count(self._excluded, record.source, exc.reason)
                continue
            bucket = assign_bucket(meta.num_frames, meta.fps, meta.height, meta.width, self.buckets)
            if bucket is None:
                self._count(self._excluded, record.source, "too_short")
                continue
            self.records.append(record)
            self.metas.append(meta)
            self.item_buckets.append(bucket)
        if not self.records:
            raise ValueError(f"no usable preference records (excluded: {self._excluded}); check the files and buckets")
        self.item_sources = [r.source for r in self.records]
        self.item_classes = [PREFERENCE_CLASS] * len(self.records)
        self._index_items()

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

    def null_text(self) -> torch.Tensor:
        """umT5 of the empty caption, (1, text_len, text_dim) float32."""
        return self.encoders.text.null_embedding().float().cpu()

    def _load(self, item: int, seed: int) -> PreferenceSample:  # type: ignore[override]
        record, meta, bucket = self.records[item], self.metas[item], self.item_buckets[item]
        start = _clip_start(record.id, meta, bucket, seed, self.fixed_seed)
        return encode_preference_pixels(load_preference_pixels(record, bucket, start, self.backend), self.encoders)


# ----------------------------------------------------------------------------------------------------
# The preference cache: safetensors shards + index.json, as the motion cache (`scail2.data.cache`)
# ----------------------------------------------------------------------------------------------------

CACHE_KIND = "preference"
# 2: reference masks as given (animation-mode masks on white), absent masks as the mode's backgrounds (version 1
# turned white reference-mask pixels black and used all-black masks for absent ones).
_CACHE_VERSION = 2
_INDEX = "index.json"
_NULL_TEXT = "null_text.safetensors"
# Tensors of one cached pair; "hands" / "loser_hands" are the (1, T, h, w) coverages.
_CACHE_TENSORS = ("latents", "loser_latents", "reference", "reference_mask", "driving", "driving_mask", "text",
                  "clip_tokens", "hands", "loser_hands")  # fmt: skip


@dataclass
class PreferenceCacheIndex:
    """The parsed ``index.json`` of a preference cache."""

    root: Path
    settings: dict[str, Any]
    shards: list[str] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, root: str | Path) -> "PreferenceCacheIndex":
        root = Path(root)
        path = root / _INDEX
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found; build it with `scail2-data preference-cache MANIFEST {root} --encoders DIR`"
            )
        data = json.loads(path.read_text())
        if data.get("kind") != CACHE_KIND:
            raise ValueError(
                f"{path} is not a preference cache (kind {data.get('kind')!r}); a motion cache is read by LatentCacheDataset"
            )
        if data.get("version") != _CACHE_VERSION:
            raise ValueError(
                f"{path} has preference-cache version {data.get('version')}; this code reads version {_CACHE_VERSION} "
                "(version 2 keeps reference masks as given, animation-mode masks on white): rebuild it with "
                f"`scail2-data preference-cache` into a new folder (or delete {root}); caches are never mixed"
            )
        return cls(root, data["settings"], data["shards"], data["samples"], data["failed"])

    def save(self) -> None:
        data = {"kind": CACHE_KIND, "version": _CACHE_VERSION, "settings": self.settings, "shards": self.shards,
                "samples": self.samples, "failed": self.failed}  # fmt: skip
        tmp = self.root / (_INDEX + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.root / _INDEX)  # atomic: readers see the old or the new index, never half

    def null_text(self) -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self.root / _NULL_TEXT))["null_text"].float()

    def read_sample(self, entry: Mapping[str, Any]) -> PreferenceSample:
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        key = entry["key"]
        try:
            with safe_open(str(self.root / entry["shard"]), framework="pt") as fh:
                t = {name: fh.get_tensor(f"{key}/{name}").float() for name in _CACHE_TENSORS}
        except (OSError, SafetensorError, KeyError) as exc:
            raise SampleError("unreadable", "cache", f"{entry['shard']} {key}: {exc}") from None
        winner = LatentSample(
            id=entry["id"],
            source=entry["source"],
            mode=entry["mode"],
            end_to_end=True,
            history_allowed=False,
            forward=False,
            bucket=Bucket(*entry["bucket"]),
            latents=t["latents"],
            reference=t["reference"],
            reference_mask=t["reference_mask"],
            driving=t["driving"],
            driving_mask=t["driving_mask"],
            text=t["text"],
            text_len=entry["text_len"],
            clip_tokens=t["clip_tokens"],
            regions={"hands": t["hands"]},
        )
        return PreferenceSample(winner, t["loser_latents"], t["loser_hands"])


@dataclass
class PreferenceCacheReport:
    cached: int  # pairs in the cache after this run
    added: int  # pairs encoded by this run
    failed: int  # records that failed (all runs)
    skipped_done: int  # records already cached (or failed) when this run started
    seconds: float


class _PixelJobs(Dataset):
    """Decoding in loader workers: item -> (record index, PreferencePixels or (reason, field, detail))."""

    def __init__(self, records, pending, buckets, seed, backend):
        self.records, self.pending, self.buckets, self.seed, self.backend = records, pending, buckets, seed, backend

    def __len__(self) -> int:
        return len(self.pending)

    def __getitem__(self, i: int):
        index = self.pending[i]
        record = self.records[index]
        try:
            meta = preference_meta(record, self.backend)
            bucket = assign_bucket(meta.num_frames, meta.fps, meta.height, meta.width, self.buckets)
            if bucket is None:
                raise SampleError("too_short", "preferred", f"{meta.num_frames} frames at {meta.fps:g} fps fit no bucket")
            start = _clip_start(record.id, meta, bucket, 0, self.seed)
            return index, load_preference_pixels(record, bucket, start, self.backend)
        except SampleError as exc:
            return index, (exc.reason, exc.field, exc.detail)


def _first(batch):
    return batch[0]


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
) -> PreferenceCacheReport:
    """Encode preference pairs into ``out_dir`` (created or resumed), like ``scail2-data cache`` does for motion
    pairs: clip starts fixed per record from ``seed`` (as `PreferencePairDataset(fixed_seed=seed)`), shards written
    under a temporary name and renamed when complete, an index that lists complete shards only. A folder built
    with other settings is refused; records already cached or failed are skipped."""
    from safetensors.torch import save_file

    if dtype not in _DTYPES:
        raise ValueError(f"cache dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    if shard_size < 1:
        raise ValueError(f"shard_size {shard_size} must be >= 1")
    buckets = [Bucket.parse(b) for b in buckets]
    if require_masks and any(not r.has_masks for r in records):
        first = next(r.id for r in records if not r.has_masks)
        raise ValueError(f"preference record {first} has no masks; add them or pass require_masks=False (masks without characters)")
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("the preference manifest has duplicate ids; fix them before caching")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    settings = {"buckets": [[b.frames, b.height, b.width] for b in buckets], "seed": seed, "dtype": dtype,
                "encoders": encoders_name, "require_masks": require_masks}  # fmt: skip
    if (root / _INDEX).exists():
        index = PreferenceCacheIndex.load(root)
        if index.settings != settings:
            changed = sorted(k for k in settings if index.settings.get(k) != settings[k])
            raise ValueError(f"{root} holds a cache built with other settings ({', '.join(changed)} differ); use a new folder")
    else:
        index = PreferenceCacheIndex(root, settings)
    for stale in root.glob("*.tmp"):  # leftovers of an interrupted run: never referenced by the index
        stale.unlink()
    if not (root / _NULL_TEXT).exists():
        tmp = root / (_NULL_TEXT + ".tmp")
        save_file({"null_text": encoders.text.null_embedding().float().cpu().contiguous()}, str(tmp))
        tmp.replace(root / _NULL_TEXT)

    done = {s["id"] for s in index.samples} | {f["id"] for f in index.failed}
    pending = [i for i, r in enumerate(records) if r.id not in done]
    store = _DTYPES[dtype]
    jobs = _PixelJobs(records, pending, buckets, seed, backend)
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
            index.samples.extend({**e, "shard": name} for e in entries)
        index.failed.extend(failures)
        if entries or failures:
            index.save()
        tensors, entries, failures = {}, [], []

    for position, result in loader:
        record = records[position]
        if not isinstance(result, PreferencePixels):
            reason, field_name, detail = result
            log.warning("preference cache: skipping %s: %s: %s: %s", record.id, field_name, reason, detail)
            failures.append({"id": record.id, "source": record.source, "reason": reason, "field": field_name, "detail": detail})
        else:
            sample = encode_preference_pixels(result, encoders)
            key = f"s{len(entries)}"
            w = sample.winner
            named = {"latents": w.latents, "loser_latents": sample.loser_latents, "reference": w.reference,
                     "reference_mask": w.reference_mask, "driving": w.driving, "driving_mask": w.driving_mask,
                     "text": w.text, "clip_tokens": w.clip_tokens, "hands": w.regions["hands"],
                     "loser_hands": sample.loser_hands}  # fmt: skip
            for name, value in named.items():
                tensors[f"{key}/{name}"] = value.to(store).contiguous()
            entries.append({"id": record.id, "source": record.source, "mode": record.mode, "key": key, "text_len": w.text_len,
                            "bucket": [w.bucket.frames, w.bucket.height, w.bucket.width]})  # fmt: skip
            added += 1
        if len(entries) >= shard_size:
            commit()
    commit()
    seconds = time.perf_counter() - start
    return PreferenceCacheReport(len(index.samples), added, len(index.failed), len(records) - len(pending), seconds)


class PreferenceCacheDataset(PairDatasetBase):
    """Cached pairs (`build_preference_cache`) -> `PreferenceSample`; nothing is drawn per sample."""

    def __init__(self, cache_dir: str | Path, max_attempts: int = 8):
        super().__init__(max_attempts)
        self.cache_dir = Path(cache_dir)
        self.index = PreferenceCacheIndex.load(self.cache_dir)
        for failure in self.index.failed:
            self._count(self._excluded, failure["source"], failure["reason"])
        self.entries = list(self.index.samples)
        if not self.entries:
            raise ValueError(f"the preference cache {self.cache_dir} has no pairs (failed: {len(self.index.failed)})")
        self.item_sources = [e["source"] for e in self.entries]
        self.item_classes = [PREFERENCE_CLASS] * len(self.entries)
        self.item_buckets = [Bucket(*e["bucket"]) for e in self.entries]
        self._index_items()

    def item_name(self, item: int) -> str:
        return self.entries[item]["id"]

    def null_text(self) -> torch.Tensor:
        return self.index.null_text()

    def _load(self, item: int, seed: int) -> PreferenceSample:  # type: ignore[override]
        return self.index.read_sample(self.entries[item])


# ----------------------------------------------------------------------------------------------------
# Loader and data module
# ----------------------------------------------------------------------------------------------------


class PreferenceDataLoader(MotionDataLoader):
    """A DataLoader of `PreferenceBatch` over a `MixBatchSampler`, resumable mid-epoch like `MotionDataLoader`
    (``state_dict`` = the sampler's position); attaches ``null_text`` to ``batch.winner`` and sums skip counts."""

    collate = staticmethod(collate_preferences)

    @staticmethod
    def motion_part(batch: PreferenceBatch) -> MotionBatch:
        return batch.winner


class PreferenceDataModule(SampledDataModule):
    """DPO training data: `PreferenceBatch` batches from a preference cache (``cache_dir``) or raw videos
    (``manifest`` + ``encoders_root``).

    Args:
        manifest: JSONL preference manifest (raw path; needs ``encoders_root``).
        cache_dir: a folder written by `build_preference_cache` (takes precedence over ``manifest``).
        encoders_root: frozen encoders for the raw path (`Encoders.from_pretrained` folder).
        buckets: allowed clip shapes (raw path only; the cache stores its own).
        batch_size: pairs per batch per rank (all of one bucket).
        num_workers: loader worker processes.
        weights: sampling weight per group; None draws every pair uniformly (one group, ``preference``).
            A record ``source`` named here forms its own group.
        samples_per_epoch: draws per epoch over all ranks (default: the number of pairs).
        seed: sampling seed; ranks and epochs get their own streams from it.
        fixed_clip_seed: raw path only: fix each pair's clip start with this seed (as a cache built with it).
        require_masks: refuse pairs without masks (False: masks without characters, the mode's backgrounds).
        video_backend, max_attempts, pin_memory, persistent_workers: as in `MotionDataModule`.
    Train with ``Trainer(use_distributed_sampler=False)``: the sampler already draws per rank.
    """

    loader_class = PreferenceDataLoader

    def __init__(
        self,
        manifest: str | Path | None = None,
        cache_dir: str | Path | None = None,
        encoders_root: str | Path | None = None,
        buckets: Sequence[Bucket | Mapping | str] = PAPER_BUCKETS_512P,
        batch_size: int = 1,
        num_workers: int = 2,
        weights: Mapping[str, float] | None = None,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        fixed_clip_seed: int | None = None,
        require_masks: bool = True,
        video_backend: Backend = "auto",
        max_attempts: int = 8,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ):
        super().__init__()
        if manifest is None and cache_dir is None:
            raise ValueError("PreferenceDataModule needs cache_dir (preference cache) or manifest (+ encoders_root)")
        if cache_dir is None and encoders_root is None:
            raise ValueError("the raw-video path (manifest without cache_dir) needs encoders_root")
        self.manifest = Path(manifest) if manifest is not None else None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.encoders_root = Path(encoders_root) if encoders_root is not None else None
        self.buckets = [Bucket.parse(b) for b in buckets]
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.weights = {str(k): float(v) for k, v in weights.items()} if weights is not None else {PREFERENCE_CLASS: 1.0}
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.fixed_clip_seed = fixed_clip_seed
        self.require_masks = require_masks
        self.video_backend = video_backend
        self.max_attempts = max_attempts
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers

    def build_dataset(self) -> PairDatasetBase:
        if self.cache_dir is not None:
            return PreferenceCacheDataset(self.cache_dir, self.max_attempts)
        return PreferencePairDataset(
            load_preference_manifest(self.manifest),
            self.buckets,
            encoders_root=self.encoders_root,
            fixed_seed=self.fixed_clip_seed,
            require_masks=self.require_masks,
            backend=self.video_backend,
            max_attempts=self.max_attempts,
        )

    def fixed_batches(
        self, num_pairs: int | None, batch_size: int, seed: int, what: str = "held-out", setting: str = "num_pairs"
    ) -> list[PreferenceBatch]:
        """A fixed set of this module's pairs for evaluation, read from a dataset of its own (the training
        loader's is untouched): ``num_pairs`` distinct pairs (all of them when None), chosen once by a
        permutation seeded with ``seed``, in batches of up to ``batch_size`` pairs of one bucket, each loaded
        with ``seed``; ``winner.null_text`` attached. A pair that cannot be read is an error, not replaced by
        another: the measured set is exactly the named one. ``what`` names the set and ``setting`` the option
        that asked for ``num_pairs`` in the errors."""
        dataset = self.build_dataset()
        available = len(dataset)
        wanted = available if num_pairs is None else num_pairs
        if wanted > available:
            raise ValueError(
                f"{setting} is {num_pairs} but the {what} set ({self.cache_dir or self.manifest}) has {available} "
                "pairs; lower it (null measures all of them) or build more pairs"
            )
        chosen = np.random.default_rng(seed).permutation(available)[:wanted]
        by_bucket: dict[Bucket, list[int]] = {}
        for item in chosen.tolist():
            by_bucket.setdefault(dataset.item_buckets[item], []).append(item)
        null_text = dataset.null_text()
        batches = []
        for items in by_bucket.values():
            for start in range(0, len(items), batch_size):
                samples = []
                for item in items[start : start + batch_size]:
                    sample = dataset[SampleKey(item, seed)]
                    if sample.skips:
                        raise RuntimeError(
                            f"{what} pair {dataset.item_name(item)} could not be read ({sample.skips}); run "
                            "`scail2-data validate` on it or remove it from the set"
                        )
                    samples.append(sample)
                batch = collate_preferences(samples)
                batch.winner.null_text = null_text
                batches.append(batch)
        return batches
