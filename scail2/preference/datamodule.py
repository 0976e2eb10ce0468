"""The LightningDataModule of DPO training: a preference cache or raw pairs -> `PreferenceBatch` batches, served
by the motion data module's machinery (`scail2.data.datamodule.SampledDataModule`: per-rank `MixBatchSampler`,
resumable order) with a loader that collates pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from scail2.data.batch import MotionBatch, PreferenceBatch
from scail2.data.buckets import PAPER_BUCKETS_512P, Bucket
from scail2.data.datamodule import MotionDataLoader, SampledDataModule
from scail2.data.datasets import PairDatasetBase
from scail2.data.sampling import SampleKey
from scail2.data.video import Backend
from scail2.preference.cache import PreferenceCacheDataset
from scail2.preference.data import PreferencePairDataset, collate_preferences
from scail2.preference.records import PREFERENCE_CLASS, load_preference_manifest


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
    cache_name = "preference cache"

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
        super().__init__(
            manifest, cache_dir, encoders_root, buckets, batch_size, num_workers,
            weights if weights is not None else {PREFERENCE_CLASS: 1.0}, samples_per_epoch, seed, video_backend,
            max_attempts, pin_memory, persistent_workers,
        )  # fmt: skip
        self.fixed_clip_seed = fixed_clip_seed
        self.require_masks = require_masks

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
