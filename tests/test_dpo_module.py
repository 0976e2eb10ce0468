"""DPOModule end to end on synthetic preference pairs: LoRA-only training, held-out implicit accuracy, and the
held-out evaluation's time kept out of the throughput figures."""

import functools
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from scail2.data.cli import main as data_cli
from scail2.preference.records import load_preference_manifest
from scail2.preference.builder import MANIFEST_NAME, BuildOptions, build_preferences, load_components
from scail2.preference.datamodule import PreferenceDataModule
from scail2.lit.callbacks import ThroughputMonitor
from scail2.lit.dpo import DPOModule, HeldOutConfig
from scail2.lit.evaluation import evaluation_history
from scail2.lit.heldout import HeldOutPreferences
from scail2.lora import LoRASpec, lora_layers
from scail2.models import SCAIL2Transformer, scail2_config
from scail2.objectives.dpo import DPOConfig
from scail2.testing import randomize_
from tests.data.helpers import session_dir, synth_dataset, tiny_encoders_dir, torch_threads
from tests.train.helpers import ChargeForwards, FakeClock, MemoryLogger

TRAIN_VIDEOS = 6  # of the 8 synthetic videos; the last 2 are only in held-out pairs


def _videos(part: str) -> Path:
    """A manifest of the training or the held-out videos, next to the full one (relative paths resolve)."""
    manifest = synth_dataset(pairs=8, frames=9)
    lines = [line for line in manifest.read_text().splitlines(keepends=True) if line.strip()]
    path = manifest.with_name(f"dpo-{part}.jsonl")
    path.write_text("".join(lines[:TRAIN_VIDEOS] if part == "train" else lines[TRAIN_VIDEOS:]))
    return path


def _cache(pairs: int, seed: int, part: str):
    root = session_dir() / f"dpo-{part}"
    report = build_preferences(_videos(part), root / "pairs", load_components("synthetic"),
                               BuildOptions(pairs=pairs, seed=seed))  # fmt: skip
    with torch_threads(1):
        assert data_cli(["preference-cache", str(report.manifest), str(root / "cache"), "--encoders",
                         str(tiny_encoders_dir()), "--buckets", "9x64x64", "--dtype", "float32"]) == 0  # fmt: skip
    return root / "cache"


@functools.lru_cache(maxsize=None)
def caches():
    """(training cache: 6 pairs of the first 6 videos, held-out cache: 4 pairs of the other 2 videos)."""
    return _cache(6, 0, "train"), _cache(4, 1, "heldout")


def source_videos(cache: Path) -> set[str]:
    """The motion videos the pairs of a preference cache were built from."""
    manifest = cache.parent / "pairs" / MANIFEST_NAME
    return {r.provenance.source_record for r in load_preference_manifest(manifest)}


def heldout_history(trainer) -> list[dict]:
    return evaluation_history(trainer, HeldOutPreferences)


def tiny_net():
    torch.manual_seed(0)
    return randomize_(SCAIL2Transformer(scail2_config("tiny")), std=0.05)


@pytest.mark.slow
def test_dpo_training_raises_implicit_accuracy(tmp_path):
    # The held-out pairs come from videos no training pair was built from. The tiny random backbone does not
    # generalise to them in a CPU-sized run, so the optimisation itself is checked on training pairs
    # (heldout.training_pairs: trainpairs/*), and the held-out figures are measured alongside.
    train_cache, heldout_cache = caches()
    assert len(source_videos(heldout_cache)) == 2 and not source_videos(heldout_cache) & source_videos(train_cache)
    module = DPOModule(
        net=tiny_net,
        objective=DPOConfig(beta=5000.0, sft_weight=0.1),
        optimizer=lambda params: torch.optim.AdamW(params, lr=5e-3, betas=(0.9, 0.95), weight_decay=0.0),
        lora=LoRASpec(rank=16),
        heldout=HeldOutConfig(cache_dir=str(heldout_cache), num_pairs=4, batch_size=2, training_pairs=True),
        seed=0,
    )
    dm = PreferenceDataModule(cache_dir=train_cache, batch_size=2, num_workers=0, samples_per_epoch=400, seed=0)
    trainer = L.Trainer(
        max_steps=100, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        use_distributed_sampler=False, default_root_dir=tmp_path, gradient_clip_val=1.0,
    )  # fmt: skip
    base_before = {n: p.detach().clone() for n, p in tiny_net().named_parameters()}
    trainer.fit(module, datamodule=dm)
    history = heldout_history(trainer)
    first, last = history[0], history[-1]
    assert first["step"] == 0 and last["step"] == 100
    # At step 0 the adapters are zero: policy == reference, every pair is a tie (accuracy exactly 0.5).
    assert first["heldout/implicit_accuracy"] == pytest.approx(0.5) and first["trainpairs/implicit_accuracy"] == pytest.approx(0.5)
    assert last["trainpairs/implicit_accuracy"] > 0.5
    assert last["trainpairs/dpo_loss"] < first["trainpairs/dpo_loss"]
    # The held-out pairs are measured on the same scale and have moved off the exact tie.
    assert all(np.isfinite(h["heldout/dpo_loss"]) for h in history) and last["heldout/dpo_loss"] != first["heldout/dpo_loss"]
    # Only the adapters moved.
    for name, p in module.net.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base_before[name.replace(".base_layer", "")]), name
    out = module.export(tmp_path / "export")
    assert (out / "lora" / "adapter_model.safetensors").is_file()
    assert (out / "lora_comfyui.safetensors").is_file()
    from scail2.models import load_transformer

    merged = load_transformer(out / "merged")
    assert not lora_layers(merged)


def _frozen_half_module(heldout_cache):
    return DPOModule(
        net=tiny_net,
        objective=DPOConfig(beta=5000.0, sft_weight=0.1),
        optimizer=lambda params: torch.optim.AdamW(params, lr=5e-3),
        lora=LoRASpec(rank=4),
        heldout=HeldOutConfig(cache_dir=str(heldout_cache), num_pairs=2, batch_size=2, draws=1),
        frozen_dtype="bfloat16",
    )


def test_frozen_backbone_in_bf16_trains_the_fp32_adapters(tmp_path):
    train_cache, heldout_cache = caches()
    module = _frozen_half_module(heldout_cache)
    dm = PreferenceDataModule(cache_dir=train_cache, batch_size=2, num_workers=0, samples_per_epoch=8, seed=0)
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", precision="bf16-mixed", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, use_distributed_sampler=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    history = heldout_history(trainer)
    params = dict(module.net.named_parameters())
    assert all(p.dtype == torch.bfloat16 for n, p in params.items() if "lora_" not in n)
    lora = {n: p for n, p in params.items() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # the adapters trained
    assert [h["step"] for h in history] == [0, 3] and all(np.isfinite(h["heldout/dpo_loss"]) for h in history)
    out = module.export(tmp_path / "export")
    from scail2.models import load_transformer

    assert next(load_transformer(out / "merged").parameters()).dtype == torch.bfloat16


def test_frozen_half_backbone_needs_mixed_precision(tmp_path):
    train_cache, heldout_cache = caches()
    dm = PreferenceDataModule(cache_dir=train_cache, batch_size=2, num_workers=0, samples_per_epoch=8, seed=0)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        use_distributed_sampler=False, default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match="frozen_dtype=bfloat16 needs mixed precision.*32-true"):
        trainer.fit(_frozen_half_module(heldout_cache), datamodule=dm)
    with pytest.raises(ValueError, match="frozen_dtype='int8'"):
        DPOModule(net=tiny_net, objective=DPOConfig(), optimizer=torch.optim.AdamW, frozen_dtype="int8")


def test_heldout_measures_distinct_pairs_chosen_by_the_seed():
    train_cache, _ = caches()  # 6 pairs
    dm = PreferenceDataModule(cache_dir=train_cache)
    ids = lambda batches: [i for b in batches for i in b.winner.meta["ids"]]  # noqa: E731
    five = ids(dm.fixed_batches(5, 2, 4321))
    assert len(five) == 5 and len(set(five)) == 5  # without replacement: no pair counted twice
    again = ids(dm.fixed_batches(5, 3, 4321))
    assert again == five  # the choice depends on the seed, not on the batch size
    names = dm.build_dataset().item_name
    for seed in (4321, 7):  # one bucket: the pairs come in the order of the seeded permutation
        chosen = ids(dm.fixed_batches(5, 2, seed))
        assert chosen == [names(i) for i in np.random.default_rng(seed).permutation(6)[:5]]
    every = ids(dm.fixed_batches(None, 4, 4321))
    assert sorted(every) == sorted(names(i) for i in range(6))
    with pytest.raises(ValueError, match="module.heldout.num_pairs is 7 but the held-out set .* has 6 pairs"):
        dm.fixed_batches(7, 2, 4321, "held-out", setting="module.heldout.num_pairs")


def test_slow_heldout_evaluation_does_not_count_as_training_time(tmp_path, monkeypatch):
    """perf/step_time_s counts the training steps alone: a held-out evaluation between two steps (here 100x
    slower per forward than training) adds nothing to it, and so nothing to perf/mfu."""
    train_cache, heldout_cache = caches()
    clock = FakeClock()
    module = DPOModule(net=tiny_net, objective=DPOConfig(), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
                       lora=LoRASpec(rank=2), heldout=HeldOutConfig(cache_dir=str(heldout_cache), num_pairs=2,
                                                                    batch_size=2, draws=1, every_n_steps=2))  # fmt: skip
    dm = PreferenceDataModule(cache_dir=train_cache, batch_size=2, num_workers=0, samples_per_epoch=8, seed=0)
    logger = MemoryLogger()
    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", logger=logger, log_every_n_steps=1, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False, default_root_dir=tmp_path,
        callbacks=[ThroughputMonitor(peak_flops=1e9, window=1), ChargeForwards(clock, eval_seconds=100.0)],
    )  # fmt: skip
    monkeypatch.setattr(time, "perf_counter", clock)
    trainer.fit(module, datamodule=dm)
    assert [h["step"] for h in heldout_history(trainer)] == [0, 2, 4]  # one evaluation between steps 2 and 3
    # A DPO step is 2 forwards (policy, and the reference with the adapters disabled): exactly 2 s.
    step_times = [v for _, v in logger.metrics["perf/step_time_s"]]
    assert len(step_times) == 4 and step_times == [2.0] * 4
    flops = module.training_flops_per_batch(next(iter(dm.train_dataloader())))
    assert [v for _, v in logger.metrics["perf/mfu"]] == pytest.approx([flops / 2.0 / 1e9] * 4, rel=1e-6)


class _FakeBatch:
    def __init__(self, b):
        self.batch_size = b

    def to(self, device):
        return self


class _FakeDPOModule:
    """``preference_loss`` returns fixed per-pair accuracies per (batch, draw), keyed by the generator's seed."""

    device = "cpu"

    def __init__(self, table):
        self.table = table  # seed -> (B,) per-pair accuracies

    def preference_loss(self, batch, generator):
        from types import SimpleNamespace

        acc = torch.tensor(self.table[generator.initial_seed()])
        return SimpleNamespace(pair_accuracy=acc, implicit_accuracy=acc.mean(), dpo_loss=torch.tensor(0.7), reward_margin=torch.tensor(0.0))


def test_heldout_accuracy_se_is_over_pairs_with_draws_averaged_per_pair(tmp_path):
    cfg = HeldOutConfig(cache_dir=str(tmp_path), seed=10, draws=2)
    cb = HeldOutPreferences(cfg)
    # Seeds: seed + 100_003 * draw + batch index. Batch 0 holds pairs a, b; batch 1 holds pair c.
    table = {10: [1.0, 0.0], 10 + 100_003: [1.0, 1.0], 11: [0.5], 11 + 100_003: [0.0]}
    metrics = cb._measure({"heldout": [_FakeBatch(2), _FakeBatch(1)]}, _FakeDPOModule(table))
    per_pair = np.array([1.0, 0.5, 0.25])  # each pair's mean over its two draws
    assert metrics["heldout/implicit_accuracy"] == pytest.approx(per_pair.mean(), rel=1e-12)
    assert metrics["heldout/implicit_accuracy_se"] == pytest.approx(per_pair.std(ddof=1) / np.sqrt(3), rel=1e-12)
