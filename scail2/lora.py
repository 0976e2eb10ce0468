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

Read as well (:func:`read_lora_file`), with no conversion step:

* the same keys **without** the ``diffusion_model.`` prefix, and in ``.pt/.pth`` files;
* the **SAT/DeepSpeed container** of the released ``bias-aware-dpo-lora.pt``: a ``torch.save`` dict whose
  ``"module"`` holds ``model.diffusion_model.transformer.layers.N.<SAT module>.lora_layer[.i].{down,up}.weight``
  (one sub-LoRA per part of SAT's fused projections: ``attention.query_key_value.lora_layer.{0,1,2}`` = self-attn
  q/k/v, ``attention.dense`` = o, ``cross_attention.query`` = cross q, ``cross_attention.key_value.lora_layer.
  {0,1}`` = cross k/v, ``cross_attention.dense`` = cross o, ``mlp.dense_h_to_4h`` / ``dense_4h_to_h`` = ffn.0 /
  ffn.2), applied as ``W += up @ down`` (no alpha key: scale 1, as the official pipeline fuses it);
* **weight deltas** ``<module>.diff`` / ``<module>.diff_b`` (full-shape additions to a weight / a bias), as the
  lightx2v step-distill LoRAs carry next to their low-rank pairs. They are applied as parametrizations
  (``weight = stored + scale * diff``), so unloading restores the base weights exactly and merging folds them in.
  A delta for ``patch_embedding.weight`` whose input channels differ from the model's (Wan2.1-I2V's 36 against
  SCAIL-2's 20) is skipped with a warning; every other delta must fit its tensor exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from scail2.utils.torch_files import TORCH_SUFFIXES, CheckpointError, describe_file, load_torch_file

log = logging.getLogger(__name__)

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


def lora_parameter_count(model: torch.nn.Module, spec: LoRASpec = LoRASpec()) -> int:
    """The adapter parameters `add_lora` would add to ``model`` (``rank x (in + out)`` per matched linear
    layer), without adding them: works on a model built on the meta device (`scail2.models.memory`)."""
    pattern = re.compile(spec.target_modules)
    return sum(
        spec.rank * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and pattern.fullmatch(name)
    )


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The same network without its adapters: the DPO reference model, with no second copy in memory."""
    layers = list(lora_layers(model).values())
    deltas = [d for _, _, d in weight_deltas(model)]
    if not layers and not deltas:
        raise ValueError("the model has no LoRA adapters to disable")
    for layer in layers:
        layer.enable_adapters(False)
    for delta in deltas:
        delta.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for delta in deltas:
            delta.enabled = True


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


# ------------------------------------------------------------------------------------------- reading files
SAT_LORA_PREFIX = "model.diffusion_model.transformer.layers."
# SAT module (after "transformer.layers.N.") of the released DPO LoRA -> Wan module (after "blocks.N.").
SAT_LORA_MODULES: dict[str, str] = {
    "attention.query_key_value.lora_layer.0": "self_attn.q",
    "attention.query_key_value.lora_layer.1": "self_attn.k",
    "attention.query_key_value.lora_layer.2": "self_attn.v",
    "attention.dense.lora_layer": "self_attn.o",
    "cross_attention.query.lora_layer": "cross_attn.q",
    "cross_attention.key_value.lora_layer.0": "cross_attn.k",
    "cross_attention.key_value.lora_layer.1": "cross_attn.v",
    "cross_attention.dense.lora_layer": "cross_attn.o",
    "mlp.dense_h_to_4h.lora_layer": "ffn.0",
    "mlp.dense_4h_to_h.lora_layer": "ffn.2",
}
_SAT_KEY = re.compile(r"^" + re.escape(SAT_LORA_PREFIX) + r"(\d+)\.(.+)\.(down\.weight|up\.weight|diff_b)$")
_SAT_SUFFIX = {"down.weight": "lora_down.weight", "up.weight": "lora_up.weight", "diff_b": "diff_b"}
_KINDS = ("lora_down.weight", "lora_up.weight", "lora_A.weight", "lora_B.weight", "alpha", "diff_b", "diff")


@dataclass(frozen=True)
class LoRAFile:
    """What a LoRA file holds, in one form: peft-named adapter pairs, their spec, the file's metadata, and the
    weight deltas (``{"blocks.0.norm3.weight": diff, "blocks.0.ffn.0.bias": diff_b, ...}``)."""

    state: dict[str, torch.Tensor]
    spec: LoRASpec
    meta: dict[str, str]
    deltas: dict[str, torch.Tensor]
    format: str  # "peft" | "comfyui" | "sat" (for messages)


def _read_tensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except SafetensorError as exc:
            raise CheckpointError(
                f"{file} ({describe_file(file)}) is not a readable safetensors file ({exc}): a truncated download or "
                "copy, or another format under a .safetensors name; copy it again"
            ) from None
    if file.suffix in TORCH_SUFFIXES:
        loads = "a .safetensors LoRA, a peft folder, or a torch file of LoRA tensors (e.g. bias-aware-dpo-lora.pt)"
        obj = load_torch_file(file, what="a LoRA adapter", loads=loads)
        for wrapper in ("module", "state_dict", "model"):
            if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
        if not isinstance(obj, dict) or not obj:
            raise CheckpointError(f"{file} holds no dict of LoRA tensors (found {type(obj).__name__}); {loads}")
        bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
        if bad:
            raise CheckpointError(f"{file} holds non-tensor entries {bad[:6]} among its LoRA tensors")
        return dict(obj), {}
    raise CheckpointError(
        f"{file} is {describe_file(file)} with suffix {file.suffix!r}; a LoRA adapter is a peft folder, a "
        f".safetensors file or a torch file ({'/'.join(TORCH_SUFFIXES)})"
    )


def _from_sat(raw: dict[str, torch.Tensor], file: Path) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for key, value in raw.items():
        m = _SAT_KEY.match(key)
        module = SAT_LORA_MODULES.get(m.group(2)) if m else None
        if module is None:
            unknown.append(key)
            continue
        out[f"blocks.{m.group(1)}.{module}.{_SAT_SUFFIX[m.group(3)]}"] = value
    if unknown:
        raise KeyError(
            f"{len(unknown)} keys of the SAT LoRA file {file} have no Wan module, e.g. {sorted(unknown)[:4]} "
            f"(known SAT modules: {sorted(SAT_LORA_MODULES)})"
        )
    return out


def read_lora_file(path: str | os.PathLike) -> LoRAFile:
    """Read any LoRA layout of the module docstring (peft folder, ComfyUI / kohya-style file with or without the
    ``diffusion_model.`` prefix, the SAT DPO container, lightx2v files with ``diff`` / ``diff_b``)."""
    p = Path(path)
    file = p / PEFT_WEIGHTS if p.is_dir() else p
    if not file.exists():
        raise FileNotFoundError(
            f"no LoRA weights at {file} (expected {PEFT_WEIGHTS} in a folder, or a .safetensors / .pt file)"
        )
    raw, meta = _read_tensors(file)
    nonfinite = sorted(k for k, v in raw.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if nonfinite:
        raise ValueError(f"{file} holds non-finite values (NaN or inf) in {len(nonfinite)} tensors, e.g. {nonfinite[0]}")
    if any(k.startswith(SAT_LORA_PREFIX) for k in raw):
        raw, fmt = _from_sat(raw, file), "sat"
    else:
        fmt = "peft" if any(".lora_A." in k for k in raw) else "comfyui"
        if raw and all(k.startswith("diffusion_model.") for k in raw):
            raw = {k[len("diffusion_model.") :]: v for k, v in raw.items()}
    state: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    alphas: set[float] = set()
    unknown = []
    for key, value in raw.items():
        kind = next((k for k in _KINDS if key.endswith("." + k)), None)
        if kind is None:
            unknown.append(key)
            continue
        module = key[: -len(kind) - 1]
        if kind == "alpha":
            alphas.add(float(value))
        elif kind == "diff":
            deltas[f"{module}.weight"] = value
        elif kind == "diff_b":
            deltas[f"{module}.bias"] = value
        else:
            side = "A" if kind in ("lora_down.weight", "lora_A.weight") else "B"
            state[f"{module}.lora_{side}.weight"] = value
    if unknown:
        raise KeyError(
            f"unexpected keys in the LoRA file {file}: {sorted(unknown)[:6]} (expected <module>.lora_down.weight / "
            "lora_up.weight / alpha / diff / diff_b, or peft's lora_A / lora_B)"
        )
    if len(alphas) > 1:
        raise ValueError(f"{file} mixes several alpha values {sorted(alphas)}; scail2 expects one")
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
    if len(ranks) > 1:
        raise ValueError(f"{file} has adapters of ranks {sorted(ranks)}; expected one rank")
    if not state and not deltas:
        raise ValueError(f"{file} holds no LoRA tensors")
    rank = ranks.pop() if ranks else 1
    if "alpha" in meta:
        alpha = float(meta["alpha"])
    elif alphas:
        alpha = alphas.pop()  # ComfyUI / kohya convention: the update is scaled by alpha / rank
    else:
        alpha = float(rank)  # no alpha: W += up @ down (the official SCAIL-2 and lightx2v fusion)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    pattern = meta.get("target_modules") or "(" + "|".join(m.replace(".", r"\.") for m in modules) + ")"
    return LoRAFile(state, LoRASpec(rank=rank, alpha=alpha, target_modules=pattern), meta, deltas, fmt)


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], LoRASpec, dict[str, str]]:
    """Adapter weights in peft layout, their spec and the file metadata, from any layout :func:`read_lora_file`
    reads (weight deltas, if the file has any, come with :func:`read_lora_file`)."""
    lora = read_lora_file(path)
    return lora.state, lora.spec, lora.meta


# ------------------------------------------------------------------------------------------ weight deltas
class WeightDelta(nn.Module):
    """A parametrization adding a LoRA file's full-shape delta to a weight or bias: ``stored + scale * delta``.

    ``scale`` follows the adapter's strength; ``enabled`` False gives the stored tensor (the reference model of
    DPO, :func:`adapters_disabled`)."""

    def __init__(self, delta: torch.Tensor, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("delta", delta, persistent=False)
        self.scale = float(scale)
        self.enabled = True

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.scale == 0.0:
            return stored
        return stored + self.scale * self.delta


def weight_deltas(model: nn.Module) -> list[tuple[nn.Module, str, WeightDelta]]:
    """The :class:`WeightDelta` parametrizations of a model: (module, tensor name, parametrization)."""
    out = []
    for module in model.modules():
        for tensor, plist in getattr(module, "parametrizations", {}).items():
            out.extend((module, tensor, p) for p in plist if isinstance(p, WeightDelta))
    return out


def _plan_deltas(
    model: nn.Module, deltas: dict[str, torch.Tensor], path: object
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The deltas that fit the model, and the names skipped (with why); anything else that does not fit raises."""
    own = dict(model.named_parameters())
    problems, skipped, fitting = [], [], {}
    for name, delta in sorted(deltas.items()):
        if name not in own and name.endswith(".weight") and name[: -len(".weight")] in own:
            name = name[: -len(".weight")]  # a bare parameter (e.g. blocks.N.modulation): its diff is on itself
        target = own.get(name)
        if target is None:
            problems.append(f"{name}: the model has no such tensor")
        elif tuple(delta.shape) == tuple(target.shape):
            fitting[name] = delta
        elif name == "patch_embedding.weight" and delta.dim() == 5 and delta.shape[0] == target.shape[0]:
            skipped.append(
                f"{name} (the file's patch embedding reads {delta.shape[1]} input channels, this model "
                f"{target.shape[1]}: a delta for another input layout, e.g. Wan2.1-I2V's)"
            )
        else:
            problems.append(f"{name}: delta {tuple(delta.shape)} vs model {tuple(target.shape)}")
    if problems:
        shown = problems[:6] + ([f"... and {len(problems) - 6} more"] if len(problems) > 6 else [])
        raise ValueError(f"LoRA file {path} has weight deltas that do not fit this model:\n- " + "\n- ".join(shown))
    return fitting, skipped


def _add_deltas(model: nn.Module, deltas: dict[str, torch.Tensor], scale: float = 1.0) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from torch.nn.utils import parametrize

    for name, delta in deltas.items():
        module_name, _, tensor = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if isinstance(module, BaseTunerLayer):  # a layer with a LoRA adapter: the delta goes to its base layer
            module = module.get_base_layer()
        stored = getattr(module, tensor)
        delta = delta.detach().to(device=stored.device, dtype=stored.dtype)
        parametrize.register_parametrization(module, tensor, WeightDelta(delta, scale))


def _remove_deltas(model: nn.Module, keep: bool) -> None:
    """Take the delta parametrizations out: ``keep`` folds them into the tensors, else the stored ones return."""
    from torch.nn.utils import parametrize

    for module, tensor, _ in weight_deltas(model):
        if parametrize.is_parametrized(module, tensor):
            parametrize.remove_parametrizations(module, tensor, leave_parametrized=keep)


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
    """Take the (unmerged) adapters out again: every adapted layer becomes its untouched base layer, and every
    weight delta is removed (the stored tensors are the base ones)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    _remove_deltas(model, keep=False)
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
    """Multiply every adapter's effect by ``scale`` (relative to its ``lora_alpha / r``; 0 switches it off);
    weight deltas become ``scale * delta``."""
    from peft.tuners.lora import LoraLayer

    for layer in lora_layers(model).values():
        if isinstance(layer, LoraLayer):
            for adapter in list(layer.scaling):
                layer.set_scale(adapter, scale)
    for _, _, delta in weight_deltas(model):
        delta.scale = float(scale)
    return model


def load_lora(model: torch.nn.Module, path: str | os.PathLike, check_base: bool = True) -> torch.nn.Module:
    """Inject adapters matching the file and load its weights; every key must load, none may be left over.

    Any layout :func:`read_lora_file` reads. Checked before the model is touched: every adapter fits a layer of
    the model (names and shapes, :func:`check_lora_fits`), every weight delta fits its tensor, and, with
    ``check_base``, the file's base-model hash is this model's. The adapter weights take the dtype and device of
    the layers they adapt. On any failure the model is left as it was. Weight deltas skipped because they are
    meant for another input layout are logged (``patch_embedding``, see the module docstring).
    """
    from peft import set_peft_model_state_dict

    if lora_layers(model) or weight_deltas(model):
        raise ValueError(f"cannot load {path}: the model already has LoRA adapters")
    lora = read_lora_file(path)
    state, spec, meta = lora.state, lora.spec, lora.meta
    if state:
        check_lora_fits(model, state, spec, path)
    deltas, skipped = _plan_deltas(model, lora.deltas, path)
    if check_base:
        check_lora_base(model, meta, path)
    grads = {id(p): p.requires_grad for p in model.parameters()}
    try:
        if state:
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
        _add_deltas(model, deltas)
    except BaseException:
        remove_lora(model)
        for p in model.parameters():
            if id(p) in grads:
                p.requires_grad_(grads[id(p)])
        raise
    if skipped:
        log.warning("%s: %d weight delta(s) not applied: %s", path, len(skipped), "; ".join(skipped))
    return model


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold the adapters (and weight deltas) into the base weights and remove them (plain layers again)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    _remove_deltas(model, keep=True)
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
