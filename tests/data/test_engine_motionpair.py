"""``scail2-data motionpair`` end to end on synthetic clips with loopback fake VLM and image endpoints, the
generator adapters (our pipeline, external commands) and ``scail2-data preference`` on prepared clips."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from scail2.data.buckets import Bucket
from scail2.data.cli import main as data_main
from scail2.data.engine.adapters import CommandAnimator, CommandReplacer, PipelineAnimator
from scail2.data.engine.components import AnimationRequest, ReplacementRequest
from scail2.data.engine.motionpair import MotionPairOptions, synthesize_pairs
from scail2.data.engine.pose import render_poses
from scail2.data.engine.prepare import PrepareOptions, load_masks, load_poses, prepare_videos
from scail2.data.manifest import load_manifest
from scail2.data.validate import ValidateOptions, validate_manifest
from scail2.data.video import read_image, read_video, write_image

from ..registration import fake_distribution
from .engine_fakes import Behaviour, FakeServer, synth_videos

pytestmark = pytest.mark.timeout(300)
_SOURCES = {"scail_animation", "wananimate_animation", "mocha_replacement_single", "mocha_replacement_multi", "pose"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    videos, _ = synth_videos()
    out = tmp_path_factory.mktemp("prepared")
    prepare_videos(videos, out, "synthetic", PrepareOptions(frames=9, lossless=True), progress=False)
    pool = tmp_path_factory.mktemp("pool")
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]):
        image = np.full((48, 32, 3), 90, dtype=np.uint8)
        image[8:40, 8:24] = colour
        write_image(pool / f"character_{i}.png", image)
    return out, pool


def spec(url: str, pool: Path, **overrides) -> dict:
    client = {"_target_": "scail2.data.engine.endpoints.OpenAIChatClient", "base_url": url, "model": "vlm",
              "timeout_s": 20, "max_attempts": 2, "backoff_s": 0.01}  # fmt: skip
    here = "scail2.data.engine"
    out = {
        "pool": {"_target_": f"{here}.adapters.ImageFolderPool", "folder": str(pool)},
        "selector": {"_target_": f"{here}.vlm.VLMCandidateSelector", "client": client},
        "weaver": {"_target_": f"{here}.vlm.VLMPromptWeaver", "client": client},
        "checker": {"_target_": f"{here}.vlm.VLMQualityChecker", "client": client},
        "image_generator": {"_target_": f"{here}.vlm.EndpointImageGenerator",
                            "client": {**client, "_target_": f"{here}.endpoints.OpenAIImageClient", "model": "image"}},
        "filter": {"_target_": f"{here}.vlm.VLMVideoFilter", "client": client},
        "animators": [
            {"name": "scail", "source": "scail_animation", "weight": 3, "animator": f"{here}.standins.SyntheticAnimator"},
            {"name": "wananimate", "source": "wananimate_animation", "weight": 1, "animator": f"{here}.standins.SyntheticAnimator"},
        ],
        "replacers": [{"name": "mocha", "replacer": f"{here}.standins.SyntheticReplacer"}],
    }  # fmt: skip
    out.update(overrides)
    return out


@pytest.fixture(scope="module")
def built(prepared, tmp_path_factory):
    prep, pool = prepared
    out = tmp_path_factory.mktemp("pairs")
    with FakeServer(Behaviour(check_fails=1, discard_every=3)) as srv:
        report = synthesize_pairs(prep, out, spec(srv.url, pool), MotionPairOptions(), progress=False)
        requests = list(srv.requests)
    return prep, out, report, requests


def test_end_to_end_pairs_validate_with_the_mix_and_the_mask_backgrounds(built):
    prep, out, report, requests = built
    bad = [r.line() for r in validate_manifest(report.manifest, ValidateOptions(full=True)) if not r.ok]
    assert bad == []
    records = load_manifest(report.manifest)
    assert report.pairs + report.pose_records == len(records) and report.pose_records == 5
    assert set(report.classes) == {"animation", "replacement", "pose"} and set(report.sources) <= _SOURCES
    # Every clip is a pair or a counted skip; discards are per generator and only the filter's.
    assert report.pairs + sum(report.skipped.values()) == report.clips == 5
    assert report.skipped == {"discarded": 1}
    (discard,) = report.details
    g = report.generators[discard["generator"]]
    assert g["discarded"] == 1 and g["discard_rate"] == pytest.approx(1 / (g["kept"] + 1))
    for r in records:
        if r.source == "pose":
            continue
        engine = r.meta["engine"]
        assert engine["orientation"] == "reverse" and r.driving.name == "synthetic.mp4"
        assert r.target == (prep / "clips" / engine["clip"] / "target.mp4").resolve()  # real = target
        assert r.target_mask is not None and 0 <= r.reference < r.frames  # reference sampled from the target
        driving_mask, target_mask = read_video(r.driving_mask), read_video(r.target_mask)
        reference_mask = read_image(r.reference_mask)
        white = lambda x: (x == 255).all(-1)  # noqa: E731
        if r.mode == "animation":  # reference on white, driving (and target) on black
            assert white(reference_mask).any() and not white(driving_mask).any() and not white(target_mask).any()
        else:  # reference on black, driving (and target) on white
            assert not white(reference_mask).any() and white(driving_mask).any() and white(target_mask).any()
        characters = r.meta["characters"]
        assert (r.source == "mocha_replacement_multi") == (characters > 1)
        real = load_masks(prep / "clips" / engine["clip"] / "characters.npz")
        # The reference mask is the target frame's mask; binding colours agree across the pair's masks.
        np.testing.assert_array_equal(~(white(reference_mask) | (reference_mask == 0).all(-1)), real[:, r.reference].any(0))
        colours = {tuple(c) for c in driving_mask.reshape(-1, 3)} - {(0, 0, 0), (255, 255, 255)}
        assert colours == {tuple(c) for c in target_mask.reshape(-1, 3)} - {(0, 0, 0), (255, 255, 255)}
        loop = json.loads((r.driving.parent / "loop.json").read_text())
        assert len(loop["transcripts"]) == (characters if r.mode == "replacement" else 1)
    # The checker's first rejection made the weaver revise and the generator edit its last result.
    first_loop = sorted(out.glob("pairs/*/loop.json"))
    turns = [t for p in first_loop for tr in json.loads(p.read_text())["transcripts"] for t in tr["turns"]]
    assert sum(not t["ok"] for t in turns) == 1 and any(t["prompt"] == "fix the hands" for t in turns)
    edits = [r[1]["images"] for r in requests if r[0] == "images"]
    assert 3 in edits and set(edits) <= {2, 3}


def test_pairs_load_as_training_samples(built):
    """Every record of the manifest (pairs and pose records) loads through the training sample path."""
    from scail2.data.sample import AugmentOptions, draw_pixel_choices, load_pixel_sample, record_meta

    bucket = Bucket(9, 64, 64)
    for i, record in enumerate(load_manifest(built[2].manifest)):
        rng = np.random.default_rng(i)
        choices = draw_pixel_choices(record, record_meta(record), bucket, rng, AugmentOptions(forward_fraction=0.5))
        drivings = ("driving", "driving_aug") if record.has_aug and not choices.forward else ("driving",)
        sample = load_pixel_sample(record, bucket, choices, drivings)
        assert sample.target.shape == (9, 3, 64, 64) and set(sample.drivings) == set(drivings)
        assert sample.reference_mask.shape == (3, 64, 64)


def test_resume_is_a_no_op_and_runs_are_reproducible(built, prepared, tmp_path):
    prep, out, report, _ = built
    with FakeServer(Behaviour(check_fails=1, discard_every=3)) as srv:
        again = synthesize_pairs(prep, out, spec(srv.url, prepared[1]), MotionPairOptions(), progress=False)
        assert again.new_pairs == 0 and srv.requests == []  # nothing asked, nothing written twice
    assert again.manifest.read_text() == report.manifest.read_text()
    with FakeServer(Behaviour(check_fails=1, discard_every=3)) as srv:
        fresh = synthesize_pairs(prep, tmp_path / "fresh", spec(srv.url, prepared[1]), MotionPairOptions(), progress=False)
    ours = [(r.id, r.source, r.reference, r.caption) for r in load_manifest(fresh.manifest)]
    assert ours == [(r.id, r.source, r.reference, r.caption) for r in load_manifest(report.manifest)]


def test_failing_endpoints_and_generators_are_reasons(prepared, tmp_path, monkeypatch):
    prep, pool = prepared
    with FakeServer(Behaviour(garbage=True)) as srv:
        report = synthesize_pairs(prep, tmp_path / "a", spec(srv.url, pool), MotionPairOptions(), progress=False)
    assert report.pairs == 0 and report.skipped == {"selector_garbage": 5}
    with FakeServer(Behaviour(sleep_s=1.5)) as srv:
        slow = spec(srv.url, pool)
        slow["selector"]["client"] = {**slow["selector"]["client"], "timeout_s": 0.2, "max_attempts": 1}
        report = synthesize_pairs(prep, tmp_path / "b", slow, MotionPairOptions(), progress=False)
    assert report.skipped == {"selector_timeout": 5}
    with FakeServer(Behaviour(check_fails=100)) as srv:
        report = synthesize_pairs(prep, tmp_path / "c", spec(srv.url, pool), MotionPairOptions(max_turns=2), progress=False)
    assert report.skipped == {"reference_rejected": 5} and report.generators["mocha"]["failed"] >= 1
    # A user's own animator (registered by its package) that returns one frame too few.
    fake_distribution(tmp_path / "site", "mylab-engine", {"short": "mylab_engine:ShortAnimator"}, {"mylab_engine/__init__.py": SHORT})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with FakeServer() as srv:
        broken = spec(srv.url, pool, replacers=[], animators=[
            {"name": "short", "source": "scail_animation", "animator": "mylab_engine.ShortAnimator"}])
        report = synthesize_pairs(prep, tmp_path / "d", broken, MotionPairOptions(), progress=False)
    sys.modules.pop("mylab_engine", None)
    multi = sum(json.loads(p.read_text())["characters"] > 1 for p in prep.glob("clips/*/clip.json"))
    assert multi >= 1 and report.skipped == {"generator_bad_output": 5 - multi, "no_replacement_generator": multi}


SHORT = """
from scail2.data.engine.standins import SyntheticAnimator


class ShortAnimator:
    def animate(self, request):
        out = SyntheticAnimator().animate(request)
        out.frames = out.frames[:-1]
        return out
"""


def test_forward_packaging_and_cli(prepared, tmp_path, capsys):
    prep, pool = prepared
    with FakeServer() as srv:
        components = tmp_path / "components.json"
        components.write_text(json.dumps(spec(srv.url, pool, filter=None)))
        code = data_main(["motionpair", str(prep), str(tmp_path / "fwd"), "--components", str(components),
                          "--forward-fraction", "1", "--no-pose", "--no-progress"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "5 pairs (5 new) from 5 clips, 0 pose records" in printed and "filter: none" in printed
    records = load_manifest(tmp_path / "fwd" / "manifest.jsonl")
    assert len(records) == 5 and all(r.meta["engine"]["orientation"] == "forward" for r in records)
    for r in records:  # synthetic = target, real = driving, no target mask (the loader must not flip it back)
        assert r.target.name == "synthetic.mp4" and r.driving.name == "target.mp4" and r.target_mask is None
        assert r.caption == "draw the character in the posture"  # the weaver's prompt (no captioner given)
    assert all(r.ok for r in validate_manifest(tmp_path / "fwd" / "manifest.jsonl", ValidateOptions(full=True)))


def _request(prep: Path) -> AnimationRequest:
    clip = next(p for p in sorted((prep / "clips").iterdir()) if p.name.startswith("scail_animation"))
    track, _ = load_poses(clip / "poses.npz")
    render = render_poses(track)
    reference = read_video(clip / "target.mp4")[0]
    return AnimationRequest(reference, track, render.frames, None, 64, 64, 9, 16.0, "a dancer", seed=3)


@pytest.mark.slow
def test_pipeline_animator_runs_our_pipeline_in_pose_driven_mode(prepared, tmp_path):
    from scail2.pipeline import SCAIL2Pipeline
    from scail2.pipeline.tiny import save_tiny_pipeline

    pipe = SCAIL2Pipeline.from_pretrained(save_tiny_pipeline(tmp_path / "tiny"))
    animator = PipelineAnimator(pipeline=pipe, steps=2, guidance_scale=1.0)
    request = _request(prepared[0])
    out = animator.animate(request)
    assert out.frames.shape == (9, 64, 64, 3) and out.frames.dtype == np.uint8 and out.masks is None
    # The same as calling the pipeline in pose-driven mode: the skeleton render drives, the image is the reference.
    direct = pipe(request.reference, request.pose_video, mode="animation", height=64, width=64, fps=16.0,
                  prompt="a dancer", seed=3, num_inference_steps=2, guidance_scale=1.0, progress=False)  # fmt: skip
    np.testing.assert_array_equal(out.frames, direct.frames)


def test_command_generators(prepared, tmp_path):
    script = tmp_path / "generate.py"
    script.write_text(
        "import sys, numpy as np\n"
        "from scail2.data.video import read_video, read_image, write_video\n"
        "kind, src, ref, out, masks = sys.argv[1:6]\n"
        "video = read_video(src)\n"
        "colour = read_image(ref)[0, 0]\n"
        "inside = video.max(-1) > 0 if kind == 'animate' else read_video(sys.argv[6]).max(-1) > 127\n"
        "frames = np.where(inside[..., None], colour, 128 if kind == 'animate' else video).astype(np.uint8)\n"
        "write_video(out, frames, 16, lossless=True)\n"
        "np.savez(masks, masks=inside[None])\n"
    )
    request = _request(prepared[0])
    request.reference = np.full((8, 8, 3), 77, dtype=np.uint8)
    animator = CommandAnimator([sys.executable, str(script), "animate", "{pose}", "{reference}", "{output}", "{output_masks}"])
    out = animator.animate(request)
    drawn = request.pose_video.max(-1) > 0
    assert (out.frames[drawn] == 77).all() and (out.frames[~drawn] == 128).all()
    np.testing.assert_array_equal(out.masks[0], drawn)
    mask = np.zeros((9, 64, 64), dtype=bool)
    mask[:, 10:20, 10:20] = True
    replacer = CommandReplacer([sys.executable, str(script), "replace", "{video}", "{reference}", "{output}",
                                "{output_masks}", "{mask}"])  # fmt: skip
    video = read_video(next((prepared[0] / "clips").iterdir()) / "target.mp4")
    res = replacer.replace(ReplacementRequest(video, mask, request.reference, 0, 16.0, "", 0))
    assert (res.frames[mask] == 77).all()
    np.testing.assert_array_equal(res.frames[~mask], video[~mask])
    with pytest.raises(Exception, match="ran past"):
        CommandAnimator([sys.executable, "-c", "import time; time.sleep(30)"], timeout_s=0.5).animate(request)


def test_preference_pairs_from_prepared_clips_with_adapters(prepared, tmp_path):
    """``scail2-data preference`` on real-video records (prepared clips) with user components through adapters:
    estimators P and P' (P' = P with estimation noise), G = a pose-driven animator behind `AnimatorGenerator`."""
    from scail2.preference.validate import validate_preference_manifest

    prep, pool = prepared
    script = tmp_path / "animate.py"
    script.write_text(
        "import sys, numpy as np\n"
        "from scail2.data.video import read_video, read_image, write_video\n"
        "pose, ref, out, masks = sys.argv[1:5]\n"
        "video = read_video(pose)\n"
        "inside = video.max(-1) > 0\n"
        "frames = np.where(inside[..., None], read_image(ref)[24, 16], 90).astype(np.uint8)\n"
        "write_video(out, frames, 16, lossless=True)\n"
        "np.savez(masks, masks=inside[None])\n"
    )
    here = "scail2.data.engine"
    components = {
        "pose_estimator": f"{here}.standins.SyntheticKeypoints",
        "weak_pose_estimator": {"_target_": "scail2.preference.components.NoisyPoses", "seed": 0,
                                "base": {"_target_": f"{here}.standins.SyntheticKeypoints"}},
        "generator": {"_target_": f"{here}.adapters.AnimatorGenerator", "limb_radius": 2.0,
                      "animator": {"_target_": f"{here}.adapters.CommandAnimator",
                                   "command": [sys.executable, str(script), "{pose}", "{reference}", "{output}", "{output_masks}"]}},
        "references": {"_target_": f"{here}.adapters.ImageFolderReferences", "folder": str(pool)},
    }  # fmt: skip
    path = tmp_path / "components.json"
    path.write_text(json.dumps(components))
    code = data_main(["preference", str(prep / "manifest.jsonl"), str(tmp_path / "dpo"), "--components", str(path),
                      "--pairs", "2", "--quiet"])  # fmt: skip
    assert code == 0
    bad = [r.line() for r in validate_preference_manifest(tmp_path / "dpo" / "manifest.jsonl", ValidateOptions(full=True)) if not r.ok]
    assert bad == []
    pair = json.loads((tmp_path / "dpo" / "manifest.jsonl").read_text().splitlines()[0])
    preferred = read_video(tmp_path / "dpo" / pair["preferred"])
    dispreferred = read_video(tmp_path / "dpo" / pair["dispreferred"])
    assert preferred.shape == dispreferred.shape and not np.array_equal(preferred, dispreferred)  # P' differs
