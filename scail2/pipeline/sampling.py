"""The denoising loop on already-encoded conditioning, shared by inference and validation during training.

:func:`sample_latents` takes latent-space conditioning (a `scail2.conditioning.Condition`: what the pipeline
encodes, or a training batch's ``batch.cond``), the negative prompt's embedding and a diffusers flow-matching
scheduler, and returns denoised latents. ``SCAIL2Pipeline`` runs exactly this function for every segment, so
validation samples and pipeline outputs come from one loop.

Per step (SPEC §8):

- the clean history latents (if any) overwrite the first latent frames of the sample before the model sees it,
  and again after every scheduler step, with a history mask of 1 on those frames;
- classifier-free guidance on the text only: ``v = v_uncond + g (v_cond - v_uncond)``, where the
  unconditional pass differs from the conditional one only in its umT5 context (the negative prompt, "" by
  default); reference, CLIP tokens, driving latents, masks and history are the same. ``g = 1`` runs the
  conditional pass alone.

The RoPE factors of the packed sequence depend only on the layout, so they are computed once per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from scail2.conditioning.condition import Condition
from scail2.conditioning.packing import history_mask, pack_inputs, with_mask_channels
from scail2.pipeline.schedulers import check_flow_scheduler, set_schedule

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def _param(module: torch.nn.Module) -> torch.Tensor:
    try:
        return next(module.parameters())
    except StopIteration:
        raise ValueError(f"{type(module).__name__} has no parameters to take its device and dtype from") from None


def initial_noise(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str
) -> torch.Tensor:
    """Standard normal float32 noise drawn on the generator's device (CPU by default), moved to ``device``.

    Drawing on the CPU makes a seed give the same noise on every machine.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    return noise.to(device)


@torch.no_grad()
def sample_latents(
    transformer: torch.nn.Module,
    cond: Condition,
    scheduler: Any,
    *,
    negative_text: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
    num_inference_steps: int = 40,
    guidance_scale: float = 5.0,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
    progress_desc: str = "denoising",
) -> torch.Tensor:
    """Denoise from noise to video latents with ``scheduler`` (reset here) and text-only CFG.

    Args:
        transformer: a ``SCAIL2Transformer`` (anything with its ``forward`` signature and ``config``); inputs are
            cast to its dtype and moved to its device.
        cond: the conditioning of B videos (`Condition`).
        scheduler: a flow-matching scheduler from ``make_scheduler`` (its shift is part of its config).
        negative_text: (1 | B, L, text_dim) umT5 of the negative prompt ("" by default:
            ``TextEncoder.null_embedding()``), the unconditional pass's context; required when ``guidance_scale != 1``.
        history: (B, 16, T_h, h, w) clean latents of the first T_h < T frames (2 for the 5-frame overlap of long
            videos), kept fixed through the loop; None: no history.
        num_inference_steps: denoising steps (40 in the official sampler).
        guidance_scale: text CFG scale g >= 1 (5 in the official sampler); 1 runs one model pass per step.
        generator: RNG of the initial noise (drawn on the generator's device, CPU by default).
        latents: the initial noise (B, 16, T, h, w) instead of drawing it.
        callback: ``callback(step, timestep, latents)`` after every step, latents (B, 16, T, h, w) float32.
        progress: show a tqdm bar.
    Returns:
        (B, 16, T, h, w) float32 denoised latents on the transformer's device; history frames are exactly
        ``history``.
    """
    if not (math.isfinite(guidance_scale) and guidance_scale >= 1):
        raise ValueError(f"guidance_scale is {guidance_scale}; need a finite number >= 1 (1 = no guidance, 5 by default)")
    use_cfg = guidance_scale != 1.0
    if use_cfg and negative_text is None:
        raise ValueError(
            f"guidance_scale {guidance_scale} needs negative_text (umT5 of the negative prompt, \"\" by "
            "default: TextEncoder.null_embedding()); or pass guidance_scale=1"
        )
    check_flow_scheduler(scheduler)
    p = _param(transformer)
    device, dtype = p.device, p.dtype
    config = transformer.config
    shape = cond.latent_shape
    b, _, t, h, w = shape

    if latents is None:
        latents = initial_noise(shape, generator, device)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {shape} for this conditioning")
    x = latents.to(device=device, dtype=torch.float32)

    if history is not None:
        if history.ndim != 5 or tuple(history.shape[:2]) + tuple(history.shape[3:]) != (b, shape[1], h, w) or not (
            0 < history.shape[2] < t
        ):
            raise ValueError(
                f"history has shape {tuple(history.shape)}; need (B, 16, T_h, h, w) = ({b}, {shape[1]}, T_h, {h}, {w}) "
                f"with 0 < T_h < T = {t} latent frames (2 for the 5-frame overlap of long videos)"
            )
        history = history.to(device=device, dtype=torch.float32)
    t_h = 0 if history is None else history.shape[2]
    hist_mask = history_mask(b, t, True, device, history_frames=t_h)

    def clean_history(z: torch.Tensor) -> torch.Tensor:
        # The history frames are known: they replace whatever the noise or the solver put there.
        return z if history is None else torch.cat([history, z[:, :, t_h:]], dim=2)

    x = clean_history(x)
    cond = cond.to(device, dtype)
    # Packed once: only the noisy video changes between steps, so the RoPE factors are reused.
    packed = pack_inputs(x, hist_mask, cond, config.head_dim, config.patch_size, theta=config.rope_theta)
    text, clip_tokens = cond.text, cond.clip_tokens
    negative = None if not use_cfg else negative_text.to(device=device, dtype=dtype).expand_as(text)

    timesteps = set_schedule(scheduler, num_inference_steps, device)
    for i, t_step in enumerate(tqdm(timesteps, desc=progress_desc, disable=not progress, leave=False)):
        x = clean_history(x)
        inputs = packed.with_video(with_mask_channels(x, hist_mask).to(dtype)).as_kwargs()
        timestep = t_step.to(device=device, dtype=torch.float32).expand(b)  # (B,) in [0, 1000]
        velocity = transformer(**inputs, timestep=timestep, context=text, clip_tokens=clip_tokens).float()
        if use_cfg:
            uncond = transformer(**inputs, timestep=timestep, context=negative, clip_tokens=clip_tokens).float()
            velocity = uncond + guidance_scale * (velocity - uncond)
        x = scheduler.step(velocity, t_step, x, return_dict=False)[0]
        x = clean_history(x.float())
        if callback is not None:
            callback(i, t_step, x)
    return x
