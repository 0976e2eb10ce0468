"""The original Wan2.1 encoder files, loaded into the transformers models that `TextEncoder` / `ImageEncoder` wrap.

The official SCAIL-2 and Wan2.1 releases ship the encoders as single torch files in Wan's own module layout:

- ``models_t5_umt5-xxl-enc-bf16.pth``: the umT5-XXL encoder (bf16) as Wan2.1's ``wan/modules/t5.py`` builds it:
  ``token_embedding``, ``blocks.N.{norm1, attn.{q,k,v,o}, norm2, ffn.{gate.0, fc1, fc2}, pos_embedding.embedding}``,
  ``norm``. It maps one to one onto transformers' ``UMT5EncoderModel`` (``gate.0`` is the GELU branch ``wi_0``,
  ``fc1`` the linear branch ``wi_1``, ``fc2`` is ``wo``; every block has its own relative position bias, with 32
  buckets and a maximum distance of 128; GELU is the tanh approximation; no attention scaling, as in T5).
- ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``: the whole open-clip XLM-RoBERTa ViT-H/14 (Wan2.1's
  ``wan/modules/clip.py``). Only its ``visual.*`` tower is used by SCAIL-2 (the text tower ``textual.*``, the
  ``log_scale`` and the visual ``head`` projection are not loaded). Its blocks fuse q/k/v in one linear
  (``attn.to_qkv``, output rows ``[q; k; v]``), which is split into transformers' ``CLIPVisionModel`` projections;
  exact GELU, LayerNorm eps 1e-5, a bias-free patch embedding and a pre-norm, as in ViT-H/14.

The geometry is read off the tensor shapes, except the CLIP head count, which the file does not record: 16, as in
Wan2.1's ``clip_xlm_roberta_vit_h_14`` (pass ``num_heads`` for another tower). The CLIP file carries no
preprocessing config either; :func:`wan_clip_preprocess` gives Wan's: resize straight to the input size
(bicubic), CLIP's mean/std.

Models are built on the meta device and the file's tensors assigned, so a file is never held twice in memory.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from scail2.utils.torch_files import TORCH_SUFFIXES, CheckpointError, describe_file, load_torch_file

if TYPE_CHECKING:
    from transformers import CLIPVisionModel, UMT5EncoderModel

    from scail2.encoders.image import ClipPreprocess

log = logging.getLogger(__name__)

WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
WAN_CLIP_HEADS = 16  # ViT-H/14 (Wan2.1 clip_xlm_roberta_vit_h_14: vision_heads=16)
# Wan2.1's CLIP normalisation (OpenAI CLIP mean/std).
WAN_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
WAN_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_T5_MAX_DISTANCE = 128  # Wan2.1 T5RelativeEmbedding(max_dist=128)


def _read(path: Path, what: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix not in (*TORCH_SUFFIXES, ".safetensors"):
        raise CheckpointError(f"{path} is {describe_file(path)}; the original Wan {what} is a .pth file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = load_torch_file(path, what=f"the Wan {what}", loads=f"the original {what} .pth (a dict of tensors)")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors (the Wan {what} state dict)")
    return state


def _check(expected: set[str], found: set[str], path: Path, what: str) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not have the key layout of the Wan2.1 {what}: missing {missing[:8]} "
            f"({len(missing)}), unexpected {unexpected[:8]} ({len(unexpected)})"
        )


def _assign(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check(set(own), set(state), path, what)
    bad = [f"{k}: file {tuple(state[k].shape)} vs model {own[k]}" for k in own if tuple(state[k].shape) != own[k]]
    if bad:
        raise CheckpointError(f"{path}: shapes do not fit the {what} they describe: {bad[:8]}")
    model.load_state_dict(dict(state), strict=True, assign=True)


# -------------------------------------------------------------------------------------------------- umT5
_T5_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def wan_t5_to_umt5(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan2.1 umT5 encoder names -> transformers ``UMT5EncoderModel`` names (unknown keys raise ``KeyError``)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if key == "token_embedding.weight":
            out["shared.weight"] = value
            out["encoder.embed_tokens.weight"] = value  # tied to shared in UMT5EncoderModel
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif m and m.group(2) in _T5_BLOCK:
            out[f"encoder.block.{m.group(1)}.{_T5_BLOCK[m.group(2)]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"{len(unknown)} keys are not Wan2.1 umT5 encoder names: {sorted(unknown)[:10]}")
    return out


def umt5_config_from_wan_state(shapes: Mapping[str, tuple[int, ...]]) -> Any:
    """The ``UMT5Config`` of a Wan2.1 umT5 encoder state dict, read off its shapes."""
    from transformers import UMT5Config

    need = ["token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight", "blocks.0.pos_embedding.embedding.weight"]
    missing = [k for k in need if k not in shapes]
    if missing:
        raise KeyError(f"not a Wan2.1 umT5 encoder: missing {missing}")
    vocab, dim = shapes["token_embedding.weight"]
    buckets, heads = shapes["blocks.0.pos_embedding.embedding.weight"]
    inner = shapes["blocks.0.attn.q.weight"][0]
    layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
    return UMT5Config(
        vocab_size=vocab,
        d_model=dim,
        d_kv=inner // heads,
        d_ff=shapes["blocks.0.ffn.fc1.weight"][0],
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=_T5_MAX_DISTANCE,
        feed_forward_proj="gated-gelu",  # GELU (tanh) gate times a linear branch
        layer_norm_epsilon=1e-6,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def load_wan_t5(path: str | Path, dtype: torch.dtype = torch.float32) -> UMT5EncoderModel:
    """``models_t5_umt5-xxl-enc-bf16.pth`` -> a transformers ``UMT5EncoderModel`` in ``dtype``."""
    from transformers import UMT5EncoderModel

    path = Path(path)
    state = _read(path, "umT5 text encoder")
    try:
        config = umt5_config_from_wan_state({k: tuple(v.shape) for k, v in state.items()})
        mapped = wan_t5_to_umt5(state)
    except KeyError as exc:
        raise CheckpointError(f"{path} is not a Wan2.1 umT5 encoder file ({exc.args[0]})") from exc
    mapped = {k: v.to(dtype) for k, v in mapped.items()}
    mapped["encoder.embed_tokens.weight"] = mapped["shared.weight"]  # one tensor, as the model ties them
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    _assign(model, mapped, path, "umT5 encoder")
    return model.eval()


# -------------------------------------------------------------------------------------------------- CLIP
_CLIP_BLOCK = {
    "norm1": "layer_norm1",
    "attn.proj": "self_attn.out_proj",
    "norm2": "layer_norm2",
    "mlp.0": "mlp.fc1",
    "mlp.2": "mlp.fc2",
}
# Parts of the released CLIP file that SCAIL-2 does not use: the text tower, the logit scale, the visual head.
_CLIP_UNUSED = re.compile(r"^(textual\..*|log_scale|visual\.head)$")


def wan_clip_to_hf(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The ``visual.*`` tower of Wan2.1's open-clip file -> transformers ``CLIPVisionModel`` names (with
    ``prefix`` before ``embeddings.``), fused q/k/v split; the text tower, ``log_scale`` and ``visual.head`` are
    left out. Unknown keys raise ``KeyError``."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if _CLIP_UNUSED.match(key):
            continue
        m = re.fullmatch(r"visual\.transformer\.(\d+)\.(.+)\.(weight|bias)", key)
        if key == "visual.patch_embedding.weight":
            out[f"{prefix}embeddings.patch_embedding.weight"] = value
        elif key == "visual.cls_embedding":
            out[f"{prefix}embeddings.class_embedding"] = value.reshape(-1)  # (1, 1, D) -> (D,)
        elif key == "visual.pos_embedding":
            out[f"{prefix}embeddings.position_embedding.weight"] = value.reshape(value.shape[-2], value.shape[-1])
        elif key in ("visual.pre_norm.weight", "visual.pre_norm.bias"):
            out[f"{prefix}pre_layrnorm.{key.rsplit('.', 1)[1]}"] = value
        elif key in ("visual.post_norm.weight", "visual.post_norm.bias"):
            out[f"{prefix}post_layernorm.{key.rsplit('.', 1)[1]}"] = value
        elif m and m.group(2) == "attn.to_qkv":
            layer, param = m.group(1), m.group(3)
            if value.shape[0] % 3:
                raise KeyError(f"{key}: fused q/k/v size {value.shape[0]} is not divisible by 3")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{prefix}encoder.layers.{layer}.self_attn.{name}.{param}"] = part.clone()
        elif m and m.group(2) in _CLIP_BLOCK:
            out[f"{prefix}encoder.layers.{m.group(1)}.{_CLIP_BLOCK[m.group(2)]}.{m.group(3)}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"{len(unknown)} keys are not Wan2.1 open-clip visual names: {sorted(unknown)[:10]}")
    return out


def clip_config_from_wan_state(shapes: Mapping[str, tuple[int, ...]], num_heads: int = WAN_CLIP_HEADS) -> Any:
    """The ``CLIPVisionConfig`` of the visual tower of a Wan2.1 open-clip state dict (shapes + head count)."""
    from transformers import CLIPVisionConfig

    need = ["visual.patch_embedding.weight", "visual.pos_embedding", "visual.transformer.0.mlp.0.weight"]
    missing = [k for k in need if k not in shapes]
    if missing:
        raise KeyError(f"not a Wan2.1 open-clip file: missing {missing}")
    dim, _, patch, _ = shapes["visual.patch_embedding.weight"]
    positions = shapes["visual.pos_embedding"][-2]
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1:
        raise KeyError(f"visual.pos_embedding has {positions} positions; expected 1 + a square number")
    if dim % num_heads:
        raise ValueError(f"CLIP width {dim} is not divisible by num_heads={num_heads}")
    layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("visual.transformer."))
    return CLIPVisionConfig(
        hidden_size=dim,
        intermediate_size=shapes["visual.transformer.0.mlp.0.weight"][0],
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",  # exact GELU in open-clip ViT-H/14
        layer_norm_eps=1e-5,
        projection_dim=shapes["visual.head"][1] if "visual.head" in shapes else dim,
    )


def load_wan_clip(
    path: str | Path, dtype: torch.dtype = torch.float32, num_heads: int = WAN_CLIP_HEADS
) -> CLIPVisionModel:
    """``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` -> its visual tower as a transformers
    ``CLIPVisionModel`` in ``dtype``."""
    from transformers import CLIPVisionModel

    path = Path(path)
    state = _read(path, "CLIP image encoder")
    try:
        config = clip_config_from_wan_state({k: tuple(v.shape) for k, v in state.items()}, num_heads)
        with torch.device("meta"):
            model = CLIPVisionModel(config)
        names = list(model.state_dict())
        prefix = next(k for k in names if k.endswith("embeddings.class_embedding"))[: -len("embeddings.class_embedding")]
        mapped = {k: v.to(dtype) for k, v in wan_clip_to_hf(state, prefix).items()}
    except KeyError as exc:
        raise CheckpointError(f"{path} is not a Wan2.1 open-clip file ({exc.args[0]})") from exc
    skipped = sorted(k for k in state if _CLIP_UNUSED.match(k))
    if skipped:
        log.info("%s: %d tensors of the text tower / head are not used by SCAIL-2 and not loaded", path, len(skipped))
    _assign(model, mapped, path, "CLIP visual tower")
    _rebuild_position_ids(model, config)
    return model.eval()


def _rebuild_position_ids(model: torch.nn.Module, config: Any) -> None:
    """Non-persistent buffers are not in any state dict; a model built on the meta device needs them made."""
    positions = (config.image_size // config.patch_size) ** 2 + 1
    for module_name, module in model.named_modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if not buffer.is_meta:
                continue
            if name != "position_ids":
                raise CheckpointError(f"buffer {module_name}.{name} of the CLIP model has no value after loading")
            module.register_buffer(name, torch.arange(positions).expand((1, -1)), persistent=False)


def wan_clip_preprocess(image_size: int) -> ClipPreprocess:
    """Wan2.1's CLIP preprocessing: straight (squash) bicubic resize to the input size, CLIP mean/std."""
    from scail2.encoders.image import ClipPreprocess

    return ClipPreprocess(
        crop_hw=(image_size, image_size), mean=WAN_CLIP_MEAN, std=WAN_CLIP_STD, interpolation="bicubic",
        shortest_edge=image_size,
    )  # fmt: skip
