"""Denoising-step speed: our transformers against diffusers' WanTransformer3DModel on the same token count.

A denoising step is one transformer forward without gradients (two with text guidance, which the pipeline
runs as two passes). Per preset, three forwards are timed in alternation (``common.interleaved``):

- ``wan_ours``: our ``WanModel`` on a plain latent video, with the diffusers model's weights converted by
  ``scail2.models.convert.diffusers_to_wan`` (the outputs are compared too: ``parity_max_abs``);
- ``wan_diffusers``: diffusers' ``WanTransformer3DModel`` (I2V-style: CLIP branch, 20 input channels) on the
  same latent;
- ``scail2_ours``: our ``SCAIL2Transformer`` (the same backbone weights plus the pose and mask embeddings) on
  the packed SCAIL-2 sequence ``[reference][video: T frames][driving: T frames at half resolution]``, whose
  length equals the plain latent's (T = 4 latent frames: (1 + T) + T / 4 = 6 frames of tokens).

    python benchmarks/bench_denoise.py                  # CPU: tiny and small presets -> results/denoise_cpu.json
    python benchmarks/bench_denoise.py --device cuda    # 14B geometry, 480p, 81 frames, bf16, random weights:
                                                        # seconds per denoising step and MFU
    python benchmarks/bench_denoise.py --device cuda --dry-run   # tokens and FLOPs only (no GPU needed)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks folder is not a package
from common import interleaved, versions, write_result  # noqa: E402

from scail2.conditioning.condition import Condition  # noqa: E402
from scail2.conditioning.packing import history_mask, pack_inputs  # noqa: E402
from scail2.models import SCAIL2Transformer, WanModel, scail2_config  # noqa: E402
from scail2.models.convert import config_from_diffusers, diffusers_to_wan  # noqa: E402

LATENT_FRAMES = 4  # SCAIL-2 video latent frames; the packed sequence is then 6 frames of full-res tokens
PLAIN_FRAMES = 6
TEXT_TOKENS = 512  # umT5 context length; diffusers' I2V attention splits image tokens off at len - 512
CONFIGS = {
    # name: (diffusers config, latent (h, w), text tokens, CLIP tokens)
    "tiny": (
        dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=2, text_dim=32, freq_dim=32,
             image_dim=32),
        (16, 16), TEXT_TOKENS, 17,
    ),
    "small": (
        dict(num_attention_heads=4, attention_head_dim=128, ffn_dim=1536, num_layers=4, text_dim=256, freq_dim=256,
             image_dim=256),
        (32, 32), TEXT_TOKENS, 257,
    ),
}
# Dense bf16 tensor-core peak per GPU, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def build(cfg: dict):
    """diffusers Wan (I2V-style, 20 input channels), ours with its weights, and SCAIL-2 on the same backbone;
    float32 on the CPU."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    ref = WanTransformer3DModel(in_channels=20, out_channels=16, added_kv_proj_dim=dim, **cfg)
    state = diffusers_to_wan(ref.state_dict())
    wan_cfg = config_from_diffusers(dict(ref.config))
    ours = WanModel(wan_cfg)
    ours.load_state_dict(state)
    scail = SCAIL2Transformer(wan_cfg.replace(mask_channels=28))
    missing, unexpected = scail.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("patch_embedding_pose", "patch_embedding_mask")) for k in missing)
    return [m.eval() for m in (ref, ours, scail)]


def scail2_inputs(config, h: int, w: int, frames: int, device, dtype, generator: torch.Generator):
    """Packed SCAIL-2 inputs for one sample (animation mode, no history)."""

    def rn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    def rm(*shape):
        return torch.rand(*shape, generator=generator).to(device, dtype)

    noisy = rn(1, 16, frames, h, w)
    cond = Condition(
        reference=rn(1, 16, 1, h, w),
        reference_mask=rm(1, 28, 1, h, w),
        driving=rn(1, 16, frames, h // 2, w // 2),
        driving_mask=rm(1, 28, frames, h // 2, w // 2),
        text=torch.zeros(1, 1, config.text_dim, device=device, dtype=dtype),  # not packed: context is given apart
        clip_tokens=torch.zeros(1, 1, config.image_dim or 1, device=device, dtype=dtype),
        modes=["animation"],
    )
    history = history_mask(1, frames, False, device=device, dtype=dtype)
    return pack_inputs(noisy, history, cond, config.head_dim, config.patch_size, theta=config.rope_theta)


def run_cpu(args) -> dict:
    results = {}
    dtype = torch.float32
    for name in args.configs:
        cfg, (h, w), text_len, image_len = CONFIGS[name]
        ref, ours, scail = build(cfg)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 20, PLAIN_FRAMES, h, w, generator=g)
        ts = torch.tensor([500.0])
        ctx = torch.randn(1, text_len, cfg["text_dim"], generator=g)
        clip = torch.randn(1, image_len, cfg["image_dim"], generator=g)
        packed = scail2_inputs(scail.config, h, w, LATENT_FRAMES, "cpu", dtype, g)
        tokens_plain = PLAIN_FRAMES * (h // 2) * (w // 2)
        tokens_packed = packed.rope.shape[1]
        assert tokens_plain == tokens_packed, (tokens_plain, tokens_packed)

        with torch.inference_mode():
            parity = (ours(x, ts, ctx, clip) - ref(x, ts, ctx, clip, return_dict=False)[0]).abs().max().item()
            fns = {
                "wan_ours": lambda: ours(x, ts, ctx, clip),
                "wan_diffusers": lambda: ref(x, ts, ctx, clip, return_dict=False),
                "scail2_ours": lambda: scail(**packed.as_kwargs(), timestep=ts, context=ctx, clip_tokens=clip),
            }
            timing = interleaved(fns, repeats=args.repeats, warmup=1)
        med = {k: v["median_s"] for k, v in timing.items()}
        best = {k: v["min_s"] for k, v in timing.items()}  # less sensitive to other load on a shared machine
        results[name] = {
            "diffusers_config": {**cfg, "in_channels": 20},
            "plain_latent_thw": [PLAIN_FRAMES, h, w],
            "scail2_latent": {"video_frames": LATENT_FRAMES, "h": h, "w": w, "driving_hw": [h // 2, w // 2]},
            "tokens": tokens_plain,
            "text_tokens": text_len,
            "clip_tokens": image_len,
            "dtype": str(dtype),
            "timing_per_forward": timing,
            "ratio_wan_ours_over_diffusers": med["wan_ours"] / med["wan_diffusers"],
            "ratio_scail2_ours_over_diffusers": med["scail2_ours"] / med["wan_diffusers"],
            "ratio_wan_ours_over_diffusers_min": best["wan_ours"] / best["wan_diffusers"],
            "ratio_scail2_ours_over_diffusers_min": best["scail2_ours"] / best["wan_diffusers"],
            "cfg_step_s": {k: 2 * v for k, v in med.items()},
            "parity_max_abs": parity,
        }
        print(
            f"{name}: {tokens_plain} tokens; per forward: Wan ours {med['wan_ours'] * 1e3:.1f} ms, diffusers "
            f"{med['wan_diffusers'] * 1e3:.1f} ms (ratio {results[name]['ratio_wan_ours_over_diffusers']:.3f}, "
            f"parity {parity:.1e}); SCAIL-2 packed {med['scail2_ours'] * 1e3:.1f} ms "
            f"(ratio {results[name]['ratio_scail2_ours_over_diffusers']:.3f})"
        )
    return results


def geometry_480p(frames: int = 81, height: int = 480, width: int = 832) -> tuple[int, int, int]:
    """Latent (T, h, w) of a video: VAE stride (4, 8, 8)."""
    return (frames - 1) // 4 + 1, height // 8, width // 8


def peak_flops(device_name: str, override: float | None) -> float | None:
    if override is not None:
        return override * 1e12
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)


def run_cuda(args) -> dict:
    """14B geometry at 480p: seconds per denoising step (2 forwards with CFG) and MFU; random bf16 weights."""
    cfg = scail2_config("wan2.1-14b")
    t, h, w = geometry_480p(args.frames, args.height, args.width)
    device = "meta" if args.dry_run else "cuda"
    dtype = torch.bfloat16
    with torch.device("meta"):
        model = SCAIL2Transformer(cfg)
    g = torch.Generator().manual_seed(0)
    if args.dry_run:
        packed = scail2_inputs(cfg, h, w, t, "cpu", torch.float32, g)  # shapes only; no weights needed
    else:
        model = model.to_empty(device=device).to(dtype)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)  # random weights: timing does not depend on the values
        model.eval()
        packed = scail2_inputs(cfg, h, w, t, device, dtype, g)
    tokens = packed.rope.shape[1]
    flops = model.flops_for_inputs(packed)
    result = {
        "geometry": "wan2.1-14b",
        "video": {"frames": args.frames, "height": args.height, "width": args.width},
        "latent_thw": [t, h, w],
        "tokens": tokens,
        "flops_per_forward": flops,
        "flops_per_cfg_step": 2 * flops,
        "dtype": str(dtype),
        "params": sum(p.numel() for p in model.parameters()),
    }
    print(f"14B, {args.height}x{args.width}x{args.frames}: {tokens} tokens, {flops / 1e12:.1f} TFLOP per forward")
    if args.dry_run:
        result["dry_run"] = True
        return result
    ts = torch.tensor([500.0], device=device)
    ctx = torch.randn(1, 512, cfg.text_dim, generator=g).to(device, dtype)
    clip = torch.randn(1, 257, cfg.image_dim, generator=g).to(device, dtype)
    with torch.inference_mode():
        timing = interleaved(
            {"forward": lambda: model(**packed.as_kwargs(), timestep=ts, context=ctx, clip_tokens=clip)},
            repeats=args.repeats,
            warmup=1,
        )
    forward_s = timing["forward"]["median_s"]
    name = torch.cuda.get_device_name(0)
    peak = peak_flops(name, args.peak_tflops)
    result.update(
        {
            "timing_per_forward": timing,
            "seconds_per_denoising_step_cfg": 2 * forward_s,
            "seconds_per_denoising_step_no_cfg": forward_s,
            "seconds_per_segment_40_steps_cfg": 80 * forward_s,
            "achieved_tflops": flops / forward_s / 1e12,
            "peak_tflops": None if peak is None else peak / 1e12,
            "mfu": None if peak is None else flops / forward_s / peak,
            "cuda_peak_bytes": torch.cuda.max_memory_allocated(),
        }
    )
    mfu = result["mfu"]
    print(
        f"{2 * forward_s:.2f} s per denoising step with CFG ({forward_s:.2f} s per forward), "
        f"{result['achieved_tflops']:.0f} TFLOP/s" + (f", MFU {mfu:.1%}" if mfu is not None else "")
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 11 on CPU, 3 on CUDA)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="CPU presets")
    ap.add_argument("--frames", type=int, default=81, help="CUDA: video frames (4k+1)")
    ap.add_argument("--height", type=int, default=480, help="CUDA: video height")
    ap.add_argument("--width", type=int, default=832, help="CUDA: video width")
    ap.add_argument("--peak-tflops", type=float, default=None, help="CUDA: dense bf16 peak for MFU (default by name)")
    ap.add_argument("--dry-run", action="store_true", help="CUDA path without a GPU: tokens and FLOPs only")
    ap.add_argument("--out", default=None, help="result file name under benchmarks/results/")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # one thread gives steadier CPU numbers on a shared machine
    if args.repeats is None:
        args.repeats = 11 if args.device == "cpu" else 3
    if args.device == "cuda" and not args.dry_run and not torch.cuda.is_available():
        ap.error("--device cuda needs a CUDA device (use --dry-run for tokens and FLOPs only)")
    if args.frames < 1 or (args.frames - 1) % 4 or args.height % 32 or args.width % 32:
        ap.error(f"--frames {args.frames} must be 4k+1 and --height/--width multiples of 32")
    if args.device == "cpu":
        payload = {"results": run_cpu(args)}
    else:
        payload = {"results": {"wan2.1-14b_480p": run_cuda(args)}}
    suffix = "_dryrun" if args.dry_run else ""
    out = args.out or f"denoise_{args.device}{suffix}.json"
    path = write_result(out, {"versions": versions("diffusers", "transformers"), **payload})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
