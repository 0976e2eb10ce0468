"""Hostile data: corrupt records are contained, counted and reported while the scan goes on; variable frame
rates and wrong sizes are refused by validate and by the cache; image decompression bombs are refused from
their header."""

from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from scail2.data.buckets import Bucket
from scail2.data.cache import CacheIndex, build_cache
from scail2.data.cli import main
from scail2.data.manifest import load_manifest
from scail2.data.validate import ValidateOptions, validate_manifest
from scail2.data.video import VideoDecodeError, read_image, read_video, variable_rate, write_video
from tests.data.helpers import synth_dataset, tiny_encoders, tiny_encoders_dir

pytestmark = pytest.mark.hostile
BUCKET = Bucket(9, 64, 64)


def _write_timed(path: Path, frames: np.ndarray, times_ms: list[int]) -> Path:
    """An H.264 mp4 whose frame i is shown at ``times_ms[i]`` (any spacing: constant or variable rate)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        for frame, t in zip(frames, times_ms):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")
            picture.pts, picture.time_base = t, Fraction(1, 1000)
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A copy of a 10-pair synthetic dataset (tests add files and records to it)."""
    root = tmp_path_factory.mktemp("hostile") / "data"
    shutil.copytree(synth_dataset(pairs=10, frames=9).parent, root)
    return root


def _rows(root: Path) -> list[dict]:
    return [json.loads(x) for x in (root / "manifest.jsonl").read_text().splitlines()]


def _base(rows: list[dict]) -> dict:
    return next(r for r in rows if r["mode"] == "animation" and isinstance(r["reference"], int) and r["end_to_end"])


def _manifest(root: Path, name: str, extra: list[dict]) -> Path:
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(root) + extra))
    return path


# ----------------------------------------------------------------------------------------------- containment
@pytest.mark.parametrize("fps", [1e-320, 1e-5, 1e308, 5e3])
def test_an_absurd_fps_is_one_bad_record_and_the_scan_goes_on(dataset, capsys, fps):
    manifest = _manifest(dataset, "fps", [{**_base(_rows(dataset)), "id": "tiny_fps", "fps": fps}])
    assert main(["validate", str(manifest), "--buckets", "9x64x64"]) == 1
    out = capsys.readouterr()
    assert out.out.strip().splitlines() == [f"tiny_fps: fps: {fps!r} is not a video frame rate; give the video's rate, between 1 and 1000"]
    assert "checked 11 records: 1 bad" in out.err and "Traceback" not in out.err


def test_the_cache_skips_an_absurd_fps_line_and_caches_the_rest(dataset, tmp_path, capsys):
    manifest = _manifest(dataset, "fps_cache", [{**_base(_rows(dataset)), "id": "tiny_fps", "fps": 1e-320}])
    code = main(["cache", str(manifest), str(tmp_path / "cache"), "--encoders", str(tiny_encoders_dir()),
                 "--buckets", "9x64x64", "--no-progress", "--dtype", "float32"])
    err = capsys.readouterr()
    assert code == 0, err
    assert "tiny_fps: fps: 1e-320 is not a video frame rate" in err.err
    index = CacheIndex.load(tmp_path / "cache")
    assert len(index.samples) == 10 and "1 unreadable manifest lines" in err.out


def test_a_check_that_crashes_is_one_bad_record(dataset, monkeypatch):
    import scail2.data.validate as validate

    real = validate.resampled_length

    def overflow(frames, fps, target_fps):
        if fps == 17.0:
            raise OverflowError("cannot convert float infinity to integer")
        return real(frames, fps, target_fps)

    monkeypatch.setattr(validate, "resampled_length", overflow)
    manifest = _manifest(dataset, "crash", [{**_base(_rows(dataset)), "id": "crashing", "fps": 17.0}])
    reports = list(validate_manifest(manifest, ValidateOptions()))
    bad = [r for r in reports if not r.ok]
    assert len(reports) == 11 and [r.record_id for r in bad] == ["crashing"]
    assert "a check failed: OverflowError" in bad[0].line()


def test_a_record_whose_loading_crashes_is_a_cache_failure_and_the_rest_is_cached(dataset, tmp_path, monkeypatch):
    import scail2.data.cache as cache

    records = load_manifest(synth_dataset(pairs=10, frames=9))[:4]
    real = cache.record_meta

    def crash(record, backend):
        if record.id == records[1].id:
            raise OverflowError("cannot convert float infinity to integer")
        return real(record, backend)

    monkeypatch.setattr(cache, "record_meta", crash)
    report = build_cache(records, tmp_path / "c", tiny_encoders(), [BUCKET], dtype="float32", progress=False)
    assert (report.cached, report.failed) == (3, 1)
    (failure,) = CacheIndex.load(tmp_path / "c").failed
    assert failure["id"] == records[1].id and failure["reason"] == "invalid" and "OverflowError" in failure["detail"]


# ----------------------------------------------------------------------------------------------- frame rate
def test_a_variable_frame_rate_video_averaging_16_fps_is_refused(dataset, tmp_path):
    rows = _rows(dataset)
    base = _base(rows)
    frames = read_video(dataset / base["target"])  # 9 frames at 16 fps
    times = [0]
    for i in range(1, len(frames)):
        times.append(times[-1] + (31 if i % 2 else 94))  # 31 / 94 ms alternately: 62.5 ms on average
    vfr = _write_timed(dataset / "vfr_target.mp4", frames, times)
    assert "variable frame rate" in variable_rate(vfr)
    record = {**base, "id": "vfr", "target": "vfr_target.mp4"}
    manifest = _manifest(dataset, "vfr", [record])
    reports = {r.record_id: r for r in validate_manifest(manifest, ValidateOptions(buckets=(BUCKET,)))}
    assert not reports["vfr"].ok and "target: variable frame rate" in reports["vfr"].line()
    assert sum(not r.ok for r in reports.values()) == 1
    # The cache refuses what validate flags.
    records = [r for r in load_manifest(manifest) if r.id in ("vfr", base["id"])]
    report = build_cache(records, tmp_path / "c", tiny_encoders(), [BUCKET], dtype="float32", progress=False)
    (failure,) = CacheIndex.load(tmp_path / "c").failed
    assert report.cached == 1 and failure["id"] == "vfr" and "variable frame rate" in failure["detail"]


@pytest.mark.parametrize("rate", [16, 29.97, 25])
def test_a_constant_rate_rounded_to_milliseconds_is_not_flagged(dataset, rate):
    frames = read_video(dataset / _base(_rows(dataset))["target"])
    times = [round(i * 1000 / rate) for i in range(len(frames))]  # 33 / 34 ms steps at 29.97 fps
    assert variable_rate(_write_timed(dataset / f"cfr_{rate}.mp4", frames, times)) is None


def test_one_dropped_frame_is_not_a_variable_rate_but_two_bursts_are(dataset):
    frames = read_video(dataset / _base(_rows(dataset))["target"])
    dropped = [0, 62, 125, 188, 250, 375, 438, 500, 562]  # one 125 ms gap in a 16 fps stream
    assert variable_rate(_write_timed(dataset / "drop.mp4", frames, dropped)) is None
    bursts = [0, 10, 20, 188, 250, 312, 322, 332, 500]
    assert "variable frame rate" in variable_rate(_write_timed(dataset / "bursts.mp4", frames, bursts))


# ----------------------------------------------------------------------------------------------- sizes
def test_a_driving_video_of_another_size_is_flagged_and_not_cached(dataset, tmp_path):
    rows = _rows(dataset)
    base = _base(rows)
    driving = read_video(dataset / base["driving"])
    mask = read_video(dataset / base["driving_mask"])
    wide = np.zeros((driving.shape[0], 64, 96, 3), np.uint8)
    wide_mask = np.zeros_like(wide)
    wide[:, :, 16:80], wide_mask[:, :, 16:80] = driving, mask
    write_video(dataset / "wide_driving.mp4", wide, fps=16, lossless=True)
    write_video(dataset / "wide_driving_mask.mp4", wide_mask, fps=16, lossless=True)
    record = {**base, "id": "wide", "driving": "wide_driving.mp4", "driving_mask": "wide_driving_mask.mp4"}
    for key in ("driving_aug", "driving_mask_aug"):
        record.pop(key, None)
    manifest = _manifest(dataset, "wide", [record])
    reports = {r.record_id: r for r in validate_manifest(manifest, ValidateOptions(buckets=(BUCKET,)))}
    assert "driving: is 64x96 but target is 64x64" in reports["wide"].line()
    records = [r for r in load_manifest(manifest) if r.id in ("wide", base["id"])]
    report = build_cache(records, tmp_path / "c", tiny_encoders(), [BUCKET], dtype="float32", progress=False)
    index = CacheIndex.load(tmp_path / "c")
    assert report.cached == 1 and [s["id"] for s in index.samples] == [base["id"]]
    assert index.failed[0]["id"] == "wide" and index.failed[0]["field"] == "driving"


# ----------------------------------------------------------------------------------------------- images
def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file that declares ``width`` x ``height`` pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 1024)  # far fewer rows than declared
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("size", [(100_000, 100_000), (9_000, 9_000)])
def test_a_decompression_bomb_png_is_refused_from_its_header(tmp_path, size):
    path = _png_header_only(tmp_path / "bomb.png", *size)
    assert path.stat().st_size < 2000
    with pytest.raises(VideoDecodeError, match="decompression bomb") as info:
        read_image(path)
    assert info.value.reason == "unreadable" and f"{size[0] * size[1] / 1e6:.0f}M pixels" in str(info.value)


def test_a_bomb_reference_image_is_one_bad_record(dataset):
    _png_header_only(dataset / "bomb_ref.png", 100_000, 100_000)
    base = _base(_rows(dataset))
    manifest = _manifest(dataset, "bomb", [{**base, "id": "bomb", "reference": "bomb_ref.png"}])
    reports = {r.record_id: r for r in validate_manifest(manifest, ValidateOptions())}
    assert "reference: unreadable: the image declares 10000M pixels" in reports["bomb"].line()


# ----------------------------------------------------------------------------------------------- components
def _hostile_component(target: str, marker: Path) -> dict:
    """A component node that would create ``marker`` if ``target`` were built with it."""
    args = {
        "scail2.config.instantiate.instantiate": {"_args_": [{"_target_": "os.system", "command": f"touch {marker}"}, "x"]},
        "scail2.data.cli.main": {"argv": ["synth", str(marker), "--pairs", "1"]},  # a command's entry point
        "scail2.train.main": {},
        "scail2.preference.components.MotionRecord": {},  # a class the module imported from elsewhere
        "builtins.eval": {"_args_": [f"open('{marker}', 'w')"]},
        "subprocess.Popen": {"args": ["touch", str(marker)]},
        "os.system": {"command": f"touch {marker}"},
        "scail2.data.engine.adapters.subprocess.Popen": {"args": ["touch", str(marker)]},  # reached through a module
        "scail2.data.engine.adapters.os.system": {"command": f"touch {marker}"},
    }[target]
    return {"_target_": target, **args}


HOSTILE_COMPONENTS = ["scail2.config.instantiate.instantiate", "scail2.data.cli.main", "scail2.train.main",
                      "scail2.preference.components.MotionRecord", "builtins.eval", "subprocess.Popen", "os.system",
                      "scail2.data.engine.adapters.subprocess.Popen", "scail2.data.engine.adapters.os.system"]  # fmt: skip


@pytest.mark.parametrize("target", HOSTILE_COMPONENTS)
def test_a_components_file_can_build_only_allowed_targets(tmp_path, target):
    """Through every loader, at the top of a component, nested in its arguments and in Hydra's positional
    arguments: refused by the config system's allow-list before anything is built."""
    from scail2.config import UnsafeTargetError, read_components
    from scail2.data.engine.components import load_motionpair_components, load_prepare_components
    from scail2.preference.builder import load_components

    marker = tmp_path / "MARKER"
    evil = _hostile_component(target, marker)
    preference = read_components("synthetic", "preference")
    prepare = read_components("synthetic", "prepare")
    motionpair = read_components("local_vlm", "motionpair")
    cases = [
        (load_components, {**preference, "generator": evil}, "generator"),
        (load_components, {**preference, "generator": {"_target_": "scail2.data.engine.adapters.AnimatorGenerator",
                                                       "animator": evil}}, "generator.animator"),
        (load_components, {**preference, "generator": {"_target_": "scail2.data.engine.adapters.AnimatorGenerator",
                                                       "_args_": [evil]}}, r"generator\._args_\[0\]"),
        (load_prepare_components, {**prepare, "captioner": evil}, "captioner"),
        (load_motionpair_components, {**motionpair, "animators": [{"name": "x", "source": "pose", "animator": evil}]},
         r"animators\[0\]\.animator"),
    ]  # fmt: skip
    for load, spec, where in cases:
        with pytest.raises(UnsafeTargetError, match=rf"config `{where}\._target_: {re.escape(target)}` is not allowed"):
            load(spec)
    assert not marker.exists()


def test_a_hostile_components_file_stops_the_command_before_it_writes(tmp_path, capsys):
    from scail2.config import read_components

    marker = tmp_path / "MARKER"
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"")
    evil = tmp_path / "evil.yaml"
    evil.write_text(
        "segmenter: {_target_: scail2.data.engine.standins.SyntheticSegmenter}\n"
        "keypoints: {_target_: scail2.data.engine.standins.SyntheticKeypoints}\n"
        f"captioner: {{_target_: subprocess.Popen, args: [touch, {marker}]}}\n"
    )
    assert main(["prepare", str(tmp_path / "videos"), str(tmp_path / "out"), "--components", str(evil), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scail2-data prepare: config `captioner._target_: subprocess.Popen` is not allowed") and err.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "out").exists()
    pref = tmp_path / "evil_pref.json"
    pref.write_text(json.dumps({**read_components("synthetic", "preference"),
                                "generator": {"_target_": "os.system", "command": f"touch {marker}"}}))
    assert main(["preference", str(tmp_path / "none.jsonl"), str(tmp_path / "dpo"), "--components", str(pref)]) == 2
    assert "config `generator._target_: os.system` is not allowed" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "dpo").exists()


def test_an_unregistered_class_of_ones_own_is_refused_with_the_way_to_register_it(tmp_path, monkeypatch):
    from scail2.config import UnsafeTargetError
    from scail2.data.engine.components import load_prepare_components

    (tmp_path / "site" / "mylab_seg").mkdir(parents=True)
    (tmp_path / "site" / "mylab_seg" / "__init__.py").write_text("raise RuntimeError('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = {"segmenter": "mylab_seg.Segmenter", "keypoints": "scail2.data.engine.standins.SyntheticKeypoints", "captioner": None}
    with pytest.raises(UnsafeTargetError, match=r"register it \(entry point group scail2\.config_targets"):
        load_prepare_components(spec)  # refused by name: the package is never imported
