"""Motion transfer on held-out synthetic pairs: trains ``experiment=demo`` (with any overrides) in a fresh work
folder and records what its motion benchmark (`scail2.lit.benchmark.MotionBenchmark`,
`scail2.bench.synthetic_motion`) measured at the end: every method's mean +- SE per metric, the trained
network's paired improvement over each baseline, the validation before -> after and the per-pair figures.

    python benchmarks/bench_synthetic_motion.py                                  # the demo as shipped
    python benchmarks/bench_synthetic_motion.py --name demo_motion_trained_vae data.vae=trained
    python benchmarks/bench_synthetic_motion.py --name short trainer.max_steps=300 data.pairs=8
    python benchmarks/bench_synthetic_motion.py --copy-driving --name synthetic_copy_driving_cpu data.vae=trained

``--copy-driving`` is a diagnostic of the driving path alone: every pair's target video (training and held-out) is
overwritten with its driving video in the work folder's data before the latent cache is built, so the network is
trained to reproduce the driving video, which it can only do by reading the driving tokens (half resolution,
w-shifted RoPE). The driving character has the target's joints, so the ground-truth region stays right; the
baseline that tells is ``shuffled_driving`` (the reference shows another character or scene).

Writes ``benchmarks/results/<name>.json`` (default ``synthetic_motion_cpu.json``).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks folder is not a package
from common import versions, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="synthetic_motion_cpu", help="result file name (without .json)")
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "work" / "synthetic_motion")
    ap.add_argument("--keep", action="store_true", help="reuse the work folder's data (default: start fresh)")
    ap.add_argument("--copy-driving", action="store_true", help="diagnostic: train to reproduce the driving video (target := driving)")
    ap.add_argument("overrides", nargs="*", help="config overrides of experiment=demo")
    args = ap.parse_args()

    from scail2.config import compose_config
    from scail2.train import summary, train

    work = args.work.absolute()
    if work.exists() and not args.keep:
        shutil.rmtree(work)
    cfg = compose_config(
        ["experiment=demo", f"paths.output_root={work}/outputs", f"paths.data_root={work}/data", "print_config=false", "logger=none", *args.overrides]
    )
    cfg.paths.run_dir = str(work / "outputs" / "demo" / "run")
    if args.copy_driving:
        copy_driving_into_targets(cfg)
    start = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - start
    print(summary(result), flush=True)
    found = Path(cfg.paths.run_dir) / "benchmark" / "results.json"
    if not found.exists():
        raise SystemExit(f"the run wrote no motion benchmark ({found} is missing): is callbacks.motion_benchmark set and data.heldout_pairs > 0?")
    bench = json.loads(found.read_text())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    first, last = (result.validation[0].metrics, result.validation[-1].metrics) if result.validation else ({}, {})
    path = write_result(
        f"{args.name}.json",
        {
            "versions": versions("diffusers", "lightning"),
            "overrides": args.overrides,
            "task": "copy_driving" if args.copy_driving else "motion_transfer",
            "steps": result.global_step,
            "wall_s": round(seconds, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "note": "wall and CPU seconds of the whole run (data, training, validation, benchmark); on a shared machine "
            "wall time depends on its load",
            "validation": {"before": first, "after": last},
            "benchmark": {k: bench[k] for k in ("pairs", "ids", "modes", "deciding_metric", "follows_driving", "metrics", "vs_baselines", "shuffled_donors", "config")},
            "per_pair": bench["per_pair"],
            "report": result.reports,
        },
    )
    print(f"wrote {path}")


def copy_driving_into_targets(cfg) -> None:
    """Write the videos of ``cfg.data`` (a `SyntheticDataModule` with held-out pairs; `prepare_videos`, no cache),
    then overwrite every pair's target with its driving video and drop any latent cache, which the run then builds
    from the new targets. Only the runner's own work folder is changed (it starts fresh unless ``--keep``)."""
    from scail2.config import instantiate

    datamodule = instantiate(cfg.data, "data")
    if not hasattr(datamodule, "prepare_videos") or datamodule.heldout_manifest is None:
        raise SystemExit("--copy-driving needs data=synthetic with data.heldout_pairs > 0")
    datamodule.prepare_videos()
    root = Path(datamodule.root)
    folders = sorted((root / "videos" / "pairs").iterdir()) + sorted((root / "heldout" / "pairs").iterdir())
    for folder in folders:
        shutil.copyfile(folder / "driving.mp4", folder / "target.mp4")
    shutil.rmtree(root / "cache", ignore_errors=True)  # a --keep run's cache holds the old targets
    print(f"copy-driving: the targets of {len(folders)} pairs under {root} are now their driving videos", flush=True)


if __name__ == "__main__":
    main()
