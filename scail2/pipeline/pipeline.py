"""``SCAIL2Pipeline``: reference image + driving video (+ masks, prompt) -> animated video.

Components: the SCAIL-2 transformer, the Wan2.1 VAE, the umT5 text encoder (with its tokenizer), the CLIP image
encoder (with its preprocessing) and a diffusers flow-matching scheduler (UniPC by default, Euler selectable).

    pipe = SCAIL2Pipeline.from_pretrained("/models/scail2-14b", dtype=torch.bfloat16, text_dtype=torch.bfloat16)
    pipe.enable_model_cpu_offload("cuda")
    out = pipe("ref.png", "driving.mp4", prompt="a woman dancing", seed=0, height=512, width=896)
    out.save("out.mp4")

One call: load and check the inputs (``scail2.pipeline.inputs``), encode the first segment's conditioning with
:func:`scail2.conditioning.encode.encode_condition` (the function the latent cache of the training data uses:
prompt, reference latent, CLIP tokens, masks, half-resolution driving latent) and the negative prompt, then for
every segment of the driving video (``scail2.pipeline.segments``) encode its driving frames and masks, denoise
with :func:`scail2.pipeline.sampling.sample_latents`, decode, and pass the last decoded frames on as clean
history.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scail2.conditioning import pixels
from scail2.conditioning.condition import Condition
from scail2.conditioning.encode import encode_caption, encode_condition, encode_driving
from scail2.pipeline.inputs import PreparedInputs, prepare_inputs
from scail2.pipeline.layout import COMPONENTS, check_folder, write_index
from scail2.pipeline.sampling import sample_latents
from scail2.pipeline.schedulers import check_flow_scheduler, load_scheduler, make_scheduler, scheduler_shift, with_shift
from scail2.pipeline.segments import SegmentPlan

log = logging.getLogger(__name__)

OUTPUT_TYPES: tuple[str, ...] = ("np", "pt")
# callback_on_step_end(pipe, step, timestep, latents): step counts over all segments.
StepEndCallback = Callable[["SCAIL2Pipeline", int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class LoadedLoRA:
    """The LoRA adapter a pipeline's transformer carries (see :meth:`SCAIL2Pipeline.load_lora`)."""

    path: Path
    scale: float
    merged: bool  # folded into the weights: cannot be unloaded
    rank: int  # 0 for a file of weight deltas only
    alpha: float
    deltas: int = 0  # full-shape weight / bias deltas (``diff`` / ``diff_b``) applied with the adapter


@dataclass
class SCAIL2Output:
    """frames: "np" -> uint8 array (F, H, W, 3); "pt" -> float32 tensor (F, 3, H, W) in [-1, 1]."""

    frames: np.ndarray | torch.Tensor
    fps: float
    seed: int | None  # the seed of the noise (None when a generator was passed)
    plan: SegmentPlan
    latents: list[torch.Tensor]  # per segment (1, 16, T, h, w) float32 on the CPU

    def save(self, path: str | Path, fps: float | None = None) -> Path:
        """Write the frames as a video (H.264 in an .mp4 by default) at ``fps`` (default: ``self.fps``)."""
        from scail2.data.video import write_video

        frames = self.frames
        if isinstance(frames, torch.Tensor):
            frames = to_uint8(frames)
        return write_video(path, frames, fps or self.fps)


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) float in [-1, 1] -> uint8 (F, H, W, 3)."""
    return pixels.to_uint8(frames.cpu()).permute(0, 2, 3, 1).contiguous().numpy()


class SCAIL2Pipeline:
    """End-to-end controlled character animation with SCAIL-2 (see the module docstring)."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        vae: Any,
        text_encoder: Any,
        image_encoder: Any,
        scheduler: Any = None,
    ) -> None:
        """transformer: a ``SCAIL2Transformer``; vae: ``WanVAE``; text_encoder: ``TextEncoder``; image_encoder:
        ``ImageEncoder``; scheduler: a flow-matching scheduler (default ``make_scheduler("unipc")``)."""
        config = getattr(transformer, "config", None)
        if config is None or not config.is_scail2:
            raise ValueError(
                f"transformer is a {type(transformer).__name__} without a SCAIL-2 config; load a SCAIL-2 checkpoint "
                "(a Wan2.1-I2V model becomes one with `scail2-convert SRC DST --init-scail2-from-i2v`)"
            )
        if config.text_dim != text_encoder.dim:
            raise ValueError(
                f"the transformer takes text_dim={config.text_dim} but the text encoder gives {text_encoder.dim}; "
                "use the umT5 encoder the transformer was trained with"
            )
        if config.image_dim != image_encoder.dim:
            raise ValueError(
                f"the transformer takes image_dim={config.image_dim} but the CLIP encoder gives "
                f"{image_encoder.dim}; use the CLIP encoder the transformer was trained with"
            )
        scheduler = make_scheduler() if scheduler is None else scheduler
        check_flow_scheduler(scheduler)
        # Not switched to eval / no-grad here: a pipeline may wrap a model that is being trained (sampling runs
        # under no_grad anyway, and the Wan blocks have no dropout).
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.scheduler = scheduler
        self._offload_device: torch.device | None = None
        self._lora: LoadedLoRA | None = None

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None,
        *,
        transformer_path: str | Path | None = None,
        vae_path: str | Path | None = None,
        text_encoder_path: str | Path | None = None,
        tokenizer_path: str | Path | None = None,
        image_encoder_path: str | Path | None = None,
        image_processor_path: str | Path | None = None,
        scheduler_path: str | Path | None = None,
        scheduler: str | None = None,
        dtype: torch.dtype | None = None,
        text_dtype: torch.dtype = torch.float32,
        image_dtype: torch.dtype = torch.float32,
        vae_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        lora: str | Path | None = None,
        lora_scale: float = 1.0,
    ) -> "SCAIL2Pipeline":
        """Load every component from ``path`` (layout in ``scail2.pipeline.layout``) or from its own path.

        ``path`` is a pipeline folder (``transformer/``, ``vae/`` ...), a Wan2.1-I2V diffusers folder with a
        SCAIL-2 ``transformer/``, or the official SCAIL-2 release folder as downloaded (``model/1/...`` SAT
        checkpoint, ``Wan2.1_VAE.pth``, the umT5 and CLIP ``.pth`` files, ``umt5-xxl/``). ``*_path`` arguments
        point at components kept elsewhere (folders or those single files).

        All files are checked first; one ``FileNotFoundError`` lists every missing file. ``dtype`` is the
        transformer's (default: as stored); ``text_dtype`` should be bfloat16 for the real umT5-XXL (float16
        overflows); the VAE is best kept in float32. ``scheduler`` "unipc" | "euler" replaces the saved
        scheduler kind, keeping its shift. ``device``: where every component goes (see also
        :meth:`enable_model_cpu_offload`). ``lora`` / ``lora_scale``: a LoRA adapter loaded (unmerged) with
        :meth:`load_lora` before the pipeline moves to ``device``.
        """
        from scail2.encoders.bundle import Encoders
        from scail2.models.loading import load_transformer

        overrides = {
            "transformer": transformer_path,
            "vae": vae_path,
            "text_encoder": text_encoder_path,
            "tokenizer": tokenizer_path,
            "image_encoder": image_encoder_path,
            "image_processor": image_processor_path,
            "scheduler": scheduler_path,
        }
        paths = check_folder(path, overrides)
        transformer = load_transformer(paths["transformer"], dtype=dtype).eval().requires_grad_(False)
        encoders = Encoders.from_pretrained(
            None,
            vae_path=paths["vae"],
            text_encoder_path=paths["text_encoder"],
            tokenizer_path=paths["tokenizer"],
            image_encoder_path=paths["image_encoder"],
            image_processor_path=paths["image_processor"],
            vae_dtype=vae_dtype,
            text_dtype=text_dtype,
            image_dtype=image_dtype,
        )
        if paths["scheduler"] is not None and paths["scheduler"].is_dir():
            sched = load_scheduler(paths["scheduler"])
        else:
            log.info("no scheduler folder (%s); sampling with UniPC, shift %s", paths["scheduler"], 5.0)
            sched = make_scheduler("unipc")
        if scheduler is not None:
            sched = make_scheduler(scheduler, scheduler_shift(sched))
        pipe = cls(transformer, encoders.vae, encoders.text, encoders.image, sched)
        if lora is not None:
            pipe.load_lora(lora, scale=lora_scale)
        return pipe.to(device) if device is not None else pipe

    # ------------------------------------------------------------------------------------------ LoRA
    @property
    def lora_loaded(self) -> LoadedLoRA | None:
        """The adapter loaded with :meth:`load_lora` (path, scale, merged, rank, alpha), or None."""
        return self._lora

    def load_lora(
        self, path: str | Path, scale: float = 1.0, merge: bool = False, check_base: bool = True
    ) -> "SCAIL2Pipeline":
        """Load a LoRA adapter into the transformer: a peft folder (``adapter_model.safetensors`` +
        ``adapter_config.json``) or a ComfyUI ``.safetensors`` file, as ``scail2.lora.save_lora`` writes them
        (the DPO export's ``lora/`` and ``lora_comfyui.safetensors``); the same keys without the
        ``diffusion_model.`` prefix; the released ``bias-aware-dpo-lora.pt`` (SAT container) as it is; and files
        with ``diff`` / ``diff_b`` weight deltas such as the lightx2v step-distill LoRA (see ``scail2.lora``;
        its sampling recipe: ``scail2.pipeline.presets``).

        Loading is strict: every adapter in the file must fit a layer of the transformer and every layer its
        pattern selects must have weights; anything else raises ``ValueError`` naming the file and what does not
        fit, and leaves the transformer untouched. With ``check_base`` the file's base-model hash must match the
        transformer's weights (compared in the dtype the adapter was trained on). ``scale`` multiplies the
        adapter's effect (0: none, 1: as trained). ``merge`` folds it, scaled, into the weights (no adapter
        overhead at sampling; cannot be unloaded). The adapter weights take the transformer's dtype and device;
        the transformer's train/eval mode and ``requires_grad`` flags are kept (adapter weights get none).

        One adapter at a time: loading a second one raises; call :meth:`unload_lora` first.
        """
        from scail2.lora import load_lora, lora_layers, merge_lora, set_lora_scale, weight_deltas

        if self._lora is not None:
            if self._lora.merged:
                raise ValueError(
                    f"the LoRA adapter {self._lora.path} is merged into the transformer; load the pipeline again "
                    f"(from_pretrained) to load {path}"
                )
            raise ValueError(
                f"the LoRA adapter {self._lora.path} is loaded; call unload_lora() first to load {path} "
                "(one adapter at a time)"
            )
        scale = float(scale)
        transformer = self.transformer
        was_training = transformer.training
        grads = {id(p): p.requires_grad for p in transformer.parameters()}
        load_lora(transformer, path, check_base=check_base)
        layer = next(iter(lora_layers(transformer).values()), None)
        rank = int(layer.r["default"]) if layer is not None else 0
        alpha = float(layer.lora_alpha["default"]) if layer is not None else 0.0
        deltas = len(weight_deltas(transformer))
        set_lora_scale(transformer, scale)
        if merge:
            merge_lora(transformer)
        transformer.train(was_training)
        for p in transformer.parameters():
            p.requires_grad_(grads.get(id(p), False))
        self._lora = LoadedLoRA(Path(path), scale, merge, rank, alpha, deltas)
        log.info("loaded LoRA %s (rank %d, scale %g%s)", path, rank, scale, ", merged" if merge else "")
        return self

    def unload_lora(self) -> "SCAIL2Pipeline":
        """Remove the adapter loaded with :meth:`load_lora`, giving back the base transformer exactly (a no-op
        without one). A merged adapter cannot be removed: that raises ``ValueError``."""
        from scail2.lora import remove_lora

        if self._lora is None:
            return self
        if self._lora.merged:
            raise ValueError(
                f"the LoRA adapter {self._lora.path} was merged into the transformer's weights and cannot be "
                "removed; load the pipeline again (from_pretrained) for the base weights"
            )
        remove_lora(self.transformer)
        self._lora = None
        return self

    def save_pretrained(self, path: str | Path) -> Path:
        """Write every component in the layout :meth:`from_pretrained` reads (weights as safetensors).

        A LoRA adapter is saved only merged (``load_lora(..., merge=True)``); with an unmerged one this raises.
        """
        from scail2.models.loading import save_pretrained as save_transformer

        if any(".base_layer." in name or ".parametrizations." in name for name, _ in self.transformer.named_parameters()):
            where = f" ({self._lora.path})" if self._lora is not None else ""
            raise ValueError(
                f"the transformer carries an unmerged LoRA adapter{where}; call unload_lora() to save the base "
                "model, or load the adapter with merge=True to save the adapted one"
            )
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        save_transformer(self.transformer, root / "transformer")
        self.vae.model.save_pretrained(root / "vae", safe_serialization=True)
        self.text_encoder.model.save_pretrained(root / "text_encoder", safe_serialization=True)
        self.text_encoder.tokenizer.save_pretrained(root / "tokenizer")
        self.image_encoder.model.save_pretrained(root / "image_encoder", safe_serialization=True)
        (root / "image_processor").mkdir(exist_ok=True)
        processor = _processor_config(self.image_encoder.preprocess)
        (root / "image_processor" / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
        self.scheduler.save_pretrained(root / "scheduler")
        write_index(root, {name: name for name in COMPONENTS})
        return root

    # ------------------------------------------------------------------------------------------ parallelism
    def enable_sequence_parallel(self, group: Any = None) -> "SCAIL2Pipeline":
        """Spread every denoising step over the ranks of ``group`` (default: all processes) with Ulysses
        sequence parallelism (`scail2.models.sequence_parallel`): each rank runs the transformer's blocks on
        its shard of the packed sequence. Every rank of the group calls the pipeline with the same arguments and
        gets the same video; the encoders and the VAE run on every rank, and their outputs and the seed are
        taken from the group's first rank so that all ranks denoise exactly the same inputs.

        Needs an initialised process group (e.g. ``torchrun``; see ``scail2-animate --sequence-parallel``).
        """
        from scail2.models.parallelize import parallelize
        from scail2.models.sequence_parallel import SequenceParallel, sequence_parallel_of

        if sequence_parallel_of(self.transformer) is not None:
            raise ValueError("sequence parallelism is already enabled on this pipeline")
        parallelize(self.transformer, sequence_parallel=SequenceParallel(group))
        return self

    @property
    def sequence_parallel(self) -> Any:
        """The `SequenceParallel` group of the transformer, or None."""
        from scail2.models.sequence_parallel import sequence_parallel_of

        return sequence_parallel_of(self.transformer)

    # ------------------------------------------------------------------------------------------ devices
    @property
    def components(self) -> dict[str, Any]:
        return {
            "transformer": self.transformer,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "image_encoder": self.image_encoder,
            "scheduler": self.scheduler,
        }

    @property
    def device(self) -> torch.device:
        """The execution device: the offload target, else where the transformer is."""
        if self._offload_device is not None:
            return self._offload_device
        return next(self.transformer.parameters()).device

    def to(self, device: torch.device | str) -> "SCAIL2Pipeline":
        """Move every model to ``device`` (and turn CPU offload off)."""
        self._offload_device = None
        for module in (self.transformer, self.vae, self.text_encoder, self.image_encoder):
            module.to(device)
        return self

    def enable_model_cpu_offload(self, device: torch.device | str = "cuda") -> "SCAIL2Pipeline":
        """Keep every model on the CPU and move each to ``device`` only while it runs (one at a time on the
        accelerator: the 14B transformer, then the VAE, never both with umT5-XXL)."""
        self.to("cpu")
        self._offload_device = torch.device(device)
        return self

    def enable_vae_tiling(self, tile_size: int | None = None, stride: int | None = None) -> "SCAIL2Pipeline":
        """Encode and decode frames in overlapping spatial tiles (diffusers' ``AutoencoderKLWan.enable_tiling``):
        the VAE's activation memory then follows the tile, not the frame. ``tile_size`` / ``stride`` in pixels
        (None: diffusers' 256 / 192); frames no larger than a tile are processed whole. Seams are blended, so the
        output differs slightly from untiled decoding."""
        self.vae.model.enable_tiling(tile_size, tile_size, stride, stride)
        return self

    @contextmanager
    def _on_device(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        if self._offload_device is None:
            yield module
            return
        module.to(self._offload_device)
        try:
            yield module
        finally:
            module.to("cpu")
            if self._offload_device.type == "cuda":
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------ encoding
    @property
    def encoders(self) -> Any:
        """The VAE, text and image encoders as an ``Encoders`` bundle (what the latent cache encodes with)."""
        from scail2.encoders.bundle import Encoders

        return Encoders(self.vae, self.text_encoder, self.image_encoder)

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """umT5 embeddings (B, 512, text_dim) float32 on the execution device."""
        return torch.cat([encode_caption(self.encoders, p, place=self._on_device, device=self.device) for p in prompts])

    def encode_condition(self, inputs: PreparedInputs, prompt: str = "", segment: int = 0) -> Condition:
        """The conditioning (batch of one, float32 on the execution device) of one segment of prepared inputs:
        :func:`scail2.conditioning.encode.encode_condition` on the prompt, the reference (and extra references)
        with their masks, and the segment's driving frames with their masks."""
        frames = inputs.plan.segments[segment]
        mask = inputs.driving_mask
        return encode_condition(
            self.encoders,
            reference=inputs.reference,
            reference_mask=inputs.reference_mask,
            driving=inputs.driving[frames.start : frames.stop],
            driving_mask=None if mask is None else mask[frames.start : frames.stop],
            caption=prompt,
            mode=inputs.mode,
            extra_references=inputs.extra_references,
            extra_reference_masks=inputs.extra_reference_masks,
            place=self._on_device,
            device=self.device,
        )

    def segment_condition(self, cond: Condition, inputs: PreparedInputs, segment: int) -> Condition:
        """``cond`` with the driving latents and masks of another segment (reference and text are shared)."""
        frames = inputs.plan.segments[segment]
        mask = inputs.driving_mask
        driving, driving_mask = encode_driving(
            self.encoders,
            inputs.driving[frames.start : frames.stop],
            None if mask is None else mask[frames.start : frames.stop],
            inputs.mode,
            place=self._on_device,
            device=self.device,
        )
        return replace(cond, driving=driving, driving_mask=driving_mask)

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """(F, 3, H, W) in [-1, 1] -> (1, 16, T, H/8, W/8) (history frames of long videos)."""
        with self._on_device(self.vae):
            return self.vae.encode(frames.transpose(0, 1)[None]).to(self.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(1, 16, T, h, w) -> (4(T-1)+1, 3, 8h, 8w) float32 in [-1, 1] on the CPU."""
        with self._on_device(self.vae):
            video = self.vae.decode(latents)  # (1, 3, F, H, W)
        return video[0].transpose(0, 1).float().cpu()

    # ------------------------------------------------------------------------------------------ sampling
    def sample_latents(
        self,
        cond: Condition,
        *,
        negative_text: torch.Tensor | None = None,
        history: torch.Tensor | None = None,
        num_inference_steps: int = 40,
        guidance_scale: float = 5.0,
        shift: float | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        progress: bool = False,
        progress_desc: str = "denoising",
    ) -> torch.Tensor:
        """The denoising loop on encoded conditioning (see :func:`scail2.pipeline.sampling.sample_latents`),
        with a fresh copy of this pipeline's scheduler at ``shift`` (default: the scheduler's own)."""
        scheduler = with_shift(self.scheduler, shift)
        sp = self.sequence_parallel
        if sp is not None:
            # The ranks must denoise identical inputs (GPU encoders need not be bit-reproducible across ranks).
            sp.broadcast_([v for v in vars(cond).values() if isinstance(v, torch.Tensor)])
            if latents is not None:
                sp.broadcast_([latents])
        with self._on_device(self.transformer):
            return sample_latents(
                self.transformer,
                cond,
                scheduler,
                negative_text=negative_text,
                history=history,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generator,
                latents=latents,
                callback=callback,
                progress=progress,
                progress_desc=progress_desc,
            )

    @torch.no_grad()
    def generate(
        self,
        inputs: PreparedInputs,
        *,
        prompt: str = "",
        negative_prompt: str = "",
        num_inference_steps: int = 40,
        guidance_scale: float = 5.0,
        shift: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "np",
        callback_on_step_end: StepEndCallback | None = None,
        progress: bool = True,
    ) -> SCAIL2Output:
        """Animate prepared inputs (from :func:`scail2.pipeline.inputs.prepare_inputs`).

        Args:
            prompt, negative_prompt: captions; the negative prompt ("" by default) conditions the unconditional
                pass of the text-only guidance.
            num_inference_steps: denoising steps per segment (40).
            guidance_scale: text CFG scale (5); 1 runs one model pass per step.
            shift: time shift of the noise schedule; default the scheduler's (5.0; 3.0 is advised at 480p).
            seed / generator: the noise RNG (CPU by default); without either a random seed is drawn and
                reported in the output.
            output_type: "np" (uint8 (F, H, W, 3)) or "pt" (float32 (F, 3, H, W) in [-1, 1]).
            callback_on_step_end: ``f(pipe, step, timestep, latents)`` after every step; ``step`` counts over all
                segments (segment i, step j -> i * num_inference_steps + j).
            progress: tqdm bars.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type is {output_type!r}; use one of {OUTPUT_TYPES}")
        generator, seed = _noise_generator(seed, generator, self.sequence_parallel, self.device)
        cond = self.encode_condition(inputs, prompt)
        negative = self.encode_prompt([negative_prompt]) if guidance_scale != 1.0 else None
        sample = partial(
            self.sample_latents,
            negative_text=negative,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            shift=shift,
            generator=generator,
            progress=progress,
        )
        frames_out: list[np.ndarray | torch.Tensor] = []
        segment_latents = []
        for index, latents, video in self._denoise_segments(inputs, cond, sample, num_inference_steps, callback_on_step_end):
            segment_latents.append(latents.float().cpu())
            kept = video[inputs.plan.segments[index].keep_from :]
            frames_out.append(kept if output_type == "pt" else to_uint8(kept))
        frames = torch.cat(frames_out) if output_type == "pt" else np.concatenate(frames_out)
        return SCAIL2Output(frames=frames, fps=inputs.fps, seed=seed, plan=inputs.plan, latents=segment_latents)

    def _denoise_segments(
        self,
        inputs: PreparedInputs,
        cond: Condition,
        sample: Callable[..., torch.Tensor],
        steps_per_segment: int,
        callback_on_step_end: StepEndCallback | None,
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(segment index, sampled latents, decoded frames (S, 3, H, W) float32 in [-1, 1]) for every segment in
        order. Segment i > 0 is conditioned on its own driving frames and on clean history: the re-encoded last
        ``overlap_frames`` decoded frames of segment i - 1."""
        plan = inputs.plan
        history = None
        for index in range(len(plan.segments)):
            if index > 0:
                cond = self.segment_condition(cond, inputs, index)
            callback = None
            if callback_on_step_end is not None:
                offset = index * steps_per_segment  # steps count over all segments
                callback = lambda i, ts, z, offset=offset: callback_on_step_end(self, offset + i, ts, z)  # noqa: E731
            latents = sample(
                cond, history=history, callback=callback, progress_desc=f"segment {index + 1}/{len(plan.segments)}"
            )
            video = self.decode(latents)
            if index + 1 < len(plan.segments):
                history = self.encode_video(video[-plan.overlap_frames :])
            yield index, latents, video

    def __call__(
        self,
        reference_image: Any,
        driving_video: Any,
        *,
        mode: str = "animation",
        reference_mask: Any = None,
        driving_mask: Any = None,
        character_masks: Any = None,
        reference_character_masks: Any = None,
        character_order: str | list[int] = "x",
        extra_reference_images: list[Any] | None = None,
        extra_reference_masks: list[Any] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        segment_frames: int | None = None,
        overlap_frames: int | None = None,
        fps: float | None = None,
        **generate_kwargs: Any,
    ) -> SCAIL2Output:
        """Animate ``reference_image`` with ``driving_video``.

        The driving video is a raw video (end-to-end mode) or a rendered skeleton/mesh video (pose-driven mode);
        both take the same path. Input forms, masks and sizes: :func:`scail2.pipeline.inputs.prepare_inputs`;
        sampling options (prompt, negative_prompt, num_inference_steps, guidance_scale, shift, seed,
        generator, output_type, callback_on_step_end, progress): :meth:`generate`. Output length: see
        ``scail2.pipeline.segments``.
        """
        segments = {}
        if segment_frames is not None:
            segments["segment_frames"] = segment_frames
        if overlap_frames is not None:
            segments["overlap_frames"] = overlap_frames
        prepared = prepare_inputs(
            reference_image,
            driving_video,
            mode=mode,
            reference_mask=reference_mask,
            driving_mask=driving_mask,
            character_masks=character_masks,
            reference_character_masks=reference_character_masks,
            order=character_order,
            extra_reference_images=extra_reference_images,
            extra_reference_masks=extra_reference_masks,
            height=height,
            width=width,
            num_frames=num_frames,
            fps=fps,
            **segments,
        )
        return self.generate(prepared, **generate_kwargs)


def _noise_generator(
    seed: int | None, generator: torch.Generator | None, sequence_parallel: Any = None, device: Any = None
) -> tuple[torch.Generator, int | None]:
    """The noise RNG and the seed to report: ``generator`` as given (seed None), or a CPU generator seeded with
    ``seed`` (a random one when neither is given; under ``sequence_parallel``, rank 0's random seed is broadcast
    on ``device`` so that the whole group draws the same noise)."""
    if generator is not None and seed is not None:
        raise ValueError("pass either seed or generator, not both")
    if generator is not None:
        return generator, None
    if seed is None:
        seed = secrets.randbits(31)
        if sequence_parallel is not None:  # one seed for the whole group
            seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
            sequence_parallel.broadcast_([seed_t])
            seed = int(seed_t.item())
    seed = int(seed)
    return torch.Generator().manual_seed(seed), seed


def _processor_config(pre: Any) -> dict[str, Any]:
    """A ``preprocessor_config.json`` that ``ClipPreprocess.from_config`` reads back to ``pre``."""
    resample = {"bilinear": 2, "bicubic": 3}[pre.interpolation]
    size = {"shortest_edge": pre.shortest_edge} if pre.shortest_edge is not None else {
        "height": pre.resize_hw[0],
        "width": pre.resize_hw[1],
    }
    return {
        "crop_size": {"height": pre.crop_hw[0], "width": pre.crop_hw[1]},
        "do_center_crop": pre.center_crop,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(pre.mean),
        "image_processor_type": "CLIPImageProcessor",
        "image_std": list(pre.std),
        "resample": resample,
        "rescale_factor": 1 / 255,
        "size": size,
    }
