"""Validation sampling during training: a fixed batch is denoised from fixed noise and compared to its targets.

`SampleValidation` is the callback that runs it (an `Evaluation`: its time is not counted as training time);
`SCAIL2Module` attaches it when its ``validation`` argument is set. The batch is the data module's
(``validation_batch``: items of the training set, each with a fixed seed). The denoising loop is inference's own (`scail2.pipeline.sampling.sample_latents`, the loop
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scail2.data.batch import MotionBatch
from scail2.lit.evaluation import Evaluation, model_in_eval


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


class SampleValidation(Evaluation):
    """Samples the fixed validation batch before training (step 0 of a fresh run), every
    ``cfg.every_n_steps`` optimizer steps and at the last step, computes the metrics, writes and logs the media.

    Every rank samples (a sharded model needs all ranks in its forward passes); global rank 0 decodes, writes
    and logs. ``history``: one `ValidationResult` per validation of this run.
    """

    def __init__(self, cfg: ValidationConfig):
        super().__init__()
        self.cfg = cfg
        # The fixed batch, the decoder and the decoded targets, made once. Held here, so that the decoder is
        # no part of the module (it must not enter checkpoints, the optimizer or DDP).
        self._batch: MotionBatch | None = None
        self._vae: Any = None
        self._targets: torch.Tensor | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.cfg.before_training and pl_module.global_step == 0 and not trainer.fast_dev_run:
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step, cfg = trainer.global_step, self.cfg
        if trainer.fast_dev_run or self.last_step == step:
            return
        last = trainer.max_steps > 0 and step >= trainer.max_steps
        periodic = cfg.every_n_steps > 0 and step > 0 and step % cfg.every_n_steps == 0
        if periodic or (last and cfg.after_training):
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.cfg.after_training and not trainer.fast_dev_run and self.last_step != trainer.global_step:
            self.run(trainer, pl_module)

    def _fixed_batch(self, trainer: Any) -> MotionBatch:
        if self._batch is None:
            dm = trainer.datamodule
            make = getattr(dm, "validation_batch", None)
            if make is None:
                raise ValueError(
                    f"validation sampling draws its batch from the data module's `validation_batch`; this data "
                    f"module ({type(dm).__name__}) has none: set module.validation=null"
                )
            self._batch = make(self.cfg.num_samples, self.cfg.seed)
        return self._batch

    @torch.no_grad()
    def run(self, trainer: Any, pl_module: Any) -> ValidationResult:
        """Sample, measure, write and log one validation at the current step; returns its result."""
        from scail2.lit.tracking import log_artifacts

        cfg, step = self.cfg, trainer.global_step
        self.last_step = step
        with self.timed():
            batch = self._fixed_batch(trainer).to(pl_module.device)
            with model_in_eval(trainer, pl_module.net):
                samples = sample_validation_latents(pl_module.net, batch, cfg)
                # The training objective with a fixed noise seed (the training generator is left untouched).
                fm_loss = pl_module.compute_loss(batch, torch.Generator().manual_seed(cfg.seed)).loss.detach()
            metrics = {"val/latent_mse": float(latent_mse(samples, batch.latents).mean()), "val/fm_loss": float(fm_loss)}
            folder, files = None, []
            if trainer.global_rank == 0 and cfg.vae is not None:
                if self._vae is None:
                    self._vae = load_vae(cfg.vae, pl_module.device)
                decoded = decode_videos(self._vae, samples)
                if self._targets is None:
                    self._targets = decode_videos(self._vae, batch.latents.float())
                metrics["val/psnr"] = psnr_db(decoded, self._targets)
                folder = Path(trainer.default_root_dir) / "validation" / f"step_{step:07d}"
                files = write_media(folder, decoded, self._targets, list(batch.meta.get("ids", [])), cfg.fps, cfg.grid_frames)
            result = ValidationResult(step, metrics, folder, files)
            self.history.append(result)
            self.publish(trainer, "validation", metrics)
            if folder is not None:  # written on global rank 0 only
                for logger in trainer.loggers:
                    log_artifacts(logger, folder, f"validation/step_{step:07d}")
        return result
