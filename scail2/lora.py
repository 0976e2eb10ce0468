"""LoRA adapters on the transformer (peft), their file formats, merging, and the adapter-free reference.

SCAIL-2's released DPO LoRA adapts, in every block, ``self_attn.{q,k,v,o}``, ``cross_attn.{q,k,v,o}``,
``ffn.0`` and ``ffn.2`` (10 modules per block; not ``k_img``/``v_img``, embeddings or the head), rank 128,
applied as ``W += alpha * (up @ down)`` with alpha 1.0. In peft terms the scale is ``lora_alpha / r``, so
the default ``lora_alpha = r`` reproduces a scale of 1.0. Down-projections start Gaussian with std 1/r and
up-projections at zero, so an adapted model equals its base at initialisation.

Files:

* **peft layout** (``save_lora(..., layout="peft")``): ``adapter_model.safetensors`` with keys
  ``blocks.N.self_attn.q.lora_A.weight`` / ``lora_B.weight`` and ``adapter_config.json``; the safetensors
  metadata holds rank, alpha, target modules and the base model's hash and dtype.
* **ComfyUI layout** (``layout="comfyui"``): one safetensors with ``diffusion_model.blocks.N.<module>.lora_down
  .weight`` / ``lora_up.weight`` / ``alpha`` (a scalar holding ``lora_alpha``, so ComfyUI's
  ``alpha / rank`` scale equals ours).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

DEFAULT_TARGETS = r"blocks\.\d+\.(self_attn\.(q|k|v|o)|cross_attn\.(q|k|v|o)|ffn\.(0|2))"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoRASpec:
    rank: int = 128
    alpha: float | None = None  # None -> alpha = rank (scale 1.0, as the released adapter)
    target_modules: str = DEFAULT_TARGETS  # regex over module names (full match)
    dropout: float = 0.0

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


def add_lora(model: torch.nn.Module, spec: LoRASpec = LoRASpec()) -> torch.nn.Module:
    """Inject LoRA adapters in place; afterwards only the adapter weights require gradients."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        init_lora_weights="gaussian",
    )
    model = inject_adapter_in_model(cfg, model)
    n = len(lora_layers(model))
    if n == 0:
        raise ValueError(f"the LoRA target pattern {spec.target_modules!r} matched no module of the model")
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The same network without its adapters: the DPO reference model, with no second copy in memory."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise ValueError("the model has no LoRA adapters to disable")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights in peft layout (``<module>.lora_A.weight`` / ``lora_B.weight``)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def base_model_hash(model: torch.nn.Module, dtype: torch.dtype | None = None) -> str:
    """sha256 over the base weights (names, shapes and bytes, adapters excluded): ties an adapter to its base.

    ``dtype``: hash the floating-point weights cast to this dtype (how an adapter trained on an upcast copy of
    bf16 weights is recognised on the bf16 model, and the other way round).
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        h.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def base_model_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the floating-point base weights, or None when they mix several."""
    dtypes = {t.dtype for n, t in model.state_dict().items() if "lora_" not in n and t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_lora(model: torch.nn.Module, spec: LoRASpec, path: str | os.PathLike, layout: str = "peft") -> Path:
    """Write the adapters (``layout`` "peft": a folder; "comfyui": one .safetensors file)."""
    state = lora_state_dict(model)
    meta = {
        "rank": str(spec.rank),
        "alpha": str(spec.lora_alpha),
        "target_modules": spec.target_modules,
        "base_model_sha256": base_model_hash(model),
        "format": "scail2-lora-v1",
    }
    dtype = base_model_dtype(model)
    if dtype is not None:
        meta["base_model_dtype"] = _dtype_name(dtype)
    p = Path(path)
    if layout == "peft":
        p.mkdir(parents=True, exist_ok=True)
        save_file(state, p / PEFT_WEIGHTS, metadata=meta)
        config = {
            "peft_type": "LORA",
            "r": spec.rank,
            "lora_alpha": spec.lora_alpha,
            "lora_dropout": spec.dropout,
            "target_modules": spec.target_modules,
            "init_lora_weights": "gaussian",
            "base_model_sha256": meta["base_model_sha256"],
        }
        (p / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return p
    if layout == "comfyui":
        out: dict[str, torch.Tensor] = {}
        for k, v in state.items():
            module, kind = k.rsplit(".lora_", 1)
            new = "lora_down.weight" if kind.startswith("A") else "lora_up.weight"
            out[f"diffusion_model.{module}.{new}"] = v
            out[f"diffusion_model.{module}.alpha"] = torch.tensor(spec.lora_alpha)
        p.parent.mkdir(parents=True, exist_ok=True)
        save_file(out, p, metadata=meta)
        return p
    raise ValueError(f"unknown LoRA layout {layout!r}; use 'peft' or 'comfyui'")


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], LoRASpec, dict[str, str]]:
    """Adapter weights in peft layout, their spec and the file metadata, from either layout."""
    p = Path(path)
    file = p / PEFT_WEIGHTS if p.is_dir() else p
    if not file.exists():
        raise FileNotFoundError(f"no LoRA weights at {file} (expected {PEFT_WEIGHTS} in a folder, or a .safetensors file)")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = dict(f.metadata() or {})
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as exc:
        raise ValueError(
            f"{file} is not a readable safetensors file ({exc}); LoRA adapters are read from safetensors only (a peft "
            "folder or a ComfyUI .safetensors file), never unpickled: re-save a .pt/.ckpt adapter with "
            "safetensors.torch.save_file, or copy a truncated file again"
        ) from None
    nonfinite = sorted(k for k, v in raw.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if nonfinite:
        raise ValueError(f"{file} holds non-finite values (NaN or inf) in {len(nonfinite)} tensors, e.g. {nonfinite[0]}")
    if any(k.startswith("diffusion_model.") for k in raw):
        state, alphas = {}, set()
        for k, v in raw.items():
            body = k[len("diffusion_model.") :]
            if body.endswith(".alpha"):
                alphas.add(float(v))
            elif body.endswith(".lora_down.weight"):
                state[body[: -len(".lora_down.weight")] + ".lora_A.weight"] = v
            elif body.endswith(".lora_up.weight"):
                state[body[: -len(".lora_up.weight")] + ".lora_B.weight"] = v
            else:
                raise KeyError(f"unexpected key {k!r} in ComfyUI LoRA file {file}")
        if len(alphas) > 1:
            raise ValueError(f"{file} mixes several alpha values {sorted(alphas)}; scail2 expects one")
    else:
        state = raw
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
    if len(ranks) != 1:
        raise ValueError(f"{file} has adapters of ranks {sorted(ranks)}; expected one rank")
    rank = ranks.pop()
    alpha = float(meta["alpha"]) if "alpha" in meta else (alphas.pop() if raw and any(k.endswith(".alpha") for k in raw) else float(rank))
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    pattern = meta.get("target_modules") or "(" + "|".join(m.replace(".", r"\.") for m in modules) + ")"
    return state, LoRASpec(rank=rank, alpha=alpha, target_modules=pattern), meta


def check_lora_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], spec: LoRASpec, path: object) -> None:
    """Raise ``ValueError`` naming ``path`` and what does not fit unless every adapter in ``state`` (peft layout)
    has a linear layer of matching shape in ``model`` and every layer the adapter's pattern selects has one."""
    problems: list[str] = []
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, sep, kind = key.rpartition(".lora_")
        if not sep or kind not in ("A.weight", "B.weight"):
            problems.append(f"unexpected key {key!r} (expected <module>.lora_A.weight / lora_B.weight)")
            continue
        modules.setdefault(module, {})[kind[0]] = value
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    absent = sorted(m for m in modules if m not in linears)
    if absent:
        problems.append(f"{len(absent)} adapted layer(s) the model does not have, e.g. {absent[:3]}")
    for module, pair in sorted(modules.items()):
        layer = linears.get(module)
        if layer is None:
            continue
        if set(pair) != {"A", "B"}:
            problems.append(f"{module} has only lora_{''.join(pair)}")
            continue
        a, b = pair["A"], pair["B"]
        want_a, want_b = (spec.rank, layer.in_features), (layer.out_features, spec.rank)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            problems.append(
                f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but the layer is "
                f"{layer.in_features} -> {layer.out_features} (expected {want_a} and {want_b} at rank {spec.rank})"
            )
    selected = {n for n in linears if re.fullmatch(spec.target_modules, n)}
    missing = sorted(selected - set(modules))
    if missing:
        problems.append(
            f"no weights for {len(missing)} layer(s) its pattern {spec.target_modules!r} selects, e.g. {missing[:3]}"
        )
    if problems:
        shown = problems[:6] + ([f"... and {len(problems) - 6} more"] if len(problems) > 6 else [])
        raise ValueError(f"LoRA file {path} does not fit this model:\n- " + "\n- ".join(shown))


def check_lora_base(model: torch.nn.Module, meta: dict[str, str], path: object) -> None:
    """Raise ``ValueError`` when ``meta`` records a base-model hash that ``model``'s weights do not have."""
    want = meta.get("base_model_sha256")
    if not want:
        return
    dtype = getattr(torch, meta.get("base_model_dtype", ""), None)
    dtype = dtype if isinstance(dtype, torch.dtype) else None
    have = base_model_hash(model, dtype)
    if have != want:
        compared = dtype if dtype is not None else base_model_dtype(model)
        hint = f" (compared in {_dtype_name(compared)})" if compared is not None else ""
        raise ValueError(
            f"{path} was trained on base weights {want[:12]}… but this model is {have[:12]}…{hint}; it belongs to "
            "another base model (or another dtype of it); pass check_base=False to load it anyway"
        )


def remove_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Take the (unmerged) adapters out again: every adapted layer becomes its untouched base layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            if module.merged:
                raise ValueError(f"the adapter of {name} is merged into its weights and cannot be removed")
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    _drop_peft_config(model)
    return model


def _drop_peft_config(model: torch.nn.Module) -> None:
    """Forget the ``peft_config`` that injection leaves on the model (else the next injection warns about
    several adapters)."""
    if "peft_config" in vars(model):
        del model.peft_config


def set_lora_scale(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """Multiply every adapter's effect by ``scale`` (relative to its ``lora_alpha / r``; 0 switches it off)."""
    from peft.tuners.lora import LoraLayer

    for layer in lora_layers(model).values():
        if isinstance(layer, LoraLayer):
            for adapter in list(layer.scaling):
                layer.set_scale(adapter, scale)
    return model


def load_lora(model: torch.nn.Module, path: str | os.PathLike, check_base: bool = True) -> torch.nn.Module:
    """Inject adapters matching the file and load its weights; every key must load, none may be left over.

    Checked before the model is touched: every adapter fits a layer of the model (names and shapes,
    :func:`check_lora_fits`) and, with ``check_base``, the file's base-model hash is this model's. The adapter
    weights take the dtype and device of the layers they adapt. On any failure the model is left as it was.
    """
    from peft import set_peft_model_state_dict

    if lora_layers(model):
        raise ValueError(f"cannot load {path}: the model already has LoRA adapters")
    state, spec, meta = read_lora(path)
    check_lora_fits(model, state, spec, path)
    if check_base:
        check_lora_base(model, meta, path)
    grads = {id(p): p.requires_grad for p in model.parameters()}
    try:
        model = add_lora(model, spec)
        result = set_peft_model_state_dict(model, state)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
        if unexpected or missing:
            raise KeyError(
                f"LoRA file {path} does not fit the model: unexpected {unexpected[:10]}, missing {missing[:10]}"
            )
        for layer in lora_layers(model).values():
            weight = layer.get_base_layer().weight
            for name in ("lora_A", "lora_B"):
                getattr(layer, name).to(device=weight.device, dtype=weight.dtype)
    except BaseException:
        remove_lora(model)
        for p in model.parameters():
            if id(p) in grads:
                p.requires_grad_(grads[id(p)])
        raise
    return model


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold the adapters into the base weights and remove them (plain Linear layers again)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    _drop_peft_config(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
