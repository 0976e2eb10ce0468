"""The synthetic dataset: deterministic, complete, and its boxes and masks match its pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scail2.data.cli import main
from scail2.data.manifest import load_manifest
from scail2.data.synth import SYNTH_SOURCES, SYNTH_STAMP, SYNTH_VERSION, SynthOptions, ensure_dataset, generate_dataset
from scail2.data.video import read_image, read_video
from tests.data.helpers import synth_dataset, tiny_encoders_dir, torch_threads


def test_deterministic_for_a_seed(tmp_path):
    a = generate_dataset(tmp_path / "a", SynthOptions(pairs=5, frames=5, seed=3))
    b = generate_dataset(tmp_path / "b", SynthOptions(pairs=5, frames=5, seed=3))
    c = generate_dataset(tmp_path / "c", SynthOptions(pairs=5, frames=5, seed=4))
    assert a.read_text() == b.read_text() and a.read_text() != c.read_text()
    for ra, rb in zip(load_manifest(a), load_manifest(b)):
        for name, path in ra.video_fields().items():
            assert np.array_equal(read_video(path), read_video(rb.video_fields()[name])), name


def test_covers_every_source_and_feature():
    records = load_manifest(synth_dataset(pairs=10, frames=9))
    assert {r.source for r in records} == set(SYNTH_SOURCES)
    assert any(isinstance(r.reference, int) for r in records) and any(not isinstance(r.reference, int) for r in records)
    assert any(r.has_aug for r in records) and any(r.ocr is not None for r in records)
    assert any(r.hands is not None for r in records)
    assert all(r.end_to_end == (r.source != "pose") for r in records)
    multi = [r for r in records if r.source == "mocha_replacement_multi"]
    for r in multi:  # several characters, each in its own binding-slot colour, over the white switch
        mask = read_video(r.driving_mask)[0]
        colours = {tuple(c) for c in mask.reshape(-1, 3).tolist()}
        assert (255, 255, 255) in colours and len(colours - {(255, 255, 255), (0, 0, 0)}) >= 2


def test_hand_boxes_and_reference_mask_match_the_pixels():
    records = load_manifest(synth_dataset(pairs=10, frames=9))
    checked = 0
    for r in records:
        target = read_video(r.target)
        if isinstance(r.reference, int):
            # The reference mask marks the character(s) of the reference frame in a palette colour.
            ref_mask = read_image(r.reference_mask)
            colour = (ref_mask > 225).any(axis=-1) & ~(ref_mask > 225).all(axis=-1)
            assert colour.sum() > 10
        if r.hands is None:
            continue
        for f, boxes in enumerate(r.hands.boxes):
            for x0, y0, x1, y1 in boxes:
                cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
                if 0 <= cx < target.shape[2] and 0 <= cy < target.shape[1] and x1 - x0 > 3 and y1 - y0 > 3:
                    # The hand blob's colour sits at the box centre: the mask there is a character colour.
                    if r.target_mask is not None:
                        assert read_video(r.target_mask, [f])[0, cy, cx].max() > 225
                    checked += 1
    assert checked > 10


def test_masks_are_drawn_on_the_official_backgrounds():
    # White marks the side whose environment is kept: animation = reference on white, driving (and target) on
    # black; replacement = reference on black, driving on white. Every other pixel is a character colour.
    import torch

    from scail2.conditioning.masks import video_mask_to_reference

    records = load_manifest(synth_dataset(pairs=10, frames=9))
    for r in records:
        ref = read_image(r.reference_mask)
        white, black = (ref > 225).all(axis=-1), (ref <= 225).all(axis=-1)
        videos = [read_video(r.driving_mask)] + ([read_video(r.target_mask)] if r.target_mask is not None else [])
        if r.mode == "animation":
            assert white.mean() > 0.3 and not black.any(), r.id
            assert all(not (v > 225).all(axis=-1).any() for v in videos), r.id
        else:
            assert black.mean() > 0.3 and not white.any(), r.id
            assert all((v > 225).all(axis=-1).mean() > 0.3 for v in videos), r.id
        if isinstance(r.reference, int) and r.target_mask is not None:
            # A target frame's reference mask is that frame's target mask, redrawn on the reference background.
            frame = torch.from_numpy(read_video(r.target_mask, [r.reference])[0]).permute(2, 0, 1)
            assert np.array_equal(video_mask_to_reference(frame, r.mode).permute(1, 2, 0).numpy(), ref), r.id
    assert {r.mode for r in records} == {"animation", "replacement"}


def test_ensure_dataset_refuses_other_versions_and_options(tmp_path):
    options = SynthOptions(pairs=2, frames=5, sizes=((32, 32),), seed=1)
    manifest = ensure_dataset(tmp_path / "videos", options)
    stamp = json.loads((tmp_path / "videos" / SYNTH_STAMP).read_text())
    assert stamp["version"] == SYNTH_VERSION == 2 and stamp["pairs"] == 2 and stamp["sizes"] == [[32, 32]]
    before = manifest.read_text()
    assert ensure_dataset(tmp_path / "videos", options) == manifest and manifest.read_text() == before
    with pytest.raises(ValueError, match=r"other settings \(pairs: 2 there, 3 here\); delete"):
        ensure_dataset(tmp_path / "videos", SynthOptions(pairs=3, frames=5, sizes=((32, 32),), seed=1))
    (tmp_path / "videos" / SYNTH_STAMP).write_text(json.dumps({**stamp, "version": 1}))
    with pytest.raises(ValueError, match="version: 1 there, 2 here"):
        ensure_dataset(tmp_path / "videos", options)
    (tmp_path / "videos" / SYNTH_STAMP).unlink()  # a dataset drawn before the stamp existed
    with pytest.raises(ValueError, match="without synth.json, drawn by an older version"):
        ensure_dataset(tmp_path / "videos", options)


def test_options_are_checked():
    with pytest.raises(ValueError, match="4k\\+1"):
        SynthOptions(frames=16)
    with pytest.raises(ValueError, match="multiples of 32"):
        SynthOptions(sizes=((60, 64),))
    with pytest.raises(ValueError, match=r"travel 0.6 must be in \[0, 0.5\]"):
        SynthOptions(travel=0.6)


def test_travel_moves_target_and_driving_characters_alike(tmp_path):
    from scail2.data.synth import TRAVEL_MIDPOINT_S, pair_truth, target_joints

    frames, size, fps = 17, 64, 16.0
    t = np.arange(frames) / fps
    for index in range(5):  # every source: one character, several, the skeleton render
        still = target_joints(0, index, frames, fps, size, size)
        moving = target_joints(0, index, frames, fps, size, size, travel=0.4)
        shifts = [m["pelvis"][:, 0] - s["pelvis"][:, 0] for (_, s), (_, m) in zip(still, moving)]
        velocity = shifts[0][-1] / ((t[-1] - TRAVEL_MIDPOINT_S) * size)
        assert 0.2 - 1e-9 <= abs(velocity) <= 0.4 + 1e-9
        for shift in shifts:  # one straight line for the whole cast, through the drawn position at the midpoint
            np.testing.assert_allclose(shift, velocity * (t - TRAVEL_MIDPOINT_S) * size, atol=1e-9)
        for (_, s), (_, m) in zip(still, moving):  # only the root's x moves
            np.testing.assert_array_equal(m["pelvis"][:, 1], s["pelvis"][:, 1])
        truth = pair_truth(0, index, frames, fps, size, size, travel=0.4)
        np.testing.assert_array_equal(truth.joints[0]["pelvis"], moving[0][1]["pelvis"])

    # Written pairs: the target's and the driving video's characters travel the same way, the drawing of
    # everything else (backgrounds, colours, captions) is the one without travel.
    still = generate_dataset(tmp_path / "still", SynthOptions(pairs=2, frames=frames, seed=0))
    moving = generate_dataset(tmp_path / "moving", SynthOptions(pairs=2, frames=frames, seed=0, travel=0.4))
    assert json.loads((tmp_path / "moving" / SYNTH_STAMP).read_text())["travel"] == 0.4
    assert "travel" not in json.loads((tmp_path / "still" / SYNTH_STAMP).read_text())
    for a, b in zip(load_manifest(still), load_manifest(moving)):
        assert a.caption == b.caption
        truth = pair_truth(0, int(b.id.rsplit("_", 1)[1]), frames, fps, size, size, travel=0.4)

        def centre_x(mask_video):  # the mean x of non-background mask pixels per frame
            on = (np.abs(mask_video.astype(int) - mask_video[0, 0, 0].astype(int)).sum(-1) > 0)
            xs = np.arange(size)[None, None, :]
            return (on * xs).sum((1, 2)) / on.sum((1, 2))

        target_x = truth.masks.any(0).astype(float)
        target_x = (target_x * np.arange(size)).sum((1, 2)) / target_x.sum((1, 2))
        driving_x = centre_x(read_video(b.driving_mask))
        drift = target_x[-1] - target_x[0]
        assert abs(drift) > 0.15 * size  # the character crosses a good part of the frame
        assert abs((driving_x[-1] - driving_x[0]) - drift) < 0.1 * size  # and the driving one follows it
        if b.target_mask is not None:  # the written target moves as its ground truth says
            written_x = centre_x(read_video(b.target_mask))
            assert abs((written_x[-1] - written_x[0]) - drift) < 0.1 * size
        assert not np.array_equal(read_video(a.target), read_video(b.target))
    assert any(r.target_mask is not None for r in load_manifest(moving))


def test_cli_synth_validate_cache(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["synth", str(out), "--pairs", "3", "--frames", "5", "--size", "64x64", "--seed", "1", "--lossy"]) == 0
    assert main(["validate", str(out / "manifest.jsonl")]) == 0
    with torch_threads(1):
        assert main(["cache", str(out / "manifest.jsonl"), str(tmp_path / "cache"), "--encoders", str(tiny_encoders_dir()),
                     "--buckets", "5x64x64", "--no-progress", "--dtype", "float32"]) == 0  # fmt: skip
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert len(index["samples"]) == 3 and index["failed"] == []
    assert "3 samples (3 new" in capsys.readouterr().out


def test_cli_synth_draws_with_the_drawing_options(tmp_path):
    out = tmp_path / "grouped"
    argv = ["synth", str(out), "--pairs", "2", "--frames", "5", "--first-index", "10", "--scene-references", "--travel", "0.3",
            "--clips-per-cast", "2", "--source", "pose", "--source", "mocha_replacement_single"]  # fmt: skip
    assert main(argv) == 0
    stamp = json.loads((out / SYNTH_STAMP).read_text())
    assert (stamp["first_index"], stamp["scene_references"], stamp["travel"], stamp["clips_per_cast"]) == (10, True, 0.3, 2)
    assert stamp["sources"] == ["pose", "mocha_replacement_single"]
    # cast index 5 for both (clips of 2): sources[5 % 2]
    assert [r.id for r in load_manifest(out / "manifest.jsonl")] == ["mocha_replacement_single_00010", "mocha_replacement_single_00011"]
    with pytest.raises(ValueError, match="clips_per_cast 0 must be >= 1"):
        main(["synth", str(tmp_path / "bad"), "--clips-per-cast", "0"])


def test_clips_per_cast_share_the_cast_and_scene_and_not_the_motion(tmp_path):
    from scail2.bench.synthetic_motion import load_cases
    from scail2.data.synth import pair_index, pair_truth, target_cast

    with pytest.raises(ValueError, match="clips_per_cast 0 must be >= 1"):
        SynthOptions(clips_per_cast=0)
    frames, size, fps = 9, 64, 16.0
    for index in range(3):  # 1: exactly the default drawing
        a, b = pair_truth(0, index, frames, fps, size, size, True, 0.3), pair_truth(0, index, frames, fps, size, size, True, 0.3, 1)
        assert np.array_equal(a.masks, b.masks) and np.array_equal(a.reference_background, b.reference_background)
    for first in (0, 3, 6, 9):  # the runs of three: one source, cast, scene and reference choice; motions their own
        run = [pair_truth(0, first + k, frames, fps, size, size, True, 0.3, 3) for k in range(3)]
        lead = pair_truth(0, first // 3, frames, fps, size, size, True, 0.3)  # drawn as cast index // 3
        for truth in run:
            assert truth.source == lead.source and truth.characters == lead.characters
            assert truth.reference_frame == lead.reference_frame
            np.testing.assert_array_equal(truth.target_background, lead.target_background)
            np.testing.assert_array_equal(truth.driving_background, lead.driving_background)
        for k in range(3):
            for other in range(k + 1, 3):
                assert not np.array_equal(run[k].joints[0]["hand_l"], run[other].joints[0]["hand_l"])
                assert not np.array_equal(run[k].masks, run[other].masks)
        roots = [[m.x0 for _, m in target_cast(0, first + k, 0.3, 3)] for k in range(3)]
        assert roots[0] == roots[1] == roots[2] == [m.x0 for _, m in target_cast(0, first // 3)]
        speeds = [{m.velocity for _, m in target_cast(0, first + k, 0.3, 3)} for k in range(3)]
        assert all(len(s) == 1 for s in speeds) and len({s.pop() for s in speeds}) == 3  # each pair its own travel
    assert pair_truth(0, 3, frames, fps, size, size, True, 0.3, 3).source != pair_truth(0, 0, frames, fps, size, size, True, 0.3, 3).source

    # Written: the stamp records it, and the ground truth drawn again from the folder is the written one.
    folder = tmp_path / "clips"
    generate_dataset(folder, SynthOptions(pairs=4, frames=frames, seed=0, clips_per_cast=2, travel=0.3))
    assert json.loads((folder / SYNTH_STAMP).read_text())["clips_per_cast"] == 2
    records = load_manifest(folder / "manifest.jsonl")
    assert records[0].source == records[1].source != records[2].source == records[3].source
    assert not np.array_equal(read_video(records[0].target), read_video(records[1].target))
    cases = load_cases(folder)
    for record, case in zip(records, cases):
        truth = pair_truth(0, pair_index(record.id), frames, fps, size, size, travel=0.3, clips_per_cast=2)
        np.testing.assert_array_equal(case.truth.masks, truth.masks)
        if record.target_mask is not None:  # the written target mask is where the ground truth has the characters
            on = np.abs(read_video(record.target_mask).astype(int) - read_video(record.target_mask)[0, 0, 0].astype(int)).sum(-1) > 0
            assert (on == truth.masks.any(0)).mean() > 0.97


def test_sources_draw_only_the_named_kinds_in_turn(tmp_path):
    from scail2.bench.synthetic_motion import load_cases
    from scail2.data.synth import SYNTH_SOURCES, ensure_dataset, pair_index, pair_truth, synth_source_class
    from scail2.lit.data import SyntheticDataModule

    with pytest.raises(ValueError, match=r"sources \['replacement'\] are not synthetic sources"):
        SynthOptions(sources=("pose", "replacement"))
    for bad in ((), "pose"):
        with pytest.raises(ValueError, match="must be a non-empty sequence"):
            SynthOptions(sources=bad)
    assert SynthOptions(sources=["pose"]).sources == ("pose",)
    assert [synth_source_class(s) for s in SYNTH_SOURCES] == ["animation", "replacement", "pose", "animation", "replacement"]
    frames, size, fps = 5, 64, 16.0
    for index in range(5):  # the default: every kind in turn, exactly as drawn without the option
        a, b = pair_truth(0, index, frames, fps, size, size), pair_truth(0, index, frames, fps, size, size, sources=SYNTH_SOURCES)
        assert a.source == SYNTH_SOURCES[index] and np.array_equal(a.masks, b.masks)
    only = ("mocha_replacement_single", "mocha_replacement_single", "pose")
    truths = [pair_truth(0, i, frames, fps, size, size, True, sources=only) for i in range(6)]
    assert [t.source for t in truths] == list(only) * 2
    assert [t.mode for t in truths] == ["replacement", "replacement", "animation"] * 2

    folder = tmp_path / "replacement"
    options = SynthOptions(pairs=3, frames=frames, seed=0, sources=("mocha_replacement_single",), scene_references=True)
    generate_dataset(folder, options)
    assert json.loads((folder / SYNTH_STAMP).read_text())["sources"] == ["mocha_replacement_single"]
    assert "sources" not in json.loads((generate_dataset(tmp_path / "all", SynthOptions(pairs=1, frames=frames)).parent / SYNTH_STAMP).read_text())
    records = load_manifest(folder / "manifest.jsonl")
    assert {(r.source, r.mode) for r in records} == {("mocha_replacement_single", "replacement")}
    for record, case in zip(records, load_cases(folder)):  # the ground truth drawn again is the written one
        truth = pair_truth(0, pair_index(record.id), frames, fps, size, size, True, sources=("mocha_replacement_single",))
        np.testing.assert_array_equal(case.truth.masks, truth.masks)
        on = np.abs(read_video(record.target_mask).astype(int) - read_video(record.target_mask)[0, 0, 0].astype(int)).sum(-1) > 0
        assert (on == truth.masks.any(0)).mean() > 0.97
    with pytest.raises(ValueError, match=r"sources: \['mocha_replacement_single'\] there, \['pose'\] here"):
        ensure_dataset(folder, SynthOptions(pairs=3, frames=frames, seed=0, sources=("pose",), scene_references=True))

    # The data module: training and held-out pairs of the named kinds; default weights over the classes drawn.
    dm = SyntheticDataModule(str(tmp_path / "dm"), pairs=2, frames=frames, heldout_pairs=2, sources=["mocha_replacement_single"])
    assert dm.synth.sources == dm.heldout.sources == ("mocha_replacement_single",)
    assert dm.weights == {"replacement": 0.2}
    assert SyntheticDataModule(str(tmp_path / "dm2"), sources=["pose", "scail_animation"]).weights == {"animation": 0.6, "pose": 0.2}
    assert SyntheticDataModule(str(tmp_path / "dm3")).weights == {"animation": 0.6, "replacement": 0.2, "pose": 0.2}


def test_scene_references_keep_their_separate_references_in_the_cache(tmp_path):
    """With scene_references the cached reference of a replacement pair is its own reference image (another
    scene, as the held-out pairs'), not a frame sampled from the target, unless augment asks for that."""
    import torch

    from scail2.data.buckets import Bucket
    from scail2.data.latents import encode_pixel_sample
    from scail2.data.sample import PixelChoices, load_pixel_sample
    from scail2.data.sampling import SampleKey
    from scail2.encoders.bundle import Encoders
    from scail2.lit.data import SyntheticDataModule

    def cached_and_expected(root, **kwargs):
        dm = SyntheticDataModule(str(root), pairs=2, frames=5, height=32, width=32, sources=["mocha_replacement_single"], scene_references=True, **kwargs)
        dm.prepare_data()
        dm.setup("fit")
        records = load_manifest(root / "videos" / "manifest.jsonl")
        encoders = Encoders.from_pretrained(root / "encoders")
        choices = PixelChoices(forward=False, clip_start=0, reference_frame=None, crop=None, skeleton_scale=None)
        expected = [encode_pixel_sample(load_pixel_sample(r, Bucket(5, 32, 32), choices), encoders).reference for r in records]
        cached = [dm.dataset[SampleKey(i, 0)].reference for i in range(len(records))]
        return dm, records, cached, expected

    with torch_threads(1):
        dm, records, cached, expected = cached_and_expected(tmp_path / "kept")
        assert dm.augment.sample_reference is False
        assert all(not isinstance(r.reference, int) for r in records)  # separate reference images
        for c, e in zip(cached, expected):
            torch.testing.assert_close(c.float(), e.float(), rtol=0, atol=1e-2)
        dm, _, cached, expected = cached_and_expected(tmp_path / "sampled", augment={"sample_reference": True})
        assert dm.augment.sample_reference is True
        assert all((c.float() - e.float()).abs().max() > 0.1 for c, e in zip(cached, expected))

    assert SyntheticDataModule(str(tmp_path / "plain")).augment.sample_reference is True  # the paper's default
    with pytest.raises(ValueError, match="unknown augment keys \\['sample_refs'\\]"):
        SyntheticDataModule(str(tmp_path / "bad"), augment={"sample_refs": False})
