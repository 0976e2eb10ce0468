"""Loading and saving transformer weights in every layout we meet, always without unpickling objects.

Layouts recognised by :func:`load_transformer`:

* **scail2** (ours): a folder with ``config.json`` (``"_scail2_format": 1`` and our geometry) and
  ``diffusion_pytorch_model.safetensors`` or shards + ``diffusion_pytorch_model.safetensors.index.json``;
  Wan2.1 parameter names.
* **wan**: an original Wan2.1 release folder (``config.json`` with ``dim``/``in_dim``/``model_type``, same
  file names, Wan names) or an official SCAIL-2 Wan-branch checkpoint (Wan names plus
  ``patch_embedding_pose``/``patch_embedding_mask``), or a bare ``.safetensors``/``.pt`` file of such weights.
* **diffusers**: a ``WanTransformer3DModel`` folder (``_class_name``/``num_attention_heads`` in config.json).
* **sat**: the released SCAIL-2 training checkpoint (``model/<iteration>/fsdp2_rank_0000_checkpoint.pt``, a
  ``torch.save`` dict whose ``"module"`` holds ``model.diffusion_model.*`` weights with fused q/k/v), see
  ``scail2.models.convert_sat``. Its NumPy RNG state is admitted through a narrow ``weights_only``
  allow-list; nothing else is unpickled.

The model class follows the weights: ``patch_embedding_mask`` present -> :class:`SCAIL2Transformer`, else
:class:`WanModel`. Keys are checked strictly; shape mismatches and missing/unexpected keys are all listed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .config import SCAIL2_CLASS, SCAIL2_IN_CHANNELS, SCAIL2_MASK_CHANNELS, WAN_CLASS, TransformerConfig
from .convert_sat import sat_to_wan
from .convert import (
    config_from_diffusers,
    config_from_wan_state,
    config_to_diffusers,
    diffusers_to_wan,
    wan_to_diffusers,
)
from .scail2 import SCAIL2Transformer
from .wan import WanModel

FORMAT_VERSION = 1
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
CONFIG_NAME = "config.json"
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says which file or key and what to do."""


# ---------------------------------------------------------------------------------------------- reading
def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing: {missing}")
        return files
    single = folder / WEIGHTS_NAME
    if single.exists():
        return [single]
    candidates = sorted(folder.glob("*.safetensors"))
    if candidates:
        return candidates
    raise CheckpointError(
        f"no weights in {folder}: expected {WEIGHTS_NAME} or shards listed in {INDEX_NAME} (or *.safetensors)"
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a weights file or folder (safetensors, or torch files with ``weights_only=True``).

    Torch files saved by training frameworks often wrap the weights (``{"module": ...}``,
    ``{"state_dict": ...}``, ``{"model": ...}``); one such level is unwrapped.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no checkpoint at {p}")
    files = _weight_files(p) if p.is_dir() else [p]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            try:
                part = load_file(str(f), device="cpu")
            except SafetensorError as exc:
                raise CheckpointError(
                    f"{f} is not a complete safetensors file ({exc}): a truncated download or copy, or another "
                    "format under a .safetensors name; copy it again"
                ) from None
        elif f.suffix in _PICKLE_SUFFIXES:
            try:
                with torch.serialization.safe_globals(_rng_state_globals()):
                    part = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # noqa: BLE001 - reported with the file name
                raise CheckpointError(
                    f"{f} cannot be loaded with torch.load(weights_only=True) ({exc}); scail2 never unpickles "
                    "arbitrary objects: re-save the weights as safetensors"
                ) from exc
            for wrapper in ("module", "state_dict", "model"):
                if isinstance(part, dict) and wrapper in part and isinstance(part[wrapper], dict):
                    part = part[wrapper]
                    break
        else:
            raise CheckpointError(f"unknown weight file type {f.name}: use .safetensors (or .pt/.pth/.bin)")
        dup = set(part) & set(state)
        if dup:
            raise CheckpointError(f"keys appear in more than one shard ({f.name}): {sorted(dup)[:5]}")
        state.update(part)
    return state


def _rng_state_globals() -> list:
    """NumPy types that a saved ``np.random.get_state()`` needs under ``weights_only`` loading (training
    checkpoints such as SCAIL-2's SAT files store it next to the weights). Only array reconstruction and
    dtypes are admitted: no callables beyond NumPy's own array constructor."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), type(np.dtype(np.float64))]


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Wrappers such as torch.compile ("_orig_mod.") or DDP ("module.") prefix every key.
    for prefix in ("_orig_mod.", "module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def detect_layout(keys: set[str], config: Mapping[str, Any] | None = None) -> str:
    """'sat' | 'scail2' | 'wan' | 'diffusers' for a set of parameter names and an optional config.json."""
    config = config or {}
    if any(k.startswith(("model.diffusion_model.", "mixins.patch_embed.", "transformer.layers.")) for k in keys):
        return "sat"
    if "_scail2_format" in config:
        return "scail2"
    if any(k.startswith("condition_embedder.") for k in keys) or "num_attention_heads" in config:
        return "diffusers"
    if "blocks.0.self_attn.q.weight" in keys or "patch_embedding.weight" in keys:
        return "wan"
    sample = sorted(keys)[:8]
    raise CheckpointError(
        f"unrecognised transformer weights (first keys {sample}); expected Wan2.1 names "
        "(blocks.0.self_attn.q.weight), diffusers names (condition_embedder.*) or a SCAIL-2 checkpoint"
    )


def _read_config(p: Path) -> dict[str, Any] | None:
    cfg_file = (p if p.is_dir() else p.parent) / CONFIG_NAME
    return json.loads(cfg_file.read_text()) if cfg_file.exists() else None


def load_state_and_config(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], TransformerConfig, str]:
    """Weights renamed to Wan2.1 names, the geometry they describe, and the layout they were stored in."""
    p = Path(path)
    raw_cfg = _read_config(p)
    state = read_state_dict(p)
    layout = detect_layout(set(state), raw_cfg)
    if layout == "sat":
        state = sat_to_wan(state)
        layout_cfg = {"num_heads": raw_cfg["num_heads"]} if raw_cfg and "num_heads" in raw_cfg else None
        return state, config_from_wan_state({k: tuple(v.shape) for k, v in state.items()}, layout_cfg), layout
    state = _strip_prefix(state)
    layout = detect_layout(set(state), raw_cfg)
    if layout == "diffusers":
        state = diffusers_to_wan(state)
        if raw_cfg is not None and "num_attention_heads" in raw_cfg:
            cfg = config_from_diffusers(raw_cfg)
        else:
            cfg = config_from_wan_state({k: tuple(v.shape) for k, v in state.items()})
    elif layout == "scail2":
        cfg = TransformerConfig.from_dict(raw_cfg)
    else:
        cfg = config_from_wan_state({k: tuple(v.shape) for k, v in state.items()}, raw_cfg)
    return state, cfg, layout


# ---------------------------------------------------------------------------------------------- building
def model_class(config: TransformerConfig) -> type[WanModel]:
    return SCAIL2Transformer if config.is_scail2 else WanModel


def build_model(config: TransformerConfig, device: torch.device | str | None = None) -> WanModel:
    with torch.device(device or "cpu"):
        return model_class(config)(config)


def load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], assign: bool = False) -> None:
    """Strict load that lists every missing, unexpected and mis-shaped key in one error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:20]}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:20]}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {shapes[:20]}")
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True, assign=assign)


def load_transformer(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> WanModel:
    """Load a Wan2.1 or SCAIL-2 transformer from any supported layout (see module docstring).

    The model is built on the meta device and the checkpoint tensors are assigned, so a large model is never
    held twice in memory.
    """
    state, cfg, _ = load_state_and_config(path)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model = build_model(cfg, device="meta")
    load_into(model, state, assign=True)
    return model.to(device)


# ---------------------------------------------------------------------------------------------- writing
def save_pretrained(
    model: WanModel,
    folder: str | os.PathLike,
    layout: str = "scail2",
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``config.json`` and safetensors shards (+ index above ``max_shard_size``).

    ``layout`` "scail2" (ours, Wan names) or "diffusers" (loadable by ``WanTransformer3DModel.from_pretrained``;
    plain Wan models only). Shards are written to a temporary folder first and moved in place, so an
    interrupted save never leaves a half-written checkpoint under ``folder``.
    """
    from huggingface_hub import save_torch_state_dict

    out = Path(folder)
    cfg = model.config
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    if layout == "scail2":
        config_json = {"_class_name": model_class(cfg).__name__, "_scail2_format": FORMAT_VERSION, **cfg.to_dict()}
    elif layout == "diffusers":
        config_json = config_to_diffusers(cfg)
        state = wan_to_diffusers(state)
    else:
        raise ValueError(f"unknown layout {layout!r}; use 'scail2' or 'diffusers'")
    tmp = out.with_name(out.name + ".tmp-save")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_torch_state_dict(
        state,
        tmp,
        filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
        max_shard_size=max_shard_size,
        metadata={"format": "pt"},
    )
    (tmp / CONFIG_NAME).write_text(json.dumps(config_json, indent=2) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("diffusion_pytorch_model*.safetensors*")) + [out / CONFIG_NAME]:
        if old.exists():
            old.unlink()
    for f in tmp.iterdir():
        f.replace(out / f.name)
    tmp.rmdir()
    return out


# ---------------------------------------------------------------------------------------------- init
def scail2_from_wan_i2v(wan: WanModel) -> SCAIL2Transformer:
    """A SCAIL-2 model for pretraining, initialised from Wan2.1-I2V weights.

    Wan2.1-I2V's 36-channel patch embedding reads ``[noisy latent 16 | mask 4 | image latent 16]``; SCAIL-2's
    20-channel input is ``[latent 16 | mask 4]`` with the same meaning of the first 20 channels (a mask of 1
    marks a known, clean frame in both), so ``patch_embedding`` keeps input channels 0..19.
    ``patch_embedding_pose`` starts as a copy of that embedding: driving frames are VAE latents of real video
    (end-to-end mode) with the same statistics, and a copy lets the pretrained attention read them from
    step 0. ``patch_embedding_mask`` starts at zero (weight and bias), so at initialisation the colour masks
    change nothing and the network is exactly the I2V backbone on the packed sequence.
    """
    c = wan.config
    if c.in_channels != 36 or c.image_dim is None or c.is_scail2:
        raise ValueError(
            f"expected a Wan2.1-I2V model (36 input channels, CLIP branch); got in_channels={c.in_channels}, "
            f"image_dim={c.image_dim}, scail2={c.is_scail2}"
        )
    cfg = c.replace(in_channels=SCAIL2_IN_CHANNELS, mask_channels=SCAIL2_MASK_CHANNELS)
    model = build_model(cfg, device=wan.patch_embedding.weight.device).to(wan.patch_embedding.weight.dtype)
    state = {k: v for k, v in wan.state_dict().items()}
    w20 = state["patch_embedding.weight"][:, :SCAIL2_IN_CHANNELS].clone()
    state["patch_embedding.weight"] = w20
    state["patch_embedding_pose.weight"] = w20.clone()
    state["patch_embedding_pose.bias"] = state["patch_embedding.bias"].clone()
    state["patch_embedding_mask.weight"] = torch.zeros_like(model.patch_embedding_mask.weight)
    state["patch_embedding_mask.bias"] = torch.zeros_like(model.patch_embedding_mask.bias)
    load_into(model, state)
    return model


__all__ = [
    "CheckpointError",
    "build_model",
    "detect_layout",
    "load_into",
    "load_state_and_config",
    "load_transformer",
    "read_state_dict",
    "save_pretrained",
    "scail2_from_wan_i2v",
    "SCAIL2_CLASS",
    "WAN_CLASS",
]
