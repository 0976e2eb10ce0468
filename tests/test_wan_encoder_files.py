"""The original Wan2.1 encoder files of the SCAIL-2 release load into TextEncoder / ImageEncoder.

The references are re-implementations of Wan2.1's module structure (tests/release_replica.py), so the files carry
Wan's own key names (``models_t5_umt5-xxl-enc-bf16.pth``: ``blocks.N.attn.q`` ...;
``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``: ``visual.transformer.N.attn.to_qkv`` ...).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scail2.encoders.bundle import Encoders
from scail2.encoders.image import ImageEncoder
from scail2.encoders.text import TextEncoder
from scail2.encoders.tiny import _build_tokenizer
from scail2.encoders.wan_files import WAN_CLIP_FILE, WAN_CLIP_MEAN, WAN_CLIP_STD, WAN_T5_FILE
from scail2.utils.torch_files import CheckpointError
from tests.release_replica import WanT5Encoder, WanVisionTransformer, randomize_norms_, wan_clip_file_state

PROMPTS = [
    "A woman in a red dress dancing on a stage, the camera slowly moving around her while she raises her arms "
    "and turns left and right, then jumps forward with her hands up and smiles at the camera.",
    "a man walking",
    "",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("umt5-xxl")
    _build_tokenizer(model_max_length=512).save_pretrained(folder)
    return folder


def _wan_t5(vocab: int) -> WanT5Encoder:
    torch.manual_seed(0)
    model = WanT5Encoder(vocab=vocab, dim=32, ffn=48, heads=4, layers=2)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return randomize_norms_(model).eval()


def test_wan_umt5_file_matches_the_wan_module(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    wan = _wan_t5(vocab)
    assert {"blocks.0.ffn.gate.0.weight", "blocks.1.pos_embedding.embedding.weight", "norm.weight"} <= set(
        wan.state_dict()
    )
    path = tmp_path / WAN_T5_FILE
    torch.save(wan.state_dict(), path)
    encoder = TextEncoder.from_pretrained(path, tokenizer_dir)
    ours = encoder.encode(PROMPTS)  # (3, 512, 32)
    ids, mask = encoder.tokenize(PROMPTS)
    with torch.no_grad():
        ref = wan(ids, mask).masked_fill(~mask.bool().unsqueeze(-1), 0.0)
    assert mask.sum(1).max() > 32  # relative distances beyond the exact buckets are exercised
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # the release stores bf16: the weights arrive exactly, in the dtype asked for
    torch.save({k: v.bfloat16() for k, v in wan.state_dict().items()}, path)
    bf16 = TextEncoder.from_pretrained(path, tokenizer_dir, dtype=torch.float32)
    assert torch.equal(bf16.model.shared.weight, wan.token_embedding.weight.bfloat16().float())
    with pytest.raises(FileNotFoundError, match="pass tokenizer_path"):
        TextEncoder.from_pretrained(path)


def _wan_visual(heads: int = 16) -> WanVisionTransformer:
    torch.manual_seed(1)
    model = WanVisionTransformer(image_size=32, patch=8, dim=32, heads=heads, layers=3, out_dim=16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return randomize_norms_(model).eval()


def _wan_clip_reference(visual: WanVisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Wan2.1's CLIPModel.visual: bicubic resize to the input size, [-1, 1] -> [0, 1], CLIP mean/std, 31 blocks."""
    x = F.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False)
    x = (x * 0.5 + 0.5 - torch.tensor(WAN_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(WAN_CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return visual(x, use_31_block=True)


def test_wan_clip_file_matches_the_wan_module(tmp_path):
    visual = _wan_visual()  # 16 heads, as ViT-H/14 (the default head count)
    state = wan_clip_file_state(visual)
    assert "visual.transformer.0.attn.to_qkv.weight" in state and "textual.token_embedding.weight" in state
    path = tmp_path / WAN_CLIP_FILE
    torch.save(state, path)
    encoder = ImageEncoder.from_pretrained(path)
    images = torch.rand(2, 3, 48, 80) * 2 - 1
    ours = encoder.encode(images)
    assert ours.shape == (2, 17, 32) and encoder.num_tokens == 17
    torch.testing.assert_close(ours, _wan_clip_reference(visual, images), atol=1e-5, rtol=0)
    # another head count is an option: the file does not record it
    four = _wan_visual(heads=4)
    torch.save(wan_clip_file_state(four), path)
    torch.testing.assert_close(
        ImageEncoder.from_pretrained(path, num_heads=4).encode(images), _wan_clip_reference(four, images), atol=1e-5, rtol=0
    )


def test_wan_encoder_files_in_the_bundle_and_their_errors(tokenizer_dir, tmp_path):
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer

    from tests.release_replica import wan_vae_original_state

    torch.save(wan_vae_original_state(AutoencoderKLWan(base_dim=8).state_dict()), tmp_path / "Wan2.1_VAE.pth")
    torch.save(_wan_t5(len(AutoTokenizer.from_pretrained(tokenizer_dir))).state_dict(), tmp_path / WAN_T5_FILE)
    torch.save(wan_clip_file_state(_wan_visual()), tmp_path / WAN_CLIP_FILE)
    bundle = Encoders.from_pretrained(
        None,
        vae_path=tmp_path / "Wan2.1_VAE.pth",
        text_encoder_path=tmp_path / WAN_T5_FILE,
        tokenizer_path=tokenizer_dir,
        image_encoder_path=tmp_path / WAN_CLIP_FILE,
    )  # the three original files and a tokenizer; no image_processor/: Wan's comes with the CLIP file
    assert bundle.image.preprocess.mean == WAN_CLIP_MEAN and bundle.image.resize == "squash"
    assert bundle.text.encode(["a man walking"]).shape == (1, 512, 32)
    assert bundle.vae.model.config.base_dim == 8
    wrong = tmp_path / "wrong.pth"
    torch.save({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4)}, wrong)
    with pytest.raises(CheckpointError, match=r"wrong.pth is not a Wan2.1 umT5 encoder file"):
        TextEncoder.from_pretrained(wrong, tokenizer_dir)
    with pytest.raises(CheckpointError, match=r"wrong.pth is not a Wan2.1 open-clip file"):
        ImageEncoder.from_pretrained(wrong)
    lfs = tmp_path / WAN_CLIP_FILE
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 4500000000\n")
    with pytest.raises(CheckpointError, match="Git LFS pointer"):
        ImageEncoder.from_pretrained(lfs)
