"""Bias-Aware DPO (SPEC §7): Diffusion-DPO with flow matching, measured inside the hand regions.

Winner and loser share noise and timestep. With ``v`` the velocity prediction and ``M`` the union of both
samples' hand masks on the latent grid,

    err(m, x) = mean over C*T*H*W of (M * (v_m(x_s) - (eps - x0)))^2
    L_dpo     = -log sigmoid(-beta/2 * [(err(theta, w) - err(ref, w)) - (err(theta, l) - err(ref, l))])
    L         = w_dpo * L_dpo + lambda * L_sft(w)

where ``L_sft`` is the plain flow-matching loss of the winner (whole frame, weighted by the flow-matching
loss mask, `scail2.objectives.flow_matching.loss_mask`, so OCR regions follow ``sigma.exclude_ocr`` as in
pretraining), computed from the same policy prediction. The reference is the pre-DPO model; the caller
passes its velocity prediction (a `VelocityFn`, made with `model_velocity`): a frozen copy, or, with LoRA,
the same network with its adapters disabled (``model_velocity(model, within=scail2.lora.adapters_disabled)``:
no second copy; the DPO LightningModule, which owns the adapters, does this).

``w_dpo`` (``dpo_weight``) is 1 in the paper's loss. ``dpo_weight = 0`` is the paper's lambda-only baseline:
supervised fine-tuning on the same winners, ``L = lambda * L_sft(w)`` exactly (the losers are still scored,
so the implicit accuracy stays comparable, but they take no part in the loss or its gradient).

beta, lambda and the learning rate are not published. Defaults: beta = 5000 (Diffusion-DPO's value for
per-element mean errors), lambda = 1.0. No history frames and no text dropout are used (preference clips
are scored as whole clips with their captions).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from scail2.conditioning.batch import PreferenceBatch
from scail2.conditioning.condition import Condition
from scail2.conditioning.packing import history_mask
from scail2.objectives.flow_matching import (
    FlowMatchingConfig,
    loss_mask,
    noisy_latents,
    predict_velocity,
    sample_sigma,
    weighted_error,
)

# A network's velocity prediction: (cond, noisy latents x_s, history mask, sigma) -> (B, 16, T, h, w).
VelocityFn = Callable[[Condition, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DPOConfig:
    beta: float = 5000.0
    sft_weight: float = 1.0  # lambda
    dpo_weight: float = 1.0  # w_dpo; 0: the SFT-only (lambda-only) baseline on the same winners
    sigma: FlowMatchingConfig = FlowMatchingConfig()  # timestep distribution, shift and loss mask (shared with pretraining)

    def __post_init__(self) -> None:
        if isinstance(self.sigma, Mapping):  # from a config file
            object.__setattr__(self, "sigma", FlowMatchingConfig(**self.sigma))
        if not isinstance(self.sigma, FlowMatchingConfig):
            raise TypeError(f"DPOConfig.sigma is a {type(self.sigma).__name__}; give a FlowMatchingConfig or its fields")
        if self.beta <= 0:
            raise ValueError(f"DPOConfig.beta is {self.beta}; need a positive value (Diffusion-DPO uses 5000)")
        if self.sft_weight < 0:
            raise ValueError(f"DPOConfig.sft_weight is {self.sft_weight}; need >= 0")
        if self.dpo_weight < 0:
            raise ValueError(f"DPOConfig.dpo_weight is {self.dpo_weight}; need >= 0 (1: Bias-Aware DPO, 0: SFT only)")
        if self.dpo_weight == 0 and self.sft_weight == 0:
            raise ValueError(
                "DPOConfig.dpo_weight and sft_weight are both 0, so the loss is 0; set dpo_weight=1 (DPO) or "
                "sft_weight > 0 with dpo_weight=0 (the SFT-only baseline)"
            )


@dataclass
class DPOOutput:
    loss: torch.Tensor  # () w_dpo * L_dpo + lambda * L_sft
    dpo_loss: torch.Tensor  # ()
    sft_loss: torch.Tensor  # ()
    implicit_accuracy: torch.Tensor  # () fraction of pairs where the policy prefers the winner more than the reference
    pair_accuracy: torch.Tensor  # (B,) per pair: 1 where it does, 0 where it does not, 0.5 on a tie
    reward_margin: torch.Tensor  # () mean of -beta/2 * inside
    err_policy_w: torch.Tensor  # (B,)
    err_policy_l: torch.Tensor
    err_ref_w: torch.Tensor
    err_ref_l: torch.Tensor
    sigma: torch.Tensor  # (B,)


@dataclass
class NoisedPair:
    """Winner and loser noised with one draw of noise and timestep, stacked winner then loser (2B)."""

    sigma: torch.Tensor  # (B,) shared noise level s'
    x_s: torch.Tensor  # (2B, 16, T, h, w) noisy latents
    history: torch.Tensor  # (2B, 1, T, 1, 1) history mask (no history frames in DPO)
    target: torch.Tensor  # (2B, 16, T, h, w) velocity targets eps - x0
    cond: Condition  # the shared condition, repeated for both halves

    @property
    def sigma2(self) -> torch.Tensor:
        """(2B,) the noise level of every row of ``x_s``."""
        return torch.cat([self.sigma, self.sigma])


def model_velocity(
    model: torch.nn.Module, within: Callable[[torch.nn.Module], AbstractContextManager[torch.nn.Module]] | None = None
) -> VelocityFn:
    """The `VelocityFn` of ``model`` (e.g. a frozen reference copy); with ``within``, of the network that
    ``within(model)`` yields, entered for every prediction (e.g. `scail2.lora.adapters_disabled`: the base of a
    LoRA model, the DPO reference without a second copy)."""
    if within is None:
        return partial(predict_velocity, model)

    def velocity(cond: Condition, x_s: torch.Tensor, hist: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with within(model) as net:
            return predict_velocity(net, cond, x_s, hist, sigma)

    return velocity


def masked_error(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean over C*T*H*W of (mask * (pred - target))^2; masked zeros stay in the denominator."""
    return (mask * (pred.float() - target.float())).pow(2).mean(dim=(1, 2, 3, 4))


def noise_pair(
    batch: PreferenceBatch, generator: torch.Generator, cfg: FlowMatchingConfig, patch_size: tuple[int, int, int]
) -> NoisedPair:
    """Draw one noise level per pair and one noise tensor shared by winner and loser (in this order, from
    ``generator``), and noise both videos with them."""
    x_w, x_l = batch.winner.latents, batch.loser_latents
    b, _, t, h, w = x_w.shape
    device = x_w.device
    _, ph, pw = patch_size
    sigma = sample_sigma(b, (h // ph) * (w // pw), generator, cfg, device)
    noise = torch.randn(x_w.shape, generator=generator).to(device=device, dtype=x_w.dtype)
    hist = history_mask(2 * b, t, False, device=device, dtype=x_w.dtype)
    x_s = torch.cat([noisy_latents(x_w, noise, sigma, hist[:b]), noisy_latents(x_l, noise, sigma, hist[b:])])
    target = torch.cat([noise - x_w, noise - x_l])
    return NoisedPair(sigma, x_s, hist, target, batch.winner.cond.repeat(2))


def preference_logits(err: torch.Tensor, err_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """(B,) -beta/2 * [(err(theta, w) - err(ref, w)) - (err(theta, l) - err(ref, l))] from the (2B,) hand-region
    errors of policy and reference (winner rows first); > 0 where the policy prefers the winner more."""
    b = err.shape[0] // 2
    inside = (err[:b] - err_ref[:b]) - (err[b:] - err_ref[b:])
    return -0.5 * beta * inside


def dpo_loss(
    model: torch.nn.Module,
    batch: PreferenceBatch,
    generator: torch.Generator,
    cfg: DPOConfig = DPOConfig(),
    *,
    reference: VelocityFn,
) -> DPOOutput:
    """One Bias-Aware DPO evaluation of the policy ``model`` against the ``reference`` prediction (run without
    gradients: the reference is frozen)."""
    b = batch.batch_size
    pair = noise_pair(batch, generator, cfg.sigma, model.config.patch_size)
    pred = predict_velocity(model, pair.cond, pair.x_s, pair.history, pair.sigma2)
    with torch.no_grad():
        pred_ref = reference(pair.cond, pair.x_s, pair.history, pair.sigma2)

    hands = batch.hand_union().to(pair.x_s.device)
    m = torch.cat([hands, hands])
    err = masked_error(pred, pair.target, m)
    err_ref = masked_error(pred_ref, pair.target, m)
    logits = preference_logits(err, err_ref, cfg.beta)
    l_dpo = -F.logsigmoid(logits).mean()

    # The SFT anchor: the winner's flow-matching loss under pretraining's loss mask.
    weight = loss_mask(batch.winner, pair.history[:b], cfg.sigma.exclude_ocr)
    l_sft = weighted_error(pred[:b], pair.target[:b], weight).mean()
    # dpo_weight 0 leaves L_dpo out entirely (not 0 * L_dpo): the loss and its gradient are exactly the SFT
    # baseline's, whatever the losers hold.
    pair_accuracy = (logits > 0).float() + 0.5 * (logits == 0).float()  # (B,)
    loss = cfg.sft_weight * l_sft if cfg.dpo_weight == 0 else cfg.dpo_weight * l_dpo + cfg.sft_weight * l_sft
    return DPOOutput(
        loss=loss,
        dpo_loss=l_dpo,
        sft_loss=l_sft,
        implicit_accuracy=pair_accuracy.mean(),
        pair_accuracy=pair_accuracy,
        reward_margin=logits.mean().detach(),
        err_policy_w=err[:b].detach(),
        err_policy_l=err[b:].detach(),
        err_ref_w=err_ref[:b],
        err_ref_l=err_ref[b:],
        sigma=pair.sigma,
    )
