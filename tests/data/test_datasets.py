"""Raw-video and latent-cache datasets: equal batches, corrupt inputs replaced and counted, orientation,
swap and skeleton scaling on real (synthetic) videos."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from scail2.data.buckets import Bucket
from scail2.data.cache import CacheIndex, build_cache
from scail2.data.datamodule import MotionDataLoader, MotionDataModule, build_sampler
from scail2.data.datasets import LatentCacheDataset, MotionPairDataset
from scail2.data.manifest import load_manifest, write_manifest
from scail2.data.sample import AugmentOptions, PixelChoices, draw_pixel_choices, load_pixel_sample, record_meta
from scail2.data.sampling import PAPER_WEIGHTS
from scail2.data.transforms import clip_indices, cover_box, crop_resize
from scail2.data.video import read_video, write_video
from tests.data.helpers import synth_dataset, tiny_encoders, tiny_encoders_dir, torch_threads

BUCKET = Bucket(9, 64, 64)
# Every random path on: forward pairs, swaps, crops, skeleton scaling.
BUSY = AugmentOptions(forward_fraction=0.5, swap_p_end_to_end=0.5, swap_p_pose=0.5, crop_p=0.7, skeleton_scale_p=0.7)
COND = ("reference", "reference_mask", "driving", "driving_mask", "text", "clip_tokens")


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def _records(pairs=6):
    return load_manifest(synth_dataset(pairs=pairs, frames=9))


def test_cache_round_trip_equals_raw_path(tmp_path):
    records = _records()
    encoders = tiny_encoders()
    report = build_cache(records, tmp_path / "cache", encoders, [BUCKET], BUSY, seed=5, dtype="float32", shard_size=4, progress=False)
    assert (report.cached, report.failed) == (6, 0)
    raw = MotionPairDataset(records, [BUCKET], encoders=encoders, options=BUSY, fixed_seed=5)
    cached = LatentCacheDataset(tmp_path / "cache", options=BUSY)
    assert [raw.item_name(i) for i in range(6)] == [cached.item_name(i) for i in range(6)]

    def batches(dataset):
        sampler = build_sampler(dataset, PAPER_WEIGHTS, batch_size=2, samples_per_epoch=6, seed=2)
        return list(MotionDataLoader(dataset, sampler, null_text=dataset.null_text()))

    a, b = batches(raw), batches(cached)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x.meta["ids"] == y.meta["ids"] and x.source == y.source and x.cond.modes == y.cond.modes
        assert x.meta["swapped"] == y.meta["swapped"] and x.meta["forward"] == y.meta["forward"]
        assert torch.equal(x.latents, y.latents) and torch.equal(x.null_text, y.null_text)
        for name in COND:
            assert torch.equal(getattr(x.cond, name), getattr(y.cond, name)), name
        assert x.cond == y.cond
        for name in ("hand_mask", "face_mask", "ocr_mask", "history_allowed", "end_to_end"):
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None and v is None) or torch.equal(u, v), name
    batch = a[0]
    assert batch.latents.shape == (2, 16, 3, 8, 8) and batch.cond.driving.shape == (2, 16, 3, 4, 4)
    assert batch.cond.driving_mask.shape == (2, 28, 3, 4, 4) and batch.cond.reference_mask.shape == (2, 28, 1, 8, 8)
    assert batch.cond.text.shape[1] == 512 and batch.null_text.shape[0] == 1
    # Text rows are stored trimmed: the shard holds far fewer than 512 rows per caption.
    index = CacheIndex.load(tmp_path / "cache")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "cache" / index.shards[0]), "pt") as fh:
        assert fh.get_slice("s0/text").get_shape()[0] < 40


def test_caches_of_another_version_or_kind_are_refused(tmp_path):
    import json

    build_cache(_records(1), tmp_path / "cache", tiny_encoders(), [BUCKET], seed=0, dtype="float32", progress=False)
    data = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert (data["kind"], data["version"]) == ("motion", 2)
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "cache", old)
    # A cache built with the old reference-mask rule (version 1, before the index had a kind).
    (old / "index.json").write_text(json.dumps({k: v for k, v in {**data, "version": 1}.items() if k != "kind"}))
    for build in (lambda: LatentCacheDataset(old), lambda: build_cache(_records(1), old, tiny_encoders(), [BUCKET], seed=0,
                                                                       dtype="float32", progress=False)):  # fmt: skip
        with pytest.raises(ValueError, match=r"cache version 1; this code reads version 2 .* rebuild it .* new folder"):
            build()
    # A preference cache given where a motion cache is read: a clear message, not a KeyError.
    (old / "index.json").write_text(json.dumps({**data, "kind": "preference"}))
    with pytest.raises(ValueError, match="is a preference cache, not a motion latent cache; train DPO on it with data=preference"):
        MotionDataModule(cache_dir=old).build_dataset()


def test_cache_resumes_after_interruption(tmp_path, monkeypatch):
    records = _records()
    encoders = tiny_encoders()
    import scail2.data.cache as cache_module

    real_encode = cache_module.encode_pixel_sample
    calls = {"n": 0}

    def flaky(sample, enc):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # the process dies while the second shard is open
        return real_encode(sample, enc)

    monkeypatch.setattr(cache_module, "encode_pixel_sample", flaky)
    out = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        build_cache(records, out, encoders, [BUCKET], seed=1, dtype="bfloat16", shard_size=2, progress=False)
    (out / "shard-00001.safetensors.tmp").write_bytes(b"half a shard")  # what a kill mid-write leaves
    index = CacheIndex.load(out)
    assert len(index.samples) == 2 and index.shards == ["shard-00000.safetensors"]
    monkeypatch.setattr(cache_module, "encode_pixel_sample", real_encode)
    report = build_cache(records, out, encoders, [BUCKET], seed=1, dtype="bfloat16", shard_size=2, progress=False)
    assert (report.skipped_done, report.added, report.cached) == (2, 4, 6)
    index = CacheIndex.load(out)
    assert sorted(s["id"] for s in index.samples) == sorted(r.id for r in records)
    assert not list(out.glob("*.tmp"))
    dataset = LatentCacheDataset(out)
    assert dataset[next(iter(build_sampler(dataset, PAPER_WEIGHTS, 1)))[0]].latents.dtype == torch.float32
    with pytest.raises(ValueError, match="other settings"):
        build_cache(records, out, encoders, [BUCKET], seed=2, dtype="bfloat16", shard_size=2, progress=False)


def _corrupt_copy(tmp_path, drop_metadata: bool):
    """Copy the synthetic dataset and break four records: truncated target (no index), empty driving, too
    short, and a target whose header promises every frame while the data stops halfway."""
    src = synth_dataset(pairs=10, frames=9).parent
    dst = tmp_path / "data"
    shutil.copytree(src, dst)
    records = load_manifest(dst / "manifest.jsonl")
    by_source = {}
    for r in records:
        by_source.setdefault(r.source, []).append(r)
    truncated, empty, short = by_source["scail_animation"][0], by_source["pose"][0], by_source["mocha_replacement_single"][0]
    over = by_source["wananimate_animation"][0]
    write_video(over.target, read_video(over.target), fps=16, faststart=True)
    data = over.target.read_bytes()
    over.target.write_bytes(data[: len(data) // 3])
    data = truncated.target.read_bytes()
    truncated.target.write_bytes(data[: len(data) // 2])
    empty.driving.write_bytes(b"")
    write_video(short.target, read_video(short.target)[:5], fps=16)  # 5 frames where the bucket needs 9
    if drop_metadata:
        records = [dataclasses.replace(r, frames=None, height=None, width=None) for r in records]
        write_manifest(dst / "manifest.jsonl", records)
    broken = {truncated.id: "target", empty.id: "driving", short.id: "target", over.id: "target"}
    return load_manifest(dst / "manifest.jsonl"), broken


def test_corrupt_inputs_are_replaced_and_counted(tmp_path):
    records, broken = _corrupt_copy(tmp_path, drop_metadata=False)
    dataset = MotionPairDataset(records, [BUCKET], encoders=tiny_encoders(), options=AugmentOptions.none())
    ids = [r.id for r in records]
    from scail2.data.sampling import SampleKey

    sources = {r.id: r.source for r in records}
    for rid in broken:
        sample = dataset[SampleKey(ids.index(rid), seed=3)]
        assert sample.id not in broken and sample.source == sources[rid]  # same source, another record
        assert sample.skips and sample.skips[0][0] == sources[rid]
    counts = dataset.skip_counts()
    assert counts["scail_animation"] == {"unreadable": 1}
    assert counts["pose"] == {"empty": 1}
    assert counts["mocha_replacement_single"] == {"too_short": 1}
    assert counts["wananimate_animation"] == {"truncated": 1}


def test_unreadable_headers_and_short_videos_are_excluded_at_start(tmp_path):
    records, broken = _corrupt_copy(tmp_path, drop_metadata=True)
    dataset = MotionPairDataset(records, [BUCKET], encoders_root=tiny_encoders_dir())
    # The empty driving video and the over-reported target are only found when loading.
    assert len(dataset) == len(records) - 2
    assert dataset.excluded_counts() == {"scail_animation": {"unreadable": 1}, "mocha_replacement_single": {"too_short": 1}}


def test_forward_orientation_swaps_target_and_driving():
    record = next(r for r in _records() if r.target_mask is not None and r.end_to_end)
    meta = record_meta(record)
    choices = PixelChoices(forward=True, clip_start=0, reference_frame=2, crop=None, skeleton_scale=None)
    sample = load_pixel_sample(record, BUCKET, choices)
    idx = clip_indices(meta.num_frames, record.fps, 9, 0)
    box = cover_box(meta.height, meta.width, 64, 64)

    def fitted(path):
        return crop_resize(torch.from_numpy(read_video(path, idx)).permute(0, 3, 1, 2), box, (64, 64))

    assert torch.equal(sample.target, fitted(record.driving))  # the synthetic video is the target
    assert torch.equal(sample.drivings["driving"][0], fitted(record.target))  # the real video drives
    assert torch.equal(sample.drivings["driving"][1], fitted(record.target_mask))
    assert torch.equal(sample.reference, fitted(record.driving)[2])
    # The reference mask is the synthetic video's mask frame, redrawn on the reference background of the mode.
    from scail2.conditioning.masks import video_mask_to_reference

    driving_mask = crop_resize(torch.from_numpy(read_video(record.driving_mask, idx)).permute(0, 3, 1, 2), box, (64, 64), "nearest")
    assert torch.equal(sample.reference_mask, video_mask_to_reference(driving_mask[2], record.mode))
    reverse = load_pixel_sample(record, BUCKET, dataclasses.replace(choices, forward=False))
    assert torch.equal(reverse.target, fitted(record.target))
    target_mask = crop_resize(torch.from_numpy(read_video(record.target_mask, idx)).permute(0, 3, 1, 2), box, (64, 64), "nearest")
    assert torch.equal(reverse.reference_mask, video_mask_to_reference(target_mask[2], record.mode))
    assert not torch.equal(reverse.reference_mask, target_mask[2])  # the background did change


def test_skeleton_scaling_keeps_render_inside_its_mask():
    records = [r for r in _records(10) if not r.end_to_end]
    assert records
    for record in records:
        meta = record_meta(record)
        for scale in (0.8, 1.2):
            choices = PixelChoices(False, 0, None, None, scale)
            render, mask = load_pixel_sample(record, BUCKET, choices).drivings["driving"]
            plain, _ = load_pixel_sample(record, BUCKET, dataclasses.replace(choices, skeleton_scale=None)).drivings["driving"]
            on = render.amax(dim=1) > 100  # skeleton pixels
            inside = mask.amax(dim=1) > 200
            inside = torch.nn.functional.max_pool2d(inside.float()[:, None], 3, 1, 1)[:, 0] > 0  # 1 px slack
            assert (on & ~inside).sum() == 0
            grow = on.float().sum() / (plain.amax(dim=1) > 100).float().sum()
            assert (grow > 1.1) if scale > 1 else (grow < 0.9)  # the render really was scaled


def test_swap_uses_the_augmented_driving_signal():
    records = [r for r in _records() if r.has_aug]
    assert records
    always = AugmentOptions(forward_fraction=0.0, swap_p_end_to_end=1.0, swap_p_pose=1.0, crop_p=0.0, skeleton_scale_p=0.0)
    dataset = MotionPairDataset(records, [BUCKET], encoders=tiny_encoders(), options=always)
    from scail2.data.sampling import SampleKey

    sample = dataset[SampleKey(0, seed=1)]
    assert sample.swapped
    record = records[0]
    choices = draw_pixel_choices(record, record_meta(record), BUCKET, np.random.default_rng(0), always)
    pixels = load_pixel_sample(record, BUCKET, choices, ("driving", "driving_aug"))
    assert not torch.equal(pixels.drivings["driving"][0], pixels.drivings["driving_aug"][0])


def test_datamodule_raw_path(tmp_path):
    dm = MotionDataModule(
        manifest=synth_dataset(pairs=6, frames=9),
        encoders_root=tiny_encoders_dir(),
        buckets=["9x64x64"],
        batch_size=2,
        num_workers=0,
        samples_per_epoch=2,
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch.batch_size == 2 and set(batch.cond.modes) <= {"animation", "replacement"}
    assert batch.null_text is not None and dm.state_dict()["loader"]["batches_done"] == 1
