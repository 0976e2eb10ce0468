"""The memory planner (`scail2.models.memory`) against what a CPU training step really holds: parameter,
gradient and AdamW state bytes exactly, and the activations autograd saves (saved-tensor hooks) within 15%,
for the tiny and a small configuration, in float32, bf16 compute copies and bf16 autocast, with and without
activation checkpointing."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from scail2.conditioning.condition import Condition
from scail2.data.batch import MotionBatch
from scail2.models import SCAIL2Transformer, scail2_config
from scail2.models.memory import Layout, Setup, plan_memory, report, saved_activation_bytes, suggestions
from scail2.models.parallelize import apply_activation_checkpointing
from scail2.objectives.flow_matching import FlowMatchingConfig, flow_matching_loss
from scail2.testing import randomize_

# name: (geometry overrides of the tiny preset, batch, latent frames x height x width, text and CLIP tokens)
CASES = {
    "tiny": ({}, 2, (5, 8, 8), 16, 17),
    "small": (dict(dim=256, ffn_dim=1024, num_heads=4, num_layers=4), 1, (5, 16, 16), 32, 17),
}
PRECISIONS = ["fp32", "bf16-params", "bf16-autocast"]


def _batch(cfg, b, t, h, w, text, image, g) -> MotionBatch:
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cond = Condition(
        reference=rn(b, 16, 1, h, w), reference_mask=torch.rand(b, 28, 1, h, w, generator=g),
        driving=rn(b, 16, t, h // 2, w // 2), driving_mask=torch.rand(b, 28, t, h // 2, w // 2, generator=g),
        text=rn(b, text, cfg.text_dim), clip_tokens=rn(b, image, cfg.image_dim), modes=["animation"] * b,
    )
    return MotionBatch(
        latents=rn(b, 16, t, h, w), cond=cond, source=["synthetic"] * b,
        history_allowed=torch.ones(b, dtype=torch.bool), null_text=rn(1, text, cfg.text_dim),
    )


def _setup(case: str, precision: str, checkpointing: bool):
    overrides, b, (t, h, w), text, image = CASES[case]
    cfg = scail2_config("tiny", **overrides)
    torch.manual_seed(0)
    model = randomize_(SCAIL2Transformer(cfg))
    if precision == "bf16-params":
        model = model.to(torch.bfloat16)
    apply_activation_checkpointing(model, checkpointing)
    layout = Layout(t, h, w, text_tokens=text, image_tokens=image)
    strategy = "fsdp2" if precision == "bf16-params" else "single"  # bf16 compute copies are FSDP2's
    setup = Setup(strategy=strategy, batch=b, precision=precision, activation_checkpointing=checkpointing)
    return model, _batch(cfg, b, t, h, w, text, image, torch.Generator().manual_seed(0)), plan_memory(cfg, layout, setup)


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-autocast" else contextlib.nullcontext()


@functools.cache
def _measured(case: str, precision: str, checkpointing: bool) -> tuple[int, object]:
    """(saved activation bytes of one flow-matching forward, the plan), measured once per configuration."""
    model, batch, plan = _setup(case, precision, checkpointing)
    g = torch.Generator().manual_seed(1)
    with _autocast(precision):
        return saved_activation_bytes(model, lambda: flow_matching_loss(model, batch, g, FlowMatchingConfig()).loss), plan


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_activations_within_15_percent(case, precision, checkpointing):
    measured, plan = _measured(case, precision, checkpointing)
    predicted = plan.persistent["activations (blocks)"] + plan.persistent["activations (embeddings, head, loss)"]
    assert abs(predicted - measured) <= 0.15 * measured, (predicted, measured)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_recomputed_block_within_15_percent(case, precision):
    """One block's saved bytes (the transient of recomputing it): what checkpointing every block saves, per
    block, plus the block's input that it keeps."""
    (plain, _), (checkpointed, plan) = _measured(case, precision, False), _measured(case, precision, True)
    measured = {False: plain, True: checkpointed}
    n = plan.config.num_layers
    block_input = plan.persistent["activations (blocks)"] / n
    per_block = (measured[False] - measured[True]) / n + block_input
    predicted = plan.transient["recomputed block"]
    assert abs(predicted - per_block) <= 0.15 * per_block, (predicted, per_block)


@pytest.mark.parametrize("case", list(CASES))
def test_parameters_gradients_and_optimizer_state_exactly(case):
    model, batch, plan = _setup(case, "fp32", False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    flow_matching_loss(model, batch, torch.Generator().manual_seed(1), FlowMatchingConfig()).loss.backward()
    opt.step()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    states = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != "step")
    assert (plan.persistent["parameters"], plan.persistent["gradients"], plan.persistent["optimizer state"]) == (
        params, grads, states
    )


def test_sharding_and_sequence_parallel_divide_the_right_terms():
    cfg = scail2_config("wan2.1-14b")
    layout = Layout.from_pixels(81, 512, 896)
    one = plan_memory(cfg, layout, Setup(world_size=64, strategy="fsdp2", precision="bf16-params", activation_checkpointing=True))
    two = plan_memory(cfg, layout, Setup(world_size=64, strategy="fsdp2", precision="bf16-params", activation_checkpointing=True,
                                         sequence_parallel=2))
    assert one.tokens_per_sample == two.tokens_per_sample == 48_832 and two.tokens_per_rank == 24_416
    assert one.persistent["parameters"] == two.persistent["parameters"] == 4 * one.num_params // 64
    ratio = two.persistent["activations (blocks)"] / one.persistent["activations (blocks)"]
    assert 0.45 < ratio < 0.55
    with pytest.raises(ValueError, match="does not divide the 40 attention heads"):
        plan_memory(cfg, layout, Setup(world_size=64, strategy="fsdp2", sequence_parallel=16))


def test_a_job_that_does_not_fit_gets_changes_that_do():
    cfg = scail2_config("wan2.1-14b")
    layout = Layout.from_pixels(81, 704, 1280)
    setup = Setup(world_size=64, strategy="fsdp2", precision="bf16-params", activation_checkpointing=False)
    plan = plan_memory(cfg, layout, setup)
    device = 80 * 1024**3
    assert not plan.fits(device)
    found = suggestions(cfg, layout, setup, device)
    assert found and all(p.fits(device) for _, p in found)
    text = report(plan, device)
    assert "does NOT fit" in text and found[0][0] in text and "95,920" in text


def test_cli_plans_the_paper_recipe(capsys):
    from scail2.cli.plan import main

    assert main(["experiment=pretrain_wan14b", "--clip", "81x704x1280", "--gpu-memory", "80"]) == 1
    out = capsys.readouterr().out
    assert "fsdp2 on 64 GPU(s)" in out and "tokens per sample" in out and "does NOT fit" in out
    assert out.index("strategy.sequence_parallel=2") < out.index("strategy.sequence_parallel=4")
    assert main(["experiment=pretrain_wan14b", "strategy.sequence_parallel=2", "--clip", "81x704x1280", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "tokens per rank                             47,960" in out and "fits:" in out
    assert main(["experiment=pretrain_wan14b"]) == 2
    assert "pass --clip FRAMESxHEIGHTxWIDTH" in capsys.readouterr().err


def test_adapter_training_counts_the_adapters_that_train_exactly():
    """DPO with LoRA: the planned adapter count is what add_lora makes trainable, and the parameter, gradient
    and AdamW bytes of a real step on the tiny model with a bf16 frozen backbone are planned exactly."""
    from scail2.lora import LoRASpec, add_lora, lora_parameter_count

    overrides, b, (t, h, w), text, image = CASES["small"]
    cfg = scail2_config("tiny", **overrides)
    spec = LoRASpec(rank=4)
    model = randomize_(SCAIL2Transformer(cfg)).to(torch.bfloat16)
    planned = lora_parameter_count(model, spec)
    add_lora(model, spec)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # the adapters train in float32 (as DPOModule keeps them)
    adapters = [p for p in model.parameters() if p.requires_grad]
    assert planned == sum(p.numel() for p in adapters) > 0
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)

    setup = Setup(batch=b, precision="bf16-autocast", adapters=planned, frozen_bytes=2, samples_per_item=2)
    plan = plan_memory(cfg, Layout(t, h, w, text_tokens=text, image_tokens=image), setup)
    opt = torch.optim.AdamW(adapters, lr=1e-4)
    for p in adapters:
        p.grad = torch.zeros_like(p)
    opt.step()
    states = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != "step")
    assert plan.persistent["parameters (frozen backbone)"] == 2 * frozen == 2 * plan.num_params
    assert plan.persistent["parameters (adapters)"] == plan.persistent["gradients"] == 4 * planned
    assert plan.persistent["optimizer state"] == states
    # A pair puts two samples through the network: the activations are those of batch 2b, not b.
    single = plan_memory(cfg, Layout(t, h, w, text_tokens=text, image_tokens=image), Setup(batch=2 * b, precision="bf16-autocast",
                         adapters=planned, frozen_bytes=2))  # fmt: skip
    assert plan.persistent["activations (blocks)"] == single.persistent["activations (blocks)"]
    with pytest.raises(ValueError, match="adapter training runs with strategy single or ddp"):
        Setup(world_size=8, strategy="fsdp2", adapters=planned)


def test_cli_plans_dpo_with_its_frozen_backbone(capsys):
    from scail2.cli.plan import main

    args = ["experiment=dpo_wan14b", "module.init_from=/w", "data.cache_dir=/c", "module.heldout.cache_dir=/h"]
    assert main([*args, "--clip", "81x480x832", "--gpu-memory", "80"]) == 1
    out = capsys.readouterr().out
    assert "adapter training: 613.42M adapter parameters train, the backbone is frozen (bf16)" in out
    assert "parameters (frozen backbone)             30.54 GiB" in out
    assert "strategy=fsdp2" not in out and "strategy.sequence_parallel=4" in out
