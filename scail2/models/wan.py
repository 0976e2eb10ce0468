"""The Wan2.1 diffusion transformer, built from plain blocks.

Module and parameter names follow the original Wan2.1 release (``self_attn.q``, ``ffn.0``, ``modulation``,
``head.head`` ...), so original and SCAIL-2 checkpoints load without renaming; diffusers checkpoints are
renamed by ``scail2.models.convert``.

Blocks take plain numbers and tensors; only :class:`WanModel` takes a :class:`TransformerConfig`.
The code is single-device: activation checkpointing, compilation, sequence parallelism and sharding are
applied from outside by `scail2.models.parallelize.parallelize`, which leaves every parameter name unchanged.

Floating inputs are cast to the dtype of the layer that takes them (so a model with bf16 parameters, e.g.
under FSDP2 mixed precision, takes float32 inputs); timesteps and RoPE factors stay float32, and norms,
modulation and RoPE are computed in float32 whatever the parameter dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from .attention import DEFAULT_BACKEND, attention
from .config import TransformerConfig
from .rope import apply_rope, grid_positions, rope_frequencies


class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in float32 (Wan's ``WanRMSNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (affine weights too, whatever dtype they are stored in), returned in the
    input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class _Projections(nn.Module):
    """q, k, v, o projections with RMSNorm on q and k over all heads together (not per head), as in Wan2.1."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        # The kernel (scail2.models.attention.BACKENDS); set from outside with set_attention_backend.
        self.attention_backend = DEFAULT_BACKEND

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))  # (B, L, dim) -> (B, L, H, D)


class SelfAttention(_Projections):
    def qkv(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries and keys and the values of tokens ``x`` (B, L, dim): each (B, L, H, D)."""
        q = self._heads(self.norm_q(self.q(x)))
        k = self._heads(self.norm_k(self.k(x)))
        return apply_rope(q, rope), apply_rope(k, rope), self._heads(self.v(x))

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x, rope)
        out = attention(q, k, v, self.attention_backend)  # (B, L, H, D)
        return self.o(out.flatten(2))


class CrossAttention(_Projections):
    """Cross-attention from video tokens to the text tokens."""

    def attend_text(self, q: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        k = self._heads(self.norm_k(self.k(context)))
        v = self._heads(self.v(context))
        return attention(q, k, v, self.attention_backend).flatten(2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_img: torch.Tensor | None) -> torch.Tensor:
        if context_img is not None:
            raise ValueError("this model has no CLIP image branch (image_dim=None) but got image tokens")
        q = self._heads(self.norm_q(self.q(x)))
        return self.o(self.attend_text(q, context))


class ImageCrossAttention(CrossAttention):
    """Cross-attention over text tokens plus the CLIP image tokens, with separate k/v for the image (I2V)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__(dim, num_heads, qk_norm, eps)
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_k_img = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_img: torch.Tensor | None) -> torch.Tensor:
        if context_img is None:
            raise ValueError("this model has a CLIP image branch: pass clip_tokens (B, 257, image_dim)")
        q = self._heads(self.norm_q(self.q(x)))
        k_img = self._heads(self.norm_k_img(self.k_img(context_img)))
        v_img = self._heads(self.v_img(context_img))
        img = attention(q, k_img, v_img, self.attention_backend).flatten(2)
        return self.o(self.attend_text(q, context) + img)


class WanBlock(nn.Module):
    """One DiT block: adaLN-modulated self-attention and FFN, un-modulated cross-attention."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        image_branch: bool,
        qk_norm: bool = True,
        cross_attn_norm: bool = True,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, num_heads, qk_norm, eps)
        self.norm3 = LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        cross = ImageCrossAttention if image_branch else CrossAttention
        self.cross_attn = cross(dim, num_heads, qk_norm, eps)
        self.norm2 = LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        # Learned offsets of the 6 adaLN vectors (shift, scale, gate for attention and FFN).
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,  # (B, L, dim)
        e: torch.Tensor,  # (B, 6, dim) float32 projected time embedding
        context: torch.Tensor,  # (B, L_txt, dim)
        context_img: torch.Tensor | None,  # (B, L_img, dim)
        rope: torch.Tensor,  # (B | 1, L, head_dim / 2, 2)
    ) -> torch.Tensor:
        shift, scale, gate, c_shift, c_scale, c_gate = (self.modulation.float() + e).chunk(6, dim=1)
        h = (self.norm1(x).float() * (1 + scale) + shift).type_as(x)
        x = (x.float() + self.self_attn(h, rope).float() * gate).type_as(x)
        x = x + self.cross_attn(self.norm3(x), context, context_img)
        h = (self.norm2(x).float() * (1 + c_scale) + c_shift).type_as(x)
        return (x.float() + self.ffn(h).float() * c_gate).type_as(x)


class Head(nn.Module):
    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float = 1e-6):
        super().__init__()
        self.norm = LayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_dim * math.prod(patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x: (B, L, dim); e: (B, dim) float32 time embedding (before the 6-way projection)."""
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
        return self.head((self.norm(x).float() * (1 + scale) + shift).type_as(x))


class ImageProjection(nn.Module):
    """CLIP tokens -> model width (Wan's ``img_emb``: LayerNorm, Linear, GELU, Linear, LayerNorm)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim), LayerNorm(out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def sinusoidal_embedding(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) timesteps in [0, 1000] -> (B, dim) float32 ``[cos, sin]`` features, computed in float64."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timestep.device) / half)
    args = timestep.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()


class WanModel(nn.Module):
    """Wan2.1 DiT on a latent video: ``model(x, timestep, context, clip_tokens)``.

    x: (B, in_channels, T, H, W) latent video; timestep: (B,) in [0, 1000]; context: (B, L_txt, text_dim)
    (umT5, zero-padded to 512 tokens); clip_tokens: (B, 257, image_dim) when the model has the I2V image
    branch. Returns (B, out_channels, T, H, W).
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        c = config
        self.patch_embedding = nn.Conv3d(c.in_channels, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"), nn.Linear(c.dim, c.dim))
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim))
        image_branch = c.image_dim is not None
        self.blocks = nn.ModuleList(
            WanBlock(c.dim, c.ffn_dim, c.num_heads, image_branch, c.qk_norm, c.cross_attn_norm, c.eps)
            for _ in range(c.num_layers)
        )
        self.head = Head(c.dim, c.out_channels, c.patch_size, c.eps)
        if image_branch:
            self.img_emb = ImageProjection(c.image_dim, c.dim)
        self.init_weights()

    # ------------------------------------------------------------------ initialisation
    def init_weights(self) -> None:
        """Wan2.1's initialisation: Xavier linears, zero biases, normal(0.02) embeddings, zero output head."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self._init_patch_conv(self.patch_embedding)
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    @staticmethod
    def _init_patch_conv(conv: nn.Conv3d) -> None:
        nn.init.xavier_uniform_(conv.weight.flatten(1))
        nn.init.zeros_(conv.bias)

    # ------------------------------------------------------------------ building blocks of forward
    def embed_time(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) -> e (B, dim) for the head and e0 (B, 6, dim) for the blocks, both float32."""
        if timestep.ndim != 1:
            raise ValueError(f"timestep must have shape (B,), got {tuple(timestep.shape)}")
        w = self.time_embedding[0].weight
        e = self.time_embedding(sinusoidal_embedding(timestep, self.config.freq_dim).to(w.dtype)).float()
        e0 = self.time_projection(e.to(w.dtype)).float().unflatten(1, (6, self.config.dim))
        return e, e0

    def embed_context(
        self, context: torch.Tensor, clip_tokens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if context.ndim != 3 or context.shape[-1] != self.config.text_dim:
            raise ValueError(
                f"context must have shape (B, L, {self.config.text_dim}) (umT5 embeddings), got {tuple(context.shape)}"
            )
        ctx = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))
        if self.config.image_dim is None:
            if clip_tokens is not None:
                raise ValueError("this model has no CLIP image branch (image_dim=None); do not pass clip_tokens")
            return ctx, None
        if clip_tokens is None:
            raise ValueError(
                f"this model needs CLIP image tokens: pass clip_tokens of shape (B, 257, {self.config.image_dim})"
            )
        if clip_tokens.ndim != 3 or clip_tokens.shape[-1] != self.config.image_dim:
            raise ValueError(
                f"clip_tokens must have shape (B, 257, {self.config.image_dim}), got {tuple(clip_tokens.shape)}"
            )
        return ctx, self.img_emb(clip_tokens.to(self.img_emb.proj[1].weight.dtype))

    def run_blocks(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        context: torch.Tensor,
        context_img: torch.Tensor | None,
        rope: torch.Tensor,
    ) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, e0, context, context_img, rope)
        return x

    def run_sequence(
        self,
        x: torch.Tensor,  # (B, L, dim) the packed token sequence
        e: torch.Tensor,  # (B, dim) float32 time embedding
        e0: torch.Tensor,  # (B, 6, dim) float32 projected time embedding
        context: torch.Tensor,
        context_img: torch.Tensor | None,
        rope: torch.Tensor,  # (B | 1, L, head_dim / 2, 2)
        keep: slice,
    ) -> torch.Tensor:
        """The blocks over the whole sequence, then the output head on the tokens ``keep``:
        (B, len(keep), out_channels * prod(patch_size)).

        This is the part a sequence-parallel model runs on a shard of the sequence
        (`scail2.models.sequence_parallel`); everything before (embeddings) and after (unpatchify) is per token.
        """
        x = self.run_blocks(x, e0, context, context_img, rope)
        return self.head(x[:, keep], e)

    def patchify(self, conv: nn.Conv3d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(B, C, T, H, W) -> tokens (B, t*h*w, dim) in (t, h, w) raster order, and the grid (t, h, w)."""
        pt, ph, pw = self.config.patch_size
        _, _, t, h, w = x.shape
        if t % pt or h % ph or w % pw:
            raise ValueError(f"latent size (T={t}, H={h}, W={w}) is not divisible by the patch size {self.config.patch_size}")
        y = conv(x.to(conv.weight.dtype))  # (B, dim, t', h', w')
        return y.flatten(2).transpose(1, 2), tuple(y.shape[2:])

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, t*h*w, C*pt*ph*pw) -> (B, C, t*pt, h*ph, w*pw)."""
        pt, ph, pw = self.config.patch_size
        f, h, w = grid
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, f, pt, h, ph, w, pw)
        return x.reshape(x.shape[0], x.shape[1], f * pt, h * ph, w * pw)

    def grid_rope(self, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        """RoPE factors of a plain video grid starting at position (0, 0, 0): (1, L, head_dim / 2, 2)."""
        pos = grid_positions(*grid, device=device)
        return rope_frequencies(pos, self.config.head_dim, self.config.rope_theta)[None]

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        clip_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"x must have shape (B, {self.config.in_channels}, T, H, W), got {tuple(x.shape)}"
            )
        tokens, grid = self.patchify(self.patch_embedding, x)
        e, e0 = self.embed_time(timestep)
        ctx, ctx_img = self.embed_context(context, clip_tokens)
        out = self.run_sequence(tokens, e, e0, ctx, ctx_img, self.grid_rope(grid, x.device), slice(None))
        return self.unpatchify(out, grid)

    # ------------------------------------------------------------------ accounting
    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_forward(
        self,
        num_tokens: int,
        text_len: int = 512,
        image_len: int = 257,
        batch: int = 1,
        head_tokens: int | None = None,
        mask_tokens: int = 0,
    ) -> float:
        """Matmul FLOPs (2 per multiply-add) of one forward pass over a sequence of ``num_tokens`` tokens.

        Counts every linear layer and convolution (blocks, embeddings, head) and the attention products
        (scores and weighted values); norms and elementwise work are not counted. ``head_tokens`` is the
        number of tokens the output head runs on (all by default) and ``mask_tokens`` those that go through a
        mask embedding. A training step (forward + backward) is about 3x this, 4x with full activation
        checkpointing.
        """
        c = self.config
        d, L = c.dim, num_tokens
        img = image_len if c.image_dim is not None else 0
        patch = math.prod(c.patch_size)
        per_block = (
            4 * L * d * d  # self-attention q, k, v, o
            + 2 * L * L * d  # scores and weighted values
            + 2 * L * d * d  # cross-attention q, o
            + 2 * (text_len + img) * d * d  # cross-attention k, v (text and image)
            + 2 * L * (text_len + img) * d  # cross-attention scores and values
            + 2 * L * d * c.ffn_dim  # FFN
        )
        embed = L * d * c.in_channels * patch + mask_tokens * d * c.mask_channels * patch
        embed += text_len * (c.text_dim * d + d * d) + c.freq_dim * d + d * d + 6 * d * d
        if c.image_dim is not None:
            embed += img * (c.image_dim * c.image_dim + c.image_dim * d)
        head = (L if head_tokens is None else head_tokens) * d * c.out_channels * patch
        return 2.0 * batch * (c.num_layers * per_block + embed + head)
