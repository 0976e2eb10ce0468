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

Every bad input (unreadable file, size not divisible by 32, mask frame count, off-palette mask colours, a model
folder missing a component) is reported before the model is loaded, with exit code 2 and a message naming the
value and the fix.

Without --height/--width, a model exported by scail2-train runs at the resolution it was trained at (its
``training.json``; of several, the one closest to the reference image's aspect ratio); a requested size far
from every trained resolution gets a warning.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

EXIT_BAD_INPUT = 2
DTYPES = ("fp32", "bf16", "fp16")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi")
SIZE_MULTIPLE = 32  # VAE stride 8 x half-resolution driving x patch 2
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
    p.add_argument("--model", type=Path, required=True, help="pipeline folder (transformer/, vae/, text_encoder/, ...)")
    p.add_argument("--ref", type=Path, required=True, help="reference image")
    p.add_argument("--driving", type=Path, required=True, help="driving video (raw video or rendered pose/mesh)")
    p.add_argument("--out", type=Path, required=True, help="output video (.mp4)")
    p.add_argument("--mode", choices=("animation", "replacement"), default="animation")
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
        "--vae-tiling", action="store_true",
        help="encode/decode frames in overlapping 256-pixel tiles (less VAE memory at 720p; seams blended)",
    )
    r.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if (args.height is None) != (args.width is None):
        raise InputError(f"give both --height and --width (got --height {args.height}, --width {args.width})")
    for flag, size in (("--height", args.height), ("--width", args.width)):
        if size is not None and (size < SIZE_MULTIPLE or size % SIZE_MULTIPLE):
            lower = size // SIZE_MULTIPLE * SIZE_MULTIPLE
            hint = f"{lower} or {lower + SIZE_MULTIPLE}" if lower else f"{SIZE_MULTIPLE}"
            raise InputError(f"{flag} {size} is not divisible by {SIZE_MULTIPLE}; use {hint}")
    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps {args.steps}; need at least 1 (40 by default)")
    if args.guidance is not None and args.guidance < 1:
        raise InputError(f"--guidance {args.guidance}; need >= 1 (1 = no guidance, 5 by default)")
    if args.shift is not None and not args.shift > 0:
        raise InputError(f"--shift {args.shift}; need a positive value (5 by default, 3 at 480p)")
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
    if args.out.suffix.lower() not in VIDEO_SUFFIXES:
        raise InputError(f"--out {args.out} has suffix {args.out.suffix!r}; use one of {VIDEO_SUFFIXES} (e.g. out.mp4)")
    if args.out.exists() and args.out.is_dir():
        raise InputError(f"--out {args.out} is a folder; give a file name such as {args.out / 'out.mp4'}")


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

    name = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    # umT5 overflows in float16, so it gets bfloat16 whenever a half type is asked for.
    text = torch.float32 if name == "fp32" else torch.bfloat16
    return dtype, text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        import torch

        from scail2.pipeline.inputs import PipelineInputError, prepare_inputs
        from scail2.pipeline.layout import check_folder

        _check_args(args)
        try:
            check_folder(args.model)
        except FileNotFoundError as exc:
            raise InputError(str(exc)) from None
        try:
            size_note = _choose_size(args, _trained_sizes(args.model))
        except (OSError, ValueError) as exc:
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
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from scail2.models.loading import CheckpointError
    from scail2.pipeline.pipeline import SCAIL2Pipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {device} but no CUDA device is available; use --device cpu", file=sys.stderr)
        return EXIT_BAD_INPUT
    dtype, text_dtype = _dtypes(args, device)
    start = time.perf_counter()
    try:
        pipe = SCAIL2Pipeline.from_pretrained(
            args.model, scheduler=args.scheduler, dtype=dtype, text_dtype=text_dtype, image_dtype=dtype
        )
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: cannot load the model from {args.model}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.lora is not None:
        scale = 1.0 if args.lora_scale is None else args.lora_scale
        try:
            pipe.load_lora(args.lora, scale=scale, merge=args.merge_lora, check_base=not args.no_lora_base_check)
        except (FileNotFoundError, KeyError, ValueError) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            print(f"error: cannot load the LoRA adapter {args.lora}: {msg}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"LoRA {args.lora}: rank {pipe.lora_loaded.rank}, scale {scale:g}{', merged' if args.merge_lora else ''}")
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
    print(
        f"animating {plan.input_frames} driving frames -> {plan.output_frames} frames at "
        f"{prepared.height}x{prepared.width} in {len(plan.segments)} segment(s), mode {prepared.mode}, on {device}"
    )
    out = pipe.generate(
        prepared,
        prompt=args.prompt,
        seed=args.seed,
        progress=not args.no_progress,
        **{k: v for k, v in sampling.items() if v is not None},
    )
    path = out.save(args.out)
    print(
        f"wrote {path} ({out.frames.shape[0]} frames, {prepared.height}x{prepared.width}, {out.fps:g} fps, "
        f"seed {out.seed}) in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
