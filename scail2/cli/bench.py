"""``scail2-bench``: run a quality benchmark, aggregate the sheets of a GSB study, or run it in the browser.

    scail2-bench benchmark=NAME [key=value ...]      # Hydra overrides of conf/bench.yaml
    scail2-bench --cfg benchmark=NAME [...]          # print the composed config and exit
    scail2-bench gsb --key KEY.json --sheets A.csv [B.csv ...] [--out DIR] [--tracking-uri URI]
    scail2-bench study serve|report STUDY_DIR [...]  # browser study (scail2.cli.study)

Examples::

    # self-driven reconstruction on a Studio-Bench-style folder, generating with a pipeline folder
    scail2-bench benchmark=self_driven benchmark.dataset.root=/data/studio generation.model_dir=/models/scail2-14b
    # score videos made elsewhere (one <case id>.mp4 per case), judge them and export a GSB study
    scail2-bench benchmark=xdance benchmark.dataset.root=/data/X-Dance generated_dir=/runs/xdance \\
        judge.model=gpt-4o-2024-08-06 judge.base_url=https://api.openai.com/v1 gsb.baseline_dir=/runs/wan_animate

Configuration errors, broken benchmark folders, missing videos and metrics that are required but cannot run
exit with code 2 and a message naming the value and the fix. See docs/benchmarks-quality.md.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_BAD_INPUT = 2


def _bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scail2-bench",
        description="Run a quality benchmark (conf/bench.yaml + conf/benchmark/NAME.yaml). Subcommand `gsb` "
        "aggregates the returned sheets of a GSB study; `study serve|report` runs it in the browser. See "
        "docs/benchmarks-quality.md.",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. benchmark=self_driven generation.steps=40")
    p.add_argument("--cfg", action="store_true", help="print the composed config and exit")
    p.add_argument(
        "--config-dir", type=Path, default=None, help="folder holding bench.yaml (default: the checkout's conf/)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no per-case progress lines")
    return p


def _gsb_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scail2-bench gsb", description="Un-blind and aggregate returned GSB sheets.")
    p.add_argument("--key", type=Path, required=True, help="key.json written by the export (kept from the raters)")
    p.add_argument("--sheets", type=Path, nargs="+", required=True, help="returned sheet.csv files (one per rater)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the key's folder)")
    p.add_argument(
        "--tracking-uri", default=None,
        help="also log the rates to this MLflow store (e.g. sqlite:///outputs/mlflow.db, the training runs' store)",
    )  # fmt: skip
    p.add_argument("--experiment", default="scail2-bench/gsb", help="MLflow experiment name (with --tracking-uri)")
    return p


def _config_errors() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from scail2.bench.scoring import MetricUnavailable

    return (HydraException, OmegaConfBaseException, MetricUnavailable, ValueError, FileNotFoundError)


def _print_summary(run) -> None:
    results = run.results
    bench = results["benchmark"]
    print(f"benchmark {bench['name']}: {bench['cases']} case(s), {results['run']['source']}")
    for name, m in results["metrics"].items():
        spread = "" if math.isnan(m["std"]) else f" ± {m['std']:.4g}"
        print(f"  {name:24s} {m['value']:.4f}{spread}  [{m['tag']}] over {m['videos']} video(s)")
    for name, reason in results["skipped"].items():
        print(f"  {name:24s} skipped: {reason}")
    for note in results["notes"]:
        print(f"  note: {note}")
    print(f"report: {run.files['report.html']}")
    print(f"results: {run.files['results.json']}, {run.files['results.csv']}, {run.files['results.md']}")
    if results.get("gsb"):
        print(f"GSB study for raters: {results['gsb']['folder']} (key kept at {results['gsb']['key']})")
        if results["gsb"].get("study"):
            print(f"  in the browser: scail2-bench study serve {Path(results['gsb']['key']).parent} --rater NAME")
    if run.mlflow_run_id:
        print(f"MLflow run {run.mlflow_run_id} in {results['run']['mlflow_tracking_uri']}")


def _run_gsb(argv: Sequence[str]) -> int:
    from scail2.bench.gsb import GSBSheetError, aggregate_gsb, write_gsb_results

    args = _gsb_parser().parse_args(argv)
    try:
        summary = aggregate_gsb(args.key, args.sheets)
    except (GSBSheetError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = args.out if args.out is not None else args.key.parent
    files = write_gsb_results(summary, out)
    print(f"GSB {summary.ours} vs {summary.baseline} over {len(summary.sheets)} sheet(s):")
    for column, counts in summary.columns.items():
        r = counts.rates()
        rates = f"G {r['G']:.1%}  S {r['S']:.1%}  B {r['B']:.1%}"
        print(f"  {column:24s} {rates}  ({counts.rated} rated, {counts.unrated} unrated)")
    print(f"results: {files['json']}, {files['csv']}, {files['md']}, {files['png']}")
    if args.tracking_uri:
        _log_gsb(summary, files, args.tracking_uri, args.experiment)
    return 0


def _log_gsb(summary, files, uri: str, experiment: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=f"gsb-{summary.ours}-vs-{summary.baseline}")
    for column, counts in summary.columns.items():
        key = column.lower().replace(" ", "_")
        for letter, rate in counts.rates().items():
            if not math.isnan(rate):
                client.log_metric(run.info.run_id, f"gsb_{key}_{letter}", rate)
    for path in files.values():
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id, "FINISHED")
    print(f"MLflow run {run.info.run_id} in {uri}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "gsb":
        return _run_gsb(argv[1:])
    if argv and argv[0] == "study":
        from scail2.cli.study import main as study_main

        return study_main(argv[1:])
    args = _bench_parser().parse_args(argv)

    from omegaconf import OmegaConf

    from scail2.bench.cases import BenchmarkLayoutError
    from scail2.config.bench import compose_bench_config, to_settings
    from scail2.bench.runner import run_benchmark

    errors = _config_errors() + (BenchmarkLayoutError,)
    try:
        cfg = compose_bench_config(args.overrides, args.config_dir)
        if args.cfg:
            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        settings = to_settings(cfg)
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if settings.progress and not args.quiet:
        bench_log = logging.getLogger("scail2.bench")
        if not any(getattr(h, "name", None) == "scail2-bench" for h in bench_log.handlers):  # main() may run twice
            handler = logging.StreamHandler(sys.stderr)
            handler.set_name("scail2-bench")
            handler.setFormatter(logging.Formatter("%(message)s"))
            bench_log.addHandler(handler)
        bench_log.setLevel(logging.INFO)
    try:
        run = run_benchmark(settings)
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _print_summary(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
