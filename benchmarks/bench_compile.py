"""CPU step time of ``torch.compile`` (inductor) against eager: one flow-matching training step (packing,
forward, loss, backward, clipping, AdamW) of the tiny and small configurations of bench_train.py, every block
compiled by `scail2.models.parallelize` (as ``module.compile=true`` does), with and without activation
checkpointing.

    python benchmarks/bench_compile.py                 # 2 rounds, each an interleaved timing of all variants
    python benchmarks/bench_compile.py --rounds 3

Compilation happens in the warm-up (not timed). Each round times eager and compiled steps in alternation, so
load changes on a shared machine hit both alike; the ratio compiled / eager of every round is recorded (single
CPU timings here swing by ~30%). Results go to benchmarks/results/compile_cpu.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks folder is not a package
from bench_train import CPU_CASES, optimizer_step, random_batch  # noqa: E402
from common import interleaved, versions, write_result  # noqa: E402

from scail2.lit.base import build_network  # noqa: E402
from scail2.models.config import scail2_config  # noqa: E402
from scail2.models.parallelize import parallelize  # noqa: E402
from scail2.objectives.flow_matching import FlowMatchingConfig, flow_matching_loss  # noqa: E402


def make_step(case: dict, compile: bool, checkpointing: bool):
    torch.manual_seed(0)
    net = build_network(scail2_config(case["preset"], **case["overrides"]))
    parallelize(net, compile=compile, activation_checkpointing=checkpointing)
    generator = torch.Generator().manual_seed(0)
    batch = random_batch(net, case, "cpu", generator)
    cfg = FlowMatchingConfig()
    return optimizer_step(lambda: flow_matching_loss(net, batch, generator, cfg).loss, list(net.parameters()), 1e-5, 1e-4, "cpu")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=8, help="timed steps per variant and round")
    ap.add_argument("--out", default="compile_cpu.json")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    steps, compile_s = {}, {}
    for name, case in CPU_CASES.items():
        for ckpt in (False, True):
            tag = f"{name}{'_checkpointed' if ckpt else ''}"
            steps[f"{tag}_eager"] = make_step(case, False, ckpt)
            steps[f"{tag}_compiled"] = make_step(case, True, ckpt)
            t0 = time.perf_counter()
            steps[f"{tag}_compiled"]()  # compiles forward and backward
            compile_s[tag] = time.perf_counter() - t0
            print(f"{tag}: first compiled step (compilation) {compile_s[tag]:.1f} s", flush=True)
    rounds = []
    for r in range(args.rounds):
        timing = interleaved(steps, repeats=args.repeats, warmup=1)
        ratios = {
            tag[: -len("_eager")]: timing[tag.replace("_eager", "_compiled")]["median_s"] / timing[tag]["median_s"]
            for tag in steps if tag.endswith("_eager")
        }
        rounds.append({"timing": timing, "compiled_over_eager": ratios})
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()), flush=True)
    path = write_result(args.out, {
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "cases": CPU_CASES,
        "compile_seconds": compile_s,
        "rounds": rounds,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
