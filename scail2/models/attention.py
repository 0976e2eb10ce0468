"""The one place where attention is computed, and the choice of its kernel.

Every attention in the network goes through :func:`attention` with a backend name; the model's attention
modules carry the name (``attention_backend``, ``"sdpa"`` unless `scail2.models.parallelize.parallelize` sets
another), so a kernel is chosen by one setting and nothing else changes.

==========  ===========================================================================================
backend     kernel
==========  ===========================================================================================
``sdpa``    ``torch.nn.functional.scaled_dot_product_attention`` (default): on GPU it dispatches to
            flash, memory-efficient or cuDNN kernels; on CPU to its fused CPU kernel
``flash3``  FlashAttention-3 (``flash_attn_interface.flash_attn_func``; Hopper GPUs, bf16/fp16)
``flash2``  FlashAttention-2 (``flash_attn.flash_attn_func``; Ampere or newer, bf16/fp16)
``math``    plain softmax(q k^T / sqrt(d)) v in float32: the reference the others are tested against
==========  ===========================================================================================

All take and return ``(B, L, H, D)`` and attend without a mask (padding is handled by the caller by giving
fewer keys than queries, see `scail2.models.sequence_parallel`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("sdpa", "flash3", "flash2", "math")
DEFAULT_BACKEND = "sdpa"
# backend -> (module, what to install)
_FLASH_MODULES: dict[str, tuple[str, str]] = {
    "flash3": ("flash_attn_interface", "FlashAttention-3 (built from flash-attention/hopper: `python setup.py install`)"),
    "flash2": ("flash_attn", "FlashAttention-2 (`pip install flash-attn --no-build-isolation`)"),
}


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = torch.einsum("blhd,bmhd->bhlm", q.float(), k.float()) / q.shape[-1] ** 0.5  # (B, H, Lq, Lk)
    return torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v.float()).to(q.dtype)


@functools.cache
def _flash(name: str):
    """The FlashAttention kernel of backend ``name`` (imported on first use)."""
    module = importlib.import_module(_FLASH_MODULES[name][0])
    fn = module.flash_attn_func

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.device.type != "cuda" or q.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"attention backend {name} runs on CUDA in bfloat16/float16; got {q.dtype} on {q.device.type}. "
                "Train or sample in bf16 (trainer.precision=bf16-mixed, strategy.param_dtype=bfloat16 or "
                "--dtype bf16), or use attention_backend=sdpa"
            )
        out = fn(q, k, v)
        return out[0] if isinstance(out, tuple) else out  # some FA3 releases also return the log-sum-exp

    return run


def backend_available(name: str) -> bool:
    """Whether ``name`` can run here: its package is importable (flash kernels also need a CUDA device)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; use one of {BACKENDS}")
    if name in _FLASH_MODULES:
        return importlib.util.find_spec(_FLASH_MODULES[name][0]) is not None and torch.cuda.is_available()
    return True


def check_backend(name: str) -> str:
    """Return ``name`` if it can run here, else raise naming what to install or what to choose instead."""
    if not backend_available(name):
        module, install = _FLASH_MODULES[name]
        if importlib.util.find_spec(module) is None:
            raise RuntimeError(f"attention backend {name} needs {install}; or use attention_backend=sdpa")
        raise RuntimeError(f"attention backend {name} needs a CUDA device; use attention_backend=sdpa on this machine")
    return name


_KERNELS = {"sdpa": _sdpa, "math": _math}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = DEFAULT_BACKEND) -> torch.Tensor:
    """Full (non-causal) attention. q: (B, Lq, H, D), k/v: (B, Lk, H, D) -> (B, Lq, H, D)."""
    kernel = _KERNELS.get(backend)
    if kernel is None:
        if backend not in _FLASH_MODULES:
            raise ValueError(f"unknown attention backend {backend!r}; use one of {BACKENDS}")
        kernel = _flash(backend)
    return kernel(q, k, v)


def set_attention_backend(model: torch.nn.Module, name: str) -> int:
    """Make every attention module of ``model`` use backend ``name`` (checked first); logs the choice once.

    Returns the number of attention modules set.
    """
    check_backend(name)
    count = 0
    for module in model.modules():
        if hasattr(module, "attention_backend"):
            module.attention_backend = name
            count += 1
    detail = {
        "sdpa": f"torch {torch.__version__} scaled_dot_product_attention",
        "math": "plain softmax reference (slow, float32)",
    }.get(name, _FLASH_MODULES.get(name, ("", ""))[1])
    log.info("attention backend: %s (%s) in %d attention modules", name, detail, count)
    return count
