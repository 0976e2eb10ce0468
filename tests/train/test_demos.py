"""The two demos as shipped: `experiment=demo` (pretraining the tiny model) and, on its export,
`experiment=dpo_demo` (Bias-Aware DPO with LoRA on synthetic preference pairs). About 4 minutes on 2 cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scail2.train import train

pytestmark = pytest.mark.slow


def _compose(root: Path, experiment: str):
    from scail2.config import compose_config

    cfg = compose_config([f"experiment={experiment}", f"paths.output_root={root}/outputs", f"paths.data_root={root}/data", "print_config=false"])
    cfg.paths.run_dir = str(root / "outputs" / experiment / "run")
    return cfg


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demos")
    cfg = _compose(root, "demo")
    return root, cfg, train(cfg)


def test_demo_experiment_learns(demo, tmp_path):
    """The demo (its own 24-pair dataset, 1,500 steps): validation samples get closer to their targets (the
    shipped run measures latent MSE 3.29 -> 2.17 and PSNR 13.32 -> 13.57 dB)."""
    _, cfg, result = demo
    before, after = result.validation[0].metrics, result.validation[-1].metrics
    assert result.validation[0].step == 0 and result.validation[-1].step == cfg.trainer.max_steps
    assert after["val/latent_mse"] < 0.75 * before["val/latent_mse"]
    assert after["val/fm_loss"] < 0.6 * before["val/fm_loss"]
    assert after["val/psnr"] > before["val/psnr"] + 0.1
    assert (result.validation[-1].folder / "grid.png").exists()

    # The export is a pipeline folder: inference runs on it from the command line.
    assert result.pipeline
    pair = sorted((Path(cfg.data.root) / "videos" / "pairs").glob("scail_animation_*/reference.png"))[0].parent
    out = tmp_path / "animated.mp4"
    proc = subprocess.run(
        [sys.executable, "-m", "scail2.cli.animate", "--model", str(result.export_dir), "--ref", str(pair / "reference.png"),
         "--driving", str(pair / "driving.mp4"), "--out", str(out), "--steps", "4", "--guidance", "1",
         "--height", "64", "--width", "64", "--device", "cpu"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0 and out.exists(), proc.stderr[-3000:]


def test_demo_motion_benchmark_beats_the_untrained_network(demo):
    """The demo's motion benchmark on its 10 held-out pairs: the trained network's latent motion error is below the
    untrained one's by more than 2 SE (baseline c). Baselines (a) reference still and (b) shuffled driving are
    reported, not asserted: the recorded shortened run beats neither (docs/training.md, "Motion transfer on
    held-out pairs")."""
    import json

    _, cfg, result = demo
    results = json.loads((Path(cfg.paths.run_dir) / "benchmark" / "results.json").read_text())
    assert results["pairs"] == cfg.data.heldout_pairs
    versus = results["vs_baselines"]["latent_motion_error"]
    assert set(versus) == {"reference_still", "shuffled_driving", "untrained"}
    assert versus["untrained"]["beats"], versus["untrained"]
    for baseline in ("reference_still", "shuffled_driving"):
        s = versus[baseline]
        print(f"latent motion error, improvement over {baseline}: {s['mean']:+.4f} +- {s['se']:.4f} (beats: {s['beats']})")
    assert any("reference_still" in line for line in result.reports)


def test_dpo_demo_post_trains_the_demo_export(demo):
    """dpo_demo post-trains the demo's export (found by ${latest_export:demo}): held-out pairs from videos the run
    never sees start as exact ties (accuracy 0.5); only the adapters move; the adapters load into the pipeline of
    the base model and reproduce the merged export."""
    from scail2.lora import lora_layers
    from scail2.models import load_transformer
    from scail2.pipeline import SCAIL2Pipeline
    from scail2.testing import random_scail2_batch

    root, _, base = demo
    cfg = _compose(root, "dpo_demo")
    assert Path(cfg.module.init_from) == base.export_dir
    result = train(cfg)

    first, last = result.heldout[0], result.heldout[-1]
    assert first["step"] == 0 and last["step"] == cfg.trainer.max_steps
    # At step 0 the adapters are zero: every held-out pair is an exact tie. (Whether the held-out accuracy ends
    # above 0.5 depends on the base generalising; the demo's base does not, see docs/training.md.)
    assert first["heldout/implicit_accuracy"] == pytest.approx(0.5) and first["heldout/dpo_loss"] == pytest.approx(0.6931, abs=1e-4)
    # On pairs it trains on, the adapted model prefers the winners: the optimisation works.
    assert last["trainpairs/implicit_accuracy"] > 0.6 and last["trainpairs/dpo_loss"] < first["trainpairs/dpo_loss"]
    assert len(result.heldout) == cfg.trainer.max_steps // cfg.module.heldout.every_n_steps + 1

    # The merged export differs from the base only in the adapted linears.
    merged = load_transformer(result.export_dir / "merged").state_dict()
    base_state = load_transformer(base.export_dir).state_dict()
    changed = {k for k in base_state if not torch.equal(base_state[k], merged[k])}
    assert changed and all(k.endswith(".weight") and (".self_attn." in k or ".cross_attn." in k or ".ffn." in k) for k in changed)
    assert not any(".k_img." in k or ".v_img." in k for k in changed)

    # The adapters on the base pipeline (strict, base hash checked) = the merged pipeline folder.
    assert result.pipeline and result.lora_dir == result.export_dir / "lora"
    with_lora = SCAIL2Pipeline.from_pretrained(base.export_dir, lora=result.lora_dir)
    assert len(lora_layers(with_lora.transformer)) == 10 * with_lora.transformer.config.num_layers
    merged_pipe = SCAIL2Pipeline.from_pretrained(result.pipeline_dir)
    base_pipe = SCAIL2Pipeline.from_pretrained(base.export_dir)
    inputs, cond = random_scail2_batch(merged_pipe.transformer.config, batch=1, frames=2, height=4, width=4, seed=0)
    with torch.no_grad():
        v_lora, v_merged, v_base = (p.transformer(**inputs.as_kwargs(), **cond) for p in (with_lora, merged_pipe, base_pipe))
    torch.testing.assert_close(v_lora, v_merged, rtol=1e-4, atol=1e-5)
    assert (v_lora - v_base).abs().max() > 1e-4
