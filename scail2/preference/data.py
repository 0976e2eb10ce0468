"""Preference pairs as training data: decoding, encoding, collation and the raw-video dataset.

It reuses the motion data (`scail2.data.sample`, `latents`, `datasets`): `load_preference_pixels` decodes a pair
with `VideoReads` and fits it to a bucket with the same transforms (hand boxes go through `transform_boxes` ->
`rasterize_boxes` -> `region_to_latent` like motion hand boxes), `encode_preference_pixels` runs the frozen
encoders (the winner through `encode_pixel_sample`, so its tensors are what the motion path produces for the same
pixels), and `collate_preferences` stacks samples into a `PreferenceBatch` whose winner is a `collate_samples`
`MotionBatch`. `PreferencePairDataset` (raw videos, a `RawPairDataset`) and `PreferenceCacheDataset`
(`scail2.preference.cache`) are indexed by the motion `MixBatchSampler`.

The only per-sample choice is the clip start (when a pair is longer than its bucket); the reference frame is
part of the pair. No history frames: DPO scores whole clips (`scail2.objectives.dpo`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from scail2.conditioning.pixels import to_unit
from scail2.data.batch import PreferenceBatch
from scail2.data.buckets import Bucket
from scail2.data.datasets import RawPairDataset, pixel_rng
from scail2.data.latents import LatentSample, collate_samples, encode_pixel_sample
from scail2.data.records import BoxTrack
from scail2.data.sample import PixelSample, SampleError, VideoMeta, VideoReads, check_same_size, mask_fill, video_meta
from scail2.data.transforms import (
    clip_indices,
    cover_box,
    crop_resize,
    rasterize_boxes,
    region_to_latent,
    transform_boxes,
)
from scail2.data.video import Backend
from scail2.preference.records import PREFERENCE_CLASS, PreferenceRecord

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


def preference_meta(record: PreferenceRecord, backend: Backend = "auto") -> VideoMeta:
    """Frame count and size of the preferred video: from the record when given, else from the file's header."""
    return video_meta(record, "preferred", backend)


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
    driving_fill = mask_fill(record.mode)
    with VideoReads(backend) as io:
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
        check_same_size(tuple(loser_src.shape[-2:]), (th, tw), "dispreferred", "preferred")
        loser = crop_resize(loser_src, box, size)

        driving_src = io.read(io.open(record.driving, "driving"), indices, "driving")
        dbox = cover_box(*driving_src.shape[-2:], *size)
        driving = crop_resize(driving_src, dbox, size)
        if record.driving_mask is not None:
            mask_src = io.read(io.open(record.driving_mask, "driving_mask"), indices, "driving_mask")
            check_same_size(tuple(mask_src.shape[-2:]), tuple(driving_src.shape[-2:]), "driving_mask", "driving")
            driving_mask = crop_resize(mask_src, dbox, size, mode="nearest", fill=driving_fill)
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
            check_same_size(tuple(ref_mask_src.shape[-2:]), ref_hw, "reference_mask", "the reference")
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
# The raw-video dataset
# ----------------------------------------------------------------------------------------------------


def clip_start(record_id: str, meta: VideoMeta, bucket: Bucket, seed: int, fixed_seed: int | None) -> int:
    """The clip's first frame (at 16 fps): the only per-sample choice of a preference pair."""
    span = meta.frames_at_train_fps - bucket.frames
    if span < 0:
        detail = f"{meta.frames_at_train_fps} frames at 16 fps; the bucket needs {bucket.frames}"
        raise SampleError("too_short", "preferred", detail)
    return int(pixel_rng(seed, record_id, fixed_seed).integers(0, span + 1))


class PreferencePairDataset(RawPairDataset):
    """Raw preference videos -> `PreferenceSample` per `SampleKey` (decode, fit the bucket, encode).

    records: parsed preference records; buckets: allowed clip shapes, encoders_root / encoders: as in
    `RawPairDataset` (the preferred video decides the bucket).
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
        if require_masks:
            maskless = [r.id for r in records if not r.has_masks]
            if maskless:
                raise ValueError(
                    f"{len(maskless)} preference records have no driving_mask/reference_mask (first: {maskless[0]}); "
                    "add the masks, or pass require_masks=False to condition them on masks without characters"
                )
        super().__init__(records, buckets, encoders_root, backend, max_attempts, encoders, encoder_kwargs)
        self.fixed_seed = fixed_seed

    def record_meta(self, record: PreferenceRecord) -> VideoMeta:
        return preference_meta(record, self.backend)

    def record_class(self, record: PreferenceRecord) -> str:
        return PREFERENCE_CLASS

    def _load(self, item: int, seed: int) -> PreferenceSample:  # type: ignore[override]
        record, meta, bucket = self.records[item], self.metas[item], self.item_buckets[item]
        start = clip_start(record.id, meta, bucket, seed, self.fixed_seed)
        return encode_preference_pixels(load_preference_pixels(record, bucket, start, self.backend), self.encoders)
