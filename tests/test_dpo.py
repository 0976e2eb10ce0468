import copy
import math

import pytest
import torch
import torch.nn.functional as F

from scail2.data.batch import MotionBatch, PreferenceBatch
from scail2.lora import LoRASpec, adapters_disabled, add_lora, load_lora, lora_layers, merge_lora, read_lora, save_lora
from scail2.models import SCAIL2Transformer, scail2_config
from scail2.objectives.dpo import DPOConfig, dpo_loss, model_velocity
from scail2.objectives.flow_matching import FlowMatchingConfig, shift_mu, shift_sigma
from scail2.testing import randomize_

from .test_flow_matching import make_batch


def make_pair(b=2, seed=0, same=False) -> PreferenceBatch:
    w = make_batch(b=b, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    hands = torch.zeros(b, 1, 3, 8, 8)
    hands[:, :, :, 2:5, 3:6] = 1.0
    w.hand_mask = hands
    loser = w.latents.clone() if same else torch.randn(w.latents.shape, generator=g)
    lh = torch.zeros_like(hands)
    lh[:, :, :, 5:7, 0:2] = 0.5
    return PreferenceBatch(w, loser, lh)


def base_of(model):
    """The reference a LoRA model's owner passes: the same network with its adapters disabled."""
    return model_velocity(model, within=adapters_disabled)


class Stub(torch.nn.Module):
    """A 'model' whose prediction is a fixed tensor (policy or reference), for hand computations."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.config = scail2_config("tiny")

    def forward(self, **kw):
        return self.out


def test_loss_equals_independent_computation():
    pair = make_pair()
    b = 2
    g0 = torch.Generator().manual_seed(0)
    p_pol, p_ref = torch.randn(2 * b, 16, 3, 8, 8, generator=g0), torch.randn(2 * b, 16, 3, 8, 8, generator=g0)
    cfg = DPOConfig(beta=50.0, sft_weight=0.3)
    out = dpo_loss(Stub(p_pol), pair, torch.Generator().manual_seed(7), cfg, reference=model_velocity(Stub(p_ref)))
    # Independent: regenerate sigma and the shared noise from the same generator.
    g = torch.Generator().manual_seed(7)
    z = torch.randn(b, generator=g)
    sigma = shift_sigma(torch.sigmoid(z).double(), shift_mu(16)).float()
    eps = torch.randn(pair.winner.latents.shape, generator=g)
    assert torch.allclose(out.sigma, sigma)
    tw, tl = eps - pair.winner.latents, eps - pair.loser_latents
    M = torch.maximum(pair.winner.hand_mask, pair.loser_hand_mask)

    def err(p, tgt):
        return (M * (p - tgt)).pow(2).flatten(1).mean(1)

    ew, el = err(p_pol[:b], tw), err(p_pol[b:], tl)
    rw, rl = err(p_ref[:b], tw), err(p_ref[b:], tl)
    inside = (ew - rw) - (el - rl)
    expect_dpo = -F.logsigmoid(-cfg.beta / 2 * inside).mean()
    expect_sft = (p_pol[:b] - tw).pow(2).flatten(1).mean(1).mean()
    assert torch.allclose(out.dpo_loss, expect_dpo, atol=1e-6)
    assert torch.allclose(out.sft_loss, expect_sft, atol=1e-6)
    assert torch.allclose(out.loss, expect_dpo + 0.3 * expect_sft, atol=1e-6)
    assert torch.allclose(out.err_policy_w, ew) and torch.allclose(out.err_ref_l, rl)
    assert out.implicit_accuracy == ((-inside) > 0).float().mean()


@pytest.mark.parametrize("exclude_ocr", [True, False])
def test_sft_term_is_the_flow_matching_loss_under_its_loss_mask(exclude_ocr):
    # The SFT anchor weights the winner's error with pretraining's loss mask: OCR regions are left out exactly
    # when the flow-matching settings say so (sigma.exclude_ocr), as in the pretraining loss.
    pair = make_pair()
    b = 2
    ocr = torch.zeros(b, 1, 3, 8, 8)
    ocr[:, :, :, 0:4, :] = 1.0  # the top half of every frame is text
    pair.winner.ocr_mask = ocr
    g0 = torch.Generator().manual_seed(0)
    p_pol, p_ref = torch.randn(2 * b, 16, 3, 8, 8, generator=g0), torch.randn(2 * b, 16, 3, 8, 8, generator=g0)
    cfg = DPOConfig(sigma=FlowMatchingConfig(exclude_ocr=exclude_ocr))
    out = dpo_loss(Stub(p_pol), pair, torch.Generator().manual_seed(7), cfg, reference=model_velocity(Stub(p_ref)))
    g = torch.Generator().manual_seed(7)
    torch.randn(b, generator=g)  # sigma
    tw = torch.randn(pair.winner.latents.shape, generator=g) - pair.winner.latents
    weight = (1 - ocr) if exclude_ocr else torch.ones_like(ocr)
    expect = ((p_pol[:b] - tw).pow(2) * weight).flatten(1).mean(1).mean()
    assert torch.allclose(out.sft_loss, expect, atol=1e-6)
    other = ((p_pol[:b] - tw).pow(2) * ((1 - ocr) if not exclude_ocr else 1.0)).flatten(1).mean(1).mean()
    assert not torch.allclose(out.sft_loss, other, atol=1e-4)  # the two settings differ on this batch


@pytest.fixture
def lora_model():
    base = randomize_(SCAIL2Transformer(scail2_config("tiny")))
    frozen = copy.deepcopy(base).eval()
    model = add_lora(base, LoRASpec(rank=4))
    with torch.no_grad():  # non-zero up-projections, so the policy differs from the reference
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model, frozen


def test_lora_targets_the_released_module_set(lora_model):
    model, _ = lora_model
    names = sorted(lora_layers(model))
    per_block = ["cross_attn.k", "cross_attn.o", "cross_attn.q", "cross_attn.v", "ffn.0", "ffn.2",
                 "self_attn.k", "self_attn.o", "self_attn.q", "self_attn.v"]
    assert names == sorted(f"blocks.{i}.{m}" for i in range(2) for m in per_block)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_adapters_disabled_equals_frozen_copy(lora_model):
    model, frozen = lora_model
    pair = make_pair()
    out_a = dpo_loss(model, pair, torch.Generator().manual_seed(1), reference=base_of(model))
    out_b = dpo_loss(model, pair, torch.Generator().manual_seed(1), reference=model_velocity(frozen))
    assert torch.allclose(out_a.err_ref_w, out_b.err_ref_w, atol=1e-6)
    assert torch.allclose(out_a.err_ref_l, out_b.err_ref_l, atol=1e-6)
    assert not torch.allclose(out_a.err_policy_w, out_a.err_ref_w)


def test_identical_pair_gives_log2_and_zero_gradient(lora_model):
    model, _ = lora_model
    out = dpo_loss(model, make_pair(same=True), torch.Generator().manual_seed(2), reference=base_of(model))
    assert out.dpo_loss.item() == pytest.approx(math.log(2), abs=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]

    def grad_norm(o):
        return torch.sqrt(sum(g.pow(2).sum() for g in torch.autograd.grad(o.dpo_loss, params))).item()

    # beta = 5000 magnifies float rounding between the two halves of the batch; zero up to that noise,
    # against an ordinary gradient for a distinct pair.
    ordinary = grad_norm(dpo_loss(model, make_pair(), torch.Generator().manual_seed(2), reference=base_of(model)))
    assert grad_norm(out) < 1e-4 * ordinary


def test_gradients_reach_only_lora_and_base_stays_unchanged(lora_model):
    model, frozen = lora_model
    pair = make_pair()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    for step in range(3):
        out = dpo_loss(model, pair, torch.Generator().manual_seed(step), reference=base_of(model))
        opt.zero_grad()
        out.loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
        opt.step()
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n
    out = dpo_loss(model, pair, torch.Generator().manual_seed(9), reference=model_velocity(frozen))
    ref = dpo_loss(model, pair, torch.Generator().manual_seed(9), reference=base_of(model))
    assert torch.allclose(out.err_ref_w, ref.err_ref_w, atol=1e-6)


class LocalModel(torch.nn.Module):
    """Prediction depends on each latent element alone, so outside-mask inputs cannot leak inside."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.7))
        self.config = scail2_config("tiny")

    def forward(self, video, **kw):
        return video[:, :16] * self.scale


def test_changes_outside_the_hand_mask_do_not_affect_the_dpo_term():
    pair = make_pair()
    ref = LocalModel()
    with torch.no_grad():
        ref.scale.fill_(0.5)
    a = dpo_loss(LocalModel(), pair, torch.Generator().manual_seed(3), reference=model_velocity(ref))
    M = pair.hand_union()
    changed = PreferenceBatch(pair.winner, pair.loser_latents + 5.0 * (M == 0), pair.loser_hand_mask)
    b = dpo_loss(LocalModel(), changed, torch.Generator().manual_seed(3), reference=model_velocity(ref))
    assert torch.allclose(a.dpo_loss, b.dpo_loss, atol=1e-7)
    inside = PreferenceBatch(pair.winner, pair.loser_latents + 5.0 * (M > 0), pair.loser_hand_mask)
    c = dpo_loss(LocalModel(), inside, torch.Generator().manual_seed(3), reference=model_velocity(ref))
    assert not torch.allclose(a.dpo_loss, c.dpo_loss)


def test_missing_hand_masks_are_an_error():
    pair = make_pair()
    pair.winner.hand_mask = None
    pair.loser_hand_mask = None
    with pytest.raises(ValueError, match="needs hand masks"):
        dpo_loss(Stub(torch.zeros(4, 16, 3, 8, 8)), pair, torch.Generator(), reference=model_velocity(Stub(torch.zeros(4, 16, 3, 8, 8))))


@pytest.mark.parametrize("layout", ["peft", "comfyui"])
def test_lora_files_round_trip_and_merge(lora_model, tmp_path, layout):
    model, frozen = lora_model
    from scail2.testing import random_scail2_batch

    inputs, cond = random_scail2_batch(model.config)
    with torch.no_grad():
        adapted = model(**inputs.as_kwargs(), **cond)
        base = frozen(**inputs.as_kwargs(), **cond)
    assert not torch.allclose(adapted, base, atol=1e-4)
    spec = LoRASpec(rank=4)
    path = save_lora(model, spec, tmp_path / ("lora" if layout == "peft" else "lora.safetensors"), layout=layout)
    state, got_spec, meta = read_lora(path)
    assert got_spec.rank == 4 and got_spec.lora_alpha == 4.0 and len(state) == 40
    assert meta["rank"] == "4" and len(meta["base_model_sha256"]) == 64
    reloaded = load_lora(copy.deepcopy(frozen), path)
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs.as_kwargs(), **cond), adapted, atol=1e-6)
        merged = merge_lora(reloaded)
        assert not lora_layers(merged)
        assert set(merged.state_dict()) == set(frozen.state_dict())
        assert torch.allclose(merged(**inputs.as_kwargs(), **cond), adapted, atol=1e-5)
    other = randomize_(SCAIL2Transformer(scail2_config("tiny")), seed=5)
    with pytest.raises(ValueError, match="was trained on base weights"):
        load_lora(other, path)


def test_adapted_model_equals_base_at_initialisation():
    base = randomize_(SCAIL2Transformer(scail2_config("tiny")))
    frozen = copy.deepcopy(base)
    model = add_lora(base, LoRASpec(rank=4))
    from scail2.testing import random_scail2_batch

    inputs, cond = random_scail2_batch(model.config)
    with torch.no_grad():
        assert torch.equal(model(**inputs.as_kwargs(), **cond), frozen(**inputs.as_kwargs(), **cond))


def test_dpo_weight_zero_is_exactly_lambda_times_the_sft_term():
    pair = make_pair()
    b = 2
    g0 = torch.Generator().manual_seed(0)
    p_pol, p_ref = torch.randn(2 * b, 16, 3, 8, 8, generator=g0), torch.randn(2 * b, 16, 3, 8, 8, generator=g0)
    sft = DPOConfig(beta=50.0, sft_weight=0.3, dpo_weight=0.0)
    out = dpo_loss(Stub(p_pol), pair, torch.Generator().manual_seed(7), sft, reference=model_velocity(Stub(p_ref)))
    g = torch.Generator().manual_seed(7)
    torch.randn(b, generator=g)  # sigma's draw
    eps = torch.randn(pair.winner.latents.shape, generator=g)
    expect_sft = (p_pol[:b] - (eps - pair.winner.latents)).pow(2).flatten(1).mean(1).mean()
    assert torch.allclose(out.sft_loss, expect_sft, atol=1e-6)
    assert torch.equal(out.loss, 0.3 * out.sft_loss)
    # The DPO term is still measured (so the implicit accuracy of an SFT run is comparable), with the same value.
    full = dpo_loss(Stub(p_pol), pair, torch.Generator().manual_seed(7), DPOConfig(beta=50.0, sft_weight=0.3), reference=model_velocity(Stub(p_ref)))
    assert torch.equal(out.dpo_loss, full.dpo_loss) and torch.equal(out.sft_loss, full.sft_loss)
    assert torch.equal(full.loss, full.dpo_loss + 0.3 * full.sft_loss)
    half = DPOConfig(beta=50.0, sft_weight=0.3, dpo_weight=0.5)
    scaled = dpo_loss(Stub(p_pol), pair, torch.Generator().manual_seed(7), half, reference=model_velocity(Stub(p_ref)))
    assert torch.equal(scaled.loss, 0.5 * full.dpo_loss + 0.3 * full.sft_loss)


def test_dpo_weight_zero_gradient_does_not_depend_on_the_losers(lora_model):
    model, _ = lora_model
    pair = make_pair()
    other = PreferenceBatch(pair.winner, torch.randn(pair.loser_latents.shape, generator=torch.Generator().manual_seed(5)), pair.loser_hand_mask)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(batch, cfg):
        out = dpo_loss(model, batch, torch.Generator().manual_seed(4), cfg, reference=base_of(model))
        return torch.autograd.grad(out.loss, params)

    sft = DPOConfig(sft_weight=0.5, dpo_weight=0.0)
    for a, c in zip(grads(pair, sft), grads(other, sft)):
        assert torch.equal(a, c)
    dpo = DPOConfig(sft_weight=0.5, dpo_weight=1.0)  # with the DPO term the losers do matter
    assert any(not torch.allclose(a, c) for a, c in zip(grads(pair, dpo), grads(other, dpo)))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"dpo_weight": -0.1}, "dpo_weight is -0.1; need >= 0"), ({"dpo_weight": 0.0, "sft_weight": 0.0}, "both 0")],
)
def test_dpo_weight_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPOConfig(**kwargs)


def test_pair_accuracy_is_per_pair_with_half_on_ties():
    pair = make_pair(b=3)
    g0 = torch.Generator().manual_seed(1)
    p_pol = torch.randn(6, 16, 3, 8, 8, generator=g0)
    p_ref = p_pol.clone()
    p_ref[0] += 0.5  # pair 0: the reference is off on the winner only, so the policy prefers the winner more
    p_ref[4] += 0.5  # pair 1: off on the loser only, so the policy prefers the loser more; pair 2: a tie
    out = dpo_loss(Stub(p_pol), pair, torch.Generator().manual_seed(2), DPOConfig(beta=10.0), reference=model_velocity(Stub(p_ref)))
    assert out.pair_accuracy.tolist() == [1.0, 0.0, 0.5]
    assert out.implicit_accuracy.item() == 0.5
