"""The CLIP ViT-H/14 image encoder (transformers `CLIPVisionModel`) with batched torch preprocessing.

`encode` returns the penultimate hidden state, ``hidden_states[-2]`` (all tokens, before the final
post-layernorm), exactly as diffusers' `WanImageToVideoPipeline.encode_image` and the Wan reference code (its
``use_31_block`` path: the first 31 of 32 blocks) do: (B, 257, 1280) for ViT-H/14 at 224 px.

Preprocessing runs in torch on (B, 3, H, W) tensors in [-1, 1], with the sizes, resampling filter and
mean/std read from the CLIP processor config (``preprocessor_config.json``). Two resize modes exist because the
two public Wan pipelines differ:

- ``"squash"`` (default): resize straight to the crop size (224 x 224), bicubic without antialiasing, no crop.
  This is what the Wan2.1 / SCAIL-2 reference code does, i.e. what the released weights were trained with, and it
  keeps every character of a wide frame in view.
- ``"crop"``: `CLIPImageProcessor` semantics (diffusers' pipeline): resize the short side to ``size`` with the
  processor's antialiased filter, clip to the pixel range, centre crop. On natural (smooth) uint8 PIL images this
  matches the processor to max |diff| < 0.02 and mean |diff| < 0.005 after normalisation, i.e. about one grey
  level divided by CLIP's std: the processor rounds to 8 bits after resizing, we do not. PIL also saturates to
  8 bits between its horizontal and vertical passes, so synthetic noise whose bicubic overshoot exceeds the pixel
  range can differ more at single pixels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from scail2.encoders._files import IMAGE_ENCODER_FILES, IMAGE_PROCESSOR_FILES, require_files

if TYPE_CHECKING:
    from transformers import CLIPVisionModel

ResizeMode = Literal["squash", "crop"]
RESIZE_MODES: tuple[str, ...] = ("squash", "crop")
# PIL resampling codes used in processor configs -> torch interpolation modes that reproduce them.
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class ClipPreprocess:
    """Resize + normalise settings of a CLIP image processor, applied in torch.

    `shortest_edge` (or an explicit `resize_hw`) is used only by the "crop" mode; "squash" resizes straight to
    `crop_hw`, the model's input size.
    """

    crop_hw: tuple[int, int]  # model input (height, width), 224 x 224 for ViT-H/14
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"  # "bicubic" | "bilinear"
    shortest_edge: int | None = 224  # crop mode: resize the short side to this, keeping the aspect ratio
    resize_hw: tuple[int, int] | None = None  # crop mode: or resize to exactly this (height, width)
    center_crop: bool = True

    def __post_init__(self) -> None:
        if (self.shortest_edge is None) == (self.resize_hw is None):
            raise ValueError(
                f"ClipPreprocess needs exactly one of shortest_edge ({self.shortest_edge}) and resize_hw "
                f"({self.resize_hw})"
            )
        if self.interpolation not in _PIL_RESAMPLE.values():
            raise ValueError(f"interpolation {self.interpolation!r}; use one of {sorted(_PIL_RESAMPLE.values())}")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ClipPreprocess:
        """Build from a ``preprocessor_config.json`` dict (CLIPImageProcessor keys)."""
        resample = config.get("resample", 3)
        if resample not in _PIL_RESAMPLE:
            raise ValueError(
                f"processor resample={resample} is not supported; use 2 (bilinear) or 3 (bicubic, CLIP's value)"
            )
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if config.get(flag, True) is False:
                raise ValueError(f"processor config sets {flag}=false; CLIP preprocessing here always does it")
        size = config.get("size", {"shortest_edge": 224})
        crop = config.get("crop_size", size)
        crop_hw = (crop, crop) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"]))
        if isinstance(size, int):  # old configs: an int means the short side (CLIP never resizes to a square)
            shortest_edge, resize_hw = size, None
        elif "shortest_edge" in size:
            shortest_edge, resize_hw = int(size["shortest_edge"]), None
        else:
            shortest_edge, resize_hw = None, (int(size["height"]), int(size["width"]))
        rescale = float(config.get("rescale_factor", 1 / 255))
        if abs(rescale - 1 / 255) > 1e-9:
            raise ValueError(f"processor rescale_factor={rescale}; CLIP processors use 1/255")
        return cls(
            crop_hw=crop_hw,
            mean=tuple(float(v) for v in config["image_mean"]),
            std=tuple(float(v) for v in config["image_std"]),
            interpolation=_PIL_RESAMPLE[resample],
            shortest_edge=shortest_edge,
            resize_hw=resize_hw,
            center_crop=bool(config.get("do_center_crop", True)),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ClipPreprocess:
        """Read ``preprocessor_config.json`` from a folder (e.g. ``image_processor/``) or the file itself."""
        path = Path(path)
        if path.is_dir():
            path = require_files(path, IMAGE_PROCESSOR_FILES) / "preprocessor_config.json"
        elif not path.is_file():
            require_files(path, IMAGE_PROCESSOR_FILES)  # raises with the expected layout
        return cls.from_config(json.loads(path.read_text()))

    def _resize_hw(self, height: int, width: int) -> tuple[int, int]:
        """Target size of the crop-mode resize, rounded as CLIPImageProcessor does (long side floored)."""
        if self.resize_hw is not None:
            return self.resize_hw
        short, long = min(height, width), max(height, width)
        new_long = int(self.shortest_edge * long / short)
        return (new_long, self.shortest_edge) if height > width else (self.shortest_edge, new_long)

    def __call__(self, images: torch.Tensor, resize: ResizeMode = "squash") -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 3, crop_h, crop_w) float32, normalised with CLIP's mean/std."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images have shape {tuple(images.shape)}; need (B, 3, H, W) in [-1, 1]")
        if not images.is_floating_point():
            raise TypeError(f"images have dtype {images.dtype}; need floats in [-1, 1] (x / 127.5 - 1 for uint8)")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize={resize!r}; use one of {RESIZE_MODES}")
        peak = images.detach().abs().amax().item() if images.numel() else 0.0
        if peak > 1 + 1e-3:  # more than rounding noise: the caller passed [0, 255] or unnormalised pixels
            raise ValueError(f"images reach |x| = {peak:.4g}; pixels must be in [-1, 1] (x / 127.5 - 1 for uint8)")
        x = (images.float() + 1.0) / 2.0  # (B, 3, H, W) in [0, 1], the range CLIP's mean/std refer to
        if resize == "squash":
            x = F.interpolate(x, size=self.crop_hw, mode=self.interpolation, align_corners=False, antialias=False)
        else:
            # antialias=True is torch's port of PIL's resampling filters (the processor resizes with PIL), and the
            # clamp stands in for PIL's 8-bit saturation of bicubic overshoot.
            x = F.interpolate(
                x, size=self._resize_hw(*x.shape[-2:]), mode=self.interpolation, align_corners=False, antialias=True
            ).clamp(0.0, 1.0)
            if self.center_crop:
                x = _center_crop(x, self.crop_hw)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def _center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Centre crop (B, C, H, W) to `size`, offsets (H - h) // 2 and (W - w) // 2 as CLIPImageProcessor."""
    height, width = x.shape[-2:]
    ch, cw = size
    if ch > height or cw > width:
        raise ValueError(f"cannot centre-crop {height}x{width} to {ch}x{cw}; the resize must cover the crop size")
    top, left = (height - ch) // 2, (width - cw) // 2
    return x[..., top : top + ch, left : left + cw]


class ImageEncoder(nn.Module):
    """Frozen CLIP vision tower: `encode(images)` -> penultimate tokens (B, 1 + num_patches, dim).

    float16 or bfloat16 is fine for CLIP (the Wan reference runs it in float16).
    """

    def __init__(self, model: CLIPVisionModel, preprocess: ClipPreprocess, resize: ResizeMode = "squash") -> None:
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize={resize!r}; use one of {RESIZE_MODES}")
        image_size = int(model.config.image_size)
        if preprocess.crop_hw != (image_size, image_size):
            raise ValueError(
                f"processor crops to {preprocess.crop_hw} but the CLIP model takes {image_size}x{image_size} images; "
                "use the image_processor folder that belongs to this image_encoder"
            )
        if model.config.num_hidden_layers < 2:
            raise ValueError("CLIP model has fewer than 2 layers; the penultimate hidden state needs at least 2")
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.resize = resize

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | Path,
        processor_path: str | Path | None = None,
        *,
        resize: ResizeMode = "squash",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        num_heads: int | None = None,
    ) -> ImageEncoder:
        """Load `model_path` and the processor config from `processor_path` (e.g. ``image_processor/``).

        `model_path` is a transformers folder (``config.json`` + ``model.safetensors``, e.g. ``image_encoder/``;
        `processor_path` defaults to it) or the original Wan2.1 file
        ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``, whose visual tower is loaded (see
        ``scail2.encoders.wan_files``; `num_heads` defaults to ViT-H/14's 16) with Wan's preprocessing unless a
        `processor_path` is given."""
        from transformers import CLIPVisionModel

        model_path = Path(model_path)
        if model_path.is_file():
            from scail2.encoders.wan_files import WAN_CLIP_HEADS, load_wan_clip, wan_clip_preprocess

            model = load_wan_clip(model_path, dtype=dtype, num_heads=num_heads or WAN_CLIP_HEADS)
            if processor_path is None:
                preprocess = wan_clip_preprocess(int(model.config.image_size))
            else:
                preprocess = ClipPreprocess.from_pretrained(processor_path)
        else:
            if num_heads is not None:
                raise ValueError("num_heads applies to a single Wan CLIP file; a folder's config.json has its own")
            model_path = require_files(model_path, IMAGE_ENCODER_FILES)
            preprocess = ClipPreprocess.from_pretrained(processor_path or model_path)
            model = CLIPVisionModel.from_pretrained(
                model_path, dtype=dtype, use_safetensors=True, local_files_only=True
            )
        encoder = cls(model, preprocess, resize=resize)
        return encoder.to(device) if device is not None else encoder

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def dim(self) -> int:
        """Token width (1280 for ViT-H/14)."""
        return int(self.model.config.hidden_size)

    @property
    def num_tokens(self) -> int:
        """1 class token + (image_size / patch_size)^2 patch tokens: 257 for ViT-H/14 at 224 px."""
        config = self.model.config
        return 1 + (config.image_size // config.patch_size) ** 2

    def train(self, mode: bool = True) -> ImageEncoder:
        # Frozen: stays in eval mode under a training parent.
        return super().train(False)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Encode reference images.

        Args:
            images: (B, 3, H, W) in [-1, 1], any size (resized here).
        Returns:
            (B, num_tokens, dim) in the encoder's dtype: the penultimate hidden state of the vision tower.
        """
        pixels = self.preprocess(images.to(self.device), self.resize).to(self.dtype)  # (B, 3, 224, 224)
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-2]
