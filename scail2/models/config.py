"""Transformer geometry: one dataclass for the Wan2.1 backbone and the SCAIL-2 model, plus size presets.

Only the top-level model takes a config; blocks take plain numbers (see ``wan.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Names of the model classes a saved ``config.json`` may declare (``"_class_name"``).
WAN_CLASS = "WanModel"
SCAIL2_CLASS = "SCAIL2Transformer"


@dataclass(frozen=True)
class TransformerConfig:
    """Geometry of a Wan2.1 DiT (and of SCAIL-2, which adds the pose and mask patch embeddings).

    ``in_channels`` is 16 for text-to-video, 36 for Wan2.1-I2V (latent + 4 mask + 16 image channels) and 20
    for SCAIL-2 (latent + 4 history-mask channels). ``image_dim`` None means no CLIP branch (T2V).
    """

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    freq_dim: int = 256
    image_dim: int | None = 1280
    eps: float = 1e-6
    cross_attn_norm: bool = True
    qk_norm: bool = True
    rope_theta: float = 10000.0
    # SCAIL-2 only: channels of the packed colour mask (7 colours x 4 sub-frames); 0 = plain Wan model.
    mask_channels: int = 0

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        head_dim = self.dim // self.num_heads
        if head_dim % 2 or (head_dim // 6) < 1:
            raise ValueError(f"head_dim {head_dim} must be even and at least 6 for the 3-D RoPE split")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size {self.patch_size} must have 3 entries (t, h, w)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def is_scail2(self) -> bool:
        return self.mask_channels > 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TransformerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in known and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unknown transformer config keys {unknown}; known keys are {sorted(known)}")
        return cls(**{k: (tuple(v) if k == "patch_size" else v) for k, v in d.items() if k in known})

    def replace(self, **changes: Any) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)


# Size presets (SPEC §1). ``tiny`` is for tests and the CPU demo; its text/image dims match the tiny encoders.
_PRESETS: dict[str, dict[str, Any]] = {
    "wan2.1-14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "wan2.1-1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "tiny": dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, image_dim=32, freq_dim=32),
}
PRESETS: tuple[str, ...] = tuple(_PRESETS)

SCAIL2_IN_CHANNELS = 20  # 16 latent + 4 history-mask channels
SCAIL2_MASK_CHANNELS = 28  # 7 colour channels x 4 packed sub-frames


def wan_config(preset: str, **overrides: Any) -> TransformerConfig:
    """A plain Wan2.1 geometry (I2V-style CLIP branch on by default; ``image_dim=None`` for T2V)."""
    if preset not in _PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(_PRESETS)}")
    return TransformerConfig(**{**_PRESETS[preset], **overrides})


def scail2_config(preset: str, **overrides: Any) -> TransformerConfig:
    """The SCAIL-2 geometry of a size preset: 20-channel patch embedding, 28-channel mask embedding, CLIP branch
    required. ``overrides`` replace single `TransformerConfig` fields of the preset (``num_layers=4``); an override
    of None keeps the preset's value (what the ``model`` config group's unset fields mean)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = wan_config(preset, **{"in_channels": SCAIL2_IN_CHANNELS, "mask_channels": SCAIL2_MASK_CHANNELS, **given})
    if cfg.image_dim is None:
        raise ValueError("SCAIL-2 needs the CLIP image branch: image_dim must not be None")
    return cfg
