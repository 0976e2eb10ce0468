"""``scail2-data prepare`` on synthetic videos: valid records, exact masks, resampling, resume, bad input, workers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from scail2.data.cli import main as data_main
from scail2.data.engine.components import PrepareComponents
from scail2.data.engine.prepare import PrepareOptions, load_masks, prepare_videos
from scail2.data.engine.standins import SyntheticCaptioner, SyntheticKeypoints, SyntheticSegmenter
from scail2.data.manifest import load_manifest
from scail2.data.validate import ValidateOptions, validate_manifest
from scail2.data.video import read_image, read_video, write_video

from .engine_fakes import Behaviour, FakeServer, synth_videos

pytestmark = pytest.mark.timeout(300)
OPTIONS = PrepareOptions(frames=9, lossless=True)
_SPECS = {"segmenter": "synthetic", "keypoints": "synthetic", "captioner": "synthetic"}


def _components(segmenter=None, keypoints=None, captioner="default") -> PrepareComponents:
    return PrepareComponents(
        segmenter=segmenter or SyntheticSegmenter(),
        keypoints=keypoints or SyntheticKeypoints(),
        captioner=SyntheticCaptioner() if captioner == "default" else captioner,
        specs=dict(_SPECS),
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    videos, manifest = synth_videos()
    out = tmp_path_factory.mktemp("prepared")
    report = prepare_videos(videos, out, "synthetic", OPTIONS, progress=False)
    return videos, manifest, out, report


def test_records_validate_and_masks_match_the_drawn_characters(prepared):
    videos, synth_manifest, out, report = prepared
    assert report.clips == 5 and report.records == 5 and report.skipped == {}
    bad = [r.line() for r in validate_manifest(report.manifest, ValidateOptions(full=True)) if not r.ok]
    assert bad == []
    records = {r.id.split("-")[0]: r for r in load_manifest(report.manifest)}
    for synth in load_manifest(synth_manifest):
        record = records[synth.id]
        assert (record.source, record.mode, record.end_to_end, record.fps, record.frames) == ("pose", "animation", False, 16.0, 9)
        assert record.driving_aug is not None and record.driving_mask_aug is not None
        np.testing.assert_array_equal(read_video(record.target), read_video(synth.target))  # 16 fps in, lossless out
        ours = read_video(record.target_mask)
        assert not (ours == 255).all(-1).any()  # animation driving background: black
        if synth.target_mask is not None:
            theirs = read_video(synth.target_mask)
            background = (theirs == 255).all(-1) if synth.mode == "replacement" else (theirs == 0).all(-1)
            # Same characters, same binding colours (left to right), pixel for pixel.
            np.testing.assert_array_equal((ours != 0).any(-1), ~background)
            np.testing.assert_array_equal(ours[~background], theirs[~background])
        ref = read_image(record.reference_mask)
        mask_frame = ours[record.reference]
        character = (mask_frame != 0).any(-1)
        assert (ref[~character] == 255).all() and (ref[character] == mask_frame[character]).all()  # reference on white
        assert len(record.hands.boxes) == len(record.faces.boxes) == 9
        assert all(len(f) == record.meta["characters"] for f in record.faces.boxes)


def test_resampling_and_resizing(prepared, tmp_path):
    videos, _, out, _ = prepared
    source = next(videos.glob("scail_animation_*.mp4"))
    frames = read_video(source)  # 9 frames at 16 fps
    folder = tmp_path / "videos"
    # The same motion at 32 fps: frame j shows time j / 32; the even frames are the 16 fps frames.
    doubled = np.repeat(frames, 2, axis=0)[:17]
    write_video(folder / source.name, doubled, 32.0, lossless=True)
    report = prepare_videos(folder, tmp_path / "out", "synthetic", OPTIONS, progress=False)
    (record,) = load_manifest(report.manifest)
    assert record.meta["origin"]["frame_indices"] == list(range(0, 17, 2))
    np.testing.assert_array_equal(read_video(record.target), frames)
    cid = record.id
    reference = load_masks(next((out / "clips").glob(f"{source.stem}-*/characters.npz")))
    np.testing.assert_array_equal(load_masks(tmp_path / "out" / "clips" / cid / "characters.npz"), reference)
    # Resize-to-cover a smaller size: every file of the record is at that size and still valid.
    small = prepare_videos(folder, tmp_path / "small", "synthetic", PrepareOptions(frames=9, size=(32, 32)), progress=False)
    (record,) = load_manifest(small.manifest)
    assert (record.height, record.width) == (32, 32) and read_video(record.driving).shape == (9, 32, 32, 3)
    assert all(r.ok for r in validate_manifest(small.manifest, ValidateOptions(full=True)))


class _Interrupting:
    """A segmenter whose n-th call stops the run like Ctrl-C."""

    def __init__(self, n: int):
        self.n, self.calls, self.inner = n, 0, SyntheticSegmenter()

    def segment(self, video):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.inner.segment(video)


def test_a_killed_run_continues_without_rewriting(prepared, tmp_path):
    videos, _, clean_out, _ = prepared
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare_videos(videos, out, _components(_Interrupting(3)), OPTIONS, progress=False)
    done = sorted(p.name for p in (out / "clips").iterdir() if not p.name.startswith("."))
    assert len(done) == 2 and not list((out / "clips").glob(".*"))  # the third clip left no half folder
    (out / "clips" / ".stale.tmp-1").mkdir()  # as a hard kill would leave it
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for d in done for p in (out / "clips" / d).iterdir()}
    report = prepare_videos(videos, out, _components(), OPTIONS, progress=False)
    assert report.clips == 5 and report.new_clips == 3
    assert stamps == {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in stamps}  # nothing written twice
    assert not (out / "clips" / ".stale.tmp-1").exists()
    clean = (clean_out / "manifest.jsonl").read_text()
    assert (out / "manifest.jsonl").read_text() == clean  # the same records as an uninterrupted run
    with pytest.raises(ValueError, match="options differ"):
        prepare_videos(videos, out, _components(), PrepareOptions(frames=5, lossless=True), progress=False)


class _BadSegmenter:
    """Answers per video: nothing, too many characters, a wrong shape, or the stand-in's masks."""

    def __init__(self):
        self.inner = SyntheticSegmenter()

    def segment(self, video):
        name = Path(video.origin.path).stem
        f, h, w = video.frames.shape[:3]
        if name.startswith("scail_animation"):
            return np.zeros((0, f, h, w), dtype=bool)
        if name.startswith("mocha_replacement_single"):
            return np.ones((7, f, h, w), dtype=bool)
        if name.startswith("wananimate"):
            return np.ones((1, f, h + 1, w), dtype=bool)
        if name.startswith("mocha_replacement_multi"):
            raise RuntimeError("CUDA out of memory")
        return self.inner.segment(video)


def test_bad_input_is_counted_by_reason(tmp_path):
    videos, _ = synth_videos()
    folder = tmp_path / "videos"
    shutil.copytree(videos, folder)
    (folder / "broken.mp4").write_bytes(b"\x00\x01 not a video" * 50)
    (folder / "empty.mp4").write_bytes(b"")
    write_video(folder / "short.mp4", read_video(next(videos.glob("pose_*.mp4")))[:5], 16.0)
    report = prepare_videos(folder, tmp_path / "out", _components(_BadSegmenter()), OPTIONS, progress=False)
    assert report.skipped == {"video_unreadable": 1, "video_empty": 1, "too_short": 1, "no_character": 1,
                              "too_many_characters": 1, "segmenter_bad_output": 1, "segmenter_error": 1}  # fmt: skip
    assert report.clips == 1 and report.videos == 8
    details = {d["reason"]: d for d in report.details}
    assert "CUDA out of memory" in details["segmenter_error"]["detail"]
    assert "7 characters" in details["too_many_characters"]["detail"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["skipped"] == report.skipped


def test_caption_endpoint_failures_are_reasons_and_can_be_retried(tmp_path):
    videos, _ = synth_videos()
    folder = tmp_path / "videos"
    folder.mkdir()
    for p in sorted(videos.glob("*.mp4"))[:2]:
        shutil.copy(p, folder / p.name)
    spec = lambda url, **kw: {  # noqa: E731
        "segmenter": "scail2.data.engine.standins.SyntheticSegmenter",
        "keypoints": "scail2.data.engine.standins.SyntheticKeypoints",
        "captioner": {"_target_": "scail2.data.engine.vlm.VLMCaptioner", "attempts": 1,
                      "client": {"_target_": "scail2.data.engine.endpoints.OpenAIChatClient", "base_url": url,
                                 "model": "vlm", "max_attempts": 1, **kw}},
    }  # fmt: skip
    out = tmp_path / "out"
    with FakeServer(Behaviour(sleep_s=1.5)) as slow:
        report = prepare_videos(folder, out, spec(slow.url, timeout_s=0.2), OPTIONS, progress=False)
    assert report.skipped == {"caption_timeout": 2} and report.clips == 0
    with FakeServer(Behaviour(garbage=True)) as broken:
        report = prepare_videos(folder, out, spec(broken.url), OPTIONS, retry=["caption_timeout"], progress=False)
    assert report.skipped == {"caption_garbage": 2}
    with FakeServer(Behaviour(caption="two figures dance")) as good:  # another port: transport settings may change
        report = prepare_videos(folder, out, spec(good.url), OPTIONS, retry=["caption_garbage"], progress=False)
    assert report.skipped == {} and report.clips == 2 and report.captions.startswith("scail2.data.engine.vlm.VLMCaptioner")
    assert {r.caption for r in load_manifest(report.manifest)} == {"two figures dance"}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_workers_give_the_sequential_result(prepared, tmp_path):
    videos, _, clean_out, _ = prepared
    report = prepare_videos(videos, tmp_path / "par", "synthetic", OPTIONS, workers=2, progress=False)
    assert (tmp_path / "par" / "manifest.jsonl").read_text() == (clean_out / "manifest.jsonl").read_text()
    assert report.clips == 5


def test_cli(prepared, tmp_path, capsys):
    videos = prepared[0]
    code = data_main(["prepare", str(videos), str(tmp_path / "cli"), "--frames", "9", "--lossless", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "5 clips (5 new) from 5 videos, 5 pose records" in printed
    assert data_main(["validate", str(tmp_path / "cli" / "manifest.jsonl"), "--full"]) == 0
    assert data_main(["prepare", str(videos), str(tmp_path / "cli"), "--frames", "13", "--no-progress"]) == 2
