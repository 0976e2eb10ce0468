"""SAT (SwissArmyTransformer) checkpoints of SCAIL-2 <-> the original Wan2.1 parameter names used here.

The official SCAIL-2 weights are published only in the SAT training layout: one ``torch.save`` file,
``model/<iteration>/fsdp2_rank_0000_checkpoint.pt`` (FSDP2 runs; DeepSpeed runs write
``mp_rank_00_model_states.pt`` instead) next to a ``model/latest`` file holding the iteration. The file is a
dict whose ``"module"`` entry is the full (unsharded) model state dict; the other entries are ``iteration``,
the LR-scheduler state, RNG states (including a NumPy one, so ``torch.load(weights_only=True)`` needs NumPy
globals allow-listed) and optionally the optimizer. Only trainable parameters are saved, so the frozen text
encoder and VAE are absent and every key starts with ``model.diffusion_model.``. Use
:func:`sat_module_state` to take the state dict out of a loaded checkpoint, then :func:`sat_to_wan`.

Layout (SAT name after ``model.diffusion_model.`` -> Wan name; ``N`` is the block index)::

    mixins.patch_embed.proj / proj_pose / proj_mask     -> patch_embedding / patch_embedding_pose /
                                                           patch_embedding_mask            (Conv3d, same shapes)
    text_embedding.{0,2}                                 -> text_embedding.{0,2}
    time_embed.{0,2}                                     -> time_embedding.{0,2}
    adaln_projection.1                                   -> time_projection.1
    clip_proj.proj.{0,1,3,4}                             -> img_emb.proj.{0,1,3,4}
    mixins.final_layer.linear                            -> head.head
    mixins.final_layer.adaLN_modulation   (1, 2, dim)    -> head.modulation
    mixins.adaln_layer.adaLN_modulations.N (1, 6, dim)   -> blocks.N.modulation
    mixins.adaln_layer.query_layernorm_list.N            -> blocks.N.self_attn.norm_q
    mixins.adaln_layer.key_layernorm_list.N              -> blocks.N.self_attn.norm_k
    mixins.adaln_layer.cross_query_layernorm_list.N      -> blocks.N.cross_attn.norm_q
    mixins.adaln_layer.cross_key_layernorm_list.N        -> blocks.N.cross_attn.norm_k
    mixins.adaln_layer.clip_feature_key_layernorm_list.N -> blocks.N.cross_attn.norm_k_img
    mixins.adaln_layer.clip_feature_key_value_list.N     -> blocks.N.cross_attn.[k_img; v_img]
    transformer.layers.N.attention.query_key_value       -> blocks.N.self_attn.[q; k; v]
    transformer.layers.N.attention.dense                 -> blocks.N.self_attn.o
    transformer.layers.N.cross_attention.query           -> blocks.N.cross_attn.q
    transformer.layers.N.cross_attention.key_value       -> blocks.N.cross_attn.[k; v]
    transformer.layers.N.cross_attention.dense           -> blocks.N.cross_attn.o
    transformer.layers.N.post_cross_attention_layernorm  -> blocks.N.norm3
    transformer.layers.N.mlp.dense_h_to_4h / dense_4h_to_h -> blocks.N.ffn.0 / ffn.2

``[a; b; c]`` is a fused linear whose weight (out, in) and bias (out,) are the parts concatenated along the
output dimension (dim 0) in that order; there are no transposes anywhere (SAT linears are ``nn.Linear``
layouts with model-parallel size 1). The q/k RMSNorms act over the full width (weights of shape (dim,)), as in
Wan. The affine-free LayerNorms (SAT ``input_layernorm`` / ``post_attention_layernorm``, Wan ``norm1`` /
``norm2`` / ``head.norm``) have no parameters on either side, and the RoPE / Ulysses mixins hold none.

Read from these public files: zai-org/SCAIL-2 (SAT branch) ``configs/video_model/
Wan2.1-i2v-14Bsc-pose-xc-latent.yaml`` and ``sat/training/deepspeed_training.py``; the SAT-branch model file
``dit_video_crossattn_sc_xc.py`` and ``sat/training/model_io.py`` as mirrored in TheMindExpansionNetwork/SCAIL-2;
the official SAT -> Wan key converter ``convert.py`` (wan-scail2 branch, mirrored in TheMindExpansionNetwork/
SCAIL-2; the SCAIL v1 version is zai-org/SCAIL ``convert.py``); zai-org/SCAIL ``sat/model/transformer.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

SAT_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class _Rule:
    sat: str  # module (or bare parameter) name after SAT_PREFIX; "{i}" stands for the block index
    wan: tuple[str, ...]  # Wan module names; more than one = fused along dim 0 in this order
    bare: bool = False  # a bare nn.Parameter (no .weight/.bias suffix)


_RULES: tuple[_Rule, ...] = (
    _Rule("mixins.patch_embed.proj", ("patch_embedding",)),
    _Rule("mixins.patch_embed.proj_pose", ("patch_embedding_pose",)),
    _Rule("mixins.patch_embed.proj_mask", ("patch_embedding_mask",)),
    _Rule("text_embedding.0", ("text_embedding.0",)),
    _Rule("text_embedding.2", ("text_embedding.2",)),
    _Rule("time_embed.0", ("time_embedding.0",)),
    _Rule("time_embed.2", ("time_embedding.2",)),
    _Rule("adaln_projection.1", ("time_projection.1",)),
    _Rule("clip_proj.proj.0", ("img_emb.proj.0",)),
    _Rule("clip_proj.proj.1", ("img_emb.proj.1",)),
    _Rule("clip_proj.proj.3", ("img_emb.proj.3",)),
    _Rule("clip_proj.proj.4", ("img_emb.proj.4",)),
    _Rule("mixins.final_layer.linear", ("head.head",)),
    _Rule("mixins.final_layer.adaLN_modulation", ("head.modulation",), bare=True),
    _Rule("mixins.adaln_layer.adaLN_modulations.{i}", ("blocks.{i}.modulation",), bare=True),
    _Rule("mixins.adaln_layer.query_layernorm_list.{i}", ("blocks.{i}.self_attn.norm_q",)),
    _Rule("mixins.adaln_layer.key_layernorm_list.{i}", ("blocks.{i}.self_attn.norm_k",)),
    _Rule("mixins.adaln_layer.cross_query_layernorm_list.{i}", ("blocks.{i}.cross_attn.norm_q",)),
    _Rule("mixins.adaln_layer.cross_key_layernorm_list.{i}", ("blocks.{i}.cross_attn.norm_k",)),
    _Rule("mixins.adaln_layer.clip_feature_key_layernorm_list.{i}", ("blocks.{i}.cross_attn.norm_k_img",)),
    _Rule(
        "mixins.adaln_layer.clip_feature_key_value_list.{i}",
        ("blocks.{i}.cross_attn.k_img", "blocks.{i}.cross_attn.v_img"),
    ),
    _Rule(
        "transformer.layers.{i}.attention.query_key_value",
        ("blocks.{i}.self_attn.q", "blocks.{i}.self_attn.k", "blocks.{i}.self_attn.v"),
    ),
    _Rule("transformer.layers.{i}.attention.dense", ("blocks.{i}.self_attn.o",)),
    _Rule("transformer.layers.{i}.cross_attention.query", ("blocks.{i}.cross_attn.q",)),
    _Rule(
        "transformer.layers.{i}.cross_attention.key_value",
        ("blocks.{i}.cross_attn.k", "blocks.{i}.cross_attn.v"),
    ),
    _Rule("transformer.layers.{i}.cross_attention.dense", ("blocks.{i}.cross_attn.o",)),
    _Rule("transformer.layers.{i}.post_cross_attention_layernorm", ("blocks.{i}.norm3",)),
    _Rule("transformer.layers.{i}.mlp.dense_h_to_4h", ("blocks.{i}.ffn.0",)),
    _Rule("transformer.layers.{i}.mlp.dense_4h_to_h", ("blocks.{i}.ffn.2",)),
)


def _pattern(template: str, bare: bool) -> re.Pattern[str]:
    body = re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)")
    return re.compile("^" + body + ("$" if bare else r"\.(?P<p>weight|bias)$"))


_SAT_PATTERNS = tuple((_pattern(r.sat, r.bare), r) for r in _RULES)
_WAN_PATTERNS = tuple((_pattern(w, r.bare), r, j) for r in _RULES for j, w in enumerate(r.wan))


def _name(template: str, m: re.Match[str]) -> str:
    d = m.groupdict()
    name = template.replace("{i}", d["i"]) if d.get("i") is not None else template
    return name + ("." + d["p"] if d.get("p") else "")


def _unknown_error(kind: str, unknown: list[str], hint: str = "") -> KeyError:
    shown = ", ".join(repr(k) for k in sorted(unknown)[:20])
    more = f" (and {len(unknown) - 20} more)" if len(unknown) > 20 else ""
    return KeyError(f"{len(unknown)} {kind} keys have no known mapping: {shown}{more}{hint}")


def sat_module_state(checkpoint: Mapping[str, Any]) -> Mapping[str, Tensor]:
    """The model state dict of a loaded SAT checkpoint file (its ``"module"`` entry), or the mapping itself
    when it already is a state dict."""
    module = checkpoint.get("module") if isinstance(checkpoint, Mapping) else None
    if isinstance(module, Mapping):
        return module
    if isinstance(checkpoint, Mapping) and all(isinstance(v, Tensor) for v in checkpoint.values()):
        return checkpoint
    raise TypeError("not a SAT checkpoint: expected a dict with a 'module' state dict, or a state dict")


def sat_plan(keys: Iterable[str]) -> dict[str, tuple[str, int, int]]:
    """Where every Wan2.1 tensor of a SAT state dict comes from, without touching the tensors.

    Returns ``{wan_key: (sat_key, part, parts)}``: the Wan tensor is part ``part`` of ``parts`` equal chunks of
    ``sat_key`` along dim 0 (``parts`` is 1 for a plain rename). Keys may carry ``model.diffusion_model.`` or
    not; unknown keys raise ``KeyError`` listing them.
    """
    keys = list(keys)
    out: dict[str, tuple[str, int, int]] = {}
    unknown: list[str] = []
    for key in keys:
        name = key[len(SAT_PREFIX) :] if key.startswith(SAT_PREFIX) else key
        for pat, rule in _SAT_PATTERNS:
            m = pat.match(name)
            if m is not None:
                break
        else:
            unknown.append(key)
            continue
        for j, template in enumerate(rule.wan):
            new = _name(template, m)
            if new in out:
                raise ValueError(f"two SAT keys map to {new!r} (is the same tensor present with and without prefix?)")
            out[new] = (key, j, len(rule.wan))
    if unknown:
        hint = ""
        if "module" in keys:
            hint = "; this looks like a whole checkpoint file, pass sat_module_state(checkpoint) instead"
        raise _unknown_error("SAT", unknown, hint)
    return out


def take_part(value: Tensor, part: int, parts: int, key: str = "tensor") -> Tensor:
    """Part ``part`` of ``parts`` equal chunks of ``value`` along dim 0 (a view; ``value`` itself if 1 part)."""
    if parts == 1:
        return value
    if value.shape[0] % parts:
        raise ValueError(f"{key}: fused size {value.shape[0]} is not divisible into {parts} equal parts")
    return value.chunk(parts, dim=0)[part]


def sat_to_wan(state: Mapping[str, Tensor], *, clone: bool = True) -> dict[str, Tensor]:
    """Rename a SAT SCAIL-2 (or SAT Wan2.1-I2V) state dict to Wan2.1 names, splitting the fused projections.

    Keys may carry the ``model.diffusion_model.`` prefix or not. Unknown keys raise ``KeyError`` listing them.
    With ``clone`` False the split q/k/v (and k/v) tensors are views of the fused SAT tensor (no extra memory,
    but they share storage, which e.g. ``safetensors.save_file`` refuses).
    """
    out: dict[str, Tensor] = {}
    for new, (key, part, parts) in sat_plan(state).items():
        value = take_part(state[key], part, parts, key)
        out[new] = value.clone() if clone and parts > 1 else value
    return out


def wan_to_sat(state: Mapping[str, Tensor], *, prefix: str = SAT_PREFIX) -> dict[str, Tensor]:
    """Inverse of :func:`sat_to_wan`: Wan2.1 names -> SAT names (with ``prefix``), fusing q/k/v and k/v.

    A fused SAT tensor needs all of its Wan parts; a missing part raises ``KeyError``, as do unknown keys.
    """
    groups: dict[str, dict[int, Tensor]] = {}
    sizes: dict[str, int] = {}
    unknown: list[str] = []
    for key, value in state.items():
        for pat, rule, j in _WAN_PATTERNS:
            m = pat.match(key)
            if m is not None:
                break
        else:
            unknown.append(key)
            continue
        sat = prefix + _name(rule.sat, m)
        slot = groups.setdefault(sat, {})
        if j in slot:
            raise ValueError(f"two Wan keys map to part {j} of {sat!r}")
        slot[j] = value
        sizes[sat] = len(rule.wan)
    if unknown:
        raise _unknown_error("Wan", unknown)
    incomplete = sorted(k for k, parts in groups.items() if len(parts) != sizes[k])
    if incomplete:
        raise KeyError(f"fused SAT tensors lack some of their q/k/v (or k/v) parts: {incomplete[:20]}")
    out: dict[str, Tensor] = {}
    for sat, parts in groups.items():
        n = sizes[sat]
        out[sat] = parts[0] if n == 1 else torch.cat([parts[j] for j in range(n)], dim=0)
    return out
