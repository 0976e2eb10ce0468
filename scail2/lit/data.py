"""The ``data=synthetic`` and ``data=synthetic_preference`` options: data modules that create their data on first
use (`SyntheticDataModule` for pretraining, `SyntheticPreferenceDataModule` for DPO).

`SyntheticDataModule.prepare_data` (run once per node before training) writes, when absent,

    <root>/videos/    the procedurally drawn dataset (`scail2.data.synth`) and its manifest.jsonl
    <root>/encoders/  tiny VAE / umT5 / CLIP in the Wan2.1-I2V folder layout (`scail2.encoders.tiny`): random
                      umT5 / CLIP and, by ``vae``, the random VAE or the shipped one trained on this domain
    <root>/cache/     the latent cache of the videos through those encoders (`scail2.data.cache`)
    <root>/heldout/   with ``heldout_pairs``: held-out pairs from indices no training set uses, for the motion
                      benchmark (`scail2.bench.synthetic_motion`); videos and manifest only, not cached

and training reads the cache like any other (`MotionDataModule`). Everything is a function of the seeds, so
the same settings give the same data; an interrupted preparation resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scail2.data.datamodule import MotionDataModule
from scail2.preference.datamodule import PreferenceDataModule

log = logging.getLogger(__name__)

# First pair index of `SyntheticDataModule`'s held-out set: no training set reaches it (pairs are limited to it).
HELDOUT_FIRST_INDEX = 1_000_000

# The synthetic sources, grouped by their sampling class, in the paper's 60 / 20 / 20 mix.
SYNTHETIC_WEIGHTS: dict[str, float] = {"animation": 0.6, "replacement": 0.2, "pose": 0.2}


def synthetic_augment(scene_references: bool, augment: Mapping[str, Any] | None = None) -> Any:
    """The `AugmentOptions` of a `SyntheticDataModule`: ``augment`` (fields of `AugmentOptions`) as given, or by
    default the standard options with ``sample_reference`` off when ``scene_references`` is on (the pairs' own
    separate references are what that setting draws; a frame sampled from the target would replace them)."""
    from scail2.data.sample import AugmentOptions

    if augment is None:
        return AugmentOptions(sample_reference=not scene_references)
    if isinstance(augment, AugmentOptions):
        return augment
    if not isinstance(augment, Mapping):
        raise TypeError(f"augment is {type(augment).__name__}; give a mapping of AugmentOptions fields or None")
    known = set(AugmentOptions.__dataclass_fields__)
    unknown = sorted(set(augment) - known)
    if unknown:
        raise ValueError(f"unknown augment keys {unknown}; AugmentOptions has {sorted(known)}")
    return AugmentOptions(**{k: tuple(v) if isinstance(v, (list, tuple)) or type(v).__name__ == "ListConfig" else v for k, v in augment.items()})


def _videos_and_encoders(root: Path, synth: Any, encoders_seed: int, vae: str) -> Path:
    """``<root>/videos``: the synthetic videos of ``synth`` (`SynthOptions`), and ``<root>/encoders``: the tiny
    encoders of ``encoders_seed`` with the ``vae`` kind, each written when absent. Returns the videos' manifest."""
    from scail2.data.synth import SYNTH_STAMP, ensure_dataset
    from scail2.encoders.tiny import ensure_tiny_encoders

    videos = root / "videos"
    if not (videos / SYNTH_STAMP).exists():
        log.info("writing %d synthetic videos to %s", synth.pairs, videos)
    manifest = ensure_dataset(videos, synth)  # refuses videos drawn by another version or with other settings
    ensure_tiny_encoders(root / "encoders", seed=encoders_seed, vae=vae)
    return manifest


class SyntheticDataModule(MotionDataModule):
    """Synthetic pairs -> tiny encoders -> latent cache, then batches from the cache.

    Args:
        root: folder of the generated data (see the module docstring).
        pairs, frames, height, width, data_seed: the synthetic dataset (`SynthOptions`); frames 4k+1, sizes
            multiples of 32.
        encoders_seed: seed of the tiny random encoders.
        vae: "random" (seeded random tiny VAE: fast, decoded samples are not pictures) or "trained" (the tiny VAE
            shipped in ``scail2/encoders/tiny_vae/``, trained on this synthetic domain: decoded samples are
            pictures); `scail2.encoders.tiny.VAE_KINDS`.
        batch_size, num_workers, samples_per_epoch, seed: as `MotionDataModule`.
        weights: sampling weights per source class (default: the paper's mix, over the classes ``sources`` draws).
        heldout_pairs: pairs of a held-out set (0: none), written to ``<root>/heldout/`` (videos and manifest,
            not cached: it is read through the inference path, `scail2.bench.synthetic_motion`). They take the
            indices from `HELDOUT_FIRST_INDEX` on, which no training set reaches, so their characters, motions
            and backgrounds are not in the training pairs, and separate references are drawn in a scene
            (`SynthOptions.scene_references`). Its ``synth.json`` records these settings; a held-out folder
            drawn with others is refused. ``heldout_manifest`` is its manifest.
        scene_references: draw the training pairs' separate references in a scene too, as the held-out pairs'
            (`SynthOptions.scene_references`): every replacement pair then has a reference from another scene, so
            its background can only come from the driving video.
        travel: the characters of the training and the held-out pairs walk across the frame
            (`SynthOptions.travel`, widths per second; 0: they sway in place).
        clips_per_cast: the training pairs come in runs of this many sharing one cast and scene, each with a
            motion of its own (`SynthOptions.clips_per_cast`), so a training reference does not tell its motion;
            the held-out pairs keep one cast each (1: every training pair has its own cast).
        sources: the synthetic source kinds the training and held-out pairs are drawn from, in turn
            (`SynthOptions.sources`; default: all five), e.g. ``[mocha_replacement_single]`` for replacement pairs
            only (then the default weights are the paper mix's over the classes drawn: ``{replacement: 0.2}``).
            The default ``data.root`` does not name these four settings: videos drawn with other values are
            refused with what to delete, so give such runs their own ``data.root``.
        augment: the per-sample randomness of the latent cache (`scail2.data.sample.AugmentOptions` or a mapping of
            its fields; the cache holds one drawn variant per pair). Default: `AugmentOptions` with
            ``sample_reference`` off when ``scene_references`` is on, so the training pairs keep their separate
            references (sampling one from the target would put the target's own scene and pose back into it),
            and on otherwise (the paper's: a frame of the target).
    """

    def __init__(
        self,
        root: str,
        pairs: int = 16,
        frames: int = 17,
        height: int = 64,
        width: int = 64,
        data_seed: int = 0,
        encoders_seed: int = 0,
        vae: str = "random",
        batch_size: int = 4,
        num_workers: int = 0,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        weights: dict[str, float] | None = None,
        heldout_pairs: int = 0,
        scene_references: bool = False,
        travel: float = 0.0,
        clips_per_cast: int = 1,
        sources: list[str] | None = None,
        augment: Mapping[str, Any] | None = None,
    ):
        from scail2.data.synth import SYNTH_SOURCES, SynthOptions, synth_source_class

        self.synth = SynthOptions(
            pairs=pairs, frames=frames, sizes=((height, width),), seed=data_seed, scene_references=scene_references,
            travel=travel, clips_per_cast=clips_per_cast, sources=SYNTH_SOURCES if sources is None else sources,
        )  # fmt: skip
        drawn = self.synth.sources
        classes = {synth_source_class(s) for s in drawn}
        self.root = Path(root)
        super().__init__(
            cache_dir=self.root / "cache",
            batch_size=batch_size,
            num_workers=num_workers,
            weights=dict(weights) if weights is not None else {k: w for k, w in SYNTHETIC_WEIGHTS.items() if k in classes},
            samples_per_epoch=samples_per_epoch,
            seed=seed,
            augment=synthetic_augment(scene_references, augment),
        )
        if heldout_pairs < 0:
            raise ValueError(f"heldout_pairs is {heldout_pairs}; use 0 (no held-out set) or a positive count")
        if pairs > HELDOUT_FIRST_INDEX:
            raise ValueError(
                f"pairs={pairs} would reach the held-out indices (from {HELDOUT_FIRST_INDEX}); use at most "
                f"{HELDOUT_FIRST_INDEX} training pairs"
            )
        self.heldout = (
            SynthOptions(
                pairs=heldout_pairs, frames=frames, sizes=((height, width),), seed=data_seed,
                first_index=HELDOUT_FIRST_INDEX, scene_references=True, travel=travel, sources=drawn,
            )  # fmt: skip
            if heldout_pairs
            else None
        )
        from scail2.encoders.tiny import check_vae_kind

        check_vae_kind(vae)
        self.encoders_seed = encoders_seed
        self.vae = vae
        self.encoders_dir = self.root / "encoders"

    @property
    def heldout_manifest(self) -> Path | None:
        """The held-out pairs' manifest (written by `prepare_data`); None without a held-out set."""
        return self.root / "heldout" / "manifest.jsonl" if self.heldout is not None else None

    def prepare_videos(self) -> Path:
        """The first half of `prepare_data`: the training videos, the tiny encoders and the held-out set, when
        absent (no latent cache). Returns the training manifest."""
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = _videos_and_encoders(self.root, self.synth, self.encoders_seed, self.vae)
        if self.heldout is not None:
            from scail2.data.synth import SYNTH_STAMP, ensure_dataset

            if not (self.root / "heldout" / SYNTH_STAMP).exists():
                log.info("writing %d held-out synthetic pairs to %s", self.heldout.pairs, self.root / "heldout")
            ensure_dataset(self.root / "heldout", self.heldout)  # refuses a held-out set drawn with other settings
        return manifest

    def prepare_data(self) -> None:
        manifest = self.prepare_videos()
        if not self._cache_complete(manifest):
            self._build_cache(manifest)

    def _cache_complete(self, manifest: Path) -> bool:
        from scail2.data.cache import CacheIndex

        index_path = self.root / "cache" / "index.json"
        if not index_path.exists():
            return False
        index = CacheIndex.load(self.root / "cache")
        with open(manifest) as fh:
            records = sum(1 for line in fh if line.strip())
        return len(index.samples) + len(index.failed) >= records

    def _build_cache(self, manifest: Path) -> None:
        from scail2.data.buckets import Bucket
        from scail2.data.cache import build_cache
        from scail2.data.manifest import load_manifest
        from scail2.encoders.bundle import Encoders

        records = load_manifest(manifest)
        log.info("encoding %d synthetic pairs into the latent cache %s (once)", len(records), self.root / "cache")
        encoders = Encoders.from_pretrained(self.encoders_dir)
        (height, width), = self.synth.sizes
        report = build_cache(
            records,
            self.root / "cache",
            encoders,
            buckets=[Bucket(self.synth.frames, height, width)],
            options=self.augment,
            seed=self.synth.seed,
            dtype="float32",
            encoders_name="tiny",
            progress=False,
        )
        if report.cached == 0:
            raise RuntimeError(f"no synthetic pair could be encoded ({report.failed} failed); see the log above")


class SyntheticPreferenceDataModule(PreferenceDataModule):
    """The ``data=synthetic_preference`` option: Bias-Aware DPO pairs built from synthetic motion videos, created
    on first use, with a held-out set of pairs from other videos.

    `prepare_data` writes, when absent,

        <root>/videos/              ``videos`` synthetic motion videos (`scail2.data.synth`); the last
                                    ``heldout_fraction`` of them are kept for held-out pairs
        <root>/encoders/            tiny random encoders (the same as ``data=synthetic`` with the same seed,
                                    so a model trained there reads these latents)
        <root>/train/  <root>/heldout/   ``pairs`` / ``heldout_pairs`` preference pairs (`build_preferences`
                                    with ground-truth poses as P, `NoisyPoses` as P' and the synthetic renderer
                                    as G: Eq. 4-7) and their preference cache (``cache/``)

    and training reads ``<root>/train/cache``; ``heldout_cache_dir`` is the held-out cache, which `DPOModule`
    measures when ``module.heldout.cache_dir`` is unset. Everything is a function of the seeds; an interrupted preparation resumes.

    Args:
        root: folder of the generated data.
        videos, frames, height, width, data_seed: the synthetic source videos (`SynthOptions`).
        pairs, heldout_pairs: preference pairs built from the training / held-out videos.
        heldout_fraction: share of the videos kept for held-out pairs (at least one video each way).
        build_seed: seed of the pair construction (references, P' noise); the held-out set uses build_seed + 1.
        weak_pose_noise: keyword arguments of `NoisyPoses` (P'): jitter, hand_jitter, confusion_p, hand_drop_p.
        hand_size: hand radius of the generated characters (`SyntheticReferences`; None: as the motion data).
        encoders_seed: seed of the tiny random encoders.
        vae: the tiny VAE kind, as `SyntheticDataModule` ("random" or "trained").
        batch_size, num_workers, samples_per_epoch, seed: as `PreferenceDataModule`.
    """

    def __init__(
        self,
        root: str,
        videos: int = 32,
        frames: int = 9,
        height: int = 64,
        width: int = 64,
        data_seed: int = 0,
        pairs: int = 48,
        heldout_pairs: int = 16,
        heldout_fraction: float = 0.25,
        build_seed: int = 0,
        weak_pose_noise: dict[str, float] | None = None,
        hand_size: float | None = None,
        encoders_seed: int = 0,
        vae: str = "random",
        batch_size: int = 2,
        num_workers: int = 0,
        samples_per_epoch: int | None = None,
        seed: int = 0,
    ):
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction is {heldout_fraction}; need a share strictly between 0 and 1")
        held = round(videos * heldout_fraction)
        if held < 1 or held >= videos:
            raise ValueError(
                f"videos={videos} with heldout_fraction={heldout_fraction} keeps {held} video(s) for held-out pairs; "
                "both sets need at least one video (raise videos or change heldout_fraction)"
            )
        self.root = Path(root)
        super().__init__(
            cache_dir=self.root / "train" / "cache",
            batch_size=batch_size,
            num_workers=num_workers,
            samples_per_epoch=samples_per_epoch,
            seed=seed,
        )
        from scail2.data.synth import SynthOptions

        self.synth = SynthOptions(pairs=videos, frames=frames, sizes=((height, width),), seed=data_seed)
        self.heldout_videos = held
        self.pairs, self.heldout_pairs = pairs, heldout_pairs
        self.build_seed = build_seed
        self.weak_pose_noise = dict(weak_pose_noise) if weak_pose_noise is not None else {}
        self.hand_size = hand_size
        from scail2.encoders.tiny import check_vae_kind

        check_vae_kind(vae)
        self.encoders_seed = encoders_seed
        self.vae = vae
        self.encoders_dir = self.root / "encoders"
        self.heldout_cache_dir = self.root / "heldout" / "cache"

    def components(self) -> dict[str, Any]:
        """The pair-construction components (`load_components` mapping)."""
        here = "scail2.preference.components"
        poses = {"_target_": f"{here}.SyntheticPoses", "synth_seed": self.synth.seed}
        return {
            "pose_estimator": poses,
            "weak_pose_estimator": {"_target_": f"{here}.NoisyPoses", "base": poses, "seed": self.build_seed, **self.weak_pose_noise},
            "generator": f"{here}.SyntheticRenderer",
            "references": {"_target_": f"{here}.SyntheticReferences", "hand_size": self.hand_size}
            if self.hand_size is not None
            else f"{here}.SyntheticReferences",
        }

    def settings(self) -> dict[str, Any]:
        """Every setting the generated data depends on (recorded in ``<root>/settings.json``)."""
        (height, width), = self.synth.sizes
        return {
            "videos": self.synth.pairs, "frames": self.synth.frames, "height": height, "width": width,
            "data_seed": self.synth.seed, "heldout_videos": self.heldout_videos, "pairs": self.pairs,
            "heldout_pairs": self.heldout_pairs, "build_seed": self.build_seed,
            "weak_pose_noise": dict(sorted(self.weak_pose_noise.items())), "hand_size": self.hand_size,
            "encoders_seed": self.encoders_seed, "vae": self.vae,
        }  # fmt: skip

    def _check_settings(self) -> None:
        """Refuse a root generated with other settings: its data would silently stand for these."""
        path = self.root / "settings.json"
        ours = self.settings()
        if path.exists():
            theirs = json.loads(path.read_text())
            theirs.setdefault("vae", "random")  # recorded since the trained tiny VAE exists; before, always random
            differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            if differ:
                detail = ", ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in differ)
                raise ValueError(
                    f"{self.root} holds synthetic preference data generated with other settings ({detail}); "
                    "give another data.root or delete that folder"
                )
            return
        if self.root.exists() and any(self.root.iterdir()):
            raise ValueError(
                f"{self.root} is not empty but has no settings.json, so what it holds cannot be checked against "
                "these settings; give another data.root or delete that folder"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ours, indent=1) + "\n")

    def prepare_data(self) -> None:
        self._check_settings()
        manifest = _videos_and_encoders(self.root, self.synth, self.encoders_seed, self.vae)
        videos = manifest.parent
        lines = [line for line in manifest.read_text().splitlines(keepends=True) if line.strip()]
        split = len(lines) - self.heldout_videos
        # Split manifests next to the full one, so the records' relative paths still resolve.
        for name, part in (("train", lines[:split]), ("heldout", lines[split:])):
            path = videos / f"{name}.jsonl"
            if not path.exists() or path.read_text() != "".join(part):
                path.write_text("".join(part))
        for name, pairs, seed in (("train", self.pairs, self.build_seed), ("heldout", self.heldout_pairs, self.build_seed + 1)):
            self._build(name, pairs, seed)

    def _build(self, name: str, pairs: int, seed: int) -> None:
        from scail2.data.buckets import Bucket
        from scail2.preference.records import load_preference_manifest
        from scail2.preference.builder import BuildOptions, build_preferences, load_components
        from scail2.preference.cache import PreferenceCacheIndex, build_preference_cache

        folder = self.root / name
        cache = folder / "cache"
        if (cache / "index.json").exists():
            index = PreferenceCacheIndex.load(cache)
            if len(index.samples) + len(index.failed) >= pairs:
                return
        report = build_preferences(
            self.root / "videos" / f"{name}.jsonl", folder / "pairs", load_components(self.components()), BuildOptions(pairs=pairs, seed=seed)
        )
        if report.pairs < pairs:
            raise RuntimeError(
                f"only {report.pairs} of {pairs} {name} preference pairs could be built from {self.root / 'videos'} "
                f"({report.rejected + report.rejected_before} rejected, {report.failed} failed); see {folder / 'pairs'}"
            )
        from scail2.encoders.bundle import Encoders

        log.info("encoding %d %s preference pairs into %s (once)", report.pairs, name, cache)
        (height, width), = self.synth.sizes
        result = build_preference_cache(
            load_preference_manifest(report.manifest),
            cache,
            Encoders.from_pretrained(self.encoders_dir),
            buckets=[Bucket(self.synth.frames, height, width)],
            seed=seed,
            dtype="float32",
            encoders_name="tiny",
        )
        if result.cached < pairs:
            raise RuntimeError(f"only {result.cached} of {pairs} {name} preference pairs could be encoded into {cache}")
