"""The Wan2.1 video VAE (diffusers `AutoencoderKLWan`) with SCAIL-2's latent conventions.

Latents leave `encode` normalised per channel, ``(z - latents_mean) / latents_std`` with the statistics from
the VAE config (written as ``(z - mean) * (1 / std)``, the form used by the Wan reference code and diffusers'
Wan pipelines, so values match them bit for bit), and `decode` undoes exactly that. Everything downstream (the
latent cache, the flow-matching target, the transformer) sees normalised latents only.

Shapes: video (B, 3, F, H, W) in [-1, 1] with F = 4k + 1 and H, W divisible by 8 ->
latents (B, 16, (F - 1) // 4 + 1, H / 8, W / 8).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from scail2.encoders._files import VAE_FILES, WAN_I2V_REPO, require_files

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan

LATENT_CHANNELS = 16  # the Wan2.1 VAE; SCAIL-2's patch embeddings take 16 latent + 4 mask channels
# Values outside [-1, 1] by more than this are taken as a wrong pixel range (e.g. [0, 255]), not rounding noise.
_RANGE_SLACK = 1e-3
# File endings accepted as an original (non-diffusers) Wan VAE checkpoint.
SINGLE_FILE_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")


def downsample_half(video: torch.Tensor) -> torch.Tensor:
    """Halve height and width of every frame with bilinear interpolation (align_corners=False, no antialias).

    This is the pixel-space 0.5x resize SCAIL-2 applies to the driving video before VAE encoding and to the
    driving mask before thresholding; both must use this one function so that they stay aligned.

    Args:
        video: (B, C, F, H, W) with H and W even; any channel count and float dtype.
    Returns:
        (B, C, F, H / 2, W / 2), same dtype and device.
    """
    if video.ndim != 5:
        raise ValueError(f"video has shape {tuple(video.shape)}; need (B, C, F, H, W)")
    b, c, f, h, w = video.shape
    if h % 2 or w % 2:
        raise ValueError(f"video is {h}x{w}; height and width must be even to halve them exactly")
    frames = video.transpose(1, 2).reshape(b * f, c, h, w)  # (B*F, C, H, W): one 2-D resize per frame
    small = F.interpolate(frames, size=(h // 2, w // 2), mode="bilinear", align_corners=False, antialias=False)
    return small.reshape(b, f, c, h // 2, w // 2).transpose(1, 2).contiguous()  # (B, C, F, H/2, W/2)


def _check_pixels(video: torch.Tensor, name: str, spatial_multiple: int, hint: str = "") -> None:
    """Raise if `video` is not a (B, 3, F, H, W) float video in [-1, 1] with F = 4k+1, H, W % multiple == 0."""
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"{name} has shape {tuple(video.shape)}; need (B, 3, F, H, W)")
    if not video.is_floating_point():
        raise TypeError(f"{name} has dtype {video.dtype}; need a float tensor in [-1, 1] (x / 127.5 - 1 for uint8)")
    frames, height, width = video.shape[2:]
    if (frames - 1) % 4:
        lower = frames - (frames - 1) % 4
        raise ValueError(f"{name} has {frames} frames; need 4k+1 (e.g. {max(lower, 1)} or {lower + 4})")
    if height % spatial_multiple or width % spatial_multiple:
        raise ValueError(
            f"{name} is {height}x{width}; height and width must be divisible by {spatial_multiple}{hint}"
        )
    peak = video.detach().abs().amax().item() if video.numel() else 0.0
    if peak > 1 + _RANGE_SLACK:
        raise ValueError(f"{name} reaches |x| = {peak:.4g}; pixels must be in [-1, 1] (x / 127.5 - 1 for uint8)")


class WanVAE(nn.Module):
    """Frozen Wan2.1 VAE: normalised-latent `encode`, `encode_driving` and `decode`.

    The wrapped model stays in eval mode with gradients off even if a parent module calls `.train()`.
    Move it with `.to(device)` / `.to(dtype)`; float32 is recommended (see docs/encoders.md). Inputs are moved
    to the VAE's device and dtype; latents come back in float32 so that the normalisation is exact and cached
    latents do not depend on the VAE's compute dtype.
    """

    def __init__(self, model: AutoencoderKLWan) -> None:
        super().__init__()
        config = model.config
        if config.z_dim != LATENT_CHANNELS:
            raise ValueError(
                f"VAE has {config.z_dim} latent channels; SCAIL-2 uses the Wan2.1 VAE with {LATENT_CHANNELS} "
                f"(load {WAN_I2V_REPO}/vae or Wan2.1_VAE.pth, not the Wan2.2 VAE)"
            )
        self.model = model.eval().requires_grad_(False)
        self.temporal_stride = int(config.scale_factor_temporal)
        self.spatial_stride = int(config.scale_factor_spatial)
        # Kept as float32 CPU tensors, not buffers: `.to(bfloat16)` must not round the statistics.
        self._mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._inv_std = 1.0 / torch.tensor(config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        config: str | Path | None = None,
    ) -> WanVAE:
        """Load a diffusers VAE folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) or, if `path`
        is a file, an original Wan checkpoint via `from_single_file` (`config` is only used then)."""
        path = Path(path)
        if path.is_file():
            return cls.from_single_file(path, config=config, dtype=dtype, device=device)
        require_files(path, VAE_FILES)
        from diffusers import AutoencoderKLWan

        model = AutoencoderKLWan.from_pretrained(path, dtype=dtype, use_safetensors=True, local_files_only=True)
        return cls._finish(model, dtype, device)

    @classmethod
    def from_single_file(
        cls,
        path: str | Path,
        *,
        config: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> WanVAE:
        """Load an original Wan2.1 VAE checkpoint (``Wan2.1_VAE.pth`` or an original-key ``.safetensors``).

        The file holds weights only, so the architecture comes from `config` (a diffusers VAE folder or its
        ``config.json``); without it, `AutoencoderKLWan`'s defaults (the Wan2.1 VAE, with its latent mean/std),
        with the base width and latent channel count read off the file's first convolution and quant conv.
        diffusers' own `AutoencoderKLWan.from_single_file` would fetch that config from the model hub, which is
        why it is not used here. Original key names are mapped with diffusers' Wan VAE converter; a file that
        already uses diffusers key names loads as is. Pickle files are read with ``weights_only=True``.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no Wan VAE checkpoint at {path} (expected the original Wan2.1_VAE.pth from the "
                f"Wan2.1-I2V-14B-720P release, or pass the diffusers folder {WAN_I2V_REPO}/vae to from_pretrained)"
            )
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise ValueError(
                f"{path} has suffix {path.suffix!r}; a VAE checkpoint file must end in one of {SINGLE_FILE_SUFFIXES}"
            )
        from diffusers import AutoencoderKLWan
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        state = _load_weights_file(path)
        # A key that exists only in the original Wan naming (diffusers' converter detects the format the same way).
        if "decoder.middle.0.residual.0.gamma" in state:
            state = convert_wan_vae_to_diffusers(state)
        if config is None:
            geometry = {}
            if "encoder.conv_in.weight" in state:
                geometry["base_dim"] = int(state["encoder.conv_in.weight"].shape[0])
            if "quant_conv.weight" in state:
                geometry["z_dim"] = int(state["quant_conv.weight"].shape[0]) // 2
            model = AutoencoderKLWan(**geometry)
        else:
            if not Path(config).exists():
                raise FileNotFoundError(
                    f"no VAE config at {config} (expected a diffusers VAE folder with config.json, "
                    f"e.g. {WAN_I2V_REPO}/vae)"
                )
            model = AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(str(config)))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(
                f"{path} does not match the VAE architecture "
                f"({'AutoencoderKLWan defaults (Wan2.1)' if config is None else f'config {config}'}): {exc}; "
                "pass config= the diffusers VAE folder this checkpoint belongs to"
            ) from exc
        return cls._finish(model, dtype, device)

    @classmethod
    def _finish(cls, model: AutoencoderKLWan, dtype: torch.dtype, device: torch.device | str | None) -> WanVAE:
        return cls(model).to(device=device, dtype=dtype)

    # ------------------------------------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.z_dim)

    def latent_size(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(T, h, w) of the latents of a (frames, height, width) video."""
        return (frames - 1) // self.temporal_stride + 1, height // self.spatial_stride, width // self.spatial_stride

    def train(self, mode: bool = True) -> WanVAE:
        # The VAE is frozen: a parent's .train() must not switch it (or any dropout inside) to training mode.
        return super().train(False)

    # ------------------------------------------------------------------------------------------ normalising
    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw posterior latents (B, 16, T, h, w) -> normalised float32 latents, (z - mean) * (1 / std)."""
        mean, inv_std = self._mean.to(z.device), self._inv_std.to(z.device)
        return (z.float() - mean) * inv_std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, 16, T, h, w) -> raw float32 latents, latents / (1 / std) + mean."""
        mean, inv_std = self._mean.to(latents.device), self._inv_std.to(latents.device)
        return latents.float() / inv_std + mean

    # ------------------------------------------------------------------------------------------- encoding
    @torch.no_grad()
    def encode(
        self, video: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Encode a video to normalised latents.

        Args:
            video: (B, 3, F, H, W) in [-1, 1], F = 4k+1 (1 for a single image), H and W divisible by 8.
            sample: False (default) takes the posterior mean (mode), as the Wan reference code and diffusers'
                pipelines do for conditioning latents and as Wan-family training does for targets; True draws
                mean + std * eps (a small latent-space augmentation).
            generator: RNG for `sample=True`, on the VAE's device.
        Returns:
            (B, 16, (F - 1) // 4 + 1, H / 8, W / 8) float32, normalised per channel.
        """
        _check_pixels(video, "video", self.spatial_stride)
        posterior = self.model.encode(video.to(device=self.device, dtype=self.dtype)).latent_dist
        z = posterior.sample(generator=generator) if sample else posterior.mode()
        return self.normalize(z)

    @torch.no_grad()
    def encode_driving(
        self, video: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Encode a driving video at half resolution (SCAIL-2: 0.5x bilinear in pixel space, then the VAE).

        Args:
            video: (B, 3, F, H, W) in [-1, 1], F = 4k+1, H and W divisible by 16 (so that H/2, W/2 are by 8).
        Returns:
            (B, 16, (F - 1) // 4 + 1, H / 16, W / 16) float32, normalised per channel.
        """
        _check_pixels(
            video, "driving video", 2 * self.spatial_stride, hint=" so that the 0.5x video is divisible by 8"
        )
        return self.encode(downsample_half(video), sample=sample, generator=generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode normalised latents (B, 16, T, h, w) to a video (B, 3, 4(T-1)+1, 8h, 8w) in [-1, 1].

        The video comes back in the VAE's dtype on its device, clamped to [-1, 1].
        """
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents have shape {tuple(latents.shape)}; need (B, {self.latent_channels}, T, h, w)"
            )
        z = self.denormalize(latents.to(self.device)).to(self.dtype)
        return self.model.decode(z).sample.clamp(-1.0, 1.0)


def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a flat name -> tensor dict without running pickled code (safetensors, or the weights-only loader)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        from scail2.utils.torch_files import load_torch_file

        # weights_only loading refuses anything but tensors and plain containers: a crafted file cannot run code.
        state = load_torch_file(path, what="a Wan VAE state dict", loads="Wan2.1_VAE.pth (a dict of tensors) or .safetensors")
    # Some trainers wrap the weights as {"state_dict": {...}}.
    while isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat dict of tensors (a VAE state dict)")
    return state
