"""Bias-Aware DPO (SPEC §7): Diffusion-DPO with flow matching, measured inside the hand regions.

Winner and loser share noise and timestep. With ``v`` the velocity prediction and ``M`` the union of both
samples' hand masks on the latent grid,

    err(m, x) = mean over C*T*H*W of (M * (v_m(x_s) - (eps - x0)))^2
    L_dpo     = -log sigmoid(-beta/2 * [(err(theta, w) - err(ref, w)) - (err(theta, l) - err(ref, l))])
    L         = L_dpo + lambda * L_sft(w)

where ``L_sft`` is the plain flow-matching loss of the winner (whole frame, history/OCR excluded as in
pretraining), computed from the same policy prediction. The reference is the pre-DPO model: with LoRA,
the same network with its adapters disabled (no second copy).

beta, lambda and the learning rate are not published. Defaults: beta = 5000 (Diffusion-DPO's value for
per-element mean errors), lambda = 1.0. No history frames and no text dropout are used (preference clips
are scored as whole clips with their captions).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F

from scail2.conditioning.batch import PreferenceBatch
from scail2.conditioning.packing import history_mask
from scail2.objectives.flow_matching import FlowMatchingConfig, noisy_latents, predict_velocity, sample_sigma


@dataclass(frozen=True)
class DPOConfig:
    beta: float = 5000.0
    sft_weight: float = 1.0  # lambda
    sigma: FlowMatchingConfig = FlowMatchingConfig()  # timestep distribution and shift (shared with pretraining)

    def __post_init__(self) -> None:
        if isinstance(self.sigma, Mapping):  # from a config file
            object.__setattr__(self, "sigma", FlowMatchingConfig(**self.sigma))
        if not isinstance(self.sigma, FlowMatchingConfig):
            raise TypeError(f"DPOConfig.sigma is a {type(self.sigma).__name__}; give a FlowMatchingConfig or its fields")
        if self.beta <= 0:
            raise ValueError(f"DPOConfig.beta is {self.beta}; need a positive value (Diffusion-DPO uses 5000)")
        if self.sft_weight < 0:
            raise ValueError(f"DPOConfig.sft_weight is {self.sft_weight}; need >= 0")


@dataclass
class DPOOutput:
    loss: torch.Tensor  # () L_dpo + lambda * L_sft
    dpo_loss: torch.Tensor  # ()
    sft_loss: torch.Tensor  # ()
    implicit_accuracy: torch.Tensor  # () fraction of pairs where the policy prefers the winner more than the reference
    reward_margin: torch.Tensor  # () mean of -beta/2 * inside
    err_policy_w: torch.Tensor  # (B,)
    err_policy_l: torch.Tensor
    err_ref_w: torch.Tensor
    err_ref_l: torch.Tensor
    sigma: torch.Tensor  # (B,)


def masked_error(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean over C*T*H*W of (mask * (pred - target))^2; masked zeros stay in the denominator."""
    return (mask * (pred.float() - target.float())).pow(2).mean(dim=(1, 2, 3, 4))


def dpo_loss(
    model: torch.nn.Module,
    batch: PreferenceBatch,
    generator: torch.Generator,
    cfg: DPOConfig = DPOConfig(),
    reference: Callable[[torch.nn.Module], ContextManager[torch.nn.Module]] | torch.nn.Module | None = None,
) -> DPOOutput:
    """One Bias-Aware DPO evaluation.

    ``reference``: a frozen reference model, or a context-manager factory that turns ``model`` into the
    reference (default: :func:`scail2.lora.adapters_disabled`).
    """
    w = batch.winner
    x_w, x_l = w.latents, batch.loser_latents
    b, _, t, h, wd = x_w.shape
    device = x_w.device
    pt, ph, pw = model.config.patch_size
    sigma = sample_sigma(b, (h // ph) * (wd // pw), generator, cfg.sigma, device)
    noise = torch.randn(x_w.shape, generator=generator).to(device=device, dtype=x_w.dtype)
    hist = history_mask(2 * b, t, False, device=device, dtype=x_w.dtype)
    sig2 = torch.cat([sigma, sigma])
    x_s = torch.cat([noisy_latents(x_w, noise, sigma, hist[:b]), noisy_latents(x_l, noise, sigma, hist[b:])])
    both = w.cond.repeat(2)  # winner then loser: one condition
    target = torch.cat([noise - x_w, noise - x_l])

    pred = predict_velocity(model, both, x_s, hist, sig2)
    with torch.no_grad():
        if reference is None:
            from scail2.lora import adapters_disabled

            ctx = adapters_disabled(model)
        elif isinstance(reference, torch.nn.Module):
            ctx = contextlib.nullcontext(reference)
        else:
            ctx = reference(model)
        with ctx as ref_model:
            pred_ref = predict_velocity(ref_model, both, x_s, hist, sig2)

    hands = batch.hand_union().to(device)
    m = torch.cat([hands, hands])
    err = masked_error(pred, target, m)
    err_ref = masked_error(pred_ref, target, m)
    err_w, err_l, ref_w, ref_l = err[:b], err[b:], err_ref[:b], err_ref[b:]
    inside = (err_w - ref_w) - (err_l - ref_l)
    logits = -0.5 * cfg.beta * inside
    l_dpo = -F.logsigmoid(logits).mean()

    sft_weight = (1 - hist[:b]).expand(-1, 1, -1, h, wd)
    if w.ocr_mask is not None:
        sft_weight = sft_weight * (1 - w.ocr_mask.float())
    l_sft = ((pred[:b].float() - target[:b].float()).pow(2) * sft_weight).mean(dim=(1, 2, 3, 4)).mean()
    return DPOOutput(
        loss=l_dpo + cfg.sft_weight * l_sft,
        dpo_loss=l_dpo,
        sft_loss=l_sft,
        implicit_accuracy=(logits > 0).float().mean() + 0.5 * (logits == 0).float().mean(),
        reward_margin=logits.mean().detach(),
        err_policy_w=err_w.detach(),
        err_policy_l=err_l.detach(),
        err_ref_w=ref_w,
        err_ref_l=ref_l,
        sigma=sigma,
    )
