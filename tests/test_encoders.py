"""Contract tests of the frozen encoders on tiny random weights saved in the Wan2.1-I2V diffusers layout."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scail2.encoders.bundle import Encoders
from scail2.encoders.image import ClipPreprocess, ImageEncoder
from scail2.encoders.text import TextEncoder, clean_prompt
from scail2.encoders.tiny import save_tiny_encoders
from scail2.encoders.vae import WanVAE, downsample_half
from tests.release_replica import wan_vae_original_state


def _video(b: int = 2, f: int = 5, h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.rand(b, 3, f, h, w) * 2 - 1


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_encoders(tmp_path_factory.mktemp("tiny_encoders"))


@pytest.fixture(scope="module")
def encoders(tiny_root: Path) -> Encoders:
    return Encoders.from_pretrained(tiny_root)


# ------------------------------------------------------------------------------------------------ bundle
def test_import_is_light() -> None:
    # Modules load diffusers/transformers only when a model is loaded: importing them must not pull those in.
    code = (
        "import sys, scail2.encoders, scail2.encoders.bundle, scail2.encoders.tiny; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_tiny_bundle_round_trip(tiny_root: Path, encoders: Encoders) -> None:
    assert sorted(p.name for p in tiny_root.iterdir()) == [
        "image_encoder",
        "image_processor",
        "text_encoder",
        "tiny_encoders.json",
        "tokenizer",
        "vae",
    ]
    assert isinstance(encoders.vae, WanVAE)
    assert encoders.text.dim == 32 and encoders.text.text_len == 512
    assert encoders.image.dim == 32 and encoders.image.num_tokens == 1 + (32 // 8) ** 2
    # Same seed -> same weights, so a saved bundle is reproducible.
    again = Encoders.from_pretrained(save_tiny_encoders(tiny_root.parent / "again", seed=0))
    for a, b in [(encoders.vae, again.vae), (encoders.text, again.text), (encoders.image, again.image)]:
        for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(p, q), name


def test_tiny_dims_are_parameters(tmp_path: Path) -> None:
    root = save_tiny_encoders(tmp_path, text_dim=16, image_dim=24, image_size=28, patch_size=14)
    enc = Encoders.from_pretrained(root)
    assert enc.text.encode(["a man"]).shape == (1, 512, 16)
    assert enc.image.encode(torch.zeros(1, 3, 40, 40)).shape == (1, 5, 24)


def test_encoders_are_frozen(encoders: Encoders) -> None:
    for module in (encoders.vae, encoders.text, encoders.image):
        module.train()
        assert not module.training and not any(m.training for m in module.modules())
        assert not any(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize(
    ("subfolder", "filename"),
    [
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "config.json"),
        ("tokenizer", "tokenizer.json"),
        ("image_encoder", "model.safetensors"),
        ("image_processor", "preprocessor_config.json"),
    ],
)
def test_missing_file_names_path_and_source(tiny_root: Path, tmp_path: Path, subfolder: str, filename: str) -> None:
    root = Path(shutil.copytree(tiny_root, tmp_path / "enc"))
    (root / subfolder / filename).unlink()
    with pytest.raises(FileNotFoundError) as info:
        Encoders.from_pretrained(root)
    message = str(info.value)
    assert str(root / subfolder) in message and filename in message
    assert f"Wan2.1-I2V-14B-720P-Diffusers/{subfolder}" in message


def test_missing_folder_and_all_problems_listed(tiny_root: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(tiny_root, tmp_path / "enc"))
    shutil.rmtree(root / "vae")
    shutil.rmtree(root / "image_processor")
    with pytest.raises(FileNotFoundError) as info:
        Encoders.from_pretrained(root)
    message = str(info.value)
    assert f"no VAE at {root / 'vae'}" in message and "diffusion_pytorch_model.safetensors" in message
    assert str(root / "image_processor") in message and "preprocessor_config.json" in message
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        WanVAE.from_pretrained(tmp_path / "nowhere")


def test_pickle_only_weights_are_refused(tiny_root: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_root / "image_encoder", tmp_path / "image_encoder"))
    (folder / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        ImageEncoder.from_pretrained(folder, tiny_root / "image_processor")


def test_components_load_from_their_own_paths(tiny_root: Path, tmp_path: Path) -> None:
    moved = Path(shutil.copytree(tiny_root / "vae", tmp_path / "elsewhere" / "my_vae"))
    enc = Encoders.from_pretrained(
        None,
        vae_path=moved,
        text_encoder_path=tiny_root / "text_encoder",
        tokenizer_path=tiny_root / "tokenizer",
        image_encoder_path=tiny_root / "image_encoder",
        image_processor_path=tiny_root / "image_processor",
    )
    assert enc.vae.encode(_video(1)).shape == (1, 16, 2, 4, 4)
    with pytest.raises(ValueError, match="root"):
        Encoders.from_pretrained(None, vae_path=moved)


def _forbid_unsafe_unpickling(monkeypatch: pytest.MonkeyPatch) -> list:
    """Make every unpickling path except torch.load(weights_only=True) fail the test; return the torch.load calls."""
    calls: list = []
    real_load = torch.load

    def guarded_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        assert kwargs.get("weights_only") is True, "torch.load without weights_only=True"
        return real_load(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("plain pickle used while loading weights")

    class RefusingUnpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    monkeypatch.setattr(torch, "load", guarded_load)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    return calls


def test_bundle_loading_unpickles_nothing(tiny_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _forbid_unsafe_unpickling(monkeypatch)
    Encoders.from_pretrained(tiny_root)
    assert calls == []  # the diffusers layout is all safetensors


# ----------------------------------------------------------------------------------------------------- VAE
def test_vae_shapes(encoders: Encoders) -> None:
    vae = encoders.vae
    video = _video(2, 5, 32, 48)
    latents = vae.encode(video)
    assert latents.shape == (2, 16, 2, 4, 6) and latents.dtype == torch.float32
    assert vae.latent_size(81, 512, 896) == (21, 64, 112)
    assert vae.encode(_video(2, 1)).shape == (2, 16, 1, 4, 4)  # a single reference image
    decoded = vae.decode(latents)
    assert decoded.shape == video.shape
    assert decoded.min() >= -1 and decoded.max() <= 1


def test_encode_driving_is_half_size_encode_of_downsampled(encoders: Encoders) -> None:
    video = _video(1, 5, 32, 64)
    driving = encoders.vae.encode_driving(video)
    assert driving.shape == (1, 16, 2, 2, 4)
    assert torch.equal(driving, encoders.vae.encode(downsample_half(video)))


def test_downsample_half_is_framewise_bilinear() -> None:
    video = torch.randn(2, 3, 5, 16, 24)
    small = downsample_half(video)
    assert small.shape == (2, 3, 5, 8, 12)
    for f in range(5):
        expected = F.interpolate(video[:, :, f], scale_factor=0.5, mode="bilinear", align_corners=False)
        torch.testing.assert_close(small[:, :, f], expected, rtol=0, atol=1e-6)
    # Bilinear 0.5x with align_corners=False samples midway between pixels: exactly a 2x2 mean.
    torch.testing.assert_close(small, F.avg_pool3d(video, (1, 2, 2)), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="even"):
        downsample_half(torch.zeros(1, 3, 1, 15, 16))


def test_latent_normalisation_matches_config_and_inverts(encoders: Encoders) -> None:
    vae = encoders.vae
    config = vae.model.config
    mean = torch.tensor(config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(config.latents_std).view(1, 16, 1, 1, 1)
    z = torch.randn(2, 16, 3, 4, 4) * std + mean
    normalised = vae.normalize(z)
    # The diffusers pipeline form, (z - mean) * (1 / std), bit for bit.
    assert torch.equal(normalised, (z - mean) * (1.0 / std))
    torch.testing.assert_close(normalised, (z - mean) / std, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vae.denormalize(normalised), z, rtol=0, atol=1e-5)
    # bfloat16 latents are denormalised in float32 with float32 statistics.
    assert vae.denormalize(normalised.bfloat16()).dtype == torch.float32


def test_tiny_vae_latents_carry_the_picture(encoders: Encoders) -> None:
    # Videos unlike the calibration probes (hard-edged blocks of random colour): their normalised latents have
    # about unit variance, and most of it differs from video to video (with PyTorch's default init about 90%
    # of the latent variance is a pattern shared by every input, which flow-matching noise drowns).
    g = torch.Generator().manual_seed(5)
    blocks = torch.rand(12, 3, 9, 4, 4, generator=g) * 2 - 1
    video = blocks.repeat_interleave(16, dim=3).repeat_interleave(16, dim=4)  # (12, 3, 9, 64, 64)
    z = encoders.vae.encode(video)
    assert 0.3 < float(z.var()) < 3.0
    assert float(z.var(dim=0).mean()) > 0.5 * float(z.var())
    # Two videos that differ in one 8x8 patch differ in latent mostly around it (the mid-block attention
    # spreads some of it over the grid).
    other = video[:1].clone()
    other[0, :, :, 24:32, 40:48] *= -1
    diff = (encoders.vae.encode(other) - z[:1]).abs().mean(dim=(0, 1, 2))  # (8, 8) latent grid
    near = diff[2:5, 4:7].mean()
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    far = diff[((rows - 3).abs() >= 3) | ((cols - 5).abs() >= 3)].mean()
    assert float(near) > 0.3 and float(near) > 3 * float(far)


def test_encode_uses_posterior_mode_by_default(encoders: Encoders) -> None:
    vae = encoders.vae
    video = _video(1)
    posterior = vae.model.encode(video).latent_dist
    assert torch.equal(vae.encode(video), vae.normalize(posterior.mode()))
    a = vae.encode(video, sample=True, generator=torch.Generator().manual_seed(1))
    b = vae.encode(video, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, vae.encode(video))


def test_decode_inverts_the_normalisation(encoders: Encoders) -> None:
    vae = encoders.vae
    latents = torch.randn(1, 16, 2, 4, 4)
    raw = vae.model.decode(vae.denormalize(latents)).sample.clamp(-1, 1)
    assert torch.equal(vae.decode(latents), raw)


def test_vae_input_errors_name_the_value(encoders: Encoders) -> None:
    vae = encoders.vae
    with pytest.raises(ValueError, match=r"6 frames; need 4k\+1 \(e\.g\. 5 or 9\)"):
        vae.encode(_video(1, 6))
    with pytest.raises(ValueError, match="36x32; height and width must be divisible by 8"):
        vae.encode(_video(1, 5, 36, 32))
    with pytest.raises(ValueError, match="divisible by 16 so that the 0.5x video"):
        vae.encode_driving(_video(1, 5, 40, 32))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        vae.encode(_video(1) * 127.5 + 127.5)
    with pytest.raises(ValueError, match=r"\(B, 16, T, h, w\)"):
        vae.decode(torch.zeros(1, 4, 2, 4, 4))


def test_vae_to_dtype_keeps_exact_statistics(tiny_root: Path) -> None:
    vae = WanVAE.from_pretrained(tiny_root / "vae", dtype=torch.float64)
    assert vae.dtype == torch.float64
    latents = vae.encode(_video(1))
    assert latents.dtype == torch.float32
    vae.to(torch.bfloat16)
    torch.testing.assert_close(vae._mean.view(-1), torch.tensor(vae.model.config.latents_mean))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_vae_loads_original_wan_checkpoint(
    encoders: Encoders, tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    from safetensors.torch import save_file

    diffusers_state = {k: v.clone() for k, v in encoders.vae.model.state_dict().items()}
    original = wan_vae_original_state(diffusers_state)
    assert set(convert_wan_vae_to_diffusers(dict(original))) == set(diffusers_state)
    path = tmp_path / f"Wan2.1_VAE{suffix}"
    if suffix == ".pth":
        torch.save(original, path)
    else:
        save_file(original, str(path))
    _forbid_unsafe_unpickling(monkeypatch)
    vae = WanVAE.from_pretrained(path, config=tiny_root / "vae")
    video = _video(1)
    assert torch.equal(vae.encode(video), encoders.vae.encode(video))
    # Without a config: the Wan2.1 architecture with the file's base width and latent channels (the release
    # ships Wan2.1_VAE.pth alone); the latent statistics are then Wan2.1's own.
    plain = WanVAE.from_single_file(path)
    assert plain.model.config.base_dim == encoders.vae.model.config.base_dim == 8
    for key, value in plain.model.state_dict().items():
        assert torch.equal(value, diffusers_state[key]), key


_UNPICKLED: list[str] = []


def _record_unpickle(tag: str) -> str:
    _UNPICKLED.append(tag)
    return tag


class _CodeOnLoad:
    def __reduce__(self):
        return (_record_unpickle, ("code ran",))


def test_vae_checkpoint_with_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "Wan2.1_VAE.pth"
    torch.save({"decoder.middle.0.residual.0.gamma": torch.zeros(1), "payload": _CodeOnLoad()}, path)
    with pytest.raises(ValueError, match=r"Wan2.1_VAE.pth \(a zip-format torch.save file.*\) is refused"):
        WanVAE.from_single_file(path)
    assert _UNPICKLED == []


# ---------------------------------------------------------------------------------------------------- text
def test_text_zero_beyond_real_length(encoders: Encoders) -> None:
    text = encoders.text
    prompts = ["A woman in a red dress dancing on a stage.", "A zebra-striped quokka!", ""]
    emb = text.encode(prompts)
    assert emb.shape == (3, 512, 32)
    _, mask = text.tokenize(prompts)
    lengths = mask.sum(1).tolist()
    assert lengths[2] == 1  # "" is just the EOS token
    for row, n in zip(emb, lengths):
        assert torch.all(row[n:] == 0)
        assert torch.all(row[:n].abs().sum(-1) > 0)


def test_null_embedding_is_cached_encoding_of_empty_string(encoders: Encoders) -> None:
    text = encoders.text
    null = text.null_embedding()
    assert null.shape == (1, 512, 32)
    assert torch.equal(null, text.encode([""]))
    assert text._null_cache is not None
    cached = text._null_cache[1]
    again = text.null_embedding()
    assert torch.equal(again, null) and text._null_cache[1] is cached  # not recomputed
    again.zero_()  # callers get a copy
    assert torch.equal(text.null_embedding(), null)


def test_null_embedding_follows_dtype(tiny_root: Path) -> None:
    text = TextEncoder.from_pretrained(tiny_root / "text_encoder", tiny_root / "tokenizer", text_len=16)
    assert text.null_embedding().dtype == torch.float32
    text.to(torch.float64)
    assert text.null_embedding().dtype == torch.float64
    assert text.null_embedding().shape == (1, 16, 32)


def test_text_batch_matches_single(encoders: Encoders) -> None:
    prompts = ["two dancers spinning in a park", "a man walks", "   Hello &amp;amp;   world  "]
    batch = encoders.text.encode(prompts)
    for i, prompt in enumerate(prompts):
        torch.testing.assert_close(batch[i : i + 1], encoders.text.encode([prompt]), rtol=1e-5, atol=1e-5)


def test_text_length_is_configurable_and_truncates(tiny_root: Path) -> None:
    text = TextEncoder.from_pretrained(tiny_root / "text_encoder", tiny_root / "tokenizer", text_len=8)
    emb = text.encode(["a man " * 20, "a man"])
    assert emb.shape == (2, 8, 32)
    assert torch.all(emb[0].abs().sum(-1) > 0)  # truncated to 8 real tokens (EOS kept last)
    assert torch.all(emb[1, 3:] == 0)


def test_text_input_errors(encoders: Encoders) -> None:
    with pytest.raises(TypeError, match="list of strings"):
        encoders.text.encode("a single string")
    with pytest.raises(ValueError, match="empty"):
        encoders.text.encode([])


def test_clean_prompt() -> None:
    assert clean_prompt("  a\n\tman &amp;amp; a  dog ") == "a man & a dog"
    assert clean_prompt("") == ""


# --------------------------------------------------------------------------------------------------- image
def test_image_tokens_are_penultimate_hidden_state(encoders: Encoders) -> None:
    image = encoders.image
    images = torch.rand(2, 3, 48, 80) * 2 - 1
    tokens = image.encode(images)
    assert tokens.shape == (2, image.num_tokens, 32) == (2, 17, 32)
    out = image.model(pixel_values=image.preprocess(images, "squash"), output_hidden_states=True)
    assert torch.equal(tokens, out.hidden_states[-2])
    assert not torch.equal(tokens, out.last_hidden_state)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        image.encode(torch.full((1, 3, 32, 32), 255.0))


def test_squash_preprocess_matches_wan_reference(encoders: Encoders) -> None:
    pre = encoders.image.preprocess
    images = torch.rand(2, 3, 48, 80) * 2 - 1
    # The Wan reference: bicubic resize of [-1, 1] pixels to the square input size, then to [0, 1], then normalise.
    resized = F.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False)
    expected = (resized * 0.5 + 0.5 - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    torch.testing.assert_close(pre(images, "squash"), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("height", "width"), [(300, 500), (45, 70), (96, 40)])
def test_crop_preprocess_matches_clip_image_processor(tiny_root: Path, height: int, width: int) -> None:
    from PIL import Image

    try:  # transformers >= 5: the PIL backend of CLIPImageProcessor (the default one needs torchvision)
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor

    processor = Processor.from_pretrained(tiny_root / "image_processor")
    pre = ClipPreprocess.from_pretrained(tiny_root / "image_processor")
    yy, xx = np.mgrid[0:height, 0:width]  # a smooth image, like natural photos at CLIP's scale
    pixels = 127.5 + 127 * np.stack([np.sin(xx / 7.0), np.cos(yy / 5.0), np.sin((xx + yy) / 9.0)], axis=-1)
    array = pixels.astype(np.uint8)
    expected = processor(images=Image.fromarray(array), return_tensors="pt")["pixel_values"]
    ours = pre(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 127.5 - 1, "crop")
    assert ours.shape == expected.shape == (1, 3, 32, 32)
    diff = (ours - expected).abs()
    # The processor rounds to 8 bits after resizing: about one grey level / CLIP std (0.0146) at most.
    assert diff.max() < 0.02 and diff.mean() < 0.006


def test_processor_config_parsing(tiny_root: Path) -> None:
    config = json.loads((tiny_root / "image_processor" / "preprocessor_config.json").read_text())
    pre = ClipPreprocess.from_config(config)
    assert pre.crop_hw == (32, 32) and pre.shortest_edge == 32 and pre.interpolation == "bicubic"
    with pytest.raises(ValueError, match="resample=1"):
        ClipPreprocess.from_config({**config, "resample": 1})
    with pytest.raises(ValueError, match="takes 32x32"):
        ImageEncoder(
            ImageEncoder.from_pretrained(tiny_root / "image_encoder", tiny_root / "image_processor").model,
            ClipPreprocess.from_config({**config, "crop_size": 224}),
        )


def test_ensure_tiny_encoders_refuses_other_versions(tmp_path: Path) -> None:
    from scail2.encoders.tiny import TINY_ENCODERS_VERSION, ensure_tiny_encoders

    root = ensure_tiny_encoders(tmp_path / "data" / "encoders", seed=3)
    stamp = json.loads((root / "tiny_encoders.json").read_text())
    assert stamp["version"] == TINY_ENCODERS_VERSION and stamp["seed"] == 3
    weights = (root / "vae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_encoders(root, seed=3) == root  # present and current: left as it is
    assert (root / "vae" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == weights
    with pytest.raises(ValueError, match="version 2, seed 3, random VAE; this version writes version 2, seed 4, random VAE"):
        ensure_tiny_encoders(root, seed=4)
    with pytest.raises(ValueError, match="seed 3, random VAE; this version writes version 2, seed 3, trained VAE"):
        ensure_tiny_encoders(root, seed=3, vae="trained")
    with pytest.raises(ValueError, match=r"vae='pretty'; use one of \('random', 'trained'\)"):
        ensure_tiny_encoders(root, seed=3, vae="pretty")
    (root / "tiny_encoders.json").unlink()  # as written before the version record existed
    with pytest.raises(ValueError, match=r"no tiny_encoders.json.*delete .*data"):
        ensure_tiny_encoders(root, seed=3)
