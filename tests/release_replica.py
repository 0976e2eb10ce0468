"""Tiny replicas of the files of the official SCAIL-2 release, with the real key names and containers.

- :func:`numpy1_rng_state`: pickle opcodes, written byte by byte, of ``np.random.get_state()`` as NumPy 1
  pickles it (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``; protocol 2, bytes
  through ``_codecs.encode``), embedded in a ``torch.save`` zip with :func:`save_with_raw`.
- :func:`save_sat_checkpoint`: ``model/<iteration>/fsdp2_rank_0000_checkpoint.pt`` as SAT writes it.
- :class:`WanT5Encoder` / :class:`WanVisionTransformer`: minimal re-implementations of the module structure of
  Wan2.1's ``wan/modules/t5.py`` (umT5 encoder) and ``clip.py`` (open-clip ViT-H/14 visual tower), written from
  its published structure (parameter names, fused qkv, activations, norms, no T5 attention scaling, relative
  position buckets), so their state dicts carry the names of ``models_t5_umt5-xxl-enc-bf16.pth`` and
  ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` and their outputs are the reference.
- :func:`save_sat_dpo_lora` / :func:`save_lightx2v_lora`: the DPO LoRA container and a diff-carrying LoRA.
- :func:`build_release_tree`: the whole release folder at tiny size.
"""

from __future__ import annotations

import math
import pickle
import re
import struct
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------------------------------ pickle opcodes
def op_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"  # GLOBAL


def op_str(text: str) -> bytes:
    data = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def op_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])  # BININT1
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)  # BININT2
    return b"J" + struct.pack("<i", value)  # BININT


def op_bytes(data: bytes) -> bytes:
    """``bytes`` under protocol 2, as Python pickles them: ``_codecs.encode(data.decode('latin1'), 'latin1')``."""
    return op_global("_codecs", "encode") + op_str(data.decode("latin1")) + op_str("latin1") + b"\x86R"


def numpy1_array(values: list[int], dtype: str = "u4", module: str = "numpy.core.multiarray") -> bytes:
    """Opcodes of a 1-D NumPy array as NumPy 1 pickles it:
    ``_reconstruct(ndarray, (0,), b'b')`` then BUILD with ``(1, shape, dtype, False, raw bytes)``."""
    fmt = {"u4": "I", "i8": "q", "f8": "d"}[dtype]
    raw = struct.pack(f"<{len(values)}{fmt}", *values)
    dtype_ops = (
        op_global("numpy", "dtype") + op_str(dtype) + b"\x89\x88\x87R"  # numpy.dtype('u4', False, True)
        + b"(" + op_int(3) + op_str("<") + b"NNN" + op_int(-1) + op_int(-1) + op_int(0) + b"tb"  # its state
    )
    return (
        op_global(module, "_reconstruct")
        + op_global("numpy", "ndarray")
        + op_int(0) + b"\x85"  # (0,)
        + op_bytes(b"b")
        + b"\x87R"  # _reconstruct(ndarray, (0,), b'b')
        + b"(" + op_int(1) + op_int(len(values)) + b"\x85" + dtype_ops + b"\x89" + op_bytes(raw) + b"tb"
    )


def numpy1_rng_state(key: list[int], pos: int = 624) -> bytes:
    """Opcodes of the tuple ``np.random.get_state()`` returns: ('MT19937', key uint32[624], pos, 0, 0.0)."""
    return b"(" + op_str("MT19937") + numpy1_array(key) + op_int(pos) + op_int(0) + b"G" + struct.pack(">d", 0.0) + b"t"


class Raw:
    """A value written into a pickle as the given opcodes, verbatim."""

    def __init__(self, data: bytes) -> None:
        self.data = data


class _RawPickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_raw(self, obj: Raw) -> None:
        self.write(obj.data)

    dispatch[Raw] = _save_raw


RAW_PICKLE = types.ModuleType("raw_pickle")
RAW_PICKLE.Pickler = _RawPickler
RAW_PICKLE.Unpickler = pickle.Unpickler


def save_with_raw(obj: object, path: Path) -> Path:
    """``torch.save`` (zip format) whose pickle writes every :class:`Raw` value as its opcodes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path, pickle_module=RAW_PICKLE)
    return path


def mt19937_key(seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [int(v) for v in torch.randint(0, 2**32, (624,), generator=g, dtype=torch.int64)]


# -------------------------------------------------------------------------------------------- SAT files
def release_config(**overrides):
    """A tiny SCAIL-2 geometry with Wan2.1's head size 128, so that, as with the real 14B file, the head count
    follows from the weights (the SAT checkpoint records none)."""
    from scail2.models import scail2_config

    return scail2_config("tiny", **{"dim": 128, "num_heads": 1, **overrides})


def save_sat_checkpoint(model: nn.Module, root: Path, iteration: int = 1, rng_key: list[int] | None = None) -> Path:
    """``root/model/latest`` + ``root/model/<iteration>/fsdp2_rank_0000_checkpoint.pt`` as SAT writes them:
    the trainable weights under ``module`` with SAT names, the iteration, and RNG states (NumPy 1 pickled)."""
    from scail2.models.convert_sat import wan_to_sat

    folder = root / "model" / str(iteration)
    folder.mkdir(parents=True, exist_ok=True)
    (root / "model" / "latest").write_text(f"{iteration}\n")
    checkpoint = {
        "iteration": iteration,
        "module": wan_to_sat(model.state_dict()),
        "client_lr_scheduler": {"num_iters": iteration},
        "random_rng_state": (3, tuple(range(625)), None),
        "np_rng_state": Raw(numpy1_rng_state(rng_key or mt19937_key())),
        "torch_rng_state": torch.get_rng_state(),
    }
    return save_with_raw(checkpoint, folder / "fsdp2_rank_0000_checkpoint.pt")


# ------------------------------------------------------------------------- Wan2.1 umT5 encoder structure
class _WanT5Norm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x


class _WanT5Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], self.heads
        q, k, v = (f(x).view(b, x.shape[1], n, -1) for f in (self.q, self.k, self.v))  # (B, L, N, C)
        logits = torch.einsum("binc,bjnc->bnij", q, k) + bias  # T5: no 1/sqrt(d) scaling
        logits = logits.masked_fill(mask.view(b, 1, 1, -1) == 0, torch.finfo(x.dtype).min)
        attn = logits.float().softmax(-1).type_as(logits)
        return self.o(torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, x.shape[1], -1))


class _WanT5FeedForward(nn.Module):
    def __init__(self, dim: int, ffn: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, ffn, bias=False)
        self.fc2 = nn.Linear(ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class _WanT5RelativeEmbedding(nn.Module):
    def __init__(self, buckets: int, heads: int, max_dist: int = 128) -> None:
        super().__init__()
        self.buckets, self.max_dist = buckets, max_dist
        self.embedding = nn.Embedding(buckets, heads)

    def forward(self, length: int) -> torch.Tensor:
        rel = torch.arange(length).unsqueeze(0) - torch.arange(length).unsqueeze(1)  # key - query
        half = self.buckets // 2  # bidirectional
        out = (rel > 0).long() * half
        rel = rel.abs()
        exact = half // 2
        large = exact + (torch.log(rel.float() / exact) / math.log(self.max_dist / exact) * (half - exact)).long()
        large = large.clamp(max=half - 1)
        out = out + torch.where(rel < exact, rel, large)
        return self.embedding(out).permute(2, 0, 1).unsqueeze(0)  # (1, N, L, L)


class _WanT5Block(nn.Module):
    def __init__(self, dim: int, ffn: int, heads: int, buckets: int) -> None:
        super().__init__()
        self.norm1 = _WanT5Norm(dim)
        self.attn = _WanT5Attention(dim, heads)
        self.norm2 = _WanT5Norm(dim)
        self.ffn = _WanT5FeedForward(dim, ffn)
        self.pos_embedding = _WanT5RelativeEmbedding(buckets, heads)  # umT5: one per block

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask, self.pos_embedding(x.shape[1]))
        return x + self.ffn(self.norm2(x))


class WanT5Encoder(nn.Module):
    """The umT5 encoder as Wan2.1 builds it: ``token_embedding``, ``blocks.N.{norm1, attn.{q,k,v,o}, norm2,
    ffn.{gate.0, fc1, fc2}, pos_embedding.embedding}``, ``norm``."""

    def __init__(self, vocab: int, dim: int, ffn: int, heads: int, layers: int, buckets: int = 32) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(_WanT5Block(dim, ffn, heads, buckets) for _ in range(layers))
        self.norm = _WanT5Norm(dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)


# ---------------------------------------------------------------- Wan2.1 open-clip visual tower structure
class _ClipAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        q, k, v = self.to_qkv(x).view(b, s, 3, self.heads, c // self.heads).unbind(2)  # (B, S, N, D) each
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(b, s, c))


class _ClipBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = _ClipAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class WanVisionTransformer(nn.Module):
    """The visual tower of Wan2.1's open-clip XLM-RoBERTa ViT: ``patch_embedding`` (no bias), ``cls_embedding``,
    ``pos_embedding``, ``pre_norm``, ``transformer.N.{norm1, attn.{to_qkv, proj}, norm2, mlp.{0,2}}``,
    ``post_norm``, ``head``; ``forward(x, use_31_block=True)`` returns the tokens before the last block."""

    def __init__(self, image_size: int, patch: int, dim: int, heads: int, layers: int, out_dim: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, dim, kernel_size=patch, stride=patch, bias=False)
        self.cls_embedding = nn.Parameter(torch.randn(1, 1, dim) / math.sqrt(dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, 1 + (image_size // patch) ** 2, dim) / math.sqrt(dim))
        self.pre_norm = nn.LayerNorm(dim, eps=1e-5)
        self.transformer = nn.Sequential(*(_ClipBlock(dim, heads, mlp_ratio) for _ in range(layers)))
        self.post_norm = nn.LayerNorm(dim, eps=1e-5)
        self.head = nn.Parameter(torch.randn(dim, out_dim) / math.sqrt(dim))

    def forward(self, x: torch.Tensor, use_31_block: bool = True) -> torch.Tensor:
        x = self.patch_embedding(x).flatten(2).transpose(1, 2)  # (B, P, dim)
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        x = self.pre_norm(x)
        return self.transformer[:-1](x) if use_31_block else self.transformer(x)


def wan_clip_file_state(visual: WanVisionTransformer, text_dim: int = 8) -> dict[str, torch.Tensor]:
    """The state dict of the whole released CLIP file: ``visual.*`` plus stand-ins for its text tower
    (``textual.*``) and ``log_scale``, which a loader of the visual tower must leave aside."""
    state = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    state["textual.token_embedding.weight"] = torch.randn(11, text_dim, generator=g)
    state["textual.head.0.weight"] = torch.randn(text_dim, text_dim, generator=g)
    state["log_scale"] = torch.tensor(math.log(1 / 0.07))
    return state


def wan_vae_original_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKLWan key names -> the original Wan2.1 VAE names (test-only inverse of the converter)."""
    inner = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6"}
    inner["conv_shortcut"] = "shortcut"
    rules = [
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)\.(\w+)",
         lambda m: f"{m[1]}.middle.{2 * int(m[2])}.{inner[m[3]]}.{m[4]}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", lambda m: f"{m[1]}.middle.1.{m[2]}"),
        (r"encoder\.down_blocks\.(\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut)\.(\w+)",
         lambda m: f"encoder.downsamples.{m[1]}.{inner[m[2]]}.{m[3]}"),
        (r"encoder\.down_blocks\.(\d+)\.(.+)", lambda m: f"encoder.downsamples.{m[1]}.{m[2]}"),
        (r"decoder\.up_blocks\.(\d)\.resnets\.(\d)\.(\w+)\.(\w+)",
         lambda m: f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{inner[m[3]]}.{m[4]}"),
        (r"decoder\.up_blocks\.(\d)\.upsamplers\.0\.(.+)", lambda m: f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"),
        (r"(encoder|decoder)\.conv_in\.(\w+)", lambda m: f"{m[1]}.conv1.{m[2]}"),
        (r"(encoder|decoder)\.norm_out\.gamma", lambda m: f"{m[1]}.head.0.gamma"),
        (r"(encoder|decoder)\.conv_out\.(\w+)", lambda m: f"{m[1]}.head.2.{m[2]}"),
        (r"quant_conv\.(\w+)", lambda m: f"conv1.{m[1]}"),
        (r"post_quant_conv\.(\w+)", lambda m: f"conv2.{m[1]}"),
    ]
    out = {}
    for key, value in state.items():
        for pattern, rename in rules:
            match = re.fullmatch(pattern, key)
            if match:
                out[rename(match)] = value
                break
        else:
            raise AssertionError(f"no rule for {key}")
    return out


def randomize_norms_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm weight/bias a random value (they start at exactly 1 / 0) so key mix-ups show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(p + 0.2 * torch.randn(p.shape, generator=g))
    return module


# ---------------------------------------------------------------------------------------------- LoRA files
DPO_MODULES = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
               "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")  # fmt: skip
_SAT_OF_WAN = {
    "self_attn.q": "attention.query_key_value.lora_layer.0",
    "self_attn.k": "attention.query_key_value.lora_layer.1",
    "self_attn.v": "attention.query_key_value.lora_layer.2",
    "self_attn.o": "attention.dense.lora_layer",
    "cross_attn.q": "cross_attention.query.lora_layer",
    "cross_attn.k": "cross_attention.key_value.lora_layer.0",
    "cross_attn.v": "cross_attention.key_value.lora_layer.1",
    "cross_attn.o": "cross_attention.dense.lora_layer",
    "ffn.0": "mlp.dense_h_to_4h.lora_layer",
    "ffn.2": "mlp.dense_4h_to_h.lora_layer",
}


def random_lora_pairs(model: nn.Module, rank: int, seed: int = 0, modules=DPO_MODULES) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"blocks.N.<module>": (down (rank, in), up (out, rank))}`` for every block, non-zero both."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for i in range(len(model.blocks)):
        for module in modules:
            layer = model.get_submodule(f"blocks.{i}.{module}")
            down = torch.randn(rank, layer.in_features, generator=g) / rank
            up = torch.randn(layer.out_features, rank, generator=g) * 0.05
            pairs[f"blocks.{i}.{module}"] = (down, up)
    return pairs


def save_sat_dpo_lora(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path) -> Path:
    """``model/bias-aware-dpo-lora.pt`` as SAT/DeepSpeed writes it: the LoRA factors under ``module`` with SAT
    names (``model.diffusion_model.transformer.layers.N.<SAT module>.lora_layer[.i].{down,up}.weight``), the
    iteration and a NumPy-1 RNG state."""
    module = {}
    for name, (down, up) in pairs.items():
        _, block, wan = name.split(".", 2)
        base = f"model.diffusion_model.transformer.layers.{block}.{_SAT_OF_WAN[wan]}"
        module[f"{base}.down.weight"] = down
        module[f"{base}.up.weight"] = up
    return save_with_raw({"module": module, "iteration": 400, "np_rng_state": Raw(numpy1_rng_state(mt19937_key(7)))}, path)


def merged_state(model: nn.Module, pairs, deltas=None, lora_scale: float = 1.0, delta_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The state dict the official fusion gives: ``W += s * up @ down``, ``t += s * delta``."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, (down, up) in pairs.items():
        state[f"{name}.weight"] += lora_scale * (up @ down)
    for name, delta in (deltas or {}).items():
        state[name] += delta_scale * delta
    return state


# ---------------------------------------------------------------------------------------- the whole release
WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"


def build_release_tree(root: Path, seed: int = 0) -> Path:
    """The official SCAIL-2 release folder at tiny size, with the real file names, containers and key names::

        root/model/latest, root/model/1/fsdp2_rank_0000_checkpoint.pt   SAT checkpoint (NumPy-1 RNG state)
        root/model/bias-aware-dpo-lora.pt                              SAT LoRA container
        root/Wan2.1_VAE.pth                                            original Wan2.1 VAE keys
        root/models_t5_umt5-xxl-enc-bf16.pth                           Wan umT5 keys, bf16
        root/umt5-xxl/                                                 tokenizer
        root/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth   open-clip keys (visual + text tower)
    """
    from diffusers import AutoencoderKLWan

    from scail2.encoders.tiny import _build_tokenizer, _content_carrying_
    from scail2.models import SCAIL2Transformer
    from scail2.testing import randomize_

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(model_max_length=512)
    tokenizer.save_pretrained(root / "umt5-xxl")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = randomize_(SCAIL2Transformer(release_config()), seed=seed)
        vae = AutoencoderKLWan(base_dim=8, z_dim=16)
        _content_carrying_(vae)
        t5 = WanT5Encoder(vocab=len(tokenizer), dim=32, ffn=48, heads=4, layers=2)
        for p in t5.parameters():
            torch.nn.init.normal_(p, std=0.3)
        visual = WanVisionTransformer(image_size=32, patch=8, dim=32, heads=16, layers=3, out_dim=16)
        for p in visual.parameters():
            torch.nn.init.normal_(p, std=0.2)
    randomize_norms_(t5, seed)
    randomize_norms_(visual, seed)
    save_sat_checkpoint(transformer, root, iteration=1, rng_key=mt19937_key(seed))
    save_sat_dpo_lora(random_lora_pairs(transformer, rank=4, seed=seed + 1), root / "model" / "bias-aware-dpo-lora.pt")
    torch.save(wan_vae_original_state({k: v.clone() for k, v in vae.state_dict().items()}), root / "Wan2.1_VAE.pth")
    torch.save({k: v.to(torch.bfloat16) for k, v in t5.state_dict().items()}, root / WAN_T5_FILE)
    torch.save(wan_clip_file_state(visual), root / WAN_CLIP_FILE)
    return root
