"""Tiny encoders saved in the Wan2.1-I2V diffusers layout, for tests and demos without real weights.

`save_tiny_encoders(root)` writes ``vae/``, ``text_encoder/``, ``tokenizer/``, ``image_encoder/`` and
``image_processor/`` so that `Encoders.from_pretrained(root)` loads them like the real release:

- VAE, ``vae="trained"``: the tiny `AutoencoderKLWan` shipped in ``scail2/encoders/tiny_vae/`` (residual
  variant: 2x2 input patches, strides (4, 8, 8), 16 latent channels, per-channel latent mean/std), trained on the
  synthetic domain of `scail2.data.synth` by `scail2.encoders.tiny_vae_training` (its ``training.json``
  records the command, seed, steps, data and held-out PSNR), so decoded synthetic videos are pictures; also
  loadable on its own with `trained_tiny_vae`. ``vae="random"`` (the default, for tests that need speed and no
  pictures, or another width ``vae_base_dim``): the Wan2.1 block layout (so original-format key conversion
  applies too) with seeded random weights that carry the picture through (zero biases, variance-preserving
  weights; with PyTorch's default init about 90% of the latent variance is the same for every video), and
  latent mean/std measured on seeded probe videos, so normalised latents have unit variance per channel and
  differences between videos are not drowned by the flow-matching noise.
- Text: a 2-layer umT5 encoder of width `text_dim` with a word-level tokenizer built in code (T5's special ids:
  pad 0, EOS 1, unk 2; lower-cased; unknown words -> <unk>; EOS appended), so it works offline on any caption.
- Image: a 3-layer CLIP vision tower of width `image_dim` on `image_size` px images with `patch_size` patches
  (32 / 8 -> 17 tokens instead of ViT-H's 257), and a CLIPImageProcessor config with CLIP's mean/std.

Random weights are deterministic for a given seed; building and saving takes well under a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Caption vocabulary of the tiny tokenizer: common words of motion/appearance captions plus punctuation.
_WORDS = (
    "a an the and or of in on at to with from by for as is are was be his her their its this that these those "
    "it he she they man woman person people boy girl child men women character characters dancer dancers "
    "dancing dances dance walking walks walk running runs jumping jumps turning turns spinning waving waves "
    "standing stands sitting sits moving moves raises lifts arm arms hand hands leg legs head face body hair "
    "eyes smile smiling left right up down forward backward around front back side camera slowly quickly "
    "red green blue yellow white black pink purple orange brown gray grey dark light bright colorful "
    "shirt dress jacket pants skirt shoes hat coat t-shirt jeans suit uniform costume "
    "room street stage park beach studio background indoor outdoor city wall floor sky tree trees water "
    "video scene shot close-up wide full upper view anime cartoon realistic style "
    "young old long short tall small big large two three one while then together each other "
    "music performs performing gesture pose poses motion steps step holding holds looks looking"
).split()
_PUNCTUATION = tuple(".,!?;:'\"-()")
_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5/umT5

# Version of what `save_tiny_encoders` writes, recorded in <root>/tiny_encoders.json. 2: the VAE's weights carry
# the picture and its latent statistics are measured (version 1 latents were nearly the same for every video).
# The stamp also records the VAE kind ("random" when absent) and, for the trained one, its weights' sha256.
TINY_ENCODERS_VERSION = 2
_STAMP = "tiny_encoders.json"
VAE_KINDS: tuple[str, ...] = ("random", "trained")
# The shipped trained tiny VAE (a diffusers folder: config.json, diffusion_pytorch_model.safetensors, training.json).
TRAINED_VAE_DIR = Path(__file__).resolve().parent / "tiny_vae"
_VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


def check_vae_kind(vae: str) -> None:
    """Refuse an unknown tiny VAE kind, and the trained kind when its shipped files are missing."""
    if vae not in VAE_KINDS:
        raise ValueError(f"vae={vae!r}; use one of {VAE_KINDS}")
    if vae == "trained":
        missing = [name for name in _VAE_FILES if not (TRAINED_VAE_DIR / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"the trained tiny VAE lacks {missing} in {TRAINED_VAE_DIR} (an incomplete install?); reinstall "
                "scail2, or train it again with `python -m scail2.encoders.tiny_vae_training --out DIR --install`"
            )


def trained_vae_sha256() -> str:
    """sha256 of the shipped tiny VAE's weights (recorded in the stamp of encoders written with it)."""
    return hashlib.sha256((TRAINED_VAE_DIR / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()


def trained_tiny_vae(dtype: torch.dtype = torch.float32):
    """The shipped tiny `AutoencoderKLWan` trained on the synthetic domain (weights stored in float16, cast to
    ``dtype``), in eval mode. Its ``config.latents_mean`` / ``latents_std`` normalise its latents."""
    from diffusers import AutoencoderKLWan

    check_vae_kind("trained")
    return AutoencoderKLWan.from_pretrained(TRAINED_VAE_DIR, torch_dtype=dtype).eval()


def _build_tokenizer(model_max_length: int):
    """A word-level tokenizer with T5's special-token ids, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(_SPECIALS)}
    for token in (*_WORDS, *_PUNCTUATION):
        vocab.setdefault(token, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs become tokens
    # T5 appends EOS to every sequence, so "" encodes to one real token, as with the real umT5 tokenizer.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        padding_side="right",
    )


def _content_carrying_(vae: torch.nn.Module) -> None:
    """Random weights through which the input survives: biases zero (PyTorch's default uniform biases add a
    video-independent pattern that dominates the latents of a deep random network) and weights drawn with unit
    gain (``N(0, 1 / fan_in)``), so activations keep their scale from layer to layer. Uses the global RNG."""
    with torch.no_grad():
        for name, param in vae.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() >= 2:
                torch.nn.init.kaiming_normal_(param, nonlinearity="linear")


def _probe_videos(count: int = 4, frames: int = 5, size: int = 64) -> torch.Tensor:
    """(count, 3, frames, size, size) smooth random videos in [-1, 1]: coarse noise fields upsampled, drifting
    from frame to frame. Uses the global RNG."""
    import torch.nn.functional as F

    coarse = torch.rand(count, 3, 2, 4, 4) * 2 - 1  # start and end fields
    steps = torch.linspace(0, 1, frames).view(1, 1, frames, 1, 1)
    field = coarse[:, :, :1] * (1 - steps) + coarse[:, :, 1:] * steps  # (count, 3, frames, 4, 4)
    video = F.interpolate(field.flatten(1, 2), size=(size, size), mode="bilinear", align_corners=False)
    detail = F.interpolate(torch.rand(count, 3 * frames, 16, 16) * 2 - 1, size=(size, size), mode="bilinear", align_corners=False)
    return (0.7 * video + 0.3 * detail).clamp(-1, 1).view(count, 3, frames, size, size)


def calibrate_latents_(vae, videos) -> None:
    """Set the VAE config's per-channel ``latents_mean`` / ``latents_std`` to those of its posterior means of
    ``videos`` (an iterable of (B, 3, F, H, W) tensors in [-1, 1], of any sizes), as the real VAE ships statistics
    measured on real videos."""
    with torch.no_grad():
        zs = [vae.eval().encode(v).latent_dist.mode().transpose(0, 1).flatten(1) for v in videos]  # (16, N) each
    z = torch.cat(zs, dim=1)
    mean, std = z.mean(dim=1), z.std(dim=1).clamp_min(1e-6)
    vae.register_to_config(latents_mean=[float(v) for v in mean], latents_std=[float(v) for v in std])


def save_tiny_encoders(
    root: str | Path,
    seed: int = 0,
    *,
    text_dim: int = 32,
    image_dim: int = 32,
    image_size: int = 32,
    patch_size: int = 8,
    vae: str = "random",
    vae_base_dim: int = 8,
) -> Path:
    """Build tiny encoders and save them under `root` in the layout `Encoders.from_pretrained` reads.

    Args:
        root: folder to create (or fill); existing files of the same names are overwritten.
        seed: random weights are a deterministic function of the seed; the global RNG is left untouched.
        text_dim: umT5 width, the `text_dim` the transformer's text embedding takes.
        image_dim: CLIP width, the `image_dim` the transformer's image embedding takes.
        image_size, patch_size: CLIP input size and patch; tokens = 1 + (image_size // patch_size) ** 2.
        vae: "random" (seeded random weights, Wan2.1 block layout) or "trained" (a copy of the shipped tiny VAE
            trained on the synthetic domain; the same whatever the seed).
        vae_base_dim: base channel width of a random VAE (the real VAE uses 96).
    Returns:
        `root` as a Path.
    """
    check_vae_kind(vae)
    if text_dim % 4 or image_dim % 4:
        raise ValueError(f"text_dim={text_dim} and image_dim={image_dim} must be divisible by the 4 tiny heads")
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} must be divisible by patch_size={patch_size}")
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    root = Path(root)
    tokenizer = _build_tokenizer(model_max_length=512)
    with torch.random.fork_rng(devices=[]):  # seed locally; callers' RNG streams are unaffected
        torch.manual_seed(seed)
        random_vae = None
        if vae == "random":
            random_vae = AutoencoderKLWan(base_dim=vae_base_dim, z_dim=16)  # real strides and block layout
            _content_carrying_(random_vae)
            calibrate_latents_(random_vae, [_probe_videos()])  # seeded probe videos
        text = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=text_dim,
                d_kv=text_dim // 4,
                d_ff=2 * text_dim,
                num_layers=2,
                num_heads=4,
                feed_forward_proj="gated-gelu",  # umT5's FFN
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )
        )
        image = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=image_dim,
                intermediate_size=2 * image_dim,
                num_hidden_layers=3,
                num_attention_heads=4,
                image_size=image_size,
                patch_size=patch_size,
                hidden_act="gelu",  # open-clip ViT-H uses exact GELU
                layer_norm_eps=1e-5,
                projection_dim=image_dim,
            )
        )
    if random_vae is not None:
        random_vae.save_pretrained(root / "vae", safe_serialization=True)
    else:
        (root / "vae").mkdir(parents=True, exist_ok=True)
        for name in _VAE_FILES:
            shutil.copyfile(TRAINED_VAE_DIR / name, root / "vae" / name)
    text.save_pretrained(root / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(root / "tokenizer")
    image.save_pretrained(root / "image_encoder", safe_serialization=True)
    processor = {  # the keys of the real image_processor/preprocessor_config.json, at the tiny size
        "crop_size": {"height": image_size, "width": image_size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": image_size},
    }
    (root / "image_processor").mkdir(parents=True, exist_ok=True)
    (root / "image_processor" / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    stamp = {"version": TINY_ENCODERS_VERSION, "seed": seed, "text_dim": text_dim, "image_dim": image_dim,
             "image_size": image_size, "patch_size": patch_size, "vae": vae}  # fmt: skip
    if vae == "random":
        stamp["vae_base_dim"] = vae_base_dim
    else:
        stamp["vae_sha256"] = trained_vae_sha256()
    (root / _STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
    return root


def ensure_tiny_encoders(root: str | Path, seed: int = 0, vae: str = "random") -> Path:
    """Write tiny encoders (default dims, the ``vae`` kind of `save_tiny_encoders`) to `root` unless it already
    holds them; refuse a folder written by another version, with another seed or another VAE (for the trained
    one: other weights), since latents cached next to it would not match these encoders."""
    check_vae_kind(vae)
    root = Path(root)
    if not (root / "vae" / "config.json").exists():
        log.info("writing tiny encoders (%s VAE) to %s", vae, root)
        return save_tiny_encoders(root, seed=seed, vae=vae)
    stamp = root / _STAMP
    recorded = json.loads(stamp.read_text()) if stamp.exists() else None
    their_vae = recorded.get("vae", "random") if recorded else None
    if not recorded or recorded.get("version") != TINY_ENCODERS_VERSION or recorded.get("seed") != seed or their_vae != vae:
        found = f"version {recorded.get('version')}, seed {recorded.get('seed')}, {their_vae} VAE" if recorded else f"no {_STAMP}"
        raise ValueError(
            f"{root} holds tiny encoders of another kind ({found}; this version writes version "
            f"{TINY_ENCODERS_VERSION}, seed {seed}, {vae} VAE), and data encoded with them would not match; delete "
            f"{root.parent} (it is regenerated on the next run) or point the data root elsewhere"
        )
    if vae == "trained" and recorded.get("vae_sha256") != trained_vae_sha256():
        raise ValueError(
            f"{root} holds a trained tiny VAE with other weights than the shipped {TRAINED_VAE_DIR} (written by "
            f"another build of scail2), and data encoded with it would not match; delete {root.parent} (it is "
            "regenerated on the next run) or point the data root elsewhere"
        )
    return root
