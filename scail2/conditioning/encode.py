"""Pixels -> `Condition`: the one path from a reference image, a driving video, their colour masks and a caption
to the latent-space conditioning. The latent cache (`scail2.data.latents.encode_pixel_sample`, training) and
`SCAIL2Pipeline` (inference) both call :func:`encode_condition`, so a model sees the same tensors for the same
pixels whichever way they came.

What each input becomes (SPEC §2-§3):

- reference image -> VAE latent (1 frame) and CLIP tokens; its colour mask -> 28 channels on the full latent
  grid (`reference_mask_to_latent`), passed as given: white pixels light the white channel;
- driving video -> VAE latent of the 0.5x video; its colour mask -> 28 channels on the half-resolution grid
  (`driving_mask_to_latent`);
- caption -> umT5 embeddings, zero-padded to the text length;
- extra reference images -> VAE latents and 28-channel masks, like the reference (no CLIP tokens).

A missing mask means no characters: the mode's background (`background_mask`), i.e. in animation mode an
all-white reference mask and an all-black driving mask, in replacement mode the other way round.

Pixels are (3, H, W) images or (F, 3, H, W) videos at the target size (H, W multiples of 32, F = 4k + 1),
uint8 or float in [-1, 1]; masks have the size of their image or video.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import torch

from scail2.conditioning.condition import Condition, check_mode
from scail2.conditioning.masks import background_mask, driving_mask_to_latent, reference_mask_to_latent
from scail2.conditioning.pixels import to_unit

if TYPE_CHECKING:
    from scail2.encoders.bundle import Encoders

# Runs an encoder where it should run (the pipeline's CPU offload moves it to the accelerator and back).
Placement = Callable[[Any], AbstractContextManager]


def _here(module: Any) -> AbstractContextManager:
    return nullcontext(module)


def _check(x: torch.Tensor, ndim: int, what: str, layout: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != ndim or x.shape[-3] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} has shape {shape}; need {layout} (uint8, or float in [-1, 1])")


@torch.no_grad()
def encode_images(
    encoders: "Encoders",
    images: torch.Tensor,
    masks: torch.Tensor | None,
    mode: str,
    *,
    place: Placement = _here,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference images and their colour masks -> (latents (n, 16, 1, h, w), masks (n, 28, 1, h, w)) float32.

    images / masks: (n, 3, H, W); ``masks=None``: the mode's reference background (no characters). Each image is
    encoded on its own, as a one-frame video.
    """
    _check(images, 4, "reference images", "(n, 3, H, W)")
    n, _, height, width = images.shape
    if masks is None:
        masks = background_mask(mode, True, height, width, frames=n)
    _check(masks, 4, "reference masks", "(n, 3, H, W)")
    if masks.shape[0] != n or masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(
            f"reference masks {tuple(masks.shape)} do not match the images {tuple(images.shape)}: one mask of the "
            "image's size per image"
        )
    with place(encoders.vae) as vae:
        latents = torch.cat([vae.encode(to_unit(image)[None, :, None]) for image in images])
    latent_masks = reference_mask_to_latent(to_unit(masks)[:, None])  # (n, 28, 1, h, w)
    return latents.float().to(device), latent_masks.to(device)


@torch.no_grad()
def encode_driving(
    encoders: "Encoders",
    video: torch.Tensor,
    mask: torch.Tensor | None,
    mode: str,
    *,
    place: Placement = _here,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A driving video and its colour mask -> (latent (1, 16, T, H/16, W/16), mask (1, 28, T, H/16, W/16)) float32.

    video / mask: (F, 3, H, W); ``mask=None``: the mode's driving background (no characters).
    """
    _check(video, 4, "driving video", "(F, 3, H, W)")
    frames, _, height, width = video.shape
    if mask is None:
        mask = background_mask(mode, False, height, width, frames=frames)
    _check(mask, 4, "driving mask", "(F, 3, H, W)")
    if mask.shape != video.shape:
        raise ValueError(
            f"driving mask {tuple(mask.shape)} does not match the driving video {tuple(video.shape)}: "
            "one mask frame of the video's size per frame"
        )
    with place(encoders.vae) as vae:
        latent = vae.encode_driving(to_unit(video).transpose(0, 1)[None])  # (1, 16, T, H/16, W/16)
    return latent.float().to(device), driving_mask_to_latent(to_unit(mask))[None].to(device)


@torch.no_grad()
def encode_caption(
    encoders: "Encoders", caption: str, *, place: Placement = _here, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """umT5 embeddings (1, text_len, text_dim) float32 of one caption (rows past it are zero)."""
    with place(encoders.text) as text:
        return text.encode([caption]).float().to(device)


@torch.no_grad()
def encode_condition(
    encoders: "Encoders",
    *,
    reference: torch.Tensor,
    driving: torch.Tensor,
    caption: str,
    mode: str,
    reference_mask: torch.Tensor | None = None,
    driving_mask: torch.Tensor | None = None,
    extra_references: torch.Tensor | None = None,
    extra_reference_masks: torch.Tensor | None = None,
    place: Placement = _here,
    device: torch.device | str = "cpu",
) -> Condition:
    """The `Condition` (batch of one, float32 on ``device``, default CPU) of one sample's pixels.

    Args:
        encoders: the frozen VAE, umT5 and CLIP encoders (``.vae``, ``.text``, ``.image``, as `Encoders`).
        reference: (3, H, W) reference image; reference_mask: (3, H, W) its colour mask, used as given.
        driving: (F, 3, H, W) driving video at full resolution (halved here); driving_mask: (F, 3, H, W).
        caption: the prompt ("" for none).
        mode: "animation" | "replacement"; decides the backgrounds of missing masks.
        extra_references / extra_reference_masks: (n, 3, H, W) further reference images and their masks
            (masks None: backgrounds); placed before the reference in the sequence.
        place: a context-manager factory each encoder runs inside (CPU offload); default: where it is.
    """
    check_mode(mode)
    _check(reference, 3, "reference image", "(3, H, W)")
    if reference_mask is not None:
        _check(reference_mask, 3, "reference mask", "(3, H, W)")
    if extra_reference_masks is not None and extra_references is None:
        raise ValueError("extra_reference_masks given without extra_references")
    ref_latent, ref_mask = encode_images(
        encoders, reference[None], None if reference_mask is None else reference_mask[None], mode, place=place, device=device
    )
    with place(encoders.image) as image_encoder:
        clip_tokens = image_encoder.encode(to_unit(reference)[None]).float().to(device)  # (1, N, image_dim)
    drive, drive_mask = encode_driving(encoders, driving, driving_mask, mode, place=place, device=device)
    extra = extra_masks = None
    if extra_references is not None:
        extra, extra_masks = encode_images(encoders, extra_references, extra_reference_masks, mode, place=place, device=device)
        extra, extra_masks = extra[None], extra_masks[None]  # (1, n, 16 | 28, 1, h, w)
    return Condition(
        reference=ref_latent,
        reference_mask=ref_mask,
        driving=drive,
        driving_mask=drive_mask,
        text=encode_caption(encoders, caption, place=place, device=device),
        clip_tokens=clip_tokens,
        modes=[mode],
        extra_references=extra,
        extra_reference_masks=extra_masks,
    )
