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
  ``scail2.models.convert_sat``; the release folder or its ``model/`` folder may be given instead
  (:func:`find_sat_checkpoint`). Its NumPy RNG state (pickled under NumPy 1) is admitted through a narrow
  ``weights_only`` allow-list (``scail2.utils.torch_files``); nothing else is unpickled.

:func:`convert_checkpoint` converts any of these to the scail2 or diffusers layout tensor by tensor, and
:func:`load_transformer` memory-maps zip-format torch files, so neither holds a checkpoint twice.

The model class follows the weights: ``patch_embedding_mask`` present -> :class:`SCAIL2Transformer`, else
:class:`WanModel`. Keys are checked strictly; shape mismatches and missing/unexpected keys are all listed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file

from scail2.utils.torch_files import TORCH_SUFFIXES, CheckpointError, describe_file, load_torch_file

from .config import SCAIL2_CLASS, SCAIL2_IN_CHANNELS, SCAIL2_MASK_CHANNELS, WAN_CLASS, TransformerConfig
from .convert_sat import sat_plan, take_part
from .convert import (
    config_from_diffusers,
    config_from_wan_state,
    config_to_diffusers,
    diffusers_to_wan,
    wan_to_diffusers,
)
from .scail2 import SCAIL2Transformer
from .streaming import TensorEntry, TensorSource, parse_size, plan_shards, write_safetensors
from .wan import WanModel

FORMAT_VERSION = 1
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
CONFIG_NAME = "config.json"
# File names of the SAT training checkpoint in model/<iteration>/ (FSDP2 runs, DeepSpeed runs).
SAT_CHECKPOINT_NAMES: tuple[str, ...] = ("fsdp2_rank_0000_checkpoint.pt", "mp_rank_00_model_states.pt")


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
    found = sorted(p.name for p in folder.iterdir())[:12]
    raise CheckpointError(
        f"no transformer weights in {folder} (found {found}); expected {WEIGHTS_NAME} or shards listed in "
        f"{INDEX_NAME} (or *.safetensors), or an official SCAIL-2 release folder with "
        f"model/<iteration>/{SAT_CHECKPOINT_NAMES[0]}"
    )


def find_sat_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The SAT training checkpoint of an official SCAIL-2 release folder, or None when ``folder`` is not one.

    Accepted: the release root (``model/latest`` + ``model/<iteration>/fsdp2_rank_0000_checkpoint.pt`` or
    ``mp_rank_00_model_states.pt``), its ``model/`` folder, or an iteration folder. ``latest`` names the
    iteration; without it the only iteration folder holding a checkpoint is taken (several: an error).
    """
    p = Path(folder)
    if not p.is_dir():
        return None
    for name in SAT_CHECKPOINT_NAMES:  # an iteration folder itself
        if (p / name).is_file():
            return p / name
    model_dir = p / "model" if (p / "model").is_dir() else p
    latest = model_dir / "latest"
    if latest.is_file():
        iteration = latest.read_text().strip()
        for name in SAT_CHECKPOINT_NAMES:
            if (model_dir / iteration / name).is_file():
                return model_dir / iteration / name
        raise CheckpointError(
            f"{latest} names iteration {iteration!r} but {model_dir / iteration} holds none of "
            f"{list(SAT_CHECKPOINT_NAMES)}; download the checkpoint into it"
        )
    found = sorted(
        d / name for d in model_dir.iterdir() if d.is_dir() for name in SAT_CHECKPOINT_NAMES if (d / name).is_file()
    )
    if len(found) > 1:
        raise CheckpointError(
            f"{model_dir} holds several SAT checkpoints {[str(f) for f in found]} and no 'latest' file naming one; "
            "pass the checkpoint file itself"
        )
    return found[0] if found else None


def resolve_transformer_path(path: str | os.PathLike) -> Path:
    """The weights a transformer path refers to: a file as is; a folder of safetensors as is; an official
    SCAIL-2 release folder (or its ``model/`` folder) -> its SAT checkpoint file."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no checkpoint at {p}")
    if p.is_file():
        return p
    if (p / INDEX_NAME).exists() or any(p.glob("*.safetensors")):
        return p
    sat = find_sat_checkpoint(p)
    return sat if sat is not None else p


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a weights file or folder (safetensors, or torch files with ``weights_only=True``).

    Torch files saved by training frameworks often wrap the weights (``{"module": ...}``,
    ``{"state_dict": ...}``, ``{"model": ...}``); one such level is unwrapped. Zip-format torch files are
    memory-mapped, so their tensors are read from disk only when used. A release folder is resolved with
    :func:`resolve_transformer_path`.
    """
    p = resolve_transformer_path(path)
    files = _weight_files(p) if p.is_dir() else [p]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            part = read_safetensors(f)
        elif f.suffix in TORCH_SUFFIXES:
            part = _unwrap(load_torch_file(f, what="transformer weights"), f)
        else:
            raise CheckpointError(
                f"{f} is {describe_file(f)} with suffix {f.suffix!r}; transformer weights load from .safetensors "
                f"(or {'/'.join(TORCH_SUFFIXES)}) files or folders"
            )
        dup = set(part) & set(state)
        if dup:
            raise CheckpointError(f"keys appear in more than one shard ({f.name}): {sorted(dup)[:5]}")
        state.update(part)
    return state


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a file that is not one is reported with what it is."""
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types; reported with the file
        raise CheckpointError(
            f"{path} ({describe_file(path)}) cannot be read as safetensors ({exc}); re-download or re-save it"
        ) from exc


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict of a loaded torch file: the file itself, or one wrapper level (module/state_dict/model)."""
    for wrapper in ("module", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors (a state dict)")
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(
            f"{path} holds non-tensor entries {bad[:8]} next to its weights; expected a state dict "
            "(optionally under 'module', 'state_dict' or 'model')"
        )
    return obj


_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "model.")  # torch.compile, DDP, Lightning wrappers


def _strip_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    # Wrappers such as torch.compile ("_orig_mod.") or DDP ("module.") prefix every key.
    state = dict(state)
    for prefix in _WRAPPER_PREFIXES:
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


Plan = dict[str, tuple[str, int, int]]  # Wan key -> (source key, part, parts along dim 0)


def rename_plan(keys: list[str], raw_cfg: Mapping[str, Any] | None) -> tuple[Plan, str]:
    """Where every Wan2.1-named tensor comes from in a checkpoint with these keys, and the checkpoint's layout.

    Only names are looked at, so the plan of a 65 GB file costs nothing; :func:`apply_plan` (in memory) and
    :func:`convert_checkpoint` (streaming) carry it out.
    """
    layout = detect_layout(set(keys), raw_cfg)
    if layout == "sat":
        return sat_plan(keys), layout
    stripped = _strip_prefix({k: k for k in keys})  # stripped name -> original key
    layout = detect_layout(set(stripped), raw_cfg)
    if layout == "diffusers":
        renamed = diffusers_to_wan(stripped)
    else:
        renamed = stripped
    return {new: (old, 0, 1) for new, old in renamed.items()}, layout


def planned_shapes(plan: Plan, shape_of) -> dict[str, tuple[int, ...]]:
    """Shapes of the planned tensors from the source shapes (``shape_of(source_key)``), without reading data."""
    out = {}
    for new, (key, part, parts) in plan.items():
        shape = tuple(shape_of(key))
        if parts > 1:
            if shape[0] % parts:
                raise CheckpointError(f"{key}: fused size {shape[0]} is not divisible into {parts} equal parts")
            shape = (shape[0] // parts, *shape[1:])
        out[new] = shape
    return out


def config_for(
    layout: str, shapes: Mapping[str, tuple[int, ...]], raw_cfg: Mapping[str, Any] | None, num_heads: int | None
) -> TransformerConfig:
    """The geometry of Wan2.1-named weights of these shapes stored in ``layout`` (with its config.json, if any).

    ``num_heads`` overrides the head count (needed only when no config.json records one and the width is not
    a multiple of 128, the Wan2.1 head size).
    """
    if layout == "scail2":
        cfg = TransformerConfig.from_dict(raw_cfg)
    elif layout == "diffusers" and raw_cfg is not None and "num_attention_heads" in raw_cfg:
        cfg = config_from_diffusers(raw_cfg)
    else:
        wan_cfg = dict(raw_cfg or {}) if layout == "wan" else {}
        if layout == "sat" and raw_cfg and "num_heads" in raw_cfg:
            wan_cfg["num_heads"] = raw_cfg["num_heads"]
        if num_heads is not None:
            wan_cfg["num_heads"] = num_heads
        return config_from_wan_state(shapes, wan_cfg or None)
    if num_heads is not None and num_heads != cfg.num_heads:
        raise CheckpointError(
            f"num_heads={num_heads} was given but the checkpoint's config.json says {cfg.num_heads}; drop the option"
        )
    return cfg


def apply_plan(plan: Plan, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Carry out a rename plan in memory; parts of fused tensors are copied (they must not share storage)."""
    out = {}
    for new, (key, part, parts) in plan.items():
        value = take_part(state[key], part, parts, key)
        out[new] = value.clone() if parts > 1 else value
    return out


def load_state_and_config(
    path: str | os.PathLike, num_heads: int | None = None
) -> tuple[dict[str, torch.Tensor], TransformerConfig, str]:
    """Weights renamed to Wan2.1 names, the geometry they describe, and the layout they were stored in.

    ``path`` may be any layout of the module docstring, or an official SCAIL-2 release folder.
    """
    p = resolve_transformer_path(path)
    raw_cfg = _read_config(p)
    state = read_state_dict(p)
    plan, layout = rename_plan(list(state), raw_cfg)
    cfg = config_for(layout, planned_shapes(plan, lambda k: state[k].shape), raw_cfg, num_heads)
    return apply_plan(plan, state), cfg, layout


# ---------------------------------------------------------------------------------------------- building
def model_class(config: TransformerConfig) -> type[WanModel]:
    return SCAIL2Transformer if config.is_scail2 else WanModel


def build_model(config: TransformerConfig, device: torch.device | str | None = None) -> WanModel:
    with torch.device(device or "cpu"):
        return model_class(config)(config)


def check_shapes(own: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> None:
    """Raise one ``CheckpointError`` listing every missing, unexpected and mis-shaped key (model vs checkpoint)."""
    missing = sorted(set(own) - set(found))
    unexpected = sorted(set(found) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(found[k])} vs model {tuple(own[k])}"
        for k in sorted(set(own) & set(found))
        if tuple(found[k]) != tuple(own[k])
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


def load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], assign: bool = False) -> None:
    """Strict load that lists every missing, unexpected and mis-shaped key in one error."""
    check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()}, {k: tuple(v.shape) for k, v in state.items()})
    model.load_state_dict(state, strict=True, assign=assign)


def open_source(path: str | os.PathLike) -> tuple[TensorSource, dict[str, Any] | None]:
    """The tensors of a transformer checkpoint (any layout, or a release folder) read lazily, and its config.json."""
    p = resolve_transformer_path(path)
    files = _weight_files(p) if p.is_dir() else [p]
    for f in files:
        if f.suffix != ".safetensors" and f.suffix not in TORCH_SUFFIXES:
            raise CheckpointError(
                f"{f} is {describe_file(f)} with suffix {f.suffix!r}; transformer weights load from .safetensors "
                f"(or {'/'.join(TORCH_SUFFIXES)}) files or folders"
            )
    return TensorSource(files, _unwrap), _read_config(p)


def load_transformer(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    num_heads: int | None = None,
) -> WanModel:
    """Load a Wan2.1 or SCAIL-2 transformer from any supported layout (see module docstring), or from an
    official SCAIL-2 release folder (its ``model/<iteration>/`` SAT checkpoint).

    The model is built on the meta device and the checkpoint tensors are assigned, so a large model is never
    held twice in memory: zip-format torch files are memory-mapped, and when ``dtype`` casts a tensor the pages
    of the source tensor are handed back right after. ``num_heads``: the head count when the checkpoint
    records none and the width is not a multiple of 128.
    """
    source, raw_cfg = open_source(path)
    plan, layout = rename_plan(source.keys(), raw_cfg)
    cfg = config_for(layout, planned_shapes(plan, source.shape), raw_cfg, num_heads)
    remaining = {}
    for key, _, _ in plan.values():
        remaining[key] = remaining.get(key, 0) + 1
    state: dict[str, torch.Tensor] = {}
    for new, (key, part, parts) in plan.items():
        src = source.get(key)
        value = take_part(src, part, parts, key)
        copied = dtype is not None and value.dtype != dtype
        value = value.to(dtype) if copied else (value.clone() if parts > 1 else value)
        state[new] = value
        remaining[key] -= 1
        if remaining[key] == 0 and (copied or parts > 1):
            source.release(key)  # every tensor taken from it is a copy now
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


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [WEIGHTS_NAME]
    stem = WEIGHTS_NAME.removesuffix(".safetensors")
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def ensure_outside_source(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Raise ``CheckpointError`` when ``dst`` is a source folder or lies inside it, or is the folder of a source
    file: conversions never write into what they read."""
    src, dst = Path(src), Path(dst)
    resolved = resolve_transformer_path(src)
    target = dst.resolve()
    if src.is_dir():  # a checkpoint or release folder: nothing may be written into it
        guarded = src.resolve()
        inside = target == guarded or guarded in target.parents
    else:  # a file: its own folder may not receive the output files (a subfolder is a folder of its own)
        guarded = resolved.parent.resolve()
        inside = target in (guarded, resolved.resolve())
    if inside:
        raise CheckpointError(
            f"the output {dst} lies in the source folder {guarded}; scail2-convert never writes into the source: "
            f"choose a folder outside it (e.g. {guarded.parent / (guarded.name + '-scail2')})"
        )


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    layout: str = "scail2",
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    num_heads: int | None = None,
) -> tuple[Path, TransformerConfig]:
    """Convert a transformer checkpoint (any layout, or an official SCAIL-2 release folder) to ``layout``
    ("scail2" or "diffusers") under ``dst``, streaming: one tensor is read, renamed/split, cast and written at a
    time, so peak memory stays near the largest tensor whatever the file size (zip-format torch files are
    memory-mapped and their pages handed back after use).

    Nothing is written into the source (``dst`` may not be the source folder, lie inside it, or be the folder
    of a source file), and the output appears only when complete (written to a temporary folder, then moved).
    ``num_heads``: the head count when the checkpoint records none and its width is not a multiple of 128.
    Returns the output folder and the model geometry.
    """
    src, dst = Path(src), Path(dst)
    ensure_outside_source(src, dst)
    resolved = resolve_transformer_path(src)
    if layout not in ("scail2", "diffusers"):
        raise ValueError(f"unknown layout {layout!r}; use 'scail2' or 'diffusers'")
    source, raw_cfg = open_source(resolved)
    plan, src_layout = rename_plan(source.keys(), raw_cfg)
    shapes = planned_shapes(plan, source.shape)
    cfg = config_for(src_layout, shapes, raw_cfg, num_heads)
    meta = build_model(cfg, device="meta")
    check_shapes({k: tuple(v.shape) for k, v in meta.state_dict().items()}, shapes)
    if layout == "scail2":
        names = {k: k for k in plan}
        config_json = {"_class_name": model_class(cfg).__name__, "_scail2_format": FORMAT_VERSION, **cfg.to_dict()}
    else:
        config_json = config_to_diffusers(cfg)  # raises for SCAIL-2 models
        names = {wan: out for out, wan in wan_to_diffusers({k: k for k in plan}).items()}

    remaining: dict[str, int] = {}
    for key, _, _ in plan.values():
        remaining[key] = remaining.get(key, 0) + 1

    def entry(new: str) -> TensorEntry:
        key, part, parts = plan[new]
        out_dtype = dtype or source.dtype(key)

        def produce() -> torch.Tensor:
            return take_part(source.get(key), part, parts, key).to(out_dtype)

        def done() -> None:
            remaining[key] -= 1
            if remaining[key] == 0:
                source.release(key)

        return TensorEntry(names[new], shapes[new], out_dtype, produce, done)

    entries = [entry(new) for new in sorted(plan, key=lambda k: names[k])]
    shards = plan_shards(entries, parse_size(max_shard_size))
    files = _shard_names(len(shards))
    tmp = dst.with_name(dst.name + ".tmp-convert")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    total = 0
    for name, shard in zip(files, shards):
        total += write_safetensors(tmp / name, shard, metadata={"format": "pt"})
    if len(files) > 1:
        weight_map = {e.name: name for name, shard in zip(files, shards) for e in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (tmp / CONFIG_NAME).write_text(json.dumps(config_json, indent=2) + "\n")
    dst.mkdir(parents=True, exist_ok=True)
    for old in list(dst.glob("diffusion_pytorch_model*.safetensors*")) + [dst / CONFIG_NAME]:
        if old.exists():
            old.unlink()
    for f in tmp.iterdir():
        f.replace(dst / f.name)
    tmp.rmdir()
    return dst, cfg


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
    "convert_checkpoint",
    "ensure_outside_source",
    "find_sat_checkpoint",
    "resolve_transformer_path",
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
