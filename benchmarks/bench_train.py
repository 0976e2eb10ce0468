"""Training-step throughput: one flow-matching step (packing, forward, loss, backward, clipping, AdamW) of
`SCAIL2Transformer` on random latent batches of the training layout (reference + video + half-resolution
driving tokens, umT5 text and CLIP tokens), as `scail2.lit.PretrainModule` runs it; and one Bias-Aware DPO step
(LoRA rank 16 on the frozen network: policy and adapter-free reference on winner and loser, backward into the
adapters, AdamW) on the tiny and small cases, as `scail2.lit.DPOModule` runs it (``*_dpo``: pairs/s).

    python benchmarks/bench_train.py                  # CPU: tiny and small models, samples/s (float32)
    python benchmarks/bench_train.py --device cuda    # + the 1.3B and 14B geometries at 480p, 81 frames: MFU
                                                      #   (bf16 autocast, activation checkpointing), peak from
                                                      #   --peak-flops

The 14B step with AdamW does not fit one GPU (16.4B parameters: 260 GB of weights, gradients and moments), so
the 14B case keeps the full width, heads and sequence and as many of its 40 blocks as the memory planner
(`scail2.models.memory`) says fit the GPU (MFU is a per-FLOP ratio: it does not depend on the depth).

MFU = 3 x the model's forward FLOPs (`flops_per_forward` on the `sequence_layout` token counts: all linear
layers, convolutions and attention products) / step time / peak FLOP/s of one device; recomputation under
activation checkpointing is not counted.
Results go to benchmarks/results/train_<device>.json.
"""

from __future__ import annotations

import argparse
import gc
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks folder is not a package
from common import interleaved, versions, write_result  # noqa: E402

from scail2.conditioning import Condition, MotionBatch, PreferenceBatch  # noqa: E402
from scail2.conditioning.packing import sequence_layout  # noqa: E402
from scail2.lit.base import build_network  # noqa: E402
from scail2.lora import LoRASpec, adapters_disabled, add_lora  # noqa: E402
from scail2.models.config import scail2_config  # noqa: E402
from scail2.models.parallelize import apply_activation_checkpointing  # noqa: E402
from scail2.objectives.dpo import DPOConfig, dpo_loss, model_velocity  # noqa: E402
from scail2.objectives.flow_matching import FlowMatchingConfig, flow_matching_loss  # noqa: E402

# name: model (preset + geometry overrides), batch, clip (frames x height x width pixels), text/CLIP tokens.
CPU_CASES = {
    "tiny": dict(preset="tiny", overrides={}, batch=4, frames=17, height=64, width=64, text_len=16, image_len=17),
    # A wider, deeper debug model (dim 256, 4 heads of 64, 4 blocks; 5.4M parameters) on a 4x larger frame.
    "small": dict(
        preset="tiny", overrides=dict(dim=256, ffn_dim=1024, num_heads=4, num_layers=4), batch=2, frames=17,
        height=128, width=128, text_len=32, image_len=17,
    ),
}
CUDA_CASES = {
    # The full in-context layout at 480p: 1,560 reference + 32,760 video + 8,190 driving tokens.
    "wan2.1-1.3b_480p": dict(
        preset="wan2.1-1.3b", overrides={}, batch=1, frames=81, height=480, width=832, text_len=512, image_len=257
    ),
    # num_layers: set by fit_layers (at most the preset's 40).
    "wan2.1-14b_480p": dict(
        preset="wan2.1-14b", overrides={}, batch=1, frames=81, height=480, width=832, text_len=512, image_len=257
    ),
}


def fit_layers(case: dict, free_bytes: float, checkpointing: bool) -> int:
    """The most blocks of ``case``'s geometry whose training step (bf16 autocast, AdamW) the planner fits into
    ``free_bytes``."""
    from scail2.models.memory import Layout, Setup, plan_memory

    layout = Layout.from_pixels(case["frames"], case["height"], case["width"], text_tokens=case["text_len"],
                                image_tokens=case["image_len"])
    setup = Setup(precision="bf16-autocast", activation_checkpointing=checkpointing, batch=case["batch"])
    full = scail2_config(case["preset"]).num_layers
    for n in range(full, 0, -1):
        if plan_memory(scail2_config(case["preset"], num_layers=n), layout, setup).fits(free_bytes):
            return n
    raise SystemExit(f"{case['preset']}: not even one block fits {free_bytes / 2**30:.0f} GiB")


def random_batch(net, case: dict, device: str, generator: torch.Generator) -> MotionBatch:
    """A latent batch of the case's clip shape with random content (the data layer's MotionBatch)."""
    c = net.config
    b, t, h, w = case["batch"], (case["frames"] - 1) // 4 + 1, case["height"] // 8, case["width"] // 8

    def rn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    def rm(*shape):
        return torch.rand(*shape, generator=generator).to(device)

    latents = rn(b, 16, t, h, w)
    cond = Condition(
        reference=rn(b, 16, 1, h, w),
        reference_mask=rm(b, 28, 1, h, w),
        driving=rn(b, 16, t, h // 2, w // 2),
        driving_mask=rm(b, 28, t, h // 2, w // 2),
        text=rn(b, case["text_len"], c.text_dim),
        clip_tokens=rn(b, case["image_len"], c.image_dim),
        modes=["animation"] * b,
    )
    return MotionBatch(
        latents=latents,
        cond=cond,
        source=["synthetic"] * b,
        history_allowed=torch.ones(b, dtype=torch.bool, device=device),
        null_text=rn(1, case["text_len"], c.text_dim),
    )


def step_cost(net, batch: MotionBatch, case: dict) -> tuple[float, int]:
    """(forward FLOPs, tokens) of one pass of ``net`` over ``batch``'s layout (reference + video + half-size driving)."""
    b, _, t, h, w = batch.latents.shape
    layout = sequence_layout(t, h, w, net.config.patch_size)
    flops = net.flops_per_forward(
        layout.total, case["text_len"], case["image_len"], batch=b, head_tokens=layout.video, mask_tokens=layout.mask_tokens
    )
    return flops, b * layout.total


def optimizer_step(loss_fn, params: list[torch.nn.Parameter], lr: float, weight_decay: float, device: str):
    """A step function: ``loss_fn()`` under bf16 autocast on CUDA, backward, clipping at 0.1, AdamW."""
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def step() -> None:
        with autocast:
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_step(case: dict, device: str, checkpointing: bool):
    """(step function, forward FLOPs, tokens per step, parameters) of one case's pretraining step."""
    torch.manual_seed(0)
    with torch.device(device):
        net = build_network(scail2_config(case["preset"], **case["overrides"]))
    apply_activation_checkpointing(net, checkpointing)
    generator = torch.Generator().manual_seed(0)
    batch = random_batch(net, case, device, generator)
    objective = FlowMatchingConfig()
    step = optimizer_step(lambda: flow_matching_loss(net, batch, generator, objective).loss, list(net.parameters()), 1e-5, 1e-4, device)
    return (step, *step_cost(net, batch, case), net.num_params())


def make_dpo_step(case: dict, device: str):
    """(step function, forward FLOPs of the 4 passes, tokens per step, base parameters) of one case's DPO step."""
    torch.manual_seed(0)
    with torch.device(device):
        net = build_network(scail2_config(case["preset"], **case["overrides"]))
    params = net.num_params()
    net.requires_grad_(False)
    add_lora(net, LoRASpec(rank=16))
    generator = torch.Generator().manual_seed(0)
    winner = random_batch(net, case, device, generator)
    b, _, t, h, w = winner.latents.shape
    hands = (torch.rand(b, 1, t, h, w, generator=generator) > 0.8).float().to(device)
    loser = torch.randn(winner.latents.shape, generator=generator).to(device)
    batch = PreferenceBatch(replace(winner, hand_mask=hands), loser, hands)
    objective = DPOConfig()
    trainable = [p for p in net.parameters() if p.requires_grad]
    reference = model_velocity(net, within=adapters_disabled)  # the base: adapters disabled
    step = optimizer_step(lambda: dpo_loss(net, batch, generator, objective, reference=reference).loss, trainable, 1e-4, 0.0, device)
    flops, tokens = step_cost(net, winner, case)
    return step, 4 * flops, tokens, params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--peak-flops", type=float, default=989e12, help="peak FLOP/s of one device (H100 SXM bf16)")
    ap.add_argument("--no-checkpointing", action="store_true", help="cuda: keep all activations")
    ap.add_argument("--out", default=None, help="result file name under benchmarks/results/")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    torch.set_flush_denormal(True)  # as scail2-train does on CPU
    checkpointing = args.device == "cuda" and not args.no_checkpointing
    steps, meta = {}, {}
    for name, case in CPU_CASES.items():
        step, flops, tokens, params = make_step(case, args.device, checkpointing)
        steps[name] = step
        meta[name] = dict(case=case, params=params, forward_flops=flops, tokens=tokens)
    for name, case in CPU_CASES.items():
        step, flops, tokens, params = make_dpo_step(case, args.device)
        steps[f"{name}_dpo"] = step
        meta[f"{name}_dpo"] = dict(case=case, params=params, forward_flops=flops, tokens=tokens, dpo=True)
    timing = interleaved(steps, repeats=args.repeats, warmup=2)
    if args.device == "cuda":
        # The large steps one at a time (each needs most of the GPU; GPU timings need no interleaving).
        for name, case in CUDA_CASES.items():
            if name == "wan2.1-14b_480p":
                free, _ = torch.cuda.mem_get_info()
                case["overrides"] = {"num_layers": fit_layers(case, free, checkpointing)}
                print(f"{name}: {case['overrides']['num_layers']} of 40 blocks fit {free / 2**30:.0f} GiB")
            step, flops, tokens, params = make_step(case, args.device, checkpointing)
            timing.update(interleaved({name: step}, repeats=args.repeats, warmup=2))
            meta[name] = dict(case=case, params=params, forward_flops=flops, tokens=tokens)
            del step
            gc.collect()
            torch.cuda.empty_cache()
    results = {}
    for name, info in meta.items():
        seconds = timing[name]["median_s"]
        # Pretraining: forward + backward = 3x the forward. DPO: 4 forwards + the policy's input-gradient
        # backward (about 2 of them) = 1.5x the 4 forwards (scail2.lit.DPOModule.training_flops_per_batch).
        achieved = (1.5 if info.get("dpo") else 3.0) * info["forward_flops"] / seconds
        results[name] = {
            **info,
            "timing": timing[name],
            "samples_per_s": info["case"]["batch"] / seconds,
            "tokens_per_s": info["tokens"] / seconds,
            "model_tflops_per_s": achieved / 1e12,
            "mfu": achieved / args.peak_flops if args.device == "cuda" else None,
            "dtype": "bf16-autocast" if args.device == "cuda" else "float32",
            "activation_checkpointing": checkpointing,
        }
        mfu = f", MFU {results[name]['mfu']:.1%}" if results[name]["mfu"] is not None else ""
        print(
            f"{name}: {info['params'] / 1e6:.2f}M params, {info['tokens']} tokens/step, {seconds * 1e3:.1f} ms/step, "
            f"{results[name]['samples_per_s']:.2f} samples/s, {results[name]['tokens_per_s']:.0f} tokens/s, "
            f"{achieved / 1e9:.2f} GFLOP/s{mfu}"
        )
    for name in CPU_CASES:
        ratio = timing[f"{name}_dpo"]["median_s"] / timing[name]["median_s"]
        results[f"{name}_dpo"]["step_time_vs_pretraining"] = ratio
        print(f"{name}: DPO step / pretraining step = {ratio:.2f} (same run, interleaved)")
    path = write_result(
        args.out or f"train_{args.device}.json",
        {"versions": versions("lightning"), "threads": torch.get_num_threads(), "peak_flops": args.peak_flops, "results": results},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
