"""8-bit pixels and the [-1, 1] range: the one mapping between them.

Every encoder and mask function takes pixels as floats in [-1, 1] (``x / 127.5 - 1`` of an 8-bit value); decoded
videos go back to 8 bits with the inverse, rounded and clamped. Thresholds written as 8-bit levels (the mask
rule's 225, the palette check's 64) are converted with :func:`unit_level`, so a level and the pixels it is
compared with go through the same arithmetic.
"""

from __future__ import annotations

import torch


def to_unit(frames: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [-1, 1] (x / 127.5 - 1); float frames (already in [-1, 1]) -> float32. Any layout."""
    return frames.float() / 127.5 - 1.0 if frames.dtype == torch.uint8 else frames.float()


def unit_level(level: float) -> float:
    """An 8-bit level (0..255) in [-1, 1] units, as :func:`to_unit` maps it."""
    return level / 127.5 - 1


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] -> uint8 (round((x + 1) * 127.5), clamped to 0..255). Any layout, same device."""
    return ((frames.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
