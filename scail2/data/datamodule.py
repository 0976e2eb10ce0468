"""The LightningDataModule: cache or raw videos -> bucketed, source-mixed `MotionBatch` batches.

Resume: `MotionDataLoader` counts the batches it has handed out and exposes ``state_dict`` /
``load_state_dict``; Lightning saves that state in every checkpoint (as a stateful loader) and restores it,
and the data module's own ``state_dict`` hooks carry the same state for loaders built after a restore.
A resumed run continues at the next batch with the identical order. Train with
``Trainer(use_distributed_sampler=False)``: the sampler already draws per rank.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from scail2.data.batch import MotionBatch
from scail2.data.buckets import PAPER_BUCKETS_512P, Bucket
from scail2.data.datasets import LatentCacheDataset, MotionPairDataset, PairDatasetBase
from scail2.data.latents import collate_samples, merge_skip_counts
from scail2.data.manifest import load_manifest
from scail2.data.sample import AugmentOptions
from scail2.data.sampling import PAPER_WEIGHTS, MixBatchSampler, SampleKey, mix_groups
from scail2.data.video import Backend

log = logging.getLogger(__name__)


class MotionDataLoader(DataLoader):
    """A DataLoader over a `MixBatchSampler` that can save and restore its position mid-epoch.

    It also attaches ``null_text`` (umT5 of "") to every batch in the main process and sums the per-batch
    skip counts (`skip_counts`). Subclasses for other batch types set ``collate`` and ``motion_part`` (the
    `MotionBatch` that carries ``meta`` and ``null_text``).
    """

    collate = staticmethod(collate_samples)

    @staticmethod
    def motion_part(batch: Any) -> MotionBatch:
        return batch

    def __init__(
        self,
        dataset: PairDatasetBase,
        batch_sampler: MixBatchSampler,
        num_workers: int = 0,
        null_text: torch.Tensor | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        timeout: float = 0,
    ):
        super().__init__(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=self.collate,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers and num_workers > 0,
            timeout=timeout,
        )
        self.null_text = null_text
        self._epoch = batch_sampler.epoch
        self._consumed = 0
        self._skips: dict[str, dict[str, int]] = {}

    @property
    def mix_sampler(self) -> MixBatchSampler:
        return self.batch_sampler  # type: ignore[return-value]

    def __iter__(self) -> Iterator[MotionBatch]:  # type: ignore[override]
        sampler = self.mix_sampler
        self._epoch = sampler.epoch
        self._consumed = sampler.resume_position  # batches of this epoch the sampler will skip
        for batch in super().__iter__():
            self._consumed += 1
            motion = self.motion_part(batch)
            merge_skip_counts(self._skips, motion.meta.get("skips", {}))
            if self.null_text is not None:
                motion.null_text = self.null_text
            yield batch
        self._epoch, self._consumed = self._epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        """Epoch and number of batches of it already handed out (what a resumed run skips)."""
        return self.mix_sampler.state_dict(batches_done=self._consumed) | {"epoch": self._epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mix_sampler.load_state_dict(state)
        self._epoch, self._consumed = int(state["epoch"]), int(state["batches_done"])

    def skip_counts(self) -> dict[str, dict[str, int]]:
        """``{source: {reason: count}}``: samples replaced in the batches handed out so far, all workers,
        plus items excluded when the dataset was built."""
        out: dict[str, dict[str, int]] = {}
        merge_skip_counts(out, self.dataset.excluded_counts())
        merge_skip_counts(out, self._skips)
        return out


def build_sampler(
    dataset: PairDatasetBase,
    weights: Mapping[str, float],
    batch_size: int,
    samples_per_epoch: int | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> MixBatchSampler:
    """A `MixBatchSampler` over a dataset's items; ``samples_per_epoch`` (all ranks) defaults to its length."""
    groups = mix_groups(dataset.item_sources, dataset.item_classes, weights)
    total = samples_per_epoch if samples_per_epoch is not None else len(dataset)
    num_batches = max(1, total // (batch_size * world_size))
    return MixBatchSampler(groups, dataset.item_buckets, weights, batch_size, num_batches, seed, rank, world_size)


class SampledDataModule(L.LightningDataModule):
    """What the motion and preference data modules share: the arguments of both (a cache or a manifest of raw
    videos, buckets, batch size, sampling weights and seed, loader settings), the dataset built once
    (`build_dataset`), a loader of ``loader_class`` over a per-rank `MixBatchSampler`, its position saved and
    restored with checkpoints, and the skip counters. Subclasses implement `build_dataset`."""

    loader_class: type[MotionDataLoader] = MotionDataLoader
    cache_name: str = "latent cache"  # what ``cache_dir`` holds, for messages

    def __init__(
        self,
        manifest: str | Path | None,
        cache_dir: str | Path | None,
        encoders_root: str | Path | None,
        buckets: Sequence[Bucket | Mapping | str],
        batch_size: int,
        num_workers: int,
        weights: Mapping[str, float],
        samples_per_epoch: int | None,
        seed: int,
        video_backend: Backend,
        max_attempts: int,
        pin_memory: bool,
        persistent_workers: bool,
    ) -> None:
        super().__init__()
        if manifest is None and cache_dir is None:
            raise ValueError(f"{type(self).__name__} needs cache_dir ({self.cache_name}) or manifest (+ encoders_root)")
        if cache_dir is None and encoders_root is None:
            raise ValueError("the raw-video path (manifest without cache_dir) needs encoders_root")
        self.manifest = Path(manifest) if manifest is not None else None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.encoders_root = Path(encoders_root) if encoders_root is not None else None
        self.buckets = [Bucket.parse(b) for b in buckets]
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.weights = {str(k): float(v) for k, v in weights.items()}
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.video_backend = video_backend
        self.max_attempts = max_attempts
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.dataset: PairDatasetBase | None = None
        self._loader: MotionDataLoader | None = None
        self._pending_state: dict[str, Any] | None = None

    def build_dataset(self) -> PairDatasetBase:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = self.build_dataset()

    def _rank(self) -> tuple[int, int]:
        """(rank, size) among the data-parallel replicas (ranks that share a sequence read the same batches)."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return 0, 1
        kwargs = trainer.distributed_sampler_kwargs
        return (kwargs["rank"], kwargs["num_replicas"]) if kwargs else (trainer.global_rank, trainer.world_size)

    def train_dataloader(self) -> MotionDataLoader:
        self.setup("fit")
        assert self.dataset is not None
        rank, world_size = self._rank()
        sampler = build_sampler(self.dataset, self.weights, self.batch_size, self.samples_per_epoch, self.seed, rank, world_size)
        self._loader = self.loader_class(
            self.dataset,
            sampler,
            num_workers=self.num_workers,
            null_text=self.dataset.null_text(),
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )
        if self._pending_state is not None:
            self._loader.load_state_dict(self._pending_state)
            self._pending_state = None
        return self._loader

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self._loader.state_dict()} if self._loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "loader" not in state_dict:
            return
        if self._loader is not None:
            self._loader.load_state_dict(state_dict["loader"])
        else:
            self._pending_state = dict(state_dict["loader"])

    def skip_counts(self) -> dict[str, dict[str, int]]:
        """Skips seen by the current training loader (see `MotionDataLoader.skip_counts`)."""
        return self._loader.skip_counts() if self._loader is not None else {}


class MotionDataModule(SampledDataModule):
    """Training data from a latent cache (``cache_dir``, fast) or a manifest of raw videos (``manifest``).

    Args:
        manifest: JSONL (or Parquet) manifest, for the raw-video path; needs ``encoders_root``.
        cache_dir: a folder written by ``scail2-data cache`` (takes precedence over ``manifest``).
        encoders_root: frozen encoders for the raw path (`Encoders.from_pretrained` folder).
        buckets: allowed clip shapes (`Bucket`, ``"81x512x896"`` or mappings); the raw path only.
        batch_size: samples per batch per rank (all of one bucket).
        num_workers: loader worker processes.
        weights: sampling weight per group: a source class (``animation``, ``replacement``, ``pose``) or a
            source name (that source then forms its own group). Default: the paper's 60 / 20 / 20.
        samples_per_epoch: draws per epoch over all ranks (default: the number of items).
        seed: sampling seed; ranks and epochs get their own streams from it.
        augment: `AugmentOptions` (or a mapping of its fields).
        fixed_pixel_seed: raw path only: fix the per-record pixel choices with this seed (as a cache built
            with that seed does) instead of drawing them per sample.
        video_backend: "auto" (decord, PyAV fallback), "decord" or "pyav".
        max_attempts: samples tried in a row before a batch fails (corrupt inputs are replaced).
    """

    def __init__(
        self,
        manifest: str | Path | None = None,
        cache_dir: str | Path | None = None,
        encoders_root: str | Path | None = None,
        buckets: Sequence[Bucket | Mapping | str] = PAPER_BUCKETS_512P,
        batch_size: int = 1,
        num_workers: int = 2,
        weights: Mapping[str, float] = PAPER_WEIGHTS,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        augment: AugmentOptions | Mapping[str, Any] = AugmentOptions(),
        fixed_pixel_seed: int | None = None,
        video_backend: Backend = "auto",
        max_attempts: int = 8,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ):
        super().__init__(
            manifest, cache_dir, encoders_root, buckets, batch_size, num_workers, weights, samples_per_epoch, seed,
            video_backend, max_attempts, pin_memory, persistent_workers,
        )  # fmt: skip
        if isinstance(augment, Mapping):
            # Config lists (also OmegaConf ListConfig) become the dataclass's tuples.
            augment = AugmentOptions(
                **{k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v for k, v in augment.items()}
            )
        self.augment = augment
        self.fixed_pixel_seed = fixed_pixel_seed

    def build_dataset(self) -> PairDatasetBase:
        if self.cache_dir is not None:
            return LatentCacheDataset(self.cache_dir, self.augment, self.max_attempts)
        records = load_manifest(self.manifest)
        return MotionPairDataset(
            records,
            self.buckets,
            encoders_root=self.encoders_root,
            options=self.augment,
            fixed_seed=self.fixed_pixel_seed,
            backend=self.video_backend,
            max_attempts=self.max_attempts,
        )

    def validation_batch(self, num_samples: int, seed: int) -> MotionBatch:
        """A fixed batch of the training set for validation sampling: up to ``num_samples`` items of its most
        common bucket, spread evenly over that bucket's items, item k loaded with seed ``seed + k``, with
        ``null_text`` attached. The same arguments give the same batch."""
        self.setup("fit")
        dataset = self.dataset
        assert dataset is not None
        buckets = list(dataset.item_buckets)
        if not buckets:
            raise ValueError("the training dataset has no items to validate on")
        bucket = Counter(buckets).most_common(1)[0][0]
        items = [i for i, b in enumerate(buckets) if b == bucket]
        n = min(num_samples, len(items))
        chosen = [items[(k * len(items)) // n] for k in range(n)]
        batch = collate_samples([dataset[SampleKey(item, seed + k)] for k, item in enumerate(chosen)])
        batch.null_text = dataset.null_text()
        return batch
