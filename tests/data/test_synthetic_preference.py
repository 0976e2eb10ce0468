"""data=synthetic_preference: generated pairs with a held-out split by source video, resumable, cached."""

from __future__ import annotations

import pytest

from scail2.data.manifest import load_manifest
from scail2.preference.records import load_preference_manifest
from scail2.preference.cache import PreferenceCacheIndex
from scail2.lit.data import SyntheticPreferenceDataModule

from .helpers import torch_threads


def _module(root, **kw):
    args = dict(videos=4, frames=5, height=32, width=32, pairs=3, heldout_pairs=2, heldout_fraction=0.25, batch_size=2)
    return SyntheticPreferenceDataModule(str(root), **{**args, **kw})


def test_pairs_split_by_video_and_cached(tmp_path):
    dm = _module(tmp_path)
    with torch_threads(1):
        dm.prepare_data()
    videos = [r.id for r in load_manifest(tmp_path / "videos" / "manifest.jsonl")]
    assert len(videos) == 4
    sources = {}
    for name, n in (("train", 3), ("heldout", 2)):
        records = load_preference_manifest(tmp_path / name / "pairs" / "manifest.jsonl")
        assert len(records) == n and all(r.has_masks and r.preferred_hands for r in records)
        sources[name] = {r.provenance.source_record for r in records}
        assert len(PreferenceCacheIndex.load(tmp_path / name / "cache").samples) == n
    # The last quarter of the videos (1 of 4) makes the held-out pairs; the others the training pairs.
    assert sources["heldout"] == {videos[-1]} and sources["train"] <= set(videos[:-1])
    assert dm.heldout_cache_dir == tmp_path / "heldout" / "cache"
    # Batches of the training cache; a second preparation changes nothing.
    batch = next(iter(dm.train_dataloader()))
    assert batch.batch_size == 2 and batch.hand_union().shape[1:] == (1, 2, 4, 4)
    stamp = (tmp_path / "train" / "cache" / "index.json").stat().st_mtime_ns
    with torch_threads(1):
        _module(tmp_path).prepare_data()
    assert (tmp_path / "train" / "cache" / "index.json").stat().st_mtime_ns == stamp


def test_components_follow_the_settings(tmp_path):
    comps = _module(tmp_path, data_seed=3, build_seed=5, weak_pose_noise={"hand_jitter": 0.1}, hand_size=3.0).components()
    assert comps["pose_estimator"]["synth_seed"] == 3
    assert comps["weak_pose_estimator"]["seed"] == 5 and comps["weak_pose_estimator"]["hand_jitter"] == 0.1
    assert comps["references"]["hand_size"] == 3.0


@pytest.mark.parametrize("videos,fraction", [(2, 0.25), (4, 0.9), (4, 0.0)])
def test_a_split_without_videos_on_one_side_is_refused(tmp_path, videos, fraction):
    with pytest.raises(ValueError, match="heldout_fraction"):
        _module(tmp_path, videos=videos, heldout_fraction=fraction)


def test_a_root_made_with_other_settings_is_refused(tmp_path):
    dm = _module(tmp_path, weak_pose_noise={"hand_drop_p": 0.5})
    dm._check_settings()  # records the settings in an empty root
    assert (tmp_path / "settings.json").is_file()
    dm._check_settings()  # the same settings: accepted
    with pytest.raises(ValueError, match=r"weak_pose_noise: \{'hand_drop_p': 0.5\} there, \{\} here"):
        _module(tmp_path)._check_settings()
    with pytest.raises(ValueError, match="hand_size: None there, 3.0 here"):
        _module(tmp_path, weak_pose_noise={"hand_drop_p": 0.5}, hand_size=3.0)._check_settings()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "videos").mkdir()
    with pytest.raises(ValueError, match="has no settings.json"):
        _module(tmp_path / "other")._check_settings()


def test_synthetic_videos_drawn_by_an_older_version_are_refused(tmp_path):
    # Videos drawn before synth.json existed (reference masks on black in every mode) must not be encoded
    # again under the current mask rule: both data modules refuse them and say what to delete.
    from scail2.lit.data import SyntheticDataModule

    for name, module in (("motion", lambda root: SyntheticDataModule(str(root), pairs=2, frames=5, height=32, width=32)),
                         ("preference", _module)):  # fmt: skip
        root = tmp_path / name
        if name == "preference":
            module(root)._check_settings()  # an old root recorded the same settings
        (root / "videos").mkdir(parents=True)
        (root / "videos" / "manifest.jsonl").write_text("")
        with pytest.raises(ValueError, match="without synth.json, drawn by an older version .* delete"):
            module(root).prepare_data()
        assert not (root / "encoders").exists()  # refused before anything else is written
