"""Small builders for tests, benchmarks and examples: random tiny models and matching inputs.

Nothing here is used by training or inference code.
"""

from __future__ import annotations

import torch

from scail2.conditioning.condition import Condition
from scail2.conditioning.packing import SCAIL2Inputs, history_mask, pack_inputs
from scail2.models.config import TransformerConfig
from scail2.models.wan import WanModel


@torch.no_grad()
def randomize_(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter so that no path is zero (the output head starts at zero otherwise)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g).to(p) * std)
    return model


def random_condition(
    config: TransformerConfig,
    batch: int = 2,
    frames: int = 3,
    height: int = 8,
    width: int = 8,
    modes: list[str] | None = None,
    num_extra_refs: int = 0,
    text_len: int = 7,
    image_len: int = 5,
    generator: torch.Generator | None = None,
) -> Condition:
    """A random `Condition` for a latent video of ``frames`` x ``height`` x ``width`` (latent units)."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    b, t, h, w, n = batch, frames, height, width, num_extra_refs

    def rn(*shape):
        return torch.randn(*shape, generator=g)

    def rm(*shape):
        return torch.rand(*shape, generator=g)

    reference, reference_mask = rn(b, 16, 1, h, w), rm(b, 28, 1, h, w)
    driving, driving_mask = rn(b, 16, t, h // 2, w // 2), rm(b, 28, t, h // 2, w // 2)
    extra = rn(b, n, 16, 1, h, w) if n else None
    extra_masks = rm(b, n, 28, 1, h, w) if n else None
    return Condition(
        reference=reference,
        reference_mask=reference_mask,
        driving=driving,
        driving_mask=driving_mask,
        text=rn(b, text_len, config.text_dim),
        clip_tokens=rn(b, image_len, config.image_dim),
        modes=modes or ["animation"] * b,
        extra_references=extra,
        extra_reference_masks=extra_masks,
    )


def random_scail2_batch(
    config: TransformerConfig,
    batch: int = 2,
    frames: int = 3,
    height: int = 8,
    width: int = 8,
    modes: list[str] | None = None,
    num_extra_refs: int = 0,
    text_len: int = 7,
    image_len: int = 5,
    history: bool | list[bool] = False,
    seed: int = 0,
) -> tuple[SCAIL2Inputs, dict[str, torch.Tensor]]:
    """Packed inputs for a latent video of ``frames`` x ``height`` x ``width`` (latent units) and the
    remaining forward arguments (timestep, context, clip_tokens)."""
    g = torch.Generator().manual_seed(seed)
    b, t = batch, frames
    noisy = torch.randn(b, 16, t, height, width, generator=g)
    cond = random_condition(config, batch, frames, height, width, modes, num_extra_refs, text_len, image_len, g)
    keep = torch.tensor(history if isinstance(history, list) else [history] * b)
    inputs = pack_inputs(noisy, history_mask(b, t, keep), cond, config.head_dim, config.patch_size, theta=config.rope_theta)
    kwargs = {"timestep": torch.rand(b, generator=g) * 1000, "context": cond.text, "clip_tokens": cond.clip_tokens}
    return inputs, kwargs


def tiny_wan(config: TransformerConfig, seed: int = 0) -> WanModel:
    torch.manual_seed(seed)
    from scail2.models.loading import build_model

    return randomize_(build_model(config), seed=seed)
