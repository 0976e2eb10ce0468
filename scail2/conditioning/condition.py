"""The conditioning record: everything SCAIL-2 is conditioned on, in latent space, for a batch of videos.

One type serves every stage that handles conditioning: the training batches carry it (`MotionBatch.cond`),
the packing turns it into the model's in-context inputs (`scail2.conditioning.packing.pack_inputs`), the
sampler denoises under it (`scail2.pipeline.sampling.sample_latents`), the pipeline builds it from pixels
(`scail2.conditioning.encode.encode_condition`, which the latent cache uses too) and DPO repeats it for the
winner and the loser (`Condition.repeat`).

Shapes: B = batch, T = latent frames, h x w = latent grid of the video (pixels / 8); the driving video is
encoded at half resolution, so its grid is h/2 x w/2; n = extra reference images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch

Mode = Literal["animation", "replacement"]
MODES: tuple[str, ...] = ("animation", "replacement")

_TENSORS = (
    "reference",
    "reference_mask",
    "driving",
    "driving_mask",
    "text",
    "clip_tokens",
    "extra_references",
    "extra_reference_masks",
)


def check_mode(mode: str, what: str = "mode") -> str:
    """Raise unless ``mode`` is one of `MODES`; return it."""
    if mode not in MODES:
        raise ValueError(f"unknown {what} {mode!r}; use one of {MODES}")
    return mode


@dataclass
class Condition:
    """Latent-space conditioning of B videos of T latent frames on an h x w latent grid."""

    reference: torch.Tensor  # (B, 16, 1, h, w) VAE latent of the reference image
    reference_mask: torch.Tensor  # (B, 28, 1, h, w) packed colour mask of the reference image
    driving: torch.Tensor  # (B, 16, T, h/2, w/2) VAE latent of the half-resolution driving video
    driving_mask: torch.Tensor  # (B, 28, T, h/2, w/2) packed colour mask of the driving video
    text: torch.Tensor  # (B, L, text_dim) umT5 embedding of the caption (zero-padded to 512 tokens)
    clip_tokens: torch.Tensor  # (B, N, image_dim) CLIP tokens of the reference image
    modes: list[str]  # per sample: "animation" | "replacement"
    extra_references: torch.Tensor | None = None  # (B, n, 16, 1, h, w) further reference images
    extra_reference_masks: torch.Tensor | None = None  # (B, n, 28, 1, h, w) their packed colour masks

    def __post_init__(self) -> None:
        self.modes = list(self.modes)
        b = self.reference.shape[0] if self.reference.ndim else 0
        if len(self.modes) != b:
            raise ValueError(f"got {len(self.modes)} modes for a batch of {b}")
        bad = sorted({m for m in self.modes if m not in MODES})
        if bad:
            raise ValueError(f"unknown modes {bad}; use one of {MODES}")
        if (self.extra_references is None) != (self.extra_reference_masks is None):
            given = "extra_references" if self.extra_references is not None else "extra_reference_masks"
            raise ValueError(f"{given} is given without its partner; extra references need their masks (both or neither)")
        for name in _TENSORS:
            x = getattr(self, name)
            if x is not None and (x.ndim == 0 or x.shape[0] != b):
                raise ValueError(
                    f"Condition.{name} has shape {tuple(x.shape)}; every field needs the batch size {b} "
                    "(of reference) as its first dim"
                )
        if self.driving.ndim != 5:
            raise ValueError(f"driving has shape {tuple(self.driving.shape)}; need (B, 16, T, h/2, w/2)")
        if self.extra_references is not None and self.extra_references.shape[:2] != self.extra_reference_masks.shape[:2]:
            raise ValueError(
                f"extra_references {tuple(self.extra_references.shape)} and extra_reference_masks "
                f"{tuple(self.extra_reference_masks.shape)} differ in (B, n)"
            )

    @property
    def batch_size(self) -> int:
        return self.reference.shape[0]

    @property
    def num_extra_references(self) -> int:
        return 0 if self.extra_references is None else self.extra_references.shape[1]

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        """(B, 16, T, h, w) of the video latents this conditions."""
        b, c, _, h, w = self.reference.shape
        return b, c, self.driving.shape[2], h, w

    def _map(self, fn) -> dict[str, torch.Tensor | None]:
        return {name: None if getattr(self, name) is None else fn(getattr(self, name)) for name in _TENSORS}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Condition":
        """Every tensor on ``device``, floating tensors cast to ``dtype`` when given."""

        def move(x: torch.Tensor) -> torch.Tensor:
            if dtype is not None and x.is_floating_point():
                return x.to(device=device, dtype=dtype)
            return x.to(device)

        return replace(self, **self._map(move))

    def repeat(self, times: int) -> "Condition":
        """The batch ``times`` times along the batch dim: samples [0..B) then [0..B) again, modes likewise (the
        winner and loser of a preference pair share one condition)."""
        if times < 1:
            raise ValueError(f"repeat({times}); need at least 1")
        return replace(self, **self._map(lambda x: torch.cat([x] * times)), modes=self.modes * times)

    def select(self, index: int | slice | Sequence[int] | torch.Tensor) -> "Condition":
        """The samples at ``index`` (an int, a slice, a list of ints, or a 1-D integer or bool tensor), keeping the
        batch dim: ``cond.select(0)`` is a batch of one."""
        b = self.batch_size
        if isinstance(index, int):
            rows = [range(b)[index]]
        elif isinstance(index, slice):
            rows = list(range(b)[index])
        elif isinstance(index, torch.Tensor):
            if index.ndim != 1:
                raise ValueError(f"select takes a 1-D index tensor; got shape {tuple(index.shape)}")
            if index.dtype == torch.bool:
                if index.numel() != b:
                    raise ValueError(f"a bool index of {index.numel()} entries for a batch of {b}")
                index = index.nonzero().flatten()
            rows = [range(b)[i] for i in index.tolist()]
        else:
            rows = [range(b)[int(i)] for i in index]
        picked = torch.tensor(rows, dtype=torch.long)
        return replace(
            self,
            **self._map(lambda x: x.index_select(0, picked.to(x.device))),
            modes=[self.modes[i] for i in rows],
        )

    def __eq__(self, other: object) -> bool:  # tensors compare by value
        if not isinstance(other, Condition):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
                    return False
            elif a != b:
                return False
        return True
