"""``scail2-bench study``: run a blinded Good/Same/Bad study in the browser, and report its answers.

    scail2-bench study serve STUDY_DIR [--rater ID ...] [--host 127.0.0.1] [--port 8765]
    scail2-bench study report STUDY_DIR [--out DIR] [--confidence 0.95] [--tracking-uri URI [--run-id ID]]
                                        [--no-mlflow]

STUDY_DIR is the gsb/ folder of a benchmark run (exported with ``gsb.baseline_dir=...``). See
docs/benchmarks-quality.md ("GSB studies in the browser").
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_BAD_INPUT = 2
DEFAULT_PORT = 8765


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scail2-bench study",
        description="Blinded GSB studies in the browser: `serve` the study to raters, `report` their answers.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the study's web server and print each rater's link")
    serve.add_argument("study_dir", type=Path, help="the gsb/ folder of a benchmark run")
    serve.add_argument(
        "--rater", action="append", default=[], metavar="ID",
        help="add a rater (repeat for several); raters added before keep their links and answers",
    )  # fmt: skip
    serve.add_argument(
        "--host", default="127.0.0.1",
        help="address to listen on (default 127.0.0.1, this machine only); another address lets anyone who can "
        "reach it and holds a link answer, over plain HTTP",
    )  # fmt: skip
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free)")
    report = sub.add_parser("report", help="rates, intervals, agreement, chart and HTML report of the answers")
    report.add_argument("study_dir", type=Path, help="the gsb/ folder of a benchmark run")
    report.add_argument("--out", type=Path, default=None, help="output folder (default STUDY_DIR/report)")
    report.add_argument("--confidence", type=float, default=0.95, help="level of the intervals (default 0.95)")
    report.add_argument(
        "--tracking-uri", default=None,
        help="MLflow store to log to instead of the benchmark run's (from <run>/results.json)",
    )  # fmt: skip
    report.add_argument("--run-id", default=None, help="MLflow run to add the study to (with --tracking-uri)")
    report.add_argument(
        "--experiment", default="scail2-bench/gsb",
        help="experiment of a new run (with --tracking-uri and no --run-id)",
    )  # fmt: skip
    report.add_argument("--no-mlflow", action="store_true", help="write the files only")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "serve":
        return _serve(args)
    return _report(args)


def _serve(args: argparse.Namespace) -> int:
    from scail2.bench.study import StudyError, load_study, open_store
    from scail2.bench.study_server import StudyApp, StudyServer, is_loopback

    if not 0 <= args.port <= 65535:
        print(f"error: --port {args.port} is not a port; use 1-65535 (or 0 for any free one)", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        study = load_study(args.study_dir)
        store = open_store(study)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        store.ensure_raters(args.rater)
        raters = store.raters()
        if not raters:
            raise StudyError("the study has no raters yet; add them with --rater ID (once per rater)")
        if not is_loopback(args.host):
            print(
                f"warning: listening on {args.host}: anyone who can reach this address and holds a rater's link "
                "can answer as that rater, and the traffic is plain HTTP; use the default 127.0.0.1 unless the "
                "network is trusted",
                file=sys.stderr,
            )
        try:
            server = StudyServer(StudyApp(study, store), args.host, args.port)
        except OSError as exc:
            raise StudyError(
                f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); pick another --port (0 = any "
                "free one) or an address of this machine"
            ) from exc
    except StudyError as exc:
        store.close()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"study: {len(study.pairs)} case(s); answers are saved in {study.database}", flush=True)
    print(f"serving on {server.base_url} (Ctrl-C stops; raters can stop and resume at any time)", flush=True)
    width = max(len(r.rater) for r in raters)
    for rater in raters:
        print(f"  {rater.rater:{width}s}  {server.rater_url(rater)}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        store.close()
    print("stopped; every answer given is in the database", flush=True)
    return 0


def _report(args: argparse.Namespace) -> int:
    from scail2.bench.gsb import GSBSheetError
    from scail2.bench.study import StudyError, analyse_study
    from scail2.bench.study_report import benchmark_run, log_study_report, study_summary_lines, write_study_report

    try:
        report = analyse_study(args.study_dir, args.confidence)
        target = None
        if not args.no_mlflow:
            if args.run_id is not None and args.tracking_uri is None:
                raise StudyError("--run-id needs --tracking-uri (the store that holds the run)")
            target = (args.tracking_uri, args.run_id) if args.tracking_uri else benchmark_run(args.study_dir)
    except (StudyError, GSBSheetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = args.out if args.out is not None else args.study_dir / "report"
    files = write_study_report(report, out)
    for line in study_summary_lines(report):
        print(line)
    print(f"report: {files['html']}; chart: {files['png']}; results: {files['json']}, {files['csv']}, {files['votes']}")
    if args.no_mlflow:
        return 0
    if target is None:
        print(
            f"not logged to MLflow: {args.study_dir.parent / 'results.json'} names no MLflow run; pass "
            "--tracking-uri (and --run-id) to log the study",
        )
        return 0
    from mlflow.exceptions import MlflowException

    uri, run_id = target
    try:
        if run_id is None:
            run_id = _new_run(uri, args.experiment, report)
        log_study_report(report, files, uri, run_id)
    except MlflowException as exc:
        print(f"error: cannot log to MLflow run {run_id} in {uri}: {exc.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"MLflow run {run_id} in {uri}")
    return 0


def _new_run(uri: str, experiment: str, report) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=f"study-{report.ours}-vs-{report.baseline}")
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


if __name__ == "__main__":
    sys.exit(main())
