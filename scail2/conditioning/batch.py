"""The training batches: a `Condition` plus the target and what the objectives need besides it.

The data layer (raw-video path or latent cache) produces a `MotionBatch`; the objective noises ``latents`` and
hands ``cond`` to `scail2.conditioning.packing.pack_inputs`, which builds the model's in-context inputs. DPO
reads a `PreferenceBatch`, whose winner carries the condition both videos share. Shapes as in
`scail2.conditioning.condition`: B = batch, T = latent frames (``(frames - 1) // 4 + 1``), h x w = latent grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from scail2.conditioning.condition import Condition


@dataclass
class MotionBatch:
    latents: torch.Tensor  # (B, 16, T, h, w) target-video latents x0 (VAE-normalised)
    cond: Condition  # reference, masks, driving, text, CLIP tokens, modes, extra references
    source: list[str]  # per sample: manifest source name (scail_animation, pose, ...)
    history_allowed: torch.Tensor  # (B,) bool: the clip may keep its first 2 latent frames clean
    null_text: torch.Tensor | None = None  # (1 | B, L_txt, text_dim) umT5 of "" for text dropout
    hand_mask: torch.Tensor | None = None  # (B, 1, T, h, w) coverage of hand regions on the latent grid
    face_mask: torch.Tensor | None = None  # (B, 1, T, h, w)
    ocr_mask: torch.Tensor | None = None  # (B, 1, T, h, w) text/OCR regions, excluded from the loss
    end_to_end: torch.Tensor | None = None  # (B,) bool: raw driving video (True) or rendered pose (False)
    meta: dict = field(default_factory=dict)  # free-form, not moved to devices (ids, skip counters, ...)

    def __post_init__(self) -> None:
        b = self.latents.shape[0]
        if not isinstance(self.cond, Condition):
            raise TypeError(f"MotionBatch.cond is a {type(self.cond).__name__}; need a Condition")
        if self.cond.batch_size != b:
            raise ValueError(f"MotionBatch.cond has a batch of {self.cond.batch_size} for {b} latents")
        if len(self.source) != b:
            raise ValueError(f"MotionBatch.source has {len(self.source)} entries for a batch of {b}")

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "MotionBatch":
        """Move every tensor to ``device``; floating tensors are cast to ``dtype`` when given."""

        def move(x):
            if not isinstance(x, torch.Tensor):
                return x
            if dtype is not None and x.is_floating_point():
                return x.to(device=device, dtype=dtype)
            return x.to(device)

        moved = {f.name: move(getattr(self, f.name)) for f in fields(self) if f.name not in ("meta", "cond")}
        return replace(self, cond=self.cond.to(device, dtype), **moved)


@dataclass
class PreferenceBatch:
    """A batch of preference pairs for Bias-Aware DPO (SPEC §7).

    ``winner.cond`` is the condition both videos share (reference frame latent and mask, driving latent and mask,
    text, CLIP tokens, modes) and ``winner.latents`` the preferred video; its ``hand_mask`` marks the winner's
    hand regions on the latent grid. The dispreferred video is ``loser_latents`` with ``loser_hand_mask``.
    """

    winner: MotionBatch
    loser_latents: torch.Tensor  # (B, 16, T, h, w)
    loser_hand_mask: torch.Tensor | None = None  # (B, 1, T, h, w)

    def __post_init__(self) -> None:
        if self.loser_latents.shape != self.winner.latents.shape:
            raise ValueError(
                f"loser latents {tuple(self.loser_latents.shape)} differ from winner latents "
                f"{tuple(self.winner.latents.shape)}: a pair must share clip length and resolution"
            )

    @property
    def batch_size(self) -> int:
        return self.winner.batch_size

    def hand_union(self) -> torch.Tensor:
        """(B, 1, T, h, w) union of both samples' hand regions (elementwise max of the coverages)."""
        masks = [m for m in (self.winner.hand_mask, self.loser_hand_mask) if m is not None]
        if not masks:
            raise ValueError("Bias-Aware DPO needs hand masks: set winner.hand_mask and/or loser_hand_mask")
        return torch.stack([m.float() for m in masks]).amax(0)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "PreferenceBatch":
        move = (lambda x: x.to(device=device, dtype=dtype)) if dtype is not None else (lambda x: x.to(device))
        return PreferenceBatch(
            self.winner.to(device, dtype),
            move(self.loser_latents),
            None if self.loser_hand_mask is None else move(self.loser_hand_mask),
        )
