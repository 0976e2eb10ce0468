"""Sequence parallelism on 2 processes: step time and per-rank activation bytes of SP=2 against SP=1.

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_sp.py            # CPU, gloo, 2 rounds
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_sp.py --device cuda

Both ranks build the same network twice: a plain copy (SP=1: every rank runs the whole sequence of its own
sample, as data parallelism does) and a copy parallelized over both ranks (SP=2: the two ranks share one
sample's sequence). A step is forward, flow-matching loss, backward and the gradient all-reduce (DDP's
reduction); the two variants are timed in alternation, in ``--rounds`` separate rounds (all recorded). Reported per variant: seconds per step, seconds per
sample (SP=1 processes 2 samples per step on 2 ranks, SP=2 one), and the activation bytes one rank saves for
backward (saved-tensor hooks) next to the memory planner's estimate. Rank 0 writes
benchmarks/results/sp_<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks folder is not a package
from bench_train import random_batch  # noqa: E402
from common import interleaved, versions, write_result  # noqa: E402

from scail2.lit.base import build_network  # noqa: E402
from scail2.models.config import scail2_config  # noqa: E402
from scail2.models.memory import Layout, Setup, plan_memory, saved_activation_bytes  # noqa: E402
from scail2.models.parallelize import parallelize  # noqa: E402
from scail2.objectives.flow_matching import FlowMatchingConfig, flow_matching_loss  # noqa: E402

# The small configuration of bench_train.py on a longer clip: 17 frames at 256x256 (1,856 tokens).
CASE = dict(preset="tiny", overrides=dict(dim=256, ffn_dim=1024, num_heads=4, num_layers=4), batch=1, frames=17,
            height=256, width=256, text_len=32, image_len=17)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    plain = build_network(scail2_config(CASE["preset"], **CASE["overrides"])).to(device)
    sp = copy.deepcopy(plain)
    parallelize(sp, sequence_parallel=dist.group.WORLD)
    cfg = FlowMatchingConfig()
    # SP=1: each rank its own sample (data parallel); SP=2: one sample shared by both ranks.
    own = random_batch(plain, CASE, str(device), torch.Generator().manual_seed(dist.get_rank()))
    shared = random_batch(plain, CASE, str(device), torch.Generator().manual_seed(0))

    def step(net, batch, scale):
        def run():
            loss = flow_matching_loss(net, batch, torch.Generator().manual_seed(1), cfg).loss * scale
            loss.backward()
            for p in net.parameters():
                dist.all_reduce(p.grad)
                p.grad = None
        return run

    steps = {"sp1": step(plain, own, 1.0), "sp2": step(sp, shared, 2.0)}
    rounds = [interleaved(steps, repeats=args.repeats, warmup=1 if r == 0 else 0) for r in range(args.rounds)]
    timing = rounds[-1]
    g = torch.Generator().manual_seed(1)
    saved = {
        "sp1": saved_activation_bytes(plain, lambda: flow_matching_loss(plain, own, g, cfg).loss),
        "sp2": saved_activation_bytes(sp, lambda: flow_matching_loss(sp, shared, g, cfg).loss),
    }
    layout = Layout.from_pixels(CASE["frames"], CASE["height"], CASE["width"], text_tokens=CASE["text_len"],
                                image_tokens=CASE["image_len"])
    planned = {}
    for name, n in (("sp1", 1), ("sp2", 2)):
        p = plan_memory(plain.config, layout, Setup(world_size=2, strategy="ddp", sequence_parallel=n))
        planned[name] = p.persistent["activations (blocks)"] + p.persistent["activations (embeddings, head, loss)"]
    if dist.get_rank() == 0:
        results = {
            name: {
                "timing": timing[name],
                "seconds_per_sample": timing[name]["median_s"] / (2 if name == "sp1" else 1),
                "activation_bytes_per_rank": saved[name],
                "planned_activation_bytes_per_rank": planned[name],
            }
            for name in steps
        }
        results["sp2_over_sp1"] = {
            "step_time_per_round": [t["sp2"]["median_s"] / t["sp1"]["median_s"] for t in rounds],
            "activation_bytes": saved["sp2"] / saved["sp1"],
        }
        results["rounds"] = rounds
        for name in steps:  # the last round
            r = results[name]
            print(f"{name}: {r['timing']['median_s'] * 1e3:.0f} ms/step, {r['seconds_per_sample'] * 1e3:.0f} ms/sample, "
                  f"activations {saved[name] / 2**20:.1f} MiB/rank (planner {planned[name] / 2**20:.1f})")
        ratios = ", ".join(f"{v:.2f}" for v in results["sp2_over_sp1"]["step_time_per_round"])
        print(f"SP=2 / SP=1: step time {ratios} (per round), activation bytes per rank "
              f"{results['sp2_over_sp1']['activation_bytes']:.2f}")
        tokens = sum(layout.tokens().values())
        launcher = f"torchrun --standalone --nproc_per_node={dist.get_world_size()}"
        path = write_result(f"sp_{args.device}.json", {"launcher": launcher, "versions": versions(), "threads": torch.get_num_threads(),
                                                        "case": CASE, "tokens_per_sample": tokens, "results": results})
        print(f"wrote {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
