"""The held-out hand benchmark of DPO (`scail2.bench.synthetic_hands`): the ground truth, the errors, the
statistics, and the runner on tiny networks and 4 held-out synthetic pairs."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scail2.bench.synthetic_hands import (
    HandBenchmarkConfig,
    HandCase,
    hand_discs,
    hand_radii,
    heldout_batches,
    implicit_accuracies,
    latent_hand_error,
    load_hand_cases,
    paired_difference,
    pixel_hand_error,
    sample_pairs,
    score_hands,
    true_hands,
)
from scail2.data.synth import joint_box
from tests.data.helpers import tiny_encoders_dir
from tests.test_dpo_module import caches, tiny_net


def test_hand_discs_exact():
    hands = np.zeros((1, 2, 1, 2))
    hands[0, 0, 0] = (2.5, 2.5)  # the centre of pixel (2, 2)
    hands[0, 1, 0] = (np.nan, np.nan)  # an undetected hand covers nothing
    discs = hand_discs(hands, np.array([1.0]), 5, 6, disc=1.0)
    expect = np.zeros((1, 5, 6), dtype=bool)
    expect[0, 2, 1:4] = expect[0, 1:4, 2] = True  # pixel centres within 1 px: the pixel and its 4 neighbours
    assert np.array_equal(discs, expect)
    assert hand_discs(hands, np.array([1.0]), 5, 6, disc=1.5).sum() == 9  # the 3x3 block (corners at 1.41 px)


def test_hand_radii_from_boxes_drawn_about_the_true_joints_clipped_or_not():
    h = w = 32
    # (K=2, 2 hands, F=1, 2); the second character's right hand is just outside the frame, left of it
    hands = np.array([[[[10.3, 12.0]], [[31.2, 1.0]]], [[[20.0, 20.0]], [[-0.5, 25.5]]]])
    r = (2.4, 1.7)
    boxes = [[joint_box(hands[k, s, 0], r[k], h, w) for k in range(2) for s in range(2)]]
    assert boxes[0][1][2] == 32.0  # the second hand's box is clipped at the right edge (and the top)
    assert boxes[0][3][0] == 0.0 and boxes[0][3][2] == 1.2  # the outside hand's box: a sliver inside
    assert hand_radii(hands, boxes, h, w) == pytest.approx(r, abs=0.011)
    wrong = hands + 6.0  # joints of another video: no box was drawn about them
    with pytest.raises(ValueError, match="was drawn about no true hand joint"):
        hand_radii(wrong, boxes, h, w)
    with pytest.raises(ValueError, match="no hand box for character"):
        hand_radii(hands, [boxes[0][:2]], h, w)


def test_true_hands_match_the_winners_of_the_heldout_pairs_and_a_wrong_seed_is_refused():
    _, held = caches()
    manifest = held.parent / "pairs" / "manifest.jsonl"
    cases = load_hand_cases(manifest, synth_seed=0)
    assert len(cases) == 4
    for c in cases:
        f, hgt, wid = c.preferred.shape[:3]
        assert c.discs.shape == (f, hgt, wid) and c.discs.any()
        assert np.array_equal(c.hands, true_hands(0, c.source_record, f, 16.0, hgt, wid))
    with pytest.raises(ValueError, match="give the seed the synthetic dataset was generated with"):
        load_hand_cases(manifest, synth_seed=1)


def test_latent_and_pixel_hand_errors_exact():
    z = torch.zeros(2, 1, 2, 2)
    t = torch.zeros(2, 1, 2, 2)
    t[0, 0, 0, 0], t[1, 0, 1, 1] = 2.0, 3.0
    cov = torch.zeros(1, 1, 2, 2)
    cov[0, 0, 0, 0], cov[0, 0, 1, 1] = 1.0, 0.5
    # (1 * 4 + 0.5 * 9) / (2 channels * 1.5)
    assert latent_hand_error(z, t, cov) == pytest.approx(8.5 / 3.0, rel=1e-12)
    assert math.isnan(latent_hand_error(z, t, torch.zeros_like(cov)))
    preferred = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    preferred[0, 0, 0] = 255
    discs = np.array([[[True, False], [False, True]]])
    case = HandCase("p", "s_0", preferred, preferred, np.zeros((1, 2, 1, 2)), np.ones(1), discs)
    video = np.full((1, 2, 2, 3), 0.25)
    assert pixel_hand_error(video, case) == pytest.approx((0.75 + 0.25) / 2, rel=1e-12)


def test_paired_difference_and_beaten_at_two_standard_errors():
    per = {"a": [{"e": 1.0}, {"e": 2.0}, {"e": 3.0}, {"e": math.nan}], "b": [{"e": 2.0}, {"e": 2.5}, {"e": 4.5}, {"e": 1.0}]}
    d = paired_difference(per, "e", "a", "b")  # b - a on the 3 pairs where both are known: 1, 0.5, 1.5
    assert d["n"] == 3 and d["mean"] == pytest.approx(1.0)
    assert d["se"] == pytest.approx(0.5 / math.sqrt(3))  # sd of (1, 0.5, 1.5) is 0.5
    assert d["beaten"]  # 1.0 > 2 * 0.289
    close = paired_difference({"a": [{"e": 0.0}, {"e": 0.0}], "b": [{"e": 1.0}, {"e": -0.5}]}, "e", "a", "b")
    assert close["mean"] == pytest.approx(0.25) and close["se"] == pytest.approx(0.75) and not close["beaten"]
    with pytest.raises(ValueError, match="no per-pair results for 'c'"):
        paired_difference(per, "e", "a", "c")


@pytest.fixture(scope="module")
def heldout():
    _, held = caches()
    batches = heldout_batches(held, None, 3, seed=0)  # 4 pairs: batches of 3 and 1
    ids = [i for b in batches for i in b.winner.meta["ids"]]
    return batches, load_hand_cases(held.parent / "pairs" / "manifest.jsonl", 0, ids=ids)


def test_scores_of_the_winners_latents_are_zero_and_the_losers_match_an_independent_computation(heldout):
    batches, cases = heldout
    truth = {i: z for b in batches for i, z in zip(b.winner.meta["ids"], b.winner.latents)}
    losers = {i: z for b in batches for i, z in zip(b.winner.meta["ids"], b.loser_latents)}
    res = score_hands({"oracle": truth}, batches, cases, compare=[("oracle", "dispreferred")])
    assert res["pairs"] == 4 and "hand_error" not in res["metrics"]  # no VAE: latents only
    assert all(r["latent_hand_error"] == 0.0 and r["latent_error"] == 0.0 for r in res["per_pair"]["oracle"])
    for case, row in zip(res["ids"], res["per_pair"]["dispreferred"]):
        c = next(x for x in cases if x.id == case)
        cov = c.latent_discs()  # (1, T, h, w)
        expect = float((cov * (losers[case] - truth[case]).pow(2)).sum() / (16 * cov.sum()))
        assert row["latent_hand_error"] == pytest.approx(expect, rel=1e-6)
        assert row["latent_error"] == pytest.approx(float((losers[case] - truth[case]).pow(2).mean()), rel=1e-6)
    d = res["comparisons"]["latent_hand_error"]["dispreferred - oracle"]
    assert d["mean"] == pytest.approx(res["metrics"]["latent_hand_error"]["dispreferred"]["mean"])
    with pytest.raises(ValueError, match="cover 1 pairs"):
        score_hands({"oracle": {res["ids"][0]: truth[res["ids"][0]]}}, batches, cases)


def test_sampling_is_the_same_noise_for_every_network_and_scores_with_pixels(heldout):
    batches, cases = heldout
    cfg = HandBenchmarkConfig(steps=2)
    net = tiny_net().eval()
    a, b = sample_pairs(net, batches, cfg), sample_pairs(net, batches, cfg)
    assert set(a) == {c.id for c in cases} and all(torch.equal(a[i], b[i]) for i in a)
    assert a[cases[0].id].shape == batches[0].winner.latents.shape[1:]
    other = sample_pairs(net, batches, HandBenchmarkConfig(steps=2, seed=1))
    assert not torch.equal(a[cases[0].id], other[cases[0].id])
    from scail2.encoders.bundle import Encoders

    res = score_hands({"a": a, "b": b}, batches, cases, Encoders.from_pretrained(tiny_encoders_dir()).vae, [("a", "b")], cfg)
    assert set(res["metrics"]["hand_error"]) == {"a", "b", "dispreferred", "vae_reconstruction"}
    same = res["comparisons"]["hand_error"]["b - a"]
    assert same["mean"] == 0.0 and not same["beaten"]


def test_implicit_accuracy_of_the_base_against_itself_is_one_half(heldout):
    batches, _ = heldout
    net = tiny_net().eval()
    acc = implicit_accuracies(net, net, batches, draws=2)
    assert sorted(acc) == sorted(i for b in batches for i in b.winner.meta["ids"]) and set(acc.values()) == {0.5}


def test_runner_writes_its_result_file(tmp_path, monkeypatch):
    from scail2.models.loading import save_pretrained

    _, held = caches()
    root = tmp_path / "data"
    root.mkdir()
    (root / "heldout").symlink_to(held.parent)
    (root / "encoders").symlink_to(tiny_encoders_dir())
    (root / "settings.json").write_text(json.dumps({"data_seed": 0}))
    base, tuned = tiny_net(), tiny_net()
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_pretrained(base, tmp_path / "base")
    save_pretrained(tuned, tmp_path / "dpo")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_dpo_hands
    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    bench_dpo_hands.main(["--data-root", str(root), "--base", str(tmp_path / "base"), "--dpo", str(tmp_path / "dpo"),
                          "--steps", "2", "--draws", "1", "--name", "t"])  # fmt: skip
    out = json.loads((tmp_path / "results" / "t.json").read_text())
    assert out["hands"]["pairs"] == 4 and "base - dpo" in out["hands"]["comparisons"]["latent_hand_error"]
    assert out["implicit_accuracy"]["networks"]["dpo"]["n"] == 4
    assert {"command", "machine", "versions", "settings", "networks"} <= set(out)


def test_heldout_hands_callback_refuses_what_it_cannot_measure(tmp_path):
    from types import SimpleNamespace

    from scail2.lit.heldout import HeldOutHands

    with pytest.raises(ValueError, match=r"compare names \['base'\]"):
        HeldOutHands(str(tmp_path), compare={"base": str(tmp_path)})
    with pytest.raises(ValueError, match="at least 2 pairs"):
        HeldOutHands(str(tmp_path), num_pairs=1)
    cb = HeldOutHands(str(tmp_path))
    trainer = SimpleNamespace(datamodule=SimpleNamespace(root=tmp_path), fast_dev_run=False, world_size=1)
    with pytest.raises(ValueError, match="has no heldout_cache_dir .*data=synthetic_preference"):
        cb.run(trainer, SimpleNamespace())
    many = SimpleNamespace(fast_dev_run=False, world_size=2, global_rank=1, global_step=3)
    cb.on_fit_end(many, SimpleNamespace())
    assert cb.results is None and cb.summary_lines() == ["Held-out preference pairs: hands not run: it samples in one process, and this run has 2."]
