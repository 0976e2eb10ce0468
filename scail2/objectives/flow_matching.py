"""Flow-matching pretraining objective of SCAIL-2 (SPEC §5), a pure function of (model, batch, generator).

    s ~ sigmoid(N(0, 1)), then the resolution shift s' = e^mu / (e^mu + 1/s - 1), mu linear in the tokens
    per latent frame (0.5 at 256 tokens -> 1.15 at 4096)
    x_s = (1 - s') x0 + s' eps;  history frames are exactly x0;  target v = eps - x0;  model timestep 1000 s'
    loss = mean over C*T*H*W of (v_pred - v)^2 * (1 - history) * (1 - ocr), then mean over the batch

Masked elements stay in the denominator (the reference's plain per-sample mean). History: the first 2 latent
frames are kept clean with probability 0.5 for clips that allow history, 0.15 otherwise (SPEC §5). Text
dropout replaces the caption by the umT5 embedding of "" (not zeros) with probability 0.1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from scail2.conditioning.batch import MotionBatch
from scail2.conditioning.condition import Condition
from scail2.conditioning.packing import history_mask, pack_inputs


@dataclass(frozen=True)
class FlowMatchingConfig:
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # mu of the resolution shift, linear in tokens per latent frame between these two points.
    shift_mu_low: float = 0.5
    shift_mu_high: float = 1.15
    shift_tokens_low: int = 256
    shift_tokens_high: int = 4096
    history_p_allowed: float = 0.5
    history_p_other: float = 0.15
    text_dropout: float = 0.1
    exclude_ocr: bool = True


@dataclass
class FlowMatchingOutput:
    loss: torch.Tensor  # () mean over the batch
    per_sample: torch.Tensor  # (B,)
    sigma: torch.Tensor  # (B,) shifted noise level s'
    history: torch.Tensor  # (B,) bool: history frames kept clean
    text_dropped: torch.Tensor  # (B,) bool
    prediction: torch.Tensor  # (B, 16, T, h, w)
    target: torch.Tensor  # (B, 16, T, h, w)


def shift_mu(tokens_per_frame: int, cfg: FlowMatchingConfig = FlowMatchingConfig()) -> float:
    frac = (tokens_per_frame - cfg.shift_tokens_low) / (cfg.shift_tokens_high - cfg.shift_tokens_low)
    return cfg.shift_mu_low + frac * (cfg.shift_mu_high - cfg.shift_mu_low)


def shift_sigma(s: torch.Tensor, mu: float) -> torch.Tensor:
    """s' = e^mu / (e^mu + 1/s - 1): the time shift with factor e^mu (more noise at higher resolution)."""
    e = math.exp(mu)
    return e / (e + 1.0 / s - 1.0)


def sample_sigma(batch: int, tokens_per_frame: int, generator: torch.Generator, cfg: FlowMatchingConfig, device=None) -> torch.Tensor:
    """(B,) shifted logistic-normal noise levels in (0, 1)."""
    z = torch.randn(batch, generator=generator) * cfg.logit_std + cfg.logit_mean
    return shift_sigma(torch.sigmoid(z).double(), shift_mu(tokens_per_frame, cfg)).float().to(device)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """x_s = (1 - s) x0 + s eps, with history frames (history mask (B, 1, T, 1, 1) = 1) exactly x0."""
    s = sigma.view(-1, 1, 1, 1, 1).to(x0.dtype)
    x_s = (1 - s) * x0 + s * noise
    return history * x0 + (1 - history) * x_s


def predict_velocity(model, cond: Condition, x_s: torch.Tensor, hist: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The model's velocity prediction for noisy latents ``x_s`` under ``cond`` (packing + forward)."""
    inputs = pack_inputs(x_s, hist, cond, model.config.head_dim, model.config.patch_size, theta=model.config.rope_theta)
    return model(**inputs.as_kwargs(), timestep=sigma * 1000.0, context=cond.text, clip_tokens=cond.clip_tokens)


def loss_mask(batch: MotionBatch, hist: torch.Tensor, exclude_ocr: bool = True) -> torch.Tensor:
    """(B, 1, T, h, w) weights: 0 on clean history frames and (optionally) OCR/text regions."""
    m = (1 - hist).expand(-1, 1, -1, *batch.latents.shape[3:])
    if exclude_ocr and batch.ocr_mask is not None:
        m = m * (1 - batch.ocr_mask.to(m.dtype))
    return m


def weighted_error(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B,) mean over C*T*H*W of (pred - target)^2 * weight (a `loss_mask`); masked zeros stay in the denominator."""
    return ((pred.float() - target.float()).pow(2) * weight).mean(dim=(1, 2, 3, 4))


def choose_text(batch: MotionBatch, drop: torch.Tensor) -> torch.Tensor:
    """(B, L, text_dim) the captions' embeddings, with umT5 of "" where ``drop`` (text dropout)."""
    text = batch.cond.text
    if not drop.any():
        return text
    if batch.null_text is None:
        raise ValueError("text dropout needs MotionBatch.null_text (umT5 of the empty caption); set text_dropout=0 to train without")
    null = batch.null_text.expand_as(text).to(text)
    return torch.where(drop.view(-1, 1, 1).to(text.device), null, text)


def flow_matching_loss(
    model, batch: MotionBatch, generator: torch.Generator, cfg: FlowMatchingConfig = FlowMatchingConfig()
) -> FlowMatchingOutput:
    """One flow-matching loss evaluation; all randomness comes from ``generator`` (a CPU generator)."""
    x0 = batch.latents
    b, _, t, h, w = x0.shape
    device = x0.device
    pt, ph, pw = model.config.patch_size
    sigma = sample_sigma(b, (h // ph) * (w // pw), generator, cfg, device)
    p_hist = torch.where(batch.history_allowed.cpu(), cfg.history_p_allowed, cfg.history_p_other)
    keep = torch.rand(b, generator=generator) < p_hist
    drop = torch.rand(b, generator=generator) < cfg.text_dropout
    noise = torch.randn(x0.shape, generator=generator).to(device=device, dtype=x0.dtype)

    hist = history_mask(b, t, keep.to(device), device=device, dtype=x0.dtype)
    x_s = noisy_latents(x0, noise, sigma, hist)
    pred = predict_velocity(model, replace(batch.cond, text=choose_text(batch, drop)), x_s, hist, sigma)
    target = noise - x0
    weight = loss_mask(batch, hist, cfg.exclude_ocr)
    per_sample = weighted_error(pred, target, weight)
    return FlowMatchingOutput(per_sample.mean(), per_sample, sigma, keep, drop, pred, target)
