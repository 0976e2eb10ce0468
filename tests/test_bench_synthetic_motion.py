"""The synthetic motion benchmark: exact values of its measures on constructed pairs, the held-out synthetic
set and its ground truth, the run end to end on a tiny random model, and the demo's callback."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scail2.bench.synthetic_motion import (
    MotionBenchmarkConfig,
    MotionCase,
    format_report,
    foreground,
    latent_region,
    load_cases,
    pixel_metrics,
    run_motion_benchmark,
    shuffled_donors,
    soft_jaccard_distance,
    summarize,
)
from scail2.data.synth import PairTruth, SynthOptions, generate_dataset, pair_index, pair_truth

H = W = 32
F = 5
SIDE = 8  # the constructed character: an 8x8 square moving right by 1 px per frame


def _square(shift: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[12 : 12 + SIDE, 4 + shift : 4 + shift + SIDE] = True
    return m


def _constructed(mode: str = "animation") -> MotionCase:
    """A pair whose ground truth is known by construction: a red square moving over grey (the target), the
    reference its first frame, the driving video over a blue background."""
    grey, blue = np.full((H, W, 3), 100.0, np.float32), np.zeros((H, W, 3), np.float32)
    blue[..., 2] = 200.0
    masks = np.stack([_square(f) for f in range(F)])[None]  # (1, F, H, W)
    target = np.where(masks[0][..., None], np.array([220, 40, 40], np.float32), grey).astype(np.uint8)
    reference_bg = grey if mode == "animation" else blue
    reference = np.where(masks[0, 0][..., None], np.array([220, 40, 40], np.float32), reference_bg).astype(np.uint8)
    truth = PairTruth(
        index=0, source="scail_animation", mode=mode, end_to_end=True, masks=masks, reference_masks=masks[:, 0],
        reference_frame=0, target_background=grey,
        driving_background=blue if mode == "animation" else grey, reference_background=reference_bg,
        joints=[], characters=[],
    )  # fmt: skip
    return MotionCase("c", mode, True, "", reference, reference, target, target, target, truth)


def test_soft_jaccard_and_foreground():
    a = np.zeros((3, 4, 4))
    a[:, :2] = 1.0
    b = np.zeros((3, 4, 4))
    b[0, :2], b[1, 2:], b[2, :1] = 1.0, 1.0, 1.0
    assert soft_jaccard_distance(a, b).tolist() == pytest.approx([0.0, 1.0, 0.5])
    assert soft_jaccard_distance(np.zeros((1, 2, 2)), np.zeros((1, 2, 2))).tolist() == [0.0]
    bg = np.full((2, 2, 3), 0.5)
    frames = np.stack([bg, bg + 0.14, bg + 0.3])  # 0, halfway up the 0.08 -> 0.2 ramp, above it
    assert foreground(frames, bg)[:, 0, 0].tolist() == pytest.approx([0.0, 0.5, 1.0])


def test_perfect_prediction_scores_zero_and_still_reference_scores_its_shift():
    case = _constructed()
    perfect = pixel_metrics(case.target / 255.0, case)
    assert perfect["motion_error"] == 0.0 and perfect["identity_error"] == pytest.approx(0.0, abs=1e-12)
    assert perfect["environment_error"] == pytest.approx(0.0, abs=1e-6) and perfect["environment_switch"] == 1.0
    # The reference held still: frame f overlaps the target's square by SIDE - f columns of SIDE + f.
    still = pixel_metrics(np.broadcast_to(case.reference, case.target.shape) / 255.0, case)
    expected = np.mean([1 - (SIDE - f) / (SIDE + f) for f in range(F)])
    assert still["motion_error"] == pytest.approx(expected)
    # Inside the target's squares a quarter of the pixels are the background the square left behind.
    red_share = np.mean([(SIDE - f) / SIDE for f in range(F)])
    assert red_share == 0.75
    assert still["identity_error"] == pytest.approx((1 - red_share) * np.linalg.norm([120.0, -60.0, -60.0]) / 255.0)
    # A video over the driving video's background takes the wrong environment in animation mode.
    wrong = np.where(case.truth.masks[0][..., None], case.target, case.truth.driving_background).astype(np.float64) / 255.0
    assert pixel_metrics(wrong, case)["environment_switch"] == 0.0
    # In replacement mode the same video keeps the right one (the driving video's background).
    repl = _constructed("replacement")
    assert pixel_metrics(repl.target / 255.0, repl)["environment_switch"] == 1.0
    assert pixel_metrics(np.broadcast_to(repl.reference, repl.target.shape) / 255.0, repl)["environment_switch"] == 0.0


def test_latent_region_groups_frames_like_the_causal_vae():
    masks = np.zeros((9, 32, 32), dtype=bool)
    masks[0, 0, 0] = True  # latent frame 0, cell (0, 0)
    masks[5, 17, 30] = True  # frames 1-4 -> latent 1, 5-8 -> latent 2; cell (2, 3)
    region = latent_region(masks, grow_cells=0)
    assert region.shape == (3, 4, 4)
    assert np.argwhere(region).tolist() == [[0, 0, 0], [2, 2, 3]]
    assert latent_region(masks, grow_cells=1)[0, :2, :2].all()
    with pytest.raises(ValueError, match="4k\\+1"):
        latent_region(np.zeros((6, 32, 32), dtype=bool))


def test_shuffled_driving_pairs_within_a_group_and_never_keeps_its_own():
    def case(i, mode, e2e=True):
        return MotionCase(f"p{i}", mode, e2e, "", *([None] * 6))

    cases = [case(0, "animation"), case(1, "replacement"), case(2, "animation"), case(3, "replacement"), case(4, "animation")]
    donors = shuffled_donors(cases)
    assert donors == [2, 3, 4, 1, 0]
    assert all(d != i and cases[d].group == cases[i].group for i, d in enumerate(donors))
    with pytest.raises(ValueError, match="at least 2 held-out animation pairs with pose driving"):
        shuffled_donors([*cases, case(5, "animation", e2e=False)])


def test_summarize_decides_on_every_baseline():
    rows = lambda *v: [{"latent_motion_error": x} for x in v]  # noqa: E731
    per = {"trained": rows(1.0, 1.0, 1.0), "reference_still": rows(2.0, 2.1, 2.2), "shuffled_driving": rows(1.5, 1.6, 1.4), "untrained": rows(3.0, 3.0, 3.1)}
    out = summarize(per, ["a", "b", "c"], ["animation"] * 3)
    assert out["deciding_metric"] == "latent_motion_error" and out["follows_driving"]
    per["reference_still"] = rows(0.5, 2.0, 1.0)  # no better on average than the trained network
    out = summarize(per, ["a", "b", "c"], ["animation"] * 3)
    assert not out["vs_baselines"]["latent_motion_error"]["reference_still"]["beats"] and not out["follows_driving"]
    assert any("does NOT beat reference_still" in line for line in format_report(out))


def test_heldout_set_is_disjoint_and_its_truth_matches_the_files(tmp_path):
    """The data module's held-out set: other indices than training, references in a scene, the stamp records it
    (and the training folder's stamp is the one drawn before these options existed); the redrawn ground truth
    matches the written videos."""
    from scail2.data.manifest import load_manifest
    from scail2.data.video import read_image, read_video
    from scail2.lit.data import HELDOUT_FIRST_INDEX, SyntheticDataModule

    dm = SyntheticDataModule(str(tmp_path / "root"), pairs=2, frames=F, height=H, width=W, heldout_pairs=5)
    from scail2.data.synth import ensure_dataset

    ensure_dataset(tmp_path / "root" / "heldout", dm.heldout)
    stamp = json.loads((tmp_path / "root" / "heldout" / "synth.json").read_text())
    assert stamp["first_index"] == HELDOUT_FIRST_INDEX and stamp["scene_references"] is True
    plain = generate_dataset(tmp_path / "plain", SynthOptions(pairs=1, frames=F, sizes=((H, W),)))
    assert "first_index" not in json.loads((plain.parent / "synth.json").read_text())
    records = load_manifest(dm.heldout_manifest)
    assert [pair_index(r.id) for r in records] == list(range(HELDOUT_FIRST_INDEX, HELDOUT_FIRST_INDEX + 5))
    for r in records:
        truth = pair_truth(0, pair_index(r.id), F, 16.0, H, W, scene_references=True)
        target = read_video(r.target)
        reference = target[r.reference] if isinstance(r.reference, int) else read_image(r.reference)
        outside = ~truth.masks.any(axis=0)
        assert (target[outside] == np.broadcast_to(truth.target_background.round(), target.shape)[outside]).all()
        off = ~truth.reference_masks.any(axis=0)
        assert (reference[off] == truth.reference_background.round()[off]).all()
        assert np.abs(truth.kept_background - truth.other_background).mean() > 8.0  # a switch to measure
    with pytest.raises(ValueError, match="other settings"):
        ensure_dataset(tmp_path / "root" / "heldout", SyntheticDataModule(str(tmp_path / "root"), pairs=2, frames=F, height=H, width=W, heldout_pairs=6).heldout)
    with pytest.raises(ValueError, match="heldout_pairs"):
        SyntheticDataModule(str(tmp_path / "x"), heldout_pairs=-1)


def test_run_on_a_tiny_random_model(tmp_path):
    """End to end on two held-out animation pairs: the methods and ceilings are all scored, the target's own
    latents score exactly 0, the untrained network given as the trained one ties exactly, and the files hold it."""
    from scail2.encoders.bundle import Encoders
    from scail2.encoders.tiny import save_tiny_encoders
    from scail2.models import SCAIL2Transformer, scail2_config
    from scail2.pipeline import SCAIL2Pipeline
    from scail2.testing import randomize_

    generate_dataset(tmp_path / "held", SynthOptions(pairs=4, frames=F, sizes=((H, W),), seed=3, first_index=10, scene_references=True))
    cases = [c for c in load_cases(tmp_path / "held") if c.group == ("animation", True)]
    assert len(cases) == 2  # scail_animation_00010 and wananimate_animation_00013
    enc = Encoders.from_pretrained(save_tiny_encoders(tmp_path / "enc", seed=0))
    net = randomize_(SCAIL2Transformer(scail2_config("tiny")), seed=1)
    pipe = SCAIL2Pipeline(net, enc.vae, enc.text, enc.image)
    config = MotionBenchmarkConfig(steps=2, grid_cases=2, grid_frames=2)
    out = run_motion_benchmark(pipe, cases, net, net, config, tmp_path / "out")
    table = out["metrics"]["latent_motion_error"]
    assert set(table) == {"trained", "shuffled_driving", "untrained", "reference_still", "vae_reconstruction"}
    assert table["vae_reconstruction"]["mean"] == 0.0
    assert out["vs_baselines"]["latent_motion_error"]["untrained"]["mean"] == 0.0
    # Another pair's driving video changes the samples of a network that reads its conditioning.
    assert out["vs_baselines"]["latent_motion_error"]["shuffled_driving"]["se"] > 0
    assert out["shuffled_donors"] == [cases[1].id, cases[0].id]
    assert out["metrics"]["motion_error"]["target"]["mean"] < 0.1 < out["metrics"]["motion_error"]["trained"]["mean"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["per_pair"]["trained"][0]["latent_motion_error"] == pytest.approx(out["per_pair"]["trained"][0]["latent_motion_error"])
    from PIL import Image

    grid = Image.open(tmp_path / "out" / "grid.png")
    assert grid.size[1] == 14 + 2 * (H + 4) and grid.size[0] == 210 + 7 * (W + 4)  # reference + 3 x 2 frames


def test_demo_callback_prints_the_benchmark(tmp_path):
    """experiment=demo with held-out pairs: the callback scores the run's start ("before") and its end, and the
    run's summary prints the figures, the baselines and the grid."""
    from scail2.config import compose_config
    from scail2.train import summary, train

    from tests.train.conftest import train_overrides

    data = tmp_path / "data"
    cfg = compose_config(
        train_overrides(data, tmp_path / "out", "data.heldout_pairs=8", "trainer.max_steps=3", "callbacks.motion_benchmark.steps=2", "logger=none")
    )
    cfg.paths.run_dir = str(tmp_path / "out" / "demo" / "run")
    result = train(cfg)
    text = summary(result)
    assert "Held-out synthetic pairs, motion transfer after step 3" in text
    assert "latent motion error                before " in text and "reference_still" in text and "shuffled_driving" in text
    assert "(reference | driving | target | sample)" in text
    results = json.loads((tmp_path / "out" / "demo" / "run" / "benchmark" / "results.json").read_text())
    assert results["pairs"] == 8 and set(results["vs_baselines"]["latent_motion_error"]) == {"reference_still", "shuffled_driving", "untrained"}
    assert not results["config"]["pixels"]  # the random tiny VAE: latent measure only
    # Three optimizer steps moved the network: the start it is compared with is not the trained one.
    assert results["vs_baselines"]["latent_motion_error"]["untrained"]["mean"] != 0.0


def test_callback_without_heldout_pairs_is_skipped_and_says_so(tmp_path):
    from types import SimpleNamespace

    from scail2.lit.benchmark import MotionBenchmark

    cb = MotionBenchmark(str(tmp_path / "bench"))
    trainer = SimpleNamespace(fast_dev_run=False, world_size=1, global_rank=0, datamodule=SimpleNamespace(heldout_manifest=None))
    cb.on_train_start(trainer, SimpleNamespace(global_step=0, init_from=None))
    cb.on_fit_end(trainer, None)
    assert not cb.history and not (tmp_path / "bench").exists()
    assert cb.summary_lines() == [
        "Held-out synthetic pairs: motion benchmark not run: the data has no held-out pairs (data=synthetic with data.heldout_pairs > 0)."
    ]


def test_callback_in_a_run_of_several_processes_is_skipped_and_says_so(tmp_path):
    from types import SimpleNamespace

    from scail2.lit.benchmark import MotionBenchmark

    cb = MotionBenchmark(str(tmp_path / "bench"))
    trainer = SimpleNamespace(fast_dev_run=False, world_size=2, global_rank=1, datamodule=SimpleNamespace(heldout_manifest=tmp_path / "m.jsonl"))
    cb.on_fit_end(trainer, None)
    assert cb.skipped == "not run: it samples in one process, and this run has 2"
    assert not cb.history and not (tmp_path / "bench").exists()
    assert any("not run: it samples in one process" in line for line in cb.summary_lines())


def _bench_runner():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_synthetic_motion.py"
    spec = importlib.util.spec_from_file_location("bench_synthetic_motion", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_copy_driving_diagnostic_makes_every_target_its_driving_video(tmp_path):
    """The runner's --copy-driving: after it, every training and held-out target file is its pair's driving video,
    no cache of the old targets exists and the next preparation caches the driving video as the target (not the
    drawn target); without held-out pairs it refuses."""
    import torch

    from scail2.bench.synthetic_motion import encode_frames
    from scail2.config import compose_config, instantiate
    from scail2.data.cache import CacheIndex
    from scail2.data.video import read_video
    from scail2.encoders.bundle import Encoders

    from tests.train.conftest import train_overrides

    runner = _bench_runner()
    cfg = compose_config(train_overrides(tmp_path / "data", tmp_path / "out", "data.heldout_pairs=4", "data.pairs=3"))
    runner.copy_driving_into_targets(cfg)
    dm = instantiate(cfg.data, "data")
    root = dm.root
    folders = sorted((root / "videos" / "pairs").iterdir()) + sorted((root / "heldout" / "pairs").iterdir())
    assert len(folders) == 3 + 4
    for folder in folders:
        assert (folder / "target.mp4").read_bytes() == (folder / "driving.mp4").read_bytes()
    assert not (root / "cache").exists()
    assert all((c.target == c.driving).all() for c in load_cases(root / "heldout"))
    dm.prepare_data()
    index = CacheIndex.load(root / "cache")
    assert len(index.samples) == 3
    vae = Encoders.from_pretrained(root / "encoders").vae
    generate_dataset(tmp_path / "drawn", dm.synth)  # the same pairs with their drawn targets

    def make_pair_target(pair_id):
        return read_video(tmp_path / "drawn" / "pairs" / pair_id / "target.mp4")

    for entry in index.samples:
        cached = index.read_sample(entry, swap=False)
        driving = read_video(root / "videos" / "pairs" / cached.id / "driving.mp4")
        torch.testing.assert_close(cached.latents, encode_frames(vae, driving)[0], atol=1e-4, rtol=1e-4)
        drawn = make_pair_target(cached.id)
        assert (cached.latents - encode_frames(vae, drawn)[0]).abs().max() > 0.1  # the drawn target differs
    with pytest.raises(SystemExit, match="heldout_pairs"):
        runner.copy_driving_into_targets(compose_config(train_overrides(tmp_path / "d2", tmp_path / "o2", "data.heldout_pairs=0")))
