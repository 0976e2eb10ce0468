"""Bias-Aware DPO on held-out synthetic preference pairs: base vs SFT-only vs DPO (`scail2.bench.synthetic_hands`).

    python benchmarks/bench_dpo_hands.py --data-root data/synthetic-preference-... \\
        --base outputs/demo/<run>/model --sft outputs/dpo_demo/<sft run>/model/merged \\
        --dpo outputs/dpo_demo/<dpo run>/model/merged [--pairs 32] [--steps 20] [--name dpo_hands_cpu]

``--data-root`` is the ``data.root`` of a ``data=synthetic_preference`` run (its ``settings.json`` gives the
synthetic dataset's seed, whose source videos hold the true hand joints; ``heldout/`` holds the pairs and their
cache). Every network samples the same held-out pairs from the same noise. Measured:

- the hand errors inside discs around the true hands (latent, and with ``--pixels`` decoded through the data's
  VAE), per network, with the losers (and the VAE's reconstruction) as reference points;
- the paired differences dpo vs base, dpo vs sft, sft vs base ("beaten": more than twice their standard error);
- the held-out implicit accuracy of sft and dpo against the base, with its standard error over pairs, and
  whether it is above 0.5 by more than twice that error.

Writes ``benchmarks/results/<name>.json`` (command, machine, versions, settings, numbers, per-pair values).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import versions, write_result  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True, help="data.root of a data=synthetic_preference run")
    p.add_argument("--base", required=True, help="the pre-DPO network folder (the reference of the implicit accuracy)")
    p.add_argument("--sft", help="network folder of the SFT-only run (objective.dpo_weight=0) on the same winners")
    p.add_argument("--dpo", help="network folder of the Bias-Aware DPO run")
    p.add_argument("--pairs", type=int, default=None, help="held-out pairs (a seeded choice; default: all)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps")
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="initial noise and the choice of pairs")
    p.add_argument("--draws", type=int, default=4, help="noise / timestep draws per pair for the implicit accuracy")
    p.add_argument("--disc", type=float, default=1.5, help="measured disc radius, in hand radii")
    p.add_argument("--pixels", action="store_true", help="also decode with the data's VAE and measure pixels")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--name", default="dpo_hands_cpu", help="result file benchmarks/results/<name>.json")
    p.add_argument("--note", default="", help="free text recorded with the result (e.g. how the networks were trained)")
    args = p.parse_args(argv)
    if args.sft is None and args.dpo is None:
        p.error("give --sft and/or --dpo (networks compared with --base)")

    import torch

    from scail2.bench.synthetic_hands import (
        HandBenchmarkConfig, format_hand_report, heldout_batches, implicit_accuracies, load_hand_cases,
        paired_difference, sample_pairs, score_hands,
    )  # fmt: skip
    from scail2.models import load_transformer
    from scail2.utils.stats import json_safe, mean_se

    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.data_root)
    settings_file = root / "settings.json"
    if not settings_file.is_file():
        raise SystemExit(f"{settings_file} not found: --data-root must be the data.root of a data=synthetic_preference run")
    settings = json.loads(settings_file.read_text())
    config = HandBenchmarkConfig(steps=args.steps, shift=args.shift, seed=args.seed, batch_size=args.batch_size, disc=args.disc)
    start = time.perf_counter()
    batches = heldout_batches(root / "heldout" / "cache", args.pairs, args.batch_size, args.seed)
    ids = [i for b in batches for i in b.winner.meta["ids"]]
    cases = load_hand_cases(root / "heldout" / "pairs" / "manifest.jsonl", int(settings["data_seed"]), args.disc, ids)
    folders = {"base": args.base, "sft": args.sft, "dpo": args.dpo}
    nets = {k: load_transformer(v).eval() for k, v in folders.items() if v is not None}
    samples = {name: sample_pairs(net, batches, config) for name, net in nets.items()}
    vae = None
    if args.pixels:
        from scail2.encoders.bundle import Encoders

        vae = Encoders.from_pretrained(root / "encoders").vae
    trained = [n for n in ("dpo", "sft") if n in nets]
    compare = [(n, "base") for n in trained] + ([("dpo", "sft")] if len(trained) == 2 else []) + [(n, "dispreferred") for n in trained]
    hands = score_hands(samples, batches, cases, vae, compare, config)

    accuracy: dict = {"draws": args.draws, "networks": {}, "comparisons": {}}
    per_acc = {}
    for name in trained:
        acc = implicit_accuracies(nets[name], nets["base"], batches, args.draws)
        per_acc[name] = [{"implicit_accuracy": acc[i]} for i in hands["ids"]]
        entry = mean_se([acc[i] for i in hands["ids"]])
        entry["above_chance"] = bool(entry["n"] > 1 and entry["mean"] - 0.5 > 2 * entry["se"])
        accuracy["networks"][name] = entry
    if len(trained) == 2:
        # dpo minus sft per pair: paired_difference reports worse - better, so name sft as the "better" side.
        accuracy["comparisons"]["dpo - sft"] = paired_difference(per_acc, "implicit_accuracy", "sft", "dpo")
    accuracy["per_pair"] = per_acc
    seconds = time.perf_counter() - start

    lines = format_hand_report(hands)
    for name, e in accuracy["networks"].items():
        verdict = "above 0.5 by > 2 SE" if e["above_chance"] else "NOT above 0.5 by > 2 SE"
        lines.append(f"  held-out implicit accuracy, {name} vs base: {e['mean']:.4f} +- {e['se']:.4f}  ({verdict})")
    for name, d in accuracy["comparisons"].items():
        lines.append(f"  held-out implicit accuracy, {name}: {d['mean']:+.4f} +- {d['se']:.4f}")
    print("\n".join(lines))
    payload = {
        "versions": versions("diffusers", "lightning"),
        "note": args.note,
        "settings": {**vars(args), "data_settings": settings},
        "networks": {k: str(Path(v).resolve()) for k, v in folders.items() if v is not None},
        "seconds": round(seconds, 1),
        "hands": hands,
        "implicit_accuracy": accuracy,
        "report": lines,
    }
    path = write_result(f"{args.name}.json", json_safe(payload))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
