"""Backbone speed and memory: our Wan2.1 DiT against diffusers' WanTransformer3DModel.

Both models get the same weights (ours loaded from the diffusers state dict) and the same input; forward +
backward steps of the two are interleaved in one process, and the ratio ours / diffusers of the median step
time is recorded (below 1.0 = we are faster). Activation memory is the total size of the tensors autograd
saves for backward, measured with saved-tensor hooks, with and without activation checkpointing (on CUDA the
peak allocated memory is recorded too).

    python benchmarks/bench_backbone.py                # CPU: tiny and small presets
    python benchmarks/bench_backbone.py --device cuda  # adds bf16 and the 1.3B training-step MFU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks folder is not a package
from common import interleaved, versions, write_result  # noqa: E402

from scail2.models import WanModel  # noqa: E402
from scail2.models.convert import config_from_diffusers, diffusers_to_wan  # noqa: E402
from scail2.models.parallelize import apply_activation_checkpointing  # noqa: E402

CONFIGS = {
    # name: (diffusers config, latent (T, H, W), text tokens)
    "tiny": (dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=2, text_dim=32, freq_dim=32), (5, 16, 16), 64),
    "small": (dict(num_attention_heads=4, attention_head_dim=128, ffn_dim=1536, num_layers=4, text_dim=256, freq_dim=256), (5, 32, 32), 128),
}


def build(cfg: dict, device: str, dtype: torch.dtype):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    ref = WanTransformer3DModel(in_channels=16, out_channels=16, **cfg)
    ours = WanModel(config_from_diffusers(dict(ref.config)))
    ours.load_state_dict(diffusers_to_wan(ref.state_dict()))
    return ref.to(device, dtype), ours.to(device, dtype)


def saved_activation_bytes(step) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--out", default=None, help="result file name under benchmarks/results/")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    results = {}
    for name in args.configs:
        cfg, (t, h, w), text_len = CONFIGS[name]
        ref, ours = build(cfg, args.device, dtype)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 16, t, h, w, generator=g).to(args.device, dtype)
        ts = torch.tensor([500.0], device=args.device)
        ctx = torch.randn(1, text_len, cfg["text_dim"], generator=g).to(args.device, dtype)

        def step_ref():
            ref(x, ts, ctx, return_dict=False)[0].float().square().mean().backward()

        def step_ours():
            ours(x, ts, ctx).float().square().mean().backward()

        timing = interleaved({"ours": step_ours, "diffusers": step_ref}, repeats=args.repeats)
        act = {"ours_plain": saved_activation_bytes(step_ours)}
        peak = {}
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step_ours()
            peak["ours_plain"] = torch.cuda.max_memory_allocated()
        apply_activation_checkpointing(ours, True)
        act["ours_checkpointed"] = saved_activation_bytes(step_ours)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step_ours()
            peak["ours_checkpointed"] = torch.cuda.max_memory_allocated()
        act["diffusers"] = saved_activation_bytes(step_ref)
        tokens = t * (h // 2) * (w // 2)
        results[name] = {
            "config": cfg,
            "latent_thw": [t, h, w],
            "tokens": tokens,
            "dtype": str(dtype),
            "timing": timing,
            "ratio_ours_over_diffusers": timing["ours"]["median_s"] / timing["diffusers"]["median_s"],
            "saved_activation_bytes": act,
            "checkpointing_activation_ratio": act["ours_checkpointed"] / act["ours_plain"],
            "cuda_peak_bytes": peak or None,
        }
        print(
            f"{name}: {tokens} tokens, ours {timing['ours']['median_s'] * 1e3:.1f} ms, diffusers "
            f"{timing['diffusers']['median_s'] * 1e3:.1f} ms, ratio {results[name]['ratio_ours_over_diffusers']:.3f}; "
            f"activations {act['ours_plain'] / 2**20:.1f} MiB -> {act['ours_checkpointed'] / 2**20:.1f} MiB checkpointed "
            f"(diffusers {act['diffusers'] / 2**20:.1f} MiB)"
        )
    out = args.out or f"backbone_{args.device}.json"
    path = write_result(out, {"versions": versions("diffusers"), "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
