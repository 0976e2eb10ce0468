"""SCAIL-2: the Wan2.1 backbone with the driving video and the colour masks in context (SPEC §2).

The sequence is ``[extra refs][reference][video][driving]``. Reference and video frames share the 20-channel
``patch_embedding`` (16 latent + 4 mask channels); the half-resolution driving frames have their own
``patch_embedding_pose``; one 28-channel ``patch_embedding_mask`` embeds the reference and driving colour
masks and is added in token space. Video tokens get the mask embedding of an all-zero mask, i.e. its bias.
Only the video tokens go through the output head.

The model takes packed tensors and RoPE factors from ``scail2.conditioning.packing.pack_inputs``; it never
sees modes, pixels or strings.

Initialisation (adaLN-Zero style): ``patch_embedding_mask``, the only path SCAIL-2 adds to the token embeddings,
starts at zero (weight and bias), so a freshly built model does not depend on the colour masks and a backbone
loaded into it computes exactly what it computed before. ``patch_embedding_pose`` is not an added path but the
embedding of the driving tokens themselves (zero weights would make every driving token the same vector); it is
initialised like ``patch_embedding`` (and copied from it by ``scail2_from_wan_i2v``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import TransformerConfig
from .wan import WanModel


class SCAIL2Transformer(WanModel):
    def __init__(self, config: TransformerConfig):
        if not config.is_scail2:
            raise ValueError("SCAIL2Transformer needs a SCAIL-2 config (mask_channels > 0): use scail2_config(preset)")
        if config.image_dim is None:
            raise ValueError("SCAIL2Transformer needs the CLIP image branch (image_dim)")
        super().__init__(config)
        c = config
        self.patch_embedding_pose = nn.Conv3d(c.in_channels, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.patch_embedding_mask = nn.Conv3d(c.mask_channels, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self._init_patch_conv(self.patch_embedding_pose)
        nn.init.zeros_(self.patch_embedding_mask.weight)  # a new added path starts at zero (see the docstring)
        nn.init.zeros_(self.patch_embedding_mask.bias)

    def forward(  # type: ignore[override]
        self,
        video: torch.Tensor,  # (B, 20, T, h, w) noisy latent + 4 history-mask channels
        reference: torch.Tensor,  # (B, 20, R, h, w) extra refs then the reference, latent + 4 ones
        reference_mask: torch.Tensor,  # (B, 28, R, h, w)
        driving: torch.Tensor,  # (B, 20, T, h/2, w/2) driving latent + 4 ones
        driving_mask: torch.Tensor,  # (B, 28, T, h/2, w/2)
        timestep: torch.Tensor,  # (B,) in [0, 1000]
        context: torch.Tensor,  # (B, L_txt, text_dim)
        clip_tokens: torch.Tensor,  # (B, 257, image_dim)
        rope: torch.Tensor,  # (B | 1, L, head_dim / 2, 2) for the whole sequence
    ) -> torch.Tensor:
        c = self.config
        for name, t, ch in (
            ("video", video, c.in_channels),
            ("reference", reference, c.in_channels),
            ("driving", driving, c.in_channels),
            ("reference_mask", reference_mask, c.mask_channels),
            ("driving_mask", driving_mask, c.mask_channels),
        ):
            if t.ndim != 5 or t.shape[1] != ch:
                raise ValueError(f"{name} must have shape (B, {ch}, frames, h, w), got {tuple(t.shape)}")
        if reference_mask.shape[2:] != reference.shape[2:]:
            raise ValueError(
                f"reference_mask frames/size {tuple(reference_mask.shape[2:])} != reference {tuple(reference.shape[2:])}"
            )
        if driving_mask.shape[2:] != driving.shape[2:]:
            raise ValueError(
                f"driving_mask frames/size {tuple(driving_mask.shape[2:])} != driving {tuple(driving.shape[2:])}"
            )

        # Reference and video frames through the same 20-channel embedding (the time kernel is 1, so one conv
        # over the concatenation equals per-segment convs).
        tokens, grid = self.patchify(self.patch_embedding, torch.cat([reference, video], dim=2))
        n_ref = math.prod(grid[1:]) * reference.shape[2]
        mask_ref, _ = self.patchify(self.patch_embedding_mask, reference_mask)
        # Noisy frames carry an all-zero mask: its embedding is exactly the conv bias.
        mask_bias = self.patch_embedding_mask.bias.view(1, 1, -1)
        tokens = torch.cat([tokens[:, :n_ref] + mask_ref, tokens[:, n_ref:] + mask_bias], dim=1)

        drive, _ = self.patchify(self.patch_embedding_pose, driving)
        drive_mask, _ = self.patchify(self.patch_embedding_mask, driving_mask)
        x = torch.cat([tokens, drive + drive_mask], dim=1)  # (B, L, dim)
        if rope.shape[1] != x.shape[1]:
            raise ValueError(f"rope covers {rope.shape[1]} tokens but the packed sequence has {x.shape[1]}")

        e, e0 = self.embed_time(timestep)
        ctx, ctx_img = self.embed_context(context, clip_tokens)
        video_grid = (video.shape[2] // c.patch_size[0], grid[1], grid[2])
        n_video = math.prod(video_grid)
        out = self.run_sequence(x, e, e0, ctx, ctx_img, rope, slice(n_ref, n_ref + n_video))
        return self.unpatchify(out, video_grid)

    def flops_for_inputs(self, inputs, text_len: int = 512, image_len: int = 257) -> float:
        """FLOPs of one forward on packed ``inputs`` (a ``SCAIL2Inputs``): all tokens through the blocks,
        reference and driving tokens through the mask embedding, video tokens through the head."""
        p = math.prod(self.config.patch_size)
        ref = inputs.reference[0, 0].numel() // p
        video = inputs.video[0, 0].numel() // p
        drive = inputs.driving[0, 0].numel() // p
        return self.flops_per_forward(
            ref + video + drive, text_len, image_len, batch=inputs.video.shape[0], head_tokens=video, mask_tokens=ref + drive
        )
