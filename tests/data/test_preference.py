"""Bias-Aware DPO preference data: the record format, the Eq. 4-7 builder on synthetic data (resume, filter),
datasets and cache yielding `PreferenceBatch`, and the DPO loss on such a batch."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from scail2.data.batch import PreferenceBatch
from scail2.data.buckets import Bucket
from scail2.data.cli import main
from scail2.data.datamodule import MotionDataModule
from scail2.data.manifest import ManifestError, load_manifest
from scail2.config import UnsafeTargetError, read_components
from scail2.preference.builder import (
    BuildOptions,
    MinHandDifference,
    build_preferences,
    load_components,
    make_candidate,
)
from scail2.preference.cache import PreferenceCacheDataset
from scail2.preference.components import NoisyPoses
from scail2.preference.data import PreferencePairDataset, collate_preferences
from scail2.preference.datamodule import PreferenceDataModule
from scail2.preference.records import load_preference_manifest, parse_preference_record, write_preference_manifest
from scail2.preference.validate import validate_preference_manifest
from scail2.data.sampling import SampleKey
from scail2.data.video import read_image, read_video, write_video
from tests.data.helpers import synth_dataset, tiny_encoders, tiny_encoders_dir, torch_threads

BUCKET = Bucket(9, 64, 64)
PAIRS = 3


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def source() -> Path:
    return synth_dataset(pairs=4, frames=9)


@pytest.fixture(scope="module")
def built(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pref") / "built"
    report = build_preferences(source, out, load_components("synthetic"), BuildOptions(pairs=PAIRS, seed=0))
    assert (report.pairs, report.written, report.rejected) == (PAIRS, PAIRS, 0)
    return report.manifest


# ----------------------------------------------------------------------------------------------------
# Record format
# ----------------------------------------------------------------------------------------------------


def _raw() -> dict:
    return {
        "id": "p0", "mode": "animation", "fps": 16, "driving": "p0/driving.mp4", "preferred": "p0/w.mp4",
        "dispreferred": "p0/l.mp4", "reference": 2, "preferred_hands": [[[1, 2, 5, 6]], []],
        "dispreferred_hands": [[], [[3.5, 4, 9, 9.5], [10, 10, 12, 12]]], "driving_mask": "p0/dm.mp4",
        "reference_mask": "p0/rm.png", "caption": "a dancer", "provenance": {"generator": "wan-animate"},
        "meta": {"k": 1},
    }  # fmt: skip


def test_record_round_trip(tmp_path):
    record = parse_preference_record(_raw(), tmp_path)
    assert record.driving == (tmp_path / "p0/driving.mp4").resolve() and record.reference == 2
    assert record.dispreferred_hands[1][0] == (3.5, 4.0, 9.0, 9.5) and record.source == "preference"
    assert record.provenance.generator == "wan-animate" and record.has_masks
    other = parse_preference_record({**_raw(), "id": "p1"}, tmp_path)
    path = write_preference_manifest(tmp_path / "prefs.jsonl", [record, other])
    assert json.loads(path.read_text().splitlines()[0])["driving"] == "p0/driving.mp4"  # relative again
    assert load_preference_manifest(path)[0] == record


@pytest.mark.parametrize(
    "change, field",
    [
        ({"winner": "x.mp4"}, "winner"),
        ({"mode": "dance"}, "mode"),
        ({"fps": "16"}, "fps"),
        ({"preferred": 3}, "preferred"),
        ({"reference": -1}, "reference"),
        ({"reference": True}, "reference"),
        ({"preferred_hands": [[[1, 2, 3]]]}, "preferred_hands"),
        ({"preferred_hands": [[[5, 2, 1, 6]]]}, "preferred_hands"),
        ({"dispreferred_hands": "hands.mp4"}, "dispreferred_hands"),
        ({"dispreferred": None}, "dispreferred"),
        ({"reference_mask": None}, "reference_mask"),
        ({"provenance": {"model": "x"}}, "provenance.model"),
        ({"provenance": {"generator": 3}}, "provenance.generator"),
        ({"frames": 0}, "frames"),
        ({"caption": ["a"]}, "caption"),
    ],
)
def test_record_rejects_bad_fields(tmp_path, change, field):
    raw = {**_raw(), **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ManifestError) as info:
        parse_preference_record(raw, tmp_path)
    assert info.value.field == field and f": {field}: " in str(info.value)


def test_manifest_errors_name_line_and_id(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(_raw()) + "\n" + json.dumps({**_raw(), "id": "bad", "fps": -1}) + "\n")
    with pytest.raises(ManifestError, match=r"line 2: bad: fps: expected a positive number"):
        load_preference_manifest(path)


def test_validation_names_the_bad_field(built, tmp_path):
    bad = [r.line() for r in validate_preference_manifest(built) if not r.ok]
    assert not bad, bad
    record = load_preference_manifest(built)[0]
    short = write_video(tmp_path / "short.mp4", read_video(record.dispreferred)[:5], record.fps, lossless=True)
    broken = replace(record, id="broken", dispreferred=short, preferred_hands=record.preferred_hands[:4])
    path = write_preference_manifest(tmp_path / "prefs.jsonl", [broken])
    (report,) = validate_preference_manifest(path)
    assert {f for f, _ in report.problems} == {"dispreferred", "preferred_hands"}
    assert "has 5 frames but preferred has 9" in report.line()


# ----------------------------------------------------------------------------------------------------
# Builder
# ----------------------------------------------------------------------------------------------------


def test_loser_differs_from_winner_in_pose_only(built, source, tmp_path):
    records = load_preference_manifest(built)
    assert [r.id for r in records] == ["pref_00000", "pref_00001", "pref_00002"]
    for r in records:
        x_a, x_w, x_l = read_video(r.driving), read_video(r.preferred), read_video(r.dispreferred)
        assert x_a.shape == x_w.shape == x_l.shape == (9, 64, 64, 3) and 0 <= r.reference < 9
        changed_l = (x_w != x_l).any(-1).mean()
        changed_a = (x_w != x_a).any(-1).mean()
        # Same character and scene: only the figure's pixels move (a few %); x_a is another appearance.
        assert 0 < changed_l < 0.15 and changed_a > 0.5, (r.id, changed_l, changed_a)
        assert r.preferred_hands != r.dispreferred_hands and all(len(f) for f in r.preferred_hands)
        assert r.provenance.source_record and "NoisyPoses" in r.provenance.weak_pose_estimator
        assert r.meta["reference_a"] != r.meta["reference_b"]
        # The reference mask marks the figure in the reference frame of x_w.
        assert read_image(r.reference_mask).max(-1).astype(bool).sum() > 20

    # With a P' that makes no error the loser is the winner, pixel for pixel: x_l differs only through P'.
    exact = load_components("synthetic")
    exact.weak_pose_estimator = NoisyPoses(jitter=0, hand_jitter=0, confusion_p=0, hand_drop_p=0)
    exact.specs = {**exact.specs, "weak_pose_estimator": "exact"}
    report = build_preferences(source, tmp_path / "exact", exact, BuildOptions(pairs=PAIRS, seed=0))
    for noisy, clean in zip(records, load_preference_manifest(report.manifest)):
        assert np.array_equal(read_video(clean.preferred), read_video(clean.dispreferred))
        assert np.array_equal(read_video(clean.preferred), read_video(noisy.preferred))
        assert clean.preferred_hands == clean.dispreferred_hands == noisy.preferred_hands


def test_resume_skips_existing_pairs_and_gives_the_same_set(built, source, tmp_path):
    out = tmp_path / "resumed"
    first = build_preferences(source, out, load_components("synthetic"), BuildOptions(pairs=2, seed=0))
    assert (first.written, first.existing) == (2, 0)
    stale = out / "pairs" / ".pref_00002.tmp-12345"  # an interrupted pair
    stale.mkdir()
    (stale / "preferred.mp4").write_bytes(b"half")
    second = build_preferences(source, out, load_components("synthetic"), BuildOptions(pairs=PAIRS, seed=0))
    assert (second.written, second.existing, second.pairs) == (1, 2, PAIRS) and not stale.exists()
    assert second.manifest.read_text() == built.read_text()
    for a, b in zip(load_preference_manifest(second.manifest), load_preference_manifest(built)):
        for name in ("driving", "preferred", "dispreferred", "driving_mask"):
            assert np.array_equal(read_video(getattr(a, name)), read_video(getattr(b, name))), name
    with pytest.raises(ValueError, match="other settings \\(seed differ"):
        build_preferences(source, out, load_components("synthetic"), BuildOptions(pairs=PAIRS, seed=1))


def test_filter_rejects_and_counts(source, tmp_path):
    components = load_components("synthetic")
    components.filter = lambda pair: pair.index % 2 == 0
    components.specs = {**components.specs, "filter": "even candidates"}
    report = build_preferences(source, tmp_path / "f", components, BuildOptions(pairs=2, seed=0))
    assert [r.id for r in load_preference_manifest(report.manifest)] == ["pref_00000", "pref_00002"]
    assert (report.rejected, report.candidates) == (1, 3) and (tmp_path / "f/pairs/pref_00001.skip.json").exists()
    again = build_preferences(source, tmp_path / "f", components, BuildOptions(pairs=3, seed=0))
    assert (again.existing, again.rejected_before, again.rejected, again.written) == (2, 1, 1, 1)

    # The shipped filter: the hand-region difference of a real candidate is positive; nothing passes 1.0.
    pair = make_candidate(load_manifest(source)[0], 0, load_components("synthetic"), BuildOptions(pairs=1))
    assert MinHandDifference(0.0).difference(pair) > 0.01
    strict = load_components("synthetic")
    strict.filter, strict.specs = MinHandDifference(1.0), {**strict.specs, "filter": "MinHandDifference(1.0)"}
    none = build_preferences(source, tmp_path / "none", strict, BuildOptions(pairs=1, max_candidates=2, seed=0))
    assert (none.pairs, none.rejected) == (0, 2) and none.manifest.read_text() == ""


def test_components_from_a_config_file(tmp_path):
    config = tmp_path / "components.yaml"
    config.write_text(
        "pose_estimator: {_target_: scail2.preference.components.SyntheticPoses, synth_seed: 0}\n"
        "weak_pose_estimator:\n"
        "  _target_: scail2.preference.components.NoisyPoses\n"
        "  base: {_target_: scail2.preference.components.SyntheticPoses}\n"
        "  jitter: 0.02\n"
        "generator: scail2.preference.components.SyntheticRenderer\n"
        "references: scail2.preference.components.SyntheticReferences\n"
        "filter: {_target_: scail2.preference.builder.MinHandDifference, min_difference: 0.01}\n"
    )
    components = load_components(config)
    assert components.weak_pose_estimator.jitter == 0.02 and components.filter.min_difference == 0.01
    assert "jitter=0.02" in components.specs["weak_pose_estimator"]
    # A name alone and {_target_: name} are one component with one provenance text; the preset's is stable.
    assert components.specs["generator"] == "scail2.preference.components.SyntheticRenderer"
    here = "scail2.preference.components"
    assert load_components("synthetic").specs == {
        "pose_estimator": f"{here}.SyntheticPoses(synth_seed=0)", "weak_pose_estimator": f"{here}.NoisyPoses(seed=0)",
        "generator": f"{here}.SyntheticRenderer", "references": f"{here}.SyntheticReferences",
    }  # fmt: skip
    synthetic = read_components("synthetic", "preference")
    with pytest.raises(UnsafeTargetError, match=r"config `generator\._target_: os\.system` is not allowed"):
        load_components({**synthetic, "generator": {"_target_": "os.system", "command": "true"}})
    with pytest.raises(ValueError, match=r"config `weak_pose_estimator\.jiter`: .*NoisyPoses has no parameter `jiter`; did you mean `jitter`"):
        load_components({**synthetic, "weak_pose_estimator": {"_target_": "scail2.preference.components.NoisyPoses", "jiter": 0.1}})
    with pytest.raises(ValueError, match="unknown key 'estimator'"):
        load_components({"estimator": "x"})
    with pytest.raises(ValueError, match="does not implement Generator"):
        load_components({**synthetic, "generator": "scail2.preference.components.SyntheticPoses"})
    with pytest.raises(ValueError, match=r"unknown components preset 'wan-animate' .*\['services', 'synthetic'\]"):
        load_components("wan-animate")


def test_cli_preference(source, tmp_path, capsys):
    assert main(["preference", str(source), str(tmp_path / "cli"), "--pairs", "2", "--quiet"]) == 0
    assert "2 pairs (2 new, 0 already there)" in capsys.readouterr().out
    assert main(["preference", str(source), str(tmp_path / "cli2"), "--pairs", "1", "--max-candidates", "1",
                 "--min-hand-difference", "1.0", "--quiet"]) == 1  # fmt: skip
    assert "0 pairs" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# Datasets, cache, data module, loss
# ----------------------------------------------------------------------------------------------------


def test_hand_masks_match_the_boxes(built, tmp_path):
    record = load_preference_manifest(built)[0]
    empty = [[] for _ in range(9)]
    w_hands, l_hands = [list(f) for f in empty], [list(f) for f in empty]
    w_hands[0] = [(8.0, 16.0, 20.0, 24.0)]  # pixels x 8..19, y 16..23 of frame 0
    l_hands[4] = [(32.0, 40.0, 48.0, 56.0)]  # pixels x 32..47, y 40..55 of frame 4 (latent frame 1)
    one = replace(record, preferred_hands=w_hands, dispreferred_hands=l_hands)
    dataset = PreferencePairDataset([one], [BUCKET], encoders=tiny_encoders())
    batch = collate_preferences([dataset[SampleKey(0, 0)]])
    expect_w = torch.zeros(1, 1, 3, 8, 8)
    expect_w[0, 0, 0, 2, 1] = 1.0  # latent cell x 8..15, y 16..23: fully inside
    expect_w[0, 0, 0, 2, 2] = 0.5  # latent cell x 16..23: columns 16..19 inside, half of it
    expect_l = torch.zeros(1, 1, 3, 8, 8)
    expect_l[0, 0, 1, 5:7, 4:6] = 1.0
    assert torch.equal(batch.winner.hand_mask, expect_w) and torch.equal(batch.loser_hand_mask, expect_l)
    assert torch.equal(batch.hand_union(), torch.maximum(expect_w, expect_l))


@pytest.fixture(scope="module")
def cache(built, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pref") / "cache"
    with torch_threads(1):
        assert main(["preference-cache", str(built), str(out), "--encoders", str(tiny_encoders_dir()),
                     "--buckets", "9x64x64", "--dtype", "float32", "--seed", "0"]) == 0  # fmt: skip
    return out


def test_a_cache_of_the_other_kind_is_refused_with_the_fix(cache, tmp_path):
    """``data=cache`` (`MotionDataModule`) on a preference cache names the kind found, the kind expected and
    what to do instead; a preference data module refuses a motion cache likewise."""
    with pytest.raises(ValueError) as refused:
        MotionDataModule(cache_dir=cache, num_workers=0).setup("fit")
    message = str(refused.value)
    assert "is a preference cache, not a motion latent cache" in message
    assert "train DPO on it with data=preference" in message
    assert "scail2-data cache MANIFEST DIR --encoders DIR" in message
    motion = tmp_path / "motion"
    motion.mkdir()
    (motion / "index.json").write_text(
        json.dumps({**json.loads((cache / "index.json").read_text()), "kind": "motion", "samples": [], "shards": []})
    )
    with pytest.raises(ValueError, match=r"is a motion cache, not a preference cache; pretrain on it with data=cache"):
        PreferenceDataModule(cache_dir=motion, num_workers=0).setup("fit")


def test_raw_and_cached_batches_agree_and_resume(built, cache):
    records = load_preference_manifest(built)
    raw = PreferencePairDataset(records, [BUCKET], encoders=tiny_encoders(), fixed_seed=0)
    cached = PreferenceCacheDataset(cache)
    for i in range(PAIRS):
        a, b = collate_preferences([raw[SampleKey(i, 7)]]), collate_preferences([cached[SampleKey(i, 7)]])
        for name in ("latents", "hand_mask"):
            assert torch.allclose(getattr(a.winner, name), getattr(b.winner, name), atol=1e-6), name
        for name in ("reference", "reference_mask", "driving", "driving_mask", "text", "clip_tokens"):
            assert torch.allclose(getattr(a.winner.cond, name), getattr(b.winner.cond, name), atol=1e-6), name
        assert torch.allclose(a.loser_latents, b.loser_latents, atol=1e-6) and torch.equal(a.loser_hand_mask, b.loser_hand_mask)
        assert a.winner.meta["ids"] == b.winner.meta["ids"] == [records[i].id]

    def module():
        dm = PreferenceDataModule(cache_dir=cache, batch_size=2, num_workers=0, samples_per_epoch=8, seed=3)
        return dm, dm.train_dataloader()

    dm, loader = module()
    batches = list(loader)
    assert len(batches) == 4
    b = batches[0]
    assert b.winner.latents.shape == b.loser_latents.shape == (2, 16, 3, 8, 8)
    assert b.winner.cond.driving.shape == (2, 16, 3, 4, 4) and b.winner.cond.driving_mask.shape == (2, 28, 3, 4, 4)
    assert b.winner.cond.reference_mask.shape == (2, 28, 1, 8, 8) and b.winner.null_text.shape[0] == 1
    assert b.winner.hand_mask.shape == b.loser_hand_mask.shape == (2, 1, 3, 8, 8)
    assert not b.winner.history_allowed.any() and b.winner.cond.modes == ["animation"] * 2
    # Resume after two batches: the rest is identical.
    dm, loader = module()
    it = iter(loader)
    next(it), next(it)
    state = dm.state_dict()
    dm2, _ = module()
    dm2.load_state_dict(state)
    rest = list(dm2._loader)
    assert [x.winner.meta["ids"] for x in rest] == [x.winner.meta["ids"] for x in batches[2:]]
    assert torch.equal(rest[0].loser_latents, batches[2].loser_latents)


class _Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list = []

    def training_step(self, batch, batch_idx):
        assert isinstance(batch, PreferenceBatch)
        self.seen.append(batch.winner.meta["ids"])
        return (self.w - batch.loser_latents.mean() - batch.hand_union().mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_resumes_mid_epoch(cache, tmp_path):
    def fit(model, root, callbacks=(), ckpt_path=None):
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=bool(callbacks), callbacks=list(callbacks),
                            use_distributed_sampler=False, default_root_dir=root)  # fmt: skip
        dm = PreferenceDataModule(cache_dir=cache, batch_size=1, num_workers=0, samples_per_epoch=4, seed=5)
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)

    full = _Recorder()
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    fit(full, tmp_path, [checkpoint])
    assert len(full.seen) == 8
    resumed = _Recorder()
    fit(resumed, tmp_path / "resume", ckpt_path=next(p for p in tmp_path.glob("*.ckpt") if "step=3" in p.name))
    assert resumed.seen == full.seen[3:]


def test_dpo_loss_runs_on_a_preference_batch(built):
    from scail2.lora import LoRASpec, adapters_disabled, add_lora
    from scail2.models import SCAIL2Transformer, scail2_config
    from scail2.objectives.dpo import dpo_loss, model_velocity
    from scail2.testing import randomize_

    dataset = PreferencePairDataset(load_preference_manifest(built), [BUCKET], encoders=tiny_encoders())
    batch = collate_preferences([dataset[SampleKey(0, 1)], dataset[SampleKey(1, 2)]])
    batch.winner.null_text = dataset.null_text()
    model = add_lora(randomize_(SCAIL2Transformer(scail2_config("tiny"))), LoRASpec(rank=4))
    with torch.no_grad():  # non-zero up-projections: the policy differs from the reference (adapters off)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    out = dpo_loss(model, batch, torch.Generator().manual_seed(0), reference=model_velocity(model, within=adapters_disabled))
    assert torch.isfinite(out.loss) and out.err_ref_w.shape == (2,) and (out.err_policy_w > 0).all()
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
