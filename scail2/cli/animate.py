"""``scail2-animate``: animate a reference image with a driving video.

Examples::

    # single character, end-to-end (the driving video is a raw video), no masks
    scail2-animate --model /models/scail2-14b --ref ref.png --driving dance.mp4 --out out.mp4
    # pose-driven replacement with colour-coded masks, 480p
    scail2-animate --model /models/scail2-14b --ref ref.png --driving pose.mp4 --mode replacement \\
        --masks pose_mask.mp4 --ref-mask ref_mask.png --height 480 --width 832 --shift 3 --out out.mp4
    # two characters from per-character binary masks (white = inside), same order in both lists
    scail2-animate --model DIR --ref ref.png --driving two.mp4 \\
        --character-masks a.mp4 b.mp4 --ref-character-masks a.png b.png --out out.mp4
    # with a LoRA adapter (peft folder or ComfyUI file, e.g. a DPO export), at 80% strength
    scail2-animate --model DIR --lora export/lora --lora-scale 0.8 --ref ref.png --driving dance.mp4 --out out.mp4
    # the official SCAIL-2 release folder as downloaded, its DPO LoRA, and the CLIP file kept elsewhere
    scail2-animate --model SCAIL-2 --lora SCAIL-2/model/bias-aware-dpo-lora.pt \\
        --image-encoder Wan2.1-I2V-14B-720P/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth \\
        --ref ref.png --driving dance.mp4 --out out.mp4

    # one video on 4 GPUs: every denoising step is spread over them (Ulysses sequence parallelism)
    torchrun --nproc_per_node 4 -m scail2.cli.animate --sequence-parallel 4 --model DIR --ref ref.png \\
        --driving dance.mp4 --out out.mp4

Every bad input (unreadable file, size not divisible by 32, a non-finite number, mask frame count, off-palette
mask colours, a model folder missing a component, an output the video writer cannot write) is reported before
the model is loaded, with exit code 2 and a message naming the value and the fix. If writing the video still fails
after sampling, the frames and latents are kept in a safetensors file next to ``--out`` (exit code 3).

Without --height/--width, a model exported by scail2-train runs at the resolution it was trained at (its
``training.json``; of several, the one closest to the reference image's aspect ratio); a requested size far
from every trained resolution gets a warning.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_OUTPUT = 3  # the video could not be written after sampling; the frames and latents were kept
DTYPES = ("fp32", "bf16", "fp16")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi")
MAX_SIDE = 8192  # output height / width; inputs are resized to cover the output, so sizes beyond cost all memory
MAX_ASPECT = 8.0  # longer / shorter output side (the training buckets are about 1.75)
# A requested size is "far" from a trained resolution when its pixel count differs by more than this factor
# or its aspect ratio by more than FAR_ASPECT; then a warning says so.
FAR_AREA = 2.0
FAR_ASPECT = 1.5


class InputError(Exception):
    """A bad command-line input; the message is printed and the exit code is 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scail2-animate",
        description="Animate a reference image with a driving video (raw video: end-to-end; rendered "
        "skeleton/mesh: pose-driven) using a SCAIL-2 pipeline folder. See docs/inference.md.",
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="pipeline folder (transformer/, vae/, text_encoder/, ...) or the official SCAIL-2 release folder "
        "(model/1/..., Wan2.1_VAE.pth, the umT5 / CLIP .pth files, umt5-xxl/)",
    )
    p.add_argument("--ref", type=Path, required=True, help="reference image")
    p.add_argument("--driving", type=Path, required=True, help="driving video (raw video or rendered pose/mesh)")
    p.add_argument("--out", type=Path, required=True, help="output video (.mp4)")
    p.add_argument("--mode", choices=("animation", "replacement"), default="animation")
    parts = p.add_argument_group("model components kept elsewhere (each replaces that part of --model)")
    parts.add_argument("--transformer", type=Path, help="transformer folder or file (any layout, SAT checkpoint too)")
    parts.add_argument("--vae", type=Path, help="VAE folder (diffusers) or Wan2.1_VAE.pth")
    parts.add_argument("--text-encoder", type=Path, help="umT5 folder or models_t5_umt5-xxl-enc-bf16.pth")
    parts.add_argument("--tokenizer", type=Path, help="umT5 tokenizer folder (e.g. umt5-xxl/)")
    parts.add_argument(
        "--image-encoder", type=Path, help="CLIP folder or models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    )
    parts.add_argument("--image-processor", type=Path, help="CLIP preprocessor_config.json folder")
    masks = p.add_argument_group("masks (optional for single-character animation)")
    masks.add_argument("--masks", type=Path, help="colour-coded driving mask video (same frames and size as --driving)")
    masks.add_argument("--ref-mask", type=Path, help="colour-coded reference mask image (same size as --ref)")
    masks.add_argument(
        "--character-masks", type=Path, nargs="+", help="one binary mask video per character (white = inside)"
    )
    masks.add_argument(
        "--ref-character-masks", type=Path, nargs="+", help="one binary mask image per character, same order"
    )
    masks.add_argument(
        "--order", choices=("x", "area"), default="x", help="palette order of the characters (default: left to right)"
    )
    masks.add_argument(
        "--palette-tolerance", type=float, default=None, help="largest fraction of off-palette mask pixels (0.05)"
    )
    s = p.add_argument_group("sampling (defaults: 40 steps, guidance 5, the scheduler's shift 5)")
    s.add_argument("--prompt", default="")
    s.add_argument("--negative-prompt", default=None, help='default ""')
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--guidance", type=float, default=None, help="text guidance scale; 1 = one pass per step")
    s.add_argument("--shift", type=float, default=None, help="time shift (5 by default; 3 is advised at 480p)")
    s.add_argument("--seed", type=int, default=None, help="noise seed (random and printed when omitted)")
    s.add_argument("--scheduler", choices=("unipc", "euler"), default=None, help="default: the model folder's (UniPC)")
    s.add_argument(
        "--preset", default=None, metavar="NAME",
        help="a named recipe (scail2.pipeline.presets.SAMPLING_PRESETS) for the steps, guidance, shift, scheduler "
        "and LoRA strength not given: default (40, 5, 5) or lightx2v-distill (8 steps, guidance 1, shift 1, for "
        "the lightx2v step-distill LoRA)",
    )  # fmt: skip
    lora = p.add_argument_group("LoRA adapter")
    lora.add_argument(
        "--lora", type=Path, default=None,
        help="LoRA adapter: a peft folder (adapter_model.safetensors + adapter_config.json) or a ComfyUI .safetensors",
    )
    lora.add_argument("--lora-scale", type=float, default=None, help="strength of the adapter (1 = as trained)")
    lora.add_argument("--merge-lora", action="store_true", help="fold the adapter into the weights (faster steps)")
    lora.add_argument(
        "--no-lora-base-check", action="store_true",
        help="load the adapter even if it was trained on other base weights than --model's",
    )
    v = p.add_argument_group("video")
    v.add_argument(
        "--height", type=int, default=None,
        help="output height, a multiple of 32 (default: the model's training resolution, else ~512x896)",
    )
    v.add_argument("--width", type=int, default=None, help="output width, a multiple of 32")
    v.add_argument("--frames", type=int, default=None, help="use only the first N driving frames")
    v.add_argument("--segment-frames", type=int, default=None, help="frames per segment of long videos (81)")
    v.add_argument("--overlap-frames", type=int, default=None, help="frames shared by consecutive segments (5)")
    v.add_argument("--fps", type=float, default=None, help="output frame rate (default: the driving video's)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    r.add_argument(
        "--dtype", choices=DTYPES, default=None,
        help="transformer and CLIP dtype (default bf16 on cuda, fp32 on cpu); umT5 runs in bf16 for bf16/fp16, "
        "the VAE always in fp32",
    )
    r.add_argument("--offload", action="store_true", help="keep idle models on the CPU (less GPU memory)")
    r.add_argument(
        "--sequence-parallel", type=int, default=1, metavar="N",
        help="spread every denoising step over N processes started by torchrun --nproc_per_node N (one GPU each)",
    )
    r.add_argument(
        "--attention-backend", choices=("sdpa", "flash3", "flash2", "math"), default=None,
        help="attention kernel (default sdpa: torch picks flash / memory-efficient kernels itself)",
    )
    r.add_argument(
        "--vae-tiling", action="store_true",
        help="encode/decode frames in overlapping 256-pixel tiles (less VAE memory at 720p; seams blended)",
    )
    r.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def _check_args(args: argparse.Namespace) -> None:
    from scail2.conditioning.masks import SIZE_MULTIPLE

    if (args.height is None) != (args.width is None):
        raise InputError(f"give both --height and --width (got --height {args.height}, --width {args.width})")
    for flag, size in (("--height", args.height), ("--width", args.width)):
        if size is not None and (size < SIZE_MULTIPLE or size % SIZE_MULTIPLE):
            lower = size // SIZE_MULTIPLE * SIZE_MULTIPLE
            hint = f"{lower} or {lower + SIZE_MULTIPLE}" if lower else f"{SIZE_MULTIPLE}"
            raise InputError(f"{flag} {size} is not divisible by {SIZE_MULTIPLE}; use {hint}")
    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps {args.steps}; need at least 1 (40 by default)")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 1):
        raise InputError(f"--guidance {args.guidance}; need >= 1, a finite number (1 = no guidance, 5 by default)")
    if args.shift is not None and not (math.isfinite(args.shift) and args.shift > 0):
        raise InputError(f"--shift {args.shift}; need a finite positive value (5 by default, 3 at 480p)")
    if args.fps is not None and not (math.isfinite(args.fps) and 0 < args.fps <= 1000):
        raise InputError(f"--fps {args.fps}; need a frame rate in (0, 1000], e.g. 16 (default: the driving video's)")
    if args.lora_scale is not None and not math.isfinite(args.lora_scale):
        raise InputError(f"--lora-scale {args.lora_scale}; need a finite strength (1 = as trained, 0 = none)")
    if args.palette_tolerance is not None and not 0 <= args.palette_tolerance <= 1:
        raise InputError(f"--palette-tolerance {args.palette_tolerance}; need a fraction in [0, 1] (0.05 by default)")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise InputError(f"--seed {args.seed}; need an integer in [0, 2**64 - 1] (random and printed when omitted)")
    if args.frames is not None and args.frames < 1:
        raise InputError(f"--frames {args.frames}; need at least 1")
    if (args.masks is None) != (args.ref_mask is None):
        missing = "--ref-mask" if args.masks is not None else "--masks"
        raise InputError(f"colour masks need both --masks (driving) and --ref-mask (reference); {missing} is missing")
    if (args.character_masks is None) != (args.ref_character_masks is None):
        missing = "--ref-character-masks" if args.character_masks is not None else "--character-masks"
        raise InputError(f"per-character masks need --character-masks and --ref-character-masks; {missing} is missing")
    if args.masks is not None and args.character_masks is not None:
        raise InputError("pass either --masks/--ref-mask or --character-masks/--ref-character-masks, not both")
    if args.mode == "replacement" and args.masks is None and args.character_masks is None:
        raise InputError(
            "--mode replacement needs masks (white marks where the driving scene stays visible): pass --masks and "
            "--ref-mask, or --character-masks and --ref-character-masks"
        )
    if args.character_masks is not None and len(args.character_masks) != len(args.ref_character_masks):
        raise InputError(
            f"{len(args.character_masks)} --character-masks but {len(args.ref_character_masks)} "
            "--ref-character-masks; give one of each per character, in the same order"
        )
    files = [("--ref", args.ref), ("--driving", args.driving), ("--masks", args.masks), ("--ref-mask", args.ref_mask)]
    files += [("--character-masks", f) for f in args.character_masks or []]
    files += [("--ref-character-masks", f) for f in args.ref_character_masks or []]
    for flag, path in files:
        if path is None:
            continue
        if not path.exists():
            raise InputError(f"{flag} {path} does not exist; check the path")
        if not path.is_file():
            raise InputError(f"{flag} {path} is not a file")
    if args.lora is None and (args.lora_scale is not None or args.merge_lora or args.no_lora_base_check):
        flags = [("--lora-scale", args.lora_scale is not None), ("--merge-lora", args.merge_lora),
                 ("--no-lora-base-check", args.no_lora_base_check)]
        raise InputError(f"{next(f for f, given in flags if given)} needs --lora PATH (the adapter to load)")
    if args.lora is not None:
        from scail2.lora import PEFT_WEIGHTS

        if not args.lora.exists():
            raise InputError(f"--lora {args.lora} does not exist; give a peft folder or a ComfyUI .safetensors file")
        if args.lora.is_dir() and not (args.lora / PEFT_WEIGHTS).is_file():
            raise InputError(f"--lora {args.lora} is a folder without {PEFT_WEIGHTS}; give a peft adapter folder")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.sequence_parallel < 1:
        raise InputError(f"--sequence-parallel {args.sequence_parallel}; need at least 1")
    if args.sequence_parallel != world:
        if args.sequence_parallel == 1:
            raise InputError(
                f"started as {world} processes (WORLD_SIZE={world}) without --sequence-parallel: pass "
                f"--sequence-parallel {world} to spread one video over them, or run a single process"
            )
        raise InputError(
            f"--sequence-parallel {args.sequence_parallel} needs {args.sequence_parallel} processes: run "
            f"torchrun --nproc_per_node {args.sequence_parallel} -m scail2.cli.animate ... (WORLD_SIZE is {world})"
        )
    if args.out.suffix.lower() not in VIDEO_SUFFIXES:
        raise InputError(f"--out {args.out} has suffix {args.out.suffix!r}; use one of {VIDEO_SUFFIXES} (e.g. out.mp4)")
    if args.out.exists() and args.out.is_dir():
        raise InputError(f"--out {args.out} is a folder; give a file name such as {args.out / 'out.mp4'}")


def _component_paths(args: argparse.Namespace) -> dict[str, Path | None]:
    return {
        "transformer": args.transformer,
        "vae": args.vae,
        "text_encoder": args.text_encoder,
        "tokenizer": args.tokenizer,
        "image_encoder": args.image_encoder,
        "image_processor": args.image_processor,
    }


def _planned_size(args: argparse.Namespace) -> tuple[int, int] | None:
    """The output size: --height/--width, or the default from the reference image's header (None when the header
    cannot be read: prepare_inputs reports that)."""
    if args.height is not None:
        return args.height, args.width
    from PIL import Image

    from scail2.pipeline.inputs import default_resolution

    try:
        with Image.open(args.ref) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001 - unreadable or a decompression bomb: named by prepare_inputs
        return None
    return default_resolution(height, width)


def _check_output(out: Path, height: int, width: int, fps: float) -> None:
    """The output size is sane and the video writer accepts this output (folder, container, codec, size, frame
    rate): checked by writing one black frame next to ``out`` before any sampling."""
    from scail2.data.video import check_video_output

    if max(height, width) > MAX_SIDE or max(height, width) > MAX_ASPECT * min(height, width):
        raise InputError(
            f"the output would be {height}x{width}: sides must be at most {MAX_SIDE} and at most {MAX_ASPECT:g} times "
            "each other (the default size follows the reference image's aspect ratio); pass --height and --width, "
            "e.g. --height 512 --width 896"
        )
    try:
        check_video_output(out, height, width, fps)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(
            f"cannot write --out {out} ({height}x{width} at {fps:g} fps): {exc}; choose another --out, --fps, or "
            "--height/--width (the default size follows the reference image's aspect ratio)"
        ) from None


def _keep(out, target: Path) -> Path:
    """Save the generated frames and latents beside ``target`` (or in the temporary folder); returns the file."""
    import tempfile

    import torch
    from safetensors.torch import save_file

    from scail2.pipeline.pipeline import to_uint8

    frames = out.frames if not isinstance(out.frames, torch.Tensor) else to_uint8(out.frames)
    tensors = {"frames": torch.from_numpy(frames).contiguous()}
    tensors.update({f"latents.{k}": z.contiguous() for k, z in enumerate(out.latents)})
    metadata = {"fps": f"{out.fps:g}", "seed": str(out.seed)}
    for folder in (target.parent, Path(tempfile.gettempdir())):
        path = folder / f"{target.stem}.unsaved.safetensors"
        try:
            save_file(tensors, str(path), metadata=metadata)
            return path
        except OSError:
            continue
    raise RuntimeError(f"the frames could not be kept either (neither {target.parent} nor the temporary folder is writable)")


def _trained_sizes(model: Path) -> list[tuple[int, int]]:
    """(height, width) of the resolutions the model's transformer was trained at, most used first (from the
    ``training.json`` scail2-train writes into its export); empty when unknown."""
    from scail2.lit.export import read_training_record
    from scail2.pipeline.layout import resolve_paths

    record = read_training_record(resolve_paths(model, {})["transformer"])
    sizes: list[tuple[int, int]] = []
    for r in (record or {}).get("resolutions", []):
        if (r["height"], r["width"]) not in sizes:
            sizes.append((int(r["height"]), int(r["width"])))
    return sizes


def _far(size: tuple[int, int], trained: tuple[int, int]) -> bool:
    area = (size[0] * size[1]) / (trained[0] * trained[1])
    aspect = (size[0] / size[1]) / (trained[0] / trained[1])
    return max(area, 1 / area) > FAR_AREA or max(aspect, 1 / aspect) > FAR_ASPECT


def _choose_size(args: argparse.Namespace, trained: list[tuple[int, int]]) -> str | None:
    """Fill --height/--width from the trained resolutions when not given; the message to print, or None."""
    if not trained:
        return None
    if args.height is None:
        from PIL import Image

        with Image.open(args.ref) as im:
            aspect = im.height / im.width
        # The trained size closest in aspect ratio to the reference (ties: the most used, listed first).
        args.height, args.width = min(trained, key=lambda hw: abs(math.log((hw[0] / hw[1]) / aspect)))
        listed = ", ".join(f"{h}x{w}" for h, w in trained)
        return f"--height/--width not given: {args.height}x{args.width}, the model's training resolution ({listed}; training.json)"
    if all(_far((args.height, args.width), hw) for hw in trained):
        listed = ", ".join(f"{h}x{w}" for h, w in trained)
        return (
            f"warning: {args.height}x{args.width} is far from the resolution(s) this model was trained at ({listed}); "
            "expect poor results, or leave out --height/--width to use its own"
        )
    return None


def _strings(paths: list[Path] | None) -> list[str] | None:
    return None if paths is None else [str(p) for p in paths]


def _dtypes(args: argparse.Namespace, device: str):
    import torch

    from scail2.utils.dtypes import SHORT_DTYPES

    name = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    dtype = SHORT_DTYPES[name]
    # umT5 overflows in float16, so it gets bfloat16 whenever a half type is asked for.
    text = torch.float32 if name == "fp32" else torch.bfloat16
    return dtype, text


def _apply_preset(args: argparse.Namespace) -> None:
    """Fill the sampling flags not given on the command line from ``--preset`` (explicit flags win)."""
    from scail2.pipeline.presets import SAMPLING_PRESETS

    if args.preset is None:
        return
    if args.preset not in SAMPLING_PRESETS:
        raise InputError(f"--preset {args.preset}: no such sampling recipe; use one of {sorted(SAMPLING_PRESETS)}")
    preset = SAMPLING_PRESETS[args.preset]
    for flag, value in (("steps", preset.num_inference_steps), ("guidance", preset.guidance_scale),
                        ("shift", preset.shift), ("scheduler", preset.scheduler)):  # fmt: skip
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if args.lora is not None and args.lora_scale is None:
        args.lora_scale = preset.lora_scale


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        _apply_preset(args)
        import torch

        from scail2.pipeline.inputs import PipelineInputError, prepare_inputs
        from scail2.pipeline.layout import check_folder

        _check_args(args)
        try:
            check_folder(args.model, _component_paths(args))
        except (FileNotFoundError, ValueError) as exc:
            raise InputError(str(exc)) from None
        try:
            size_note = _choose_size(args, _trained_sizes(args.model) if args.model is not None else [])
        except Exception as exc:  # noqa: BLE001 - unreadable, too large (PIL's pixel limit) or a bad training.json
            raise InputError(f"cannot read --ref {args.ref} or the model's training.json: {exc}") from None
        if size_note:
            print(size_note, file=sys.stderr if size_note.startswith("warning") else sys.stdout)
        optional = {
            "height": args.height,
            "width": args.width,
            "num_frames": args.frames,
            "segment_frames": args.segment_frames,
            "overlap_frames": args.overlap_frames,
            "fps": args.fps,
            "palette_tolerance": args.palette_tolerance,
        }
        size = _planned_size(args)
        if size is not None:  # checked before any input is resized to it
            _check_output(args.out, *size, args.fps or 16.0)
        try:
            prepared = prepare_inputs(
                args.ref,
                args.driving,
                mode=args.mode,
                reference_mask=args.ref_mask,
                driving_mask=args.masks,
                character_masks=_strings(args.character_masks),
                reference_character_masks=_strings(args.ref_character_masks),
                order=args.order,
                **{k: v for k, v in optional.items() if v is not None},
            )
        except PipelineInputError as exc:
            raise InputError(str(exc)) from None
        if size != (prepared.height, prepared.width) or prepared.fps != (args.fps or 16.0):
            _check_output(args.out, prepared.height, prepared.width, prepared.fps)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {device} but no CUDA device is available; use --device cpu", file=sys.stderr)
        return EXIT_BAD_INPUT
    started_group = False
    if args.sequence_parallel > 1:
        import torch.distributed as dist

        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
            started_group = True
    try:
        return _animate(args, prepared, device)
    finally:
        if started_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _animate(args: argparse.Namespace, prepared, device: str) -> int:
    """Load the pipeline and write the video (global rank 0 prints and writes under sequence parallelism)."""
    from safetensors import SafetensorError

    from scail2.models.loading import CheckpointError
    from scail2.pipeline.pipeline import SCAIL2Pipeline

    main_rank = int(os.environ.get("RANK", "0")) == 0
    dtype, text_dtype = _dtypes(args, device)
    start = time.perf_counter()
    try:
        parts = {f"{name}_path": path for name, path in _component_paths(args).items()}
        pipe = SCAIL2Pipeline.from_pretrained(
            args.model, scheduler=args.scheduler, dtype=dtype, text_dtype=text_dtype, image_dtype=dtype, **parts
        )
    except (CheckpointError, FileNotFoundError, ValueError, OSError, SafetensorError) as exc:
        print(f"error: cannot load the model from {args.model or 'the component paths'}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.lora is not None:
        scale = 1.0 if args.lora_scale is None else args.lora_scale
        try:
            pipe.load_lora(args.lora, scale=scale, merge=args.merge_lora, check_base=not args.no_lora_base_check)
        except (FileNotFoundError, KeyError, ValueError, OSError, SafetensorError) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            print(f"error: cannot load the LoRA adapter {args.lora}: {msg}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if main_rank:
            print(f"LoRA {args.lora}: rank {pipe.lora_loaded.rank}, scale {scale:g}{', merged' if args.merge_lora else ''}")
    if args.attention_backend is not None:
        from scail2.models.attention import set_attention_backend

        try:
            set_attention_backend(pipe.transformer, args.attention_backend)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
    if args.sequence_parallel > 1:
        pipe.enable_sequence_parallel()
    if args.vae_tiling:
        pipe.enable_vae_tiling()
    if args.offload:
        pipe.enable_model_cpu_offload(device)
    else:
        pipe.to(device)

    sampling = {
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "shift": args.shift,
        "negative_prompt": args.negative_prompt,
    }
    plan = prepared.plan
    where = f"{args.sequence_parallel} processes ({device.split(':')[0]})" if args.sequence_parallel > 1 else device
    if main_rank:
        print(
            f"animating {plan.input_frames} driving frames -> {plan.output_frames} frames at "
            f"{prepared.height}x{prepared.width} in {len(plan.segments)} segment(s), mode {prepared.mode}, on {where}"
        )
    out = pipe.generate(
        prepared,
        prompt=args.prompt,
        seed=args.seed,
        progress=not args.no_progress and main_rank,
        **{k: v for k, v in sampling.items() if v is not None},
    )
    if not main_rank:
        return 0
    try:
        path = out.save(args.out)
    except Exception as exc:  # noqa: BLE001 - the frames must outlive any writer failure
        kept = _keep(out, args.out)
        print(
            f"error: writing {args.out} failed after sampling ({type(exc).__name__}: {exc}); the frames and latents "
            f"are kept in {kept} (safetensors: 'frames' uint8 (F, H, W, 3), 'latents.K' per segment; write them with "
            f"scail2.data.video.write_video(OUT, safetensors.torch.load_file('{kept}')['frames'], {out.fps:g}))",
            file=sys.stderr,
        )
        return EXIT_OUTPUT
    print(
        f"wrote {path} ({out.frames.shape[0]} frames, {prepared.height}x{prepared.width}, {out.fps:g} fps, "
        f"seed {out.seed}) in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
