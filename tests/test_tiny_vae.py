"""The shipped tiny VAE trained on the synthetic domain: held-out reconstruction, its training record, loading
it through the tiny encoders, and the training script."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scail2.encoders.tiny import TRAINED_VAE_DIR, ensure_tiny_encoders, save_tiny_encoders, trained_tiny_vae, trained_vae_sha256
from scail2.encoders.tiny_vae_training import TrainSettings, train, vae_config
from scail2.conditioning.pixels import to_unit
from scail2.encoders.vae import WanVAE

from .data.helpers import torch_threads

# Held-out reconstruction the shipped weights must keep (dB, per-frame PSNR on [0, 1], 128x128 synthetic
# videos): below what they reach (training.json), well above a random or untrained VAE (about 11 dB), so a
# broken loader, wrong latent statistics or other weights fail.
MIN_PSNR_DB = 22.0
# Data seeds the shipped VAE was not trained or evaluated on.
HELDOUT_SEED = 4242


@pytest.fixture(scope="module")
def heldout_videos(tmp_path_factory: pytest.TempPathFactory) -> list[torch.Tensor]:
    """Every RGB video of 3 freshly drawn synthetic pairs at the VAE's training size (128x128, 9 frames),
    (F, 3, H, W) uint8."""
    from scail2.data.manifest import load_manifest
    from scail2.data.synth import SynthOptions, generate_dataset
    from scail2.data.video import read_video

    folder = tmp_path_factory.mktemp("heldout")
    manifest = generate_dataset(folder, SynthOptions(pairs=3, frames=9, sizes=((128, 128),), seed=HELDOUT_SEED))
    videos = []
    for record in load_manifest(manifest):
        for path in (record.target, record.driving, record.driving_aug):
            if path is not None:
                videos.append(torch.from_numpy(read_video(path)).permute(0, 3, 1, 2).contiguous())
    return videos


def test_trained_vae_reconstructs_heldout_synthetic_videos(heldout_videos: list[torch.Tensor]) -> None:
    from scail2.eval.metrics import psnr

    assert set(json.loads((TRAINED_VAE_DIR / "training.json").read_text())["settings"]) >= {"seed", "train_sets"}
    seeds = [s[3] for key in ("train_sets", "heldout_sets") for s in json.loads((TRAINED_VAE_DIR / "training.json").read_text())["settings"][key]]
    assert HELDOUT_SEED not in seeds  # really held out
    vae = WanVAE.from_pretrained(TRAINED_VAE_DIR)  # the library's loader: normalised latents in, pixels out
    video = to_unit(torch.stack(heldout_videos)).transpose(1, 2)  # (N, 3, 9, 128, 128)
    latents = vae.encode(video)
    assert latents.shape == (len(heldout_videos), 16, 3, 16, 16)
    # The per-channel statistics normalise held-out latents too (about zero mean, unit variance per channel).
    channel_mean, channel_std = latents.mean(dim=(0, 2, 3, 4)), latents.std(dim=(0, 2, 3, 4))
    assert float(channel_mean.abs().max()) < 0.6 and 0.5 < float(channel_std.min()) and float(channel_std.max()) < 2.0
    decoded = vae.decode(latents).clamp(-1, 1)
    scores = psnr((decoded.transpose(1, 2) + 1) / 2, (video.transpose(1, 2) + 1) / 2)
    first, later = float(scores.per_frame[:, 0].mean()), float(scores.per_frame[:, 1:].mean())
    assert scores.mean >= MIN_PSNR_DB, f"held-out PSNR {scores.mean:.2f} dB (first frames {first:.2f}, later {later:.2f})"
    # Every video, not only the mean, is a picture of itself: closer to its own input than to any other (the
    # videos of one pair share a background, so the nearest other can be close).
    for i in range(len(heldout_videos)):
        distances = ((decoded[i : i + 1] - video) ** 2).mean(dim=(1, 2, 3, 4))
        assert int(distances.argmin()) == i, f"video {i} decodes nearer video {int(distances.argmin())}: {distances.tolist()}"


def test_training_record_describes_the_shipped_weights(tmp_path: Path) -> None:
    record = json.loads((TRAINED_VAE_DIR / "training.json").read_text())
    config = json.loads((TRAINED_VAE_DIR / "config.json").read_text())
    settings = TrainSettings(**{k: tuple(map(tuple, v)) if k.endswith("_sets") else (tuple(v) if k == "dim_mult" else v)
                                for k, v in record["settings"].items()})  # fmt: skip
    # The geometry the settings build is the shipped one: Wan's strides, 16 latent channels, 16 statistics each.
    for key, value in vae_config(settings).items():
        assert config[key] == value, key
    assert (config["scale_factor_temporal"], config["scale_factor_spatial"], config["z_dim"]) == (4, 8, 16)
    assert len(config["latents_mean"]) == len(config["latents_std"]) == 16 and min(config["latents_std"]) > 0
    assert record["command"].startswith("python -m scail2.encoders.tiny_vae_training")
    assert record["steps"] == settings.steps == record["history"][-1]["step"]
    # The recorded held-out figures are those of the shipped weights: measured again on the same held-out sets.
    from scail2.encoders.tiny_vae_training import reconstruction_psnr, synthetic_videos

    heldout = synthetic_videos(tmp_path, settings.heldout_sets)
    with torch_threads(1):
        measured = reconstruction_psnr(trained_tiny_vae(), heldout)
    for key, value in record["heldout_psnr_db"].items():
        assert measured[key] == pytest.approx(value, abs=0.01), key
    assert record["heldout_psnr_db"]["overall"] >= MIN_PSNR_DB
    weights = TRAINED_VAE_DIR / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 10 * 2**20
    assert record["parameters"] == sum(p.numel() for p in trained_tiny_vae().parameters())


def test_tiny_encoders_with_the_trained_vae(tmp_path: Path) -> None:
    root = save_tiny_encoders(tmp_path / "enc", vae="trained")
    assert (root / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        TRAINED_VAE_DIR / "diffusion_pytorch_model.safetensors"
    ).read_bytes()
    stamp = json.loads((root / "tiny_encoders.json").read_text())
    assert stamp["vae"] == "trained" and stamp["vae_sha256"] == trained_vae_sha256()
    assert ensure_tiny_encoders(root, vae="trained") == root
    with pytest.raises(ValueError, match="trained VAE; this version writes version 2, seed 0, random VAE"):
        ensure_tiny_encoders(root)
    stamp["vae_sha256"] = "0" * 64  # written by a build that shipped other weights
    (root / "tiny_encoders.json").write_text(json.dumps(stamp))
    with pytest.raises(ValueError, match="other weights than the shipped"):
        ensure_tiny_encoders(root, vae="trained")
    with pytest.raises(ValueError, match=r"vae='pretty'; use one of"):
        save_tiny_encoders(tmp_path / "other", vae="pretty")
    model = trained_tiny_vae(torch.float64)
    assert not model.training and next(model.parameters()).dtype == torch.float64


def test_training_script_trains_checkpoints_and_resumes(tmp_path: Path) -> None:
    settings = TrainSettings(
        steps=3, batch=2, crop=32, clip_frames=5, warmup=1, base_dim=8,
        train_sets=((2, 5, 32, 11),), heldout_sets=((1, 5, 32, 12),),
    )  # fmt: skip
    folder = train(tmp_path / "run", settings, eval_every=2, command="python -m scail2.encoders.tiny_vae_training (test)")
    record = json.loads((folder / "training.json").read_text())
    assert [h["step"] for h in record["history"]] == [0, 2, 3]
    assert record["steps"] == 3 and record["settings"]["train_sets"] == [[2, 5, 32, 11]]
    assert set(record["heldout_psnr_db"]) == {"overall", "first_frame", "later_frames"}
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 3
    weights = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    # A finished run asked again resumes at its last step and writes the same weights.
    again = train(tmp_path / "run", settings, eval_every=2)
    assert again == folder and (folder / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    with pytest.raises(ValueError, match="other settings"):
        train(tmp_path / "run", TrainSettings(**{**settings.__dict__, "lr": 5e-4}), eval_every=2)
    from diffusers import AutoencoderKLWan

    config = AutoencoderKLWan.load_config(folder)
    assert len(config["latents_std"]) == 16 and not np.allclose(config["latents_std"], 1.0)


def test_training_loss_sees_pixels_decoded_out_of_range() -> None:
    from scail2.encoders.tiny_vae_training import build_vae, decode_unclamped

    vae = build_vae(TrainSettings(base_dim=8))
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(20)  # decoded pixels well outside [-1, 1]
    z = torch.randn(1, 16, 2, 2, 2)
    raw = decode_unclamped(vae, z)
    assert raw.shape == (1, 3, 5, 16, 16) and float(raw.abs().max()) > 1.5
    assert torch.equal(raw.clamp(-1, 1), vae.decode(z).sample)
    raw.abs().sum().backward()  # the gradient reaches the decoder through every pixel
    assert float(vae.decoder.conv_out.weight.grad.abs().sum()) > 0


def test_synthetic_data_modules_take_the_vae_kind(tmp_path: Path) -> None:
    from scail2.data.cache import CacheIndex
    from scail2.lit.data import SyntheticDataModule, SyntheticPreferenceDataModule

    with pytest.raises(ValueError, match=r"vae='pretty'; use one of \('random', 'trained'\)"):
        SyntheticDataModule(str(tmp_path / "x"), vae="pretty")
    with pytest.raises(ValueError, match=r"vae='pretty'"):
        SyntheticPreferenceDataModule(str(tmp_path / "y"), vae="pretty")
    dm = SyntheticDataModule(str(tmp_path / "motion"), pairs=2, frames=5, height=64, width=64, vae="trained")
    dm.prepare_data()
    encoders = tmp_path / "motion" / "encoders"
    assert json.loads((encoders / "tiny_encoders.json").read_text())["vae"] == "trained"
    assert (encoders / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        TRAINED_VAE_DIR / "diffusion_pytorch_model.safetensors"
    ).read_bytes()
    assert len(CacheIndex.load(tmp_path / "motion" / "cache").samples) == 2
    # The same root asked for with the random VAE: its latents would not match, so it is refused.
    with pytest.raises(ValueError, match="trained VAE; this version writes version 2, seed 0, random VAE"):
        SyntheticDataModule(str(tmp_path / "motion"), pairs=2, frames=5, height=64, width=64).prepare_data()
    # The preference module records the kind with its settings; roots recorded before it existed read as random.
    pref = SyntheticPreferenceDataModule(str(tmp_path / "pref"), videos=4, frames=5, height=32, width=32, pairs=2, heldout_pairs=1)
    pref._check_settings()
    recorded = json.loads((tmp_path / "pref" / "settings.json").read_text())
    assert recorded["vae"] == "random"
    del recorded["vae"]
    (tmp_path / "pref" / "settings.json").write_text(json.dumps(recorded))
    pref._check_settings()
    with pytest.raises(ValueError, match="vae: 'random' there, 'trained' here"):
        SyntheticPreferenceDataModule(
            str(tmp_path / "pref"), videos=4, frames=5, height=32, width=32, pairs=2, heldout_pairs=1, vae="trained"
        )._check_settings()


def test_a_run_can_start_from_another_runs_encoder(tmp_path: Path) -> None:
    from scail2.encoders.tiny_vae_training import build_vae

    torch.manual_seed(1)
    build_vae(TrainSettings(base_dim=8)).save_pretrained(tmp_path / "first", safe_serialization=True)
    first = build_vae(TrainSettings(base_dim=8, init=str(tmp_path / "first"))).state_dict()
    torch.manual_seed(0)
    fresh = build_vae(TrainSettings(base_dim=8, decoder_base_dim=16)).state_dict()
    torch.manual_seed(0)
    wider = build_vae(TrainSettings(base_dim=8, decoder_base_dim=16, init=str(tmp_path / "first"), init_decoder=False)).state_dict()
    assert set(wider) == set(fresh)
    for key, value in wider.items():
        from_first = key.startswith(("encoder.", "quant_conv."))
        assert torch.equal(value, first[key] if from_first else fresh[key]), key
    with pytest.raises(RuntimeError, match="size mismatch"):  # the whole of a narrower run does not fit
        build_vae(TrainSettings(base_dim=8, decoder_base_dim=16, init=str(tmp_path / "first")))
