"""Train the tiny Wan VAE that the CPU demo decodes with (shipped in ``scail2/encoders/tiny_vae/``).

    python -m scail2.encoders.tiny_vae_training --out /tmp/tiny-vae                # resumable
    python -m scail2.encoders.tiny_vae_training --out /tmp/tiny-vae --install      # then copy it into the package

The model is diffusers' `AutoencoderKLWan`, residual variant (the Wan2.2 VAE's blocks: 2x2 input patches,
parameter-free averaging / duplicating shortcuts around every down / up block) at Wan's strides (4, 8, 8) with
16 latent channels and a small width. It is trained on the synthetic domain of `scail2.data.synth` (targets,
driving and augmented driving videos, pose renders and reference images of generated pairs); held-out videos
come from datasets drawn with other seeds. Each step sees a batch of random ``clip_frames``-frame clips cut to
``crop`` x ``crop`` (aligned to the 8-pixel latent grid, randomly mirrored); the first frame of a clip goes
through the encoder alone, as a reference image does, so the image path and the causal temporal path are both
trained. The loss is MSE + ``l1`` x L1 on the reconstruction from the posterior mean (what the library encodes
with; taken before the decoder's final clamp to [-1, 1], which would stop the gradient of pixels decoded out of
range) plus ``latent_l2`` x the mean square of the latents (it only keeps their scale bounded; the per-channel
``latents_mean`` / ``latents_std`` measured afterwards on the training videos normalise them to unit variance,
as the real VAE's statistics do on real videos). There is no KL term: the library never samples the posterior.

Everything is a function of the settings: the synthetic data (its own seeds), the initial weights (``seed``, or
``init``: the weights of an earlier run, to continue it with other settings) and the batches. Every
``eval_every`` steps the held-out PSNR is printed and the state is saved (``checkpoint/``: weights as
safetensors, optimizer and generator state, step), so a stopped run resumes where it was. The result
(``vae/``, float16 weights) carries ``training.json``: the command, the settings, the steps and the final
held-out PSNR, overall, on first frames and on later frames.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from scail2.conditioning.pixels import to_unit

log = logging.getLogger(__name__)

# Where the shipped weights live (package data).
PACKAGE_DIR = Path(__file__).resolve().parent / "tiny_vae"
RECORD = "training.json"

# (pairs, frames, size, data seed) of a synthetic dataset.
DataSet = tuple[int, int, int, int]


@dataclass(frozen=True)
class TrainSettings:
    """Everything a training run is a function of (recorded in training.json)."""

    seed: int = 0
    steps: int = 3000
    batch: int = 4
    crop: int = 32
    clip_frames: int = 9
    lr: float = 1e-3
    final_lr: float = 0.05  # the cosine schedule ends at final_lr x lr
    warmup: int = 50
    l1: float = 0.5
    latent_l2: float = 1e-4
    base_dim: int = 16
    decoder_base_dim: int | None = None  # the decoder's width (None: base_dim); decoding is the harder half
    dim_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    init: str | None = None  # a diffusers VAE folder to start from instead of a fresh initialisation
    init_decoder: bool = True  # False: take only the encoder from ``init``, and a fresh decoder (of another width)
    # Synthetic training data; held-out sets use other data seeds (different characters, motions, backgrounds).
    train_sets: tuple[DataSet, ...] = ((64, 17, 64, 100),)
    heldout_sets: tuple[DataSet, ...] = ((8, 9, 64, 200),)


def vae_config(settings: TrainSettings) -> dict:
    """`AutoencoderKLWan` arguments of the tiny geometry: patch 2 x two spatial downsamples = 8; both
    downsamples also halve time: 4."""
    if len(settings.dim_mult) != 3:
        raise ValueError(f"dim_mult {settings.dim_mult}: need 3 levels (patch 2 x two downsamples = stride 8)")
    if settings.dim_mult[2] != settings.dim_mult[1]:
        raise ValueError(
            f"dim_mult {settings.dim_mult}: the last level has no downsample, so its width must equal the one "
            f"before (the residual shortcut cannot widen), e.g. (1, 2, 2) or (1, 4, 4)"
        )
    return dict(
        base_dim=settings.base_dim, decoder_base_dim=settings.decoder_base_dim or settings.base_dim, z_dim=16, dim_mult=list(settings.dim_mult),
        num_res_blocks=settings.num_res_blocks, is_residual=True, patch_size=2, in_channels=12, out_channels=12,
        temperal_downsample=[True, True], scale_factor_temporal=4, scale_factor_spatial=8,
    )  # fmt: skip


# The modules that make the posterior (what ``init_decoder=False`` takes from ``init``).
_ENCODER_PARTS = ("encoder.", "quant_conv.")


def build_vae(settings: TrainSettings):
    """A fresh `AutoencoderKLWan` of the tiny geometry (PyTorch's default initialisation, seeded by the caller),
    or the weights of ``settings.init`` (which must have that geometry; with ``init_decoder=False`` only its
    encoder, which must have this encoder's width, and a fresh decoder)."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(**vae_config(settings))
    if settings.init is not None:
        from safetensors.torch import load_file

        weights = {k: v.float() for k, v in load_file(str(Path(settings.init) / "diffusion_pytorch_model.safetensors")).items()}
        if not settings.init_decoder:  # the encoder half only; the decoder keeps its fresh initialisation
            encoder = {k: v for k, v in weights.items() if k.startswith(_ENCODER_PARTS)}
            weights = {**{k: v for k, v in vae.state_dict().items() if not k.startswith(_ENCODER_PARTS)}, **encoder}
        vae.load_state_dict(weights)
    return vae


def synthetic_videos(root: Path, sets: tuple[DataSet, ...]) -> list[torch.Tensor]:
    """Every RGB video and reference image of the synthetic datasets ``sets`` (drawn under ``root`` when
    absent) as uint8 tensors (F, 3, H, W); reference images are 1-frame videos."""
    from scail2.data.manifest import load_manifest
    from scail2.data.synth import SynthOptions, ensure_dataset
    from scail2.data.video import read_image, read_video

    videos: list[torch.Tensor] = []
    for pairs, frames, size, seed in sets:
        manifest = ensure_dataset(
            root / f"synthetic-{pairs}p-{frames}x{size}-s{seed}",
            SynthOptions(pairs=pairs, frames=frames, sizes=((size, size),), seed=seed),
        )
        for record in load_manifest(manifest):
            for path in (record.target, record.driving, record.driving_aug):
                if path is not None:
                    videos.append(torch.from_numpy(read_video(path)).permute(0, 3, 1, 2).contiguous())
            if not isinstance(record.reference, int):
                videos.append(torch.from_numpy(read_image(record.reference)).permute(2, 0, 1)[None].contiguous())
    return videos


def _whole_latent_frames(video: torch.Tensor) -> torch.Tensor:
    """The first 4k + 1 frames of a (F, ...) video (all of them when F = 4k + 1; an image stays 1 frame)."""
    return video[: video.shape[0] - (video.shape[0] - 1) % 4]


def random_crops(videos: list[torch.Tensor], settings: TrainSettings, gen: torch.Generator) -> torch.Tensor:
    """(batch, 3, clip_frames, crop, crop) in [-1, 1]: random clips of the videos with enough frames, random
    crops on the 8-pixel grid, random horizontal flips."""
    frames, crop = settings.clip_frames, settings.crop
    long = [v for v in videos if v.shape[0] >= frames]
    clips = []
    for _ in range(settings.batch):
        v = long[int(torch.randint(len(long), (1,), generator=gen))]
        f, _, h, w = v.shape
        t0 = int(torch.randint(f - frames + 1, (1,), generator=gen))
        y0 = int(torch.randint((h - crop) // 8 + 1, (1,), generator=gen)) * 8
        x0 = int(torch.randint((w - crop) // 8 + 1, (1,), generator=gen)) * 8
        clip = v[t0 : t0 + frames, :, y0 : y0 + crop, x0 : x0 + crop]
        if bool(torch.randint(2, (1,), generator=gen)):
            clip = clip.flip(-1)
        clips.append(clip.permute(1, 0, 2, 3))  # (3, F, crop, crop)
    return to_unit(torch.stack(clips))


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """`AutoencoderKLWan.decode` without its final clamp to [-1, 1] (the training loss needs the gradient of
    pixels decoded out of range): the decoder's outputs, frame by frame as ``decode`` runs it, put together and
    unpatchified as ``decode`` does."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    outputs: list[torch.Tensor] = []
    hook = vae.decoder.register_forward_hook(lambda module, args, out: outputs.append(out))
    try:
        clamped = vae.decode(z).sample
    finally:
        hook.remove()
    out = torch.cat(outputs, dim=2)
    if vae.config.patch_size is not None:
        out = unpatchify(out, patch_size=vae.config.patch_size)
    if out.shape != clamped.shape:
        raise RuntimeError(f"decoder outputs {tuple(out.shape)} do not make the decoded {tuple(clamped.shape)}")
    return out


@torch.no_grad()
def reconstruct(vae, video: torch.Tensor) -> torch.Tensor:
    """The posterior-mean reconstruction of a uint8 (F, 3, H, W) video (F = 4k + 1, or 1), as float (F, 3, H, W)
    in [0, 1]."""
    x = to_unit(video).permute(1, 0, 2, 3)[None].to(next(vae.parameters()).device)  # (1, 3, F, H, W)
    y = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    return ((y[0].transpose(0, 1) + 1) / 2).cpu()


@torch.no_grad()
def reconstruction_psnr(vae, videos: list[torch.Tensor]) -> dict[str, float]:
    """Held-out reconstruction PSNR (dB on [0, 1], `scail2.eval.metrics.psnr` per frame): ``overall`` (per video
    the mean over its frames, then the mean over videos; reference images count as 1-frame videos),
    ``first_frame`` (the frames encoded alone: first frames and images) and ``later_frames`` (the others,
    which share a latent frame with 3 more)."""
    from scail2.eval.metrics import psnr

    vae.eval()
    overall, first, later = [], [], []
    for v in videos:
        v = _whole_latent_frames(v)
        values = psnr(reconstruct(vae, v)[None], (v.float() / 255)[None]).per_frame[0]
        overall.append(float(values.mean()))
        first.append(float(values[0]))
        later.extend(float(x) for x in values[1:])
    return {"overall": float(np.mean(overall)), "first_frame": float(np.mean(first)), "later_frames": float(np.mean(later))}


def calibrate_latents_(vae, videos: list[torch.Tensor], max_videos: int = 96) -> None:
    """Set ``latents_mean`` / ``latents_std`` of the config to the statistics of posterior means of (up to
    ``max_videos``, evenly spaced) ``videos``."""
    from scail2.encoders.tiny import calibrate_latents_ as calibrate

    chosen = videos[:: max(1, len(videos) // max_videos)]
    calibrate(vae, (to_unit(_whole_latent_frames(v)).permute(1, 0, 2, 3)[None] for v in chosen))


def lr_at(settings: TrainSettings, step: int) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine from ``lr`` down to ``final_lr`` x ``lr``."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = min(1.0, (step - settings.warmup) / max(1, settings.steps - settings.warmup))
    return settings.lr * (settings.final_lr + (1 - settings.final_lr) * 0.5 * (1 + math.cos(math.pi * progress)))


def _save_checkpoint(folder: Path, vae, opt, gen: torch.Generator, step: int, history: list) -> None:
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}, str(tmp / "model.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "generator": gen.get_state()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "history": history}, indent=1) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)  # a run stopped while saving keeps the previous checkpoint


def _settings_json(settings: TrainSettings) -> dict:
    return json.loads(json.dumps(asdict(settings)))  # tuples as lists, as read back


def train(
    out: Path,
    settings: TrainSettings,
    eval_every: int = 100,
    command: str | None = None,
    stop_at: int | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Train (resuming from ``out/checkpoint`` when present) and write ``out/vae`` (the diffusers folder, float16
    weights, calibrated latent statistics) with its ``training.json``. Returns that folder. ``stop_at``: end at
    that step of the schedule instead of ``settings.steps`` (the record says where it stopped; a later call
    without it resumes and finishes the schedule). ``device``: where the steps and evaluations run (not a
    setting: the batches are drawn on the CPU alike, checkpoints are saved from the CPU and resume on either;
    the latent statistics are measured on the CPU)."""
    from safetensors.torch import load_file

    out.mkdir(parents=True, exist_ok=True)
    settings_file = out / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != _settings_json(settings):
        raise ValueError(f"{out} holds a run with other settings ({settings_file}); use another --out or delete it")
    settings_file.write_text(json.dumps(_settings_json(settings), indent=1) + "\n")
    data_root = out / "data"
    train_videos = synthetic_videos(data_root, settings.train_sets)
    heldout = synthetic_videos(data_root, settings.heldout_sets)
    log.info("%d training videos, %d held-out", len(train_videos), len(heldout))

    torch.manual_seed(settings.seed)
    vae = build_vae(settings).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=settings.lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    history: list[dict] = []
    start = 0
    checkpoint = out / "checkpoint"
    if checkpoint.exists():
        vae.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
        state = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        recorded = json.loads((checkpoint / "state.json").read_text())
        start, history = int(recorded["step"]), recorded["history"]
        log.info("resumed at step %d", start)
    else:
        history.append({"step": 0, **reconstruction_psnr(vae, heldout)})
        log.info("step 0  held-out PSNR %.2f dB", history[-1]["overall"])

    end = settings.steps if stop_at is None else min(stop_at, settings.steps)
    if start > end:
        raise ValueError(f"{out} is at step {start}, past stop_at={stop_at}; stop at {start} or later")
    clock = time.perf_counter()
    for step in range(start, end):
        vae.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(settings, step)
        x = random_crops(train_videos, settings, gen).to(device)
        z = vae.encode(x).latent_dist.mode()
        y = decode_unclamped(vae, z)
        mse = (y - x).pow(2).mean()
        loss = mse + settings.l1 * (y - x).abs().mean() + settings.latent_l2 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        done = step + 1
        if done % 10 == 0:
            log.info("step %d  train-crop PSNR %.2f dB  %.1f s/step", done,
                     10 * math.log10(4.0 / max(float(mse.detach()), 1e-12)), (time.perf_counter() - clock) / 10)  # fmt: skip
            clock = time.perf_counter()
        if (eval_every and done % eval_every == 0) or done == end:
            history.append({"step": done, **reconstruction_psnr(vae, heldout)})
            log.info("step %d  held-out PSNR %.2f dB (first frames %.2f, later %.2f)", done,
                     history[-1]["overall"], history[-1]["first_frame"], history[-1]["later_frames"])  # fmt: skip
            _save_checkpoint(checkpoint, vae, opt, gen, done, history)

    vae = vae.cpu()
    calibrate_latents_(vae, train_videos)
    folder = out / "vae"
    vae.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    # The PSNR of the weights as shipped (float16, read back as float32).
    from diffusers import AutoencoderKLWan

    shipped = AutoencoderKLWan.from_pretrained(folder, torch_dtype=torch.float32)
    record = {
        "command": command or "python -m scail2.encoders.tiny_vae_training " + " ".join(sys.argv[1:]),
        "settings": _settings_json(settings),
        "steps": end,  # trained; settings.steps is the length of the schedule
        "parameters": sum(p.numel() for p in shipped.parameters()),
        "heldout_psnr_db": reconstruction_psnr(shipped, heldout),
        "history": history,
    }
    if settings.init is not None:  # the run continued another: its weights' hash and its own record
        init = Path(settings.init)
        record["init"] = {
            "sha256": hashlib.sha256((init / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest(),
            "record": json.loads((init / RECORD).read_text()) if (init / RECORD).exists() else None,
        }
    (folder / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    log.info("wrote %s (held-out PSNR %.2f dB)", folder, record["heldout_psnr_db"]["overall"])
    return folder


def _yes_no(text: str) -> bool:
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: need true or false")


def _data_sets(text: str) -> tuple[DataSet, ...]:
    """``PAIRS:FRAMES:SIZE:SEED[,...]`` -> data sets."""
    try:
        sets = tuple(tuple(int(x) for x in part.split(":")) for part in text.split(","))
    except ValueError:
        sets = ((),)
    if any(len(s) != 4 for s in sets):
        raise argparse.ArgumentTypeError(f"{text!r}: need PAIRS:FRAMES:SIZE:SEED[,...], e.g. 64:17:64:100")
    return sets  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (data, resumable checkpoint, the result in vae/)")
    for f in fields(TrainSettings):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if f.name.endswith("_sets"):
            parser.add_argument(flag, type=_data_sets, default=value, help="PAIRS:FRAMES:SIZE:SEED[,...] (default %(default)s)")
        elif f.name == "dim_mult":
            parser.add_argument(flag, type=lambda s: tuple(int(x) for x in s.split(",")), default=value, help="e.g. 1,2,2")
        elif f.name == "decoder_base_dim":
            parser.add_argument(flag, type=int, default=None, help="the decoder's width (default: --base-dim)")
        elif f.name == "init_decoder":
            parser.add_argument(flag, type=_yes_no, default=True, help="false: only the encoder from --init (default true)")
        elif f.name == "init":
            parser.add_argument(flag, default=None, help="a diffusers VAE folder of the same geometry to start from")
        else:
            parser.add_argument(flag, type=type(value), default=value, help="(default %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--eval-every", type=int, default=100, help="held-out PSNR and a checkpoint every N steps")
    parser.add_argument("--stop-at", type=int, default=None, help="end at this step of the schedule (resume later to finish it)")
    parser.add_argument("--device", default="cpu", help="where the steps run, e.g. cuda (not a setting: a run resumes on any)")
    parser.add_argument("--install", action="store_true", help=f"copy the result into {PACKAGE_DIR}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    settings = TrainSettings(**{f.name: getattr(args, f.name) for f in fields(TrainSettings)})
    folder = train(args.out, settings, eval_every=args.eval_every, stop_at=args.stop_at, device=args.device)
    if args.install:
        if PACKAGE_DIR.exists():
            shutil.rmtree(PACKAGE_DIR)
        shutil.copytree(folder, PACKAGE_DIR)
        log.info("installed into %s", PACKAGE_DIR)


if __name__ == "__main__":
    main()
