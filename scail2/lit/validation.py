"""Validation sampling during training: a fixed batch is denoised from fixed noise and compared to its targets.

The denoising loop is inference's own (`scail2.pipeline.sampling.sample_latents`, the loop
``SCAIL2Pipeline`` runs), on the batch's encoded conditioning. Metrics:

- ``val/latent_mse``: mean squared error between sampled and target latents (VAE-normalised, so 1.0 is the
  scale of the data; an untrained model, whose zero-initialised head predicts no velocity, returns its noise);
- ``val/psnr``: PSNR (dB) of the decoded samples against the decoded targets, when a VAE is given (both go
  through the same decoder, so the VAE's own reconstruction error does not count);
- ``val/fm_loss``: the training objective on the batch with a fixed noise seed (a cheap, low-variance curve).

Files (global rank 0): ``<run_dir>/validation/step_NNNNNNN/sample_K.mp4`` (target | sample side by side) and
``grid.png`` (per sample, a row of target frames over a row of sampled frames).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scail2.data.batch import MotionBatch


@dataclass(frozen=True)
class ValidationConfig:
    """When and how validation samples are drawn.

    every_n_steps: also sample every n optimizer steps (0: only before and after training).
    before_training / after_training: sample at step 0 of a fresh run and at the last step.
    num_samples: samples in the fixed validation batch (all of one bucket).
    num_inference_steps, guidance_scale, scheduler, shift: the sampler (`scail2.pipeline.make_scheduler`);
        guidance 1 = one model pass per step.
    seed: seed of the batch selection and of the initial noise (the same at every validation).
    vae: a diffusers VAE folder (or an encoders folder with ``vae/``) to decode samples into videos and
        compute PSNR; None: latent metrics only.
    fps: frame rate of the written videos; grid_frames: frames per row of the PNG grid.
    """

    every_n_steps: int = 0
    before_training: bool = True
    after_training: bool = True
    num_samples: int = 4
    num_inference_steps: int = 20
    guidance_scale: float = 1.0
    scheduler: str = "unipc"
    shift: float = 3.0
    seed: int = 1234
    vae: str | None = None
    fps: float = 16.0
    grid_frames: int = 4

    def __post_init__(self) -> None:
        if self.every_n_steps < 0:
            raise ValueError(f"validation.every_n_steps is {self.every_n_steps}; use 0 (before/after only) or n > 0")
        if self.num_samples < 1:
            raise ValueError(f"validation.num_samples is {self.num_samples}; need at least 1")
        if self.num_inference_steps < 1:
            raise ValueError(f"validation.num_inference_steps is {self.num_inference_steps}; need at least 1")


@dataclass
class ValidationResult:
    step: int
    metrics: dict[str, float]
    folder: Path | None  # the written files (global rank 0 with a VAE), else None
    files: list[Path]


def validation_batch(dataset: Any, num_samples: int, seed: int) -> MotionBatch:
    """A fixed batch from a data module's dataset: up to ``num_samples`` items of its most common bucket,
    spread evenly over that bucket's items, each loaded with its own fixed seed; ``null_text`` attached."""
    from scail2.data.latents import collate_samples
    from scail2.data.sampling import SampleKey

    buckets = list(dataset.item_buckets)
    if not buckets:
        raise ValueError("the training dataset has no items to validate on")
    bucket = Counter(buckets).most_common(1)[0][0]
    items = [i for i, b in enumerate(buckets) if b == bucket]
    n = min(num_samples, len(items))
    chosen = [items[(k * len(items)) // n] for k in range(n)]
    batch = collate_samples([dataset[SampleKey(item, seed + k)] for k, item in enumerate(chosen)])
    batch.null_text = dataset.null_text()
    return batch


def load_vae(path: str | Path, device: torch.device) -> Any:
    """The decoder for validation videos: a diffusers VAE folder, or an encoders root holding ``vae/``."""
    from scail2.encoders.vae import WanVAE

    path = Path(path)
    if path.is_dir() and not (path / "config.json").exists() and (path / "vae").is_dir():
        path = path / "vae"
    return WanVAE.from_pretrained(path, device=device)


@torch.no_grad()
def sample_validation_latents(net: torch.nn.Module, batch: MotionBatch, cfg: ValidationConfig) -> torch.Tensor:
    """(B, 16, T, h, w) float32 latents denoised from noise seeded by ``cfg.seed`` (no history frames)."""
    from scail2.pipeline.sampling import sample_latents
    from scail2.pipeline.schedulers import make_scheduler

    generator = torch.Generator().manual_seed(cfg.seed)
    return sample_latents(
        net,
        batch.cond,
        make_scheduler(cfg.scheduler, cfg.shift),
        negative_text=batch.null_text,
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
        generator=generator,
    )


def latent_mse(samples: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared error per sample."""
    return (samples.float() - targets.float().to(samples.device)).pow(2).mean(dim=(1, 2, 3, 4))


@torch.no_grad()
def decode_videos(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """(B, 16, T, h, w) -> (B, F, 3, H, W) float32 in [0, 1] on the CPU, one video at a time (memory)."""
    videos = [vae.decode(latents[i : i + 1])[0].float().cpu() for i in range(latents.shape[0])]  # (3, F, H, W)
    return torch.stack([(v.transpose(0, 1) + 1.0) / 2.0 for v in videos]).clamp(0.0, 1.0)


def _uint8(frames: torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) in [0, 1] -> (F, H, W, 3) uint8."""
    return (frames * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def write_media(
    folder: Path, samples: torch.Tensor, targets: torch.Tensor, ids: list[str], fps: float, grid_frames: int
) -> list[Path]:
    """Side-by-side mp4 per sample and one PNG grid. samples / targets: (B, F, 3, H, W) in [0, 1]."""
    from PIL import Image

    from scail2.data.video import write_video

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(samples.shape[0]):
        pair = torch.cat([targets[i], samples[i]], dim=-1)  # (F, 3, H, 2W): target | sample
        files.append(write_video(folder / f"sample_{i}.mp4", _uint8(pair), fps))
    f = samples.shape[1]
    picks = sorted({round(k * (f - 1) / max(1, grid_frames - 1)) for k in range(grid_frames)})
    rows = []
    for i in range(samples.shape[0]):
        rows.append(torch.cat([targets[i, j] for j in picks], dim=-1))  # (3, H, k*W)
        rows.append(torch.cat([samples[i, j] for j in picks], dim=-1))
    grid = torch.cat(rows, dim=-2)  # (3, 2B*H, k*W)
    path = folder / "grid.png"
    Image.fromarray(_uint8(grid[None])[0]).save(path)
    (folder / "samples.txt").write_text(
        "rows: for each sample, target frames over sampled frames; columns: frames "
        + ", ".join(str(j) for j in picks) + "\n" + "\n".join(f"sample_{i}: {sid}" for i, sid in enumerate(ids)) + "\n"
    )
    return [*files, path, folder / "samples.txt"]


def psnr_db(samples: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean PSNR (dB) over frames then videos of (B, F, 3, H, W) videos in [0, 1] (scail2.eval protocol)."""
    from scail2.eval.metrics import psnr

    value = psnr(samples, targets).mean
    return float(value) if math.isfinite(value) else float("nan")
