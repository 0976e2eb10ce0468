"""The floating-point dtypes scail2 takes by name, in one place.

Configs name them as torch does (``float32``, ``bfloat16``, ``float16``: `DTYPES`); the command lines take the
short names (``fp32``, ``bf16``, ``fp16``: `SHORT_DTYPES`). `HALF_DTYPES` are the 16-bit ones (a frozen
backbone stored in half precision).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch

DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
)
HALF_DTYPES: Mapping[str, torch.dtype] = MappingProxyType({k: DTYPES[k] for k in ("bfloat16", "float16")})
SHORT_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
)
