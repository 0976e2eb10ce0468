import math

import pytest
import torch

from scail2.conditioning import Condition, MotionBatch
from scail2.models import SCAIL2Transformer, scail2_config
from scail2.objectives.flow_matching import (
    FlowMatchingConfig,
    flow_matching_loss,
    noisy_latents,
    sample_sigma,
    shift_mu,
    shift_sigma,
)
from scail2.conditioning.packing import history_mask
from scail2.testing import randomize_


def make_batch(b=2, t=3, h=8, w=8, seed=0, **kw) -> MotionBatch:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    latents = r(b, 16, t, h, w)
    cond = Condition(
        reference=r(b, 16, 1, h, w),
        reference_mask=torch.rand(b, 28, 1, h, w, generator=g),
        driving=r(b, 16, t, h // 2, w // 2),
        driving_mask=torch.rand(b, 28, t, h // 2, w // 2, generator=g),
        text=r(b, 7, 32),
        clip_tokens=r(b, 5, 32),
        modes=kw.pop("mode", ["animation", "replacement"][:b] + ["animation"] * max(0, b - 2)),
    )
    return MotionBatch(
        latents=latents,
        cond=cond,
        source=["scail_animation"] * b,
        history_allowed=kw.pop("history_allowed", torch.ones(b, dtype=torch.bool)),
        null_text=r(1, 7, 32),
        **kw,
    )


class ConstantModel(torch.nn.Module):
    """Predicts a fixed tensor: lets the loss be checked by hand."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.config = scail2_config("tiny")
        self.calls = []

    def forward(self, **kw):
        self.calls.append(kw)
        return self.out


def test_shift_matches_published_factors():
    # 512x896 -> latent 64x112 -> 1,792 tokens per frame -> shift ~2.1; 704x1280 -> 3,520 -> ~2.9 (SPEC §5)
    assert math.exp(shift_mu(1792)) == pytest.approx(2.14, abs=0.01)
    assert math.exp(shift_mu(3520)) == pytest.approx(2.86, abs=0.01)
    assert shift_mu(256) == pytest.approx(0.5) and shift_mu(4096) == pytest.approx(1.15)
    s = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    e = math.exp(0.7)
    assert torch.allclose(shift_sigma(s, 0.7), e * s / (e * s + 1 - s))


def test_sigma_distribution_is_logistic_normal_before_the_shift():
    cfg = FlowMatchingConfig(shift_mu_low=0.0, shift_mu_high=0.0)  # no shift
    s = sample_sigma(20000, 1024, torch.Generator().manual_seed(0), cfg)
    logit = torch.log(s / (1 - s))
    assert logit.mean().abs() < 0.03 and (logit.std() - 1).abs() < 0.03


def test_history_frames_are_exactly_clean():
    x0, eps = torch.randn(2, 16, 4, 4, 4), torch.randn(2, 16, 4, 4, 4)
    hist = history_mask(2, 4, torch.tensor([True, False]))
    x_s = noisy_latents(x0, eps, torch.tensor([0.7, 0.7]), hist)
    assert torch.equal(x_s[0, :, :2], x0[0, :, :2])
    assert torch.allclose(x_s[0, :, 2:], 0.3 * x0[0, :, 2:] + 0.7 * eps[0, :, 2:])
    assert torch.allclose(x_s[1], 0.3 * x0[1] + 0.7 * eps[1])


def test_loss_equals_hand_computation_with_history_and_ocr():
    batch = make_batch(ocr_mask=torch.zeros(2, 1, 3, 8, 8))
    batch.ocr_mask[0, 0, 2, :4] = 1  # half of the last frame of sample 0 is text
    pred = torch.randn(2, 16, 3, 8, 8)
    model = ConstantModel(pred)
    cfg = FlowMatchingConfig(history_p_allowed=1.0, text_dropout=0.0)
    out = flow_matching_loss(model, batch, torch.Generator().manual_seed(3), cfg)
    # Recreate the noise: same generator consumption order (sigma normals, history and dropout draws, noise).
    g = torch.Generator().manual_seed(3)
    torch.randn(2, generator=g), torch.rand(2, generator=g), torch.rand(2, generator=g)
    eps = torch.randn(batch.latents.shape, generator=g)
    target = eps - batch.latents
    sq = (pred - target) ** 2
    w = torch.ones(2, 1, 3, 8, 8)
    w[:, :, :2] = 0  # history frames (first 2 latent frames) excluded
    w[0, 0, 2, :4] = 0  # OCR region excluded
    expect = (sq * w).mean(dim=(1, 2, 3, 4))  # masked zeros stay in the denominator
    assert torch.allclose(out.per_sample, expect)
    assert torch.allclose(out.loss, expect.mean())
    assert out.history.all()
    # The model saw x_s with clean history frames and timestep 1000 * sigma.
    kw = model.calls[0]
    assert torch.allclose(kw["timestep"], out.sigma * 1000)
    assert torch.equal(kw["video"][:, :16, :2], batch.latents[:, :, :2])
    assert torch.equal(kw["video"][:, 16:, :2], torch.ones(2, 4, 2, 8, 8))


def test_history_probability_depends_on_the_clip():
    batch = make_batch(b=2, history_allowed=torch.tensor([True, False]))
    model = ConstantModel(torch.zeros(2, 16, 3, 8, 8))
    kept = torch.zeros(2)
    for seed in range(400):
        kept += flow_matching_loss(model, batch, torch.Generator().manual_seed(seed)).history.float()
    rate = kept / 400
    assert abs(rate[0] - 0.5) < 0.08 and abs(rate[1] - 0.15) < 0.06


def test_text_dropout_uses_the_empty_caption_embedding():
    batch = make_batch()
    model = ConstantModel(torch.zeros(2, 16, 3, 8, 8))
    out = flow_matching_loss(model, batch, torch.Generator().manual_seed(0), FlowMatchingConfig(text_dropout=1.0))
    assert out.text_dropped.all()
    assert torch.equal(model.calls[0]["context"], batch.null_text.expand_as(batch.cond.text))
    batch.null_text = None
    with pytest.raises(ValueError, match="null_text"):
        flow_matching_loss(model, batch, torch.Generator().manual_seed(0), FlowMatchingConfig(text_dropout=1.0))


def test_real_model_backward_and_determinism():
    model = randomize_(SCAIL2Transformer(scail2_config("tiny")))
    batch = make_batch()
    a = flow_matching_loss(model, batch, torch.Generator().manual_seed(1))
    b = flow_matching_loss(model, batch, torch.Generator().manual_seed(1))
    assert torch.equal(a.loss, b.loss)
    a.loss.backward()
    assert model.patch_embedding_pose.weight.grad.abs().sum() > 0
