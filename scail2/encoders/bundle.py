"""All three frozen encoders, loaded from one folder in the Wan2.1-I2V diffusers layout.

Layout of `root` (the public ``Wan2.1-I2V-14B-720P-Diffusers`` release has exactly these subfolders; its
``transformer/`` and ``scheduler/`` are not read here)::

    root/
      vae/              config.json, diffusion_pytorch_model.safetensors
      text_encoder/     config.json, model.safetensors (or model.safetensors.index.json + shards)
      tokenizer/        tokenizer_config.json, tokenizer.json (or spiece.model), special_tokens_map.json
      image_encoder/    config.json, model.safetensors
      image_processor/  preprocessor_config.json

Every component can also come from its own path, including the original single files of the Wan2.1 and
SCAIL-2 releases: ``vae_path="Wan2.1_VAE.pth"``, ``text_encoder_path="models_t5_umt5-xxl-enc-bf16.pth"`` (with
``tokenizer_path="umt5-xxl"``) and ``image_encoder_path="models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"``
(Wan's CLIP preprocessing unless ``image_processor_path`` is given). All folders are checked before anything is
loaded, and one error lists every missing file with where to get it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from scail2.encoders._files import (
    IMAGE_ENCODER_FILES,
    IMAGE_PROCESSOR_FILES,
    TEXT_ENCODER_FILES,
    TOKENIZER_FILES,
    VAE_FILES,
    missing_files,
)
from scail2.encoders.image import ImageEncoder, ResizeMode
from scail2.encoders.text import TEXT_LEN, TextEncoder
from scail2.encoders.vae import WanVAE


@dataclass
class Encoders:
    """The frozen VAE, umT5 text encoder and CLIP image encoder that cache, training and inference share."""

    vae: WanVAE
    text: TextEncoder
    image: ImageEncoder

    @classmethod
    def from_pretrained(
        cls,
        root: str | Path | None = None,
        *,
        vae_path: str | Path | None = None,
        text_encoder_path: str | Path | None = None,
        tokenizer_path: str | Path | None = None,
        image_encoder_path: str | Path | None = None,
        image_processor_path: str | Path | None = None,
        vae_dtype: torch.dtype = torch.float32,
        text_dtype: torch.dtype = torch.float32,
        image_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        text_len: int = TEXT_LEN,
        image_resize: ResizeMode = "squash",
    ) -> Encoders:
        """Load the three encoders from `root` (layout in the module docstring); an explicit ``*_path`` overrides
        that component's subfolder, and `root` may be None when every path is given.

        Every dtype defaults to float32 (whatever the files store); for the real umT5-XXL pass
        ``text_dtype=torch.bfloat16`` (23 GB in float32), see docs/encoders.md for memory and dtype advice.
        """
        paths = {
            "vae": vae_path,
            "text_encoder": text_encoder_path,
            "tokenizer": tokenizer_path,
            "image_encoder": image_encoder_path,
            "image_processor": image_processor_path,
        }
        # A single Wan CLIP file brings Wan's preprocessing; a processor folder is used only when given or present.
        wan_clip = image_encoder_path is not None and Path(image_encoder_path).is_file()
        optional = {"image_processor"} if wan_clip else set()
        missing_root = [name for name, p in paths.items() if p is None and name not in optional]
        if root is None and missing_root:
            raise ValueError(f"no root folder given and no path for {missing_root}; pass root= or those paths")
        resolved: dict[str, Path | None] = {
            name: Path(p) if p is not None else (Path(root) / name if root is not None else None)
            for name, p in paths.items()
        }
        processor = resolved["image_processor"]
        if wan_clip and image_processor_path is None and (processor is None or not processor.is_dir()):
            resolved["image_processor"] = None

        specs = {
            "vae": VAE_FILES,
            "text_encoder": TEXT_ENCODER_FILES,
            "tokenizer": TOKENIZER_FILES,
            "image_encoder": IMAGE_ENCODER_FILES,
            "image_processor": IMAGE_PROCESSOR_FILES,
        }
        problems = []
        for name, spec in specs.items():
            path = resolved[name]
            if path is None or (name in ("vae", "text_encoder", "image_encoder") and path.is_file()):
                continue  # single original files (Wan2.1_VAE.pth, the umT5 / CLIP .pth) are checked by their loaders
            message = missing_files(path, spec)
            if message is not None:
                problems.append(message)
        if problems:
            raise FileNotFoundError("cannot load the encoders:\n- " + "\n- ".join(problems))

        return cls(
            vae=WanVAE.from_pretrained(resolved["vae"], dtype=vae_dtype, device=device),
            text=TextEncoder.from_pretrained(
                resolved["text_encoder"], resolved["tokenizer"], text_len=text_len, dtype=text_dtype, device=device
            ),
            image=ImageEncoder.from_pretrained(
                resolved["image_encoder"],
                resolved["image_processor"],
                resize=image_resize,
                dtype=image_dtype,
                device=device,
            ),
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Encoders:
        """Move all three in place (and return self). A dtype applies to all three; prefer per-component `.to`."""
        for module in (self.vae, self.text, self.image):
            module.to(device=device, dtype=dtype)
        return self
