"""The denoising loop on already-encoded conditioning, shared by inference and validation during training.

:func:`sample_latents` takes latent-space conditioning (a :class:`SamplingConditioning`, which a training
``MotionBatch`` converts to with :meth:`SamplingConditioning.from_batch`) and a diffusers flow-matching
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
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from scail2.conditioning.packing import pack_inputs, with_mask_channels
from scail2.data.batch import MODES
from scail2.pipeline.schedulers import check_flow_scheduler, set_schedule

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass
class SamplingConditioning:
    """Latent-space conditioning of a batch of B videos of T latent frames on an h x w latent grid."""

    reference: torch.Tensor  # (B, 16, 1, h, w) VAE latent of the reference image
    reference_mask: torch.Tensor  # (B, 28, 1, h, w) packed colour mask of the reference image
    driving: torch.Tensor  # (B, 16, T, h/2, w/2) VAE latent of the half-resolution driving video
    driving_mask: torch.Tensor  # (B, 28, T, h/2, w/2) packed colour mask of the driving video
    text: torch.Tensor  # (B, L, text_dim) umT5 embedding of the prompt (zero-padded to 512 tokens)
    clip_tokens: torch.Tensor  # (B, N, image_dim) CLIP tokens of the reference image
    modes: list[str]  # per sample: "animation" | "replacement"
    negative_text: torch.Tensor | None = None  # (1 | B, L, text_dim) umT5 of the negative prompt; CFG needs it
    history: torch.Tensor | None = None  # (B, 16, T_h, h, w) clean latents of the first T_h frames
    extra_references: torch.Tensor | None = None  # (B, n, 16, 1, h, w)
    extra_reference_masks: torch.Tensor | None = None  # (B, n, 28, 1, h, w)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        b = self.reference.shape[0]
        if len(self.modes) != b:
            raise ValueError(f"got {len(self.modes)} modes for a batch of {b}")
        bad = sorted({m for m in self.modes if m not in MODES})
        if bad:
            raise ValueError(f"unknown modes {bad}; use one of {MODES}")
        if self.driving.ndim != 5:
            raise ValueError(f"driving has shape {tuple(self.driving.shape)}; need (B, 16, T, h/2, w/2)")
        if self.history is not None:
            t_h, t = self.history.shape[2], self.driving.shape[2]
            if self.history.ndim != 5 or t_h >= t:
                raise ValueError(
                    f"history has shape {tuple(self.history.shape)}; need (B, 16, T_h, h, w) with T_h < T = {t} "
                    "latent frames (2 for the 5-frame overlap of long videos)"
                )

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        """(B, 16, T, h, w) of the video latents to sample."""
        b, c, _, h, w = self.reference.shape
        return b, c, self.driving.shape[2], h, w

    @classmethod
    def from_batch(cls, batch: Any, history: torch.Tensor | None = None) -> "SamplingConditioning":
        """Conditioning of a training ``MotionBatch``; its ``null_text`` (umT5 of "") is the negative prompt.

        ``history`` (B, 16, T_h, h, w), e.g. ``batch.latents[:, :, :2]``, samples with clean history frames.
        """
        return cls(
            reference=batch.reference,
            reference_mask=batch.reference_mask,
            driving=batch.driving,
            driving_mask=batch.driving_mask,
            text=batch.text,
            clip_tokens=batch.clip_tokens,
            modes=list(batch.mode),
            negative_text=batch.null_text,
            history=history,
            extra_references=batch.extra_references,
            extra_reference_masks=batch.extra_reference_masks,
        )


def _param(module: torch.nn.Module) -> torch.Tensor:
    try:
        return next(module.parameters())
    except StopIteration:
        raise ValueError(f"{type(module).__name__} has no parameters to take its device and dtype from") from None


def history_frames_mask(batch: int, frames: int, history_frames: int, device=None) -> torch.Tensor:
    """(B, 1, T, 1, 1) float32: 1 on the first ``history_frames`` latent frames (clean history), else 0."""
    mask = (torch.arange(frames, device=device) < history_frames).to(torch.float32)
    return mask.view(1, 1, frames, 1, 1).expand(batch, 1, frames, 1, 1)


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
    cond: SamplingConditioning,
    scheduler: Any,
    *,
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
        cond: the conditioning; ``cond.negative_text`` is required when ``guidance_scale != 1``.
        scheduler: a flow-matching scheduler from ``make_scheduler`` (its shift is part of its config).
        num_inference_steps: denoising steps (40 in the official sampler).
        guidance_scale: text CFG scale g >= 1 (5 in the official sampler); 1 runs one model pass per step.
        generator: RNG of the initial noise (drawn on the generator's device, CPU by default).
        latents: the initial noise (B, 16, T, h, w) instead of drawing it.
        callback: ``callback(step, timestep, latents)`` after every step, latents (B, 16, T, h, w) float32.
        progress: show a tqdm bar.
    Returns:
        (B, 16, T, h, w) float32 denoised latents on the transformer's device; history frames are exactly
        ``cond.history``.
    """
    if not (math.isfinite(guidance_scale) and guidance_scale >= 1):
        raise ValueError(f"guidance_scale is {guidance_scale}; need a finite number >= 1 (1 = no guidance, 5 by default)")
    use_cfg = guidance_scale != 1.0
    if use_cfg and cond.negative_text is None:
        raise ValueError(
            f"guidance_scale {guidance_scale} needs cond.negative_text (umT5 of the negative prompt, \"\" by "
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

    history = None if cond.history is None else cond.history.to(device=device, dtype=torch.float32)
    t_h = 0 if history is None else history.shape[2]
    if history is not None and tuple(history.shape) != (b, shape[1], t_h, h, w):
        raise ValueError(f"history has shape {tuple(history.shape)}; expected {(b, shape[1], t_h, h, w)}")
    hist_mask = history_frames_mask(b, t, t_h, device)

    def clean_history(z: torch.Tensor) -> torch.Tensor:
        # The history frames are known: they replace whatever the noise or the solver put there.
        return z if history is None else torch.cat([history, z[:, :, t_h:]], dim=2)

    def model_dtype(z: torch.Tensor | None) -> torch.Tensor | None:
        return None if z is None else z.to(device=device, dtype=dtype)

    x = clean_history(x)
    # Packed once: only the noisy video changes between steps, so the RoPE factors are reused.
    packed = pack_inputs(
        x,
        hist_mask,
        model_dtype(cond.reference),
        model_dtype(cond.reference_mask),
        model_dtype(cond.driving),
        model_dtype(cond.driving_mask),
        list(cond.modes),
        config.head_dim,
        config.patch_size,
        extra_references=model_dtype(cond.extra_references),
        extra_reference_masks=model_dtype(cond.extra_reference_masks),
        theta=config.rope_theta,
    )
    text = model_dtype(cond.text)
    negative = None if not use_cfg else model_dtype(cond.negative_text).expand_as(text)
    clip_tokens = model_dtype(cond.clip_tokens)

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
