"""Outputs of a browser study: the Fig. 5-style chart, the HTML report, JSON / CSV, and the MLflow record.

    report = analyse_study("outputs/bench/cross_identity-.../gsb")
    files = write_study_report(report, "outputs/bench/cross_identity-.../gsb/report")

The chart has one panel per case kind (single-character animation, multi-character animation, replacement),
one stacked bar per metric: G (ours better), S, B (baseline better), with the confidence interval of G drawn at
the G|S edge and that of B at the S|B edge. Drawn on a bare ``matplotlib.figure.Figure`` (Agg canvas, no pyplot).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import time
from pathlib import Path

from scail2.bench.study import KIND_LABELS, MetricStats, StudyError, StudyReport, metric_key

COLOURS = {"G": "#55a868", "S": "#bbbbbb", "B": "#c44e52"}


def _pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.1%}"


def _num(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:+.3f}"


def study_chart(report: StudyReport, path: Path) -> Path:
    from matplotlib.figure import Figure

    kinds = list(report.by_kind)
    rows = sum(len(report.by_kind[k]) for k in kinds)
    fig = Figure(figsize=(7.5, 0.55 * rows + 1.1 * len(kinds) + 0.8))
    axes = fig.subplots(len(kinds), 1, squeeze=False, gridspec_kw={"height_ratios": [len(report.by_kind[k]) + 0.6
                                                                                     for k in kinds]})[:, 0]
    labels = {"G": f"G ({report.ours} better)", "S": "S (same)", "B": f"B ({report.baseline} better)"}
    for ax, kind in zip(axes, kinds):
        metrics = list(report.by_kind[kind])
        left = [0.0] * len(metrics)
        for letter in ("G", "S", "B"):
            rates = [report.by_kind[kind][m].counts.rates()[letter] for m in metrics]
            rates = [0.0 if math.isnan(r) else r for r in rates]
            ax.barh(range(len(metrics)), rates, left=left, color=COLOURS[letter], label=labels[letter], height=0.62)
            for i, (start, r) in enumerate(zip(left, rates)):
                if r >= 0.06:
                    ax.text(start + r / 2, i, f"{r:.0%}", ha="center", va="center", fontsize=7)
            left = [a + b for a, b in zip(left, rates)]
        for i, m in enumerate(metrics):
            stats = report.by_kind[kind][m]
            r, (g_lo, g_hi), (b_lo, b_hi) = stats.counts.rates(), stats.intervals["G"], stats.intervals["B"]
            if stats.counts.rated:  # whiskers above (G) and below (B) the bar's middle, clear of the labels
                ax.errorbar(r["G"], i - 0.2, xerr=[[r["G"] - g_lo], [g_hi - r["G"]]], fmt="none",
                            ecolor="#1d3d24", elinewidth=0.9, capsize=2.5)  # fmt: skip
                ax.errorbar(1 - r["B"], i + 0.2, xerr=[[b_hi - r["B"]], [r["B"] - b_lo]], fmt="none",
                            ecolor="#4d1417", elinewidth=0.9, capsize=2.5)  # fmt: skip
        names = [f"{m}  (n={report.by_kind[kind][m].counts.rated})" for m in metrics]
        ax.set_yticks(range(len(metrics)))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(KIND_LABELS[kind], fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
    axes[-1].set_xlabel(f"fraction of votes ({report.confidence:.0%} Wilson intervals)", fontsize=8)
    axes[0].legend(fontsize=7, loc="lower right", bbox_to_anchor=(1.0, 1.08), ncol=3, frameon=False)
    fig.suptitle(f"{report.ours} vs {report.baseline}: {sum(1 for r in report.raters if r['answers'])} rater(s)",
                 fontsize=10, x=0.02, ha="left")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    return path


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1000px;color:#1d2329;padding:0 16px}
h1{font-size:22px} h2{font-size:17px;margin-top:28px} table{border-collapse:collapse;margin:8px 0}
th,td{border:1px solid #d5d9de;padding:4px 8px;text-align:right} th:first-child,td:first-child{text-align:left}
thead th{background:#f4f6f8} .muted{color:#5d6670} img{max-width:100%}
"""


def _stats_cells(s: MetricStats) -> list[str]:
    c, r = s.counts, s.counts.rates()
    cells = []
    for letter, count in (("G", c.good), ("S", c.same), ("B", c.bad)):
        lo, hi = s.intervals[letter]
        cells.append(f"{_pct(r[letter])} ({count})<br><span class='muted'>{_pct(lo)}–{_pct(hi)}</span>")
    return cells + [str(c.rated), str(c.unrated), _num(c.score), _num(s.alpha), _pct(s.agreement),
                    str(s.cases_with_two)]  # fmt: skip


def study_html(report: StudyReport, chart: Path) -> str:
    e = html.escape
    picture = base64.b64encode(chart.read_bytes()).decode()
    header = ("<tr><th>metric</th><th>G</th><th>S</th><th>B</th><th>votes</th><th>unrated</th><th>score</th>"
              "<th>α</th><th>agreement</th><th>cases ≥2 raters</th></tr>")  # fmt: skip
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>GSB study: {e(report.ours)} vs {e(report.baseline)}</title><style>{_CSS}</style></head><body>",
        f"<h1>GSB study: {e(report.ours)} vs {e(report.baseline)}</h1>",
        f"<p>{report.cases} case(s), {sum(1 for r in report.raters if r['answers'])} rater(s) with answers, "
        f"{len(report.votes)} vote(s) counted ({report.answers_given} answer(s) given, the latest per rater, case "
        f"and metric counts). G = {e(report.ours)} better, S = about the same, B = {e(report.baseline)} better.</p>",
        f"<img alt='G/S/B rates per metric' src='data:image/png;base64,{picture}'>",
    ]
    groups = [(KIND_LABELS[k], v) for k, v in report.by_kind.items()] + [("all cases", report.columns)]
    for title, block in groups:
        parts.append(f"<h2>{e(title)}</h2><table><thead>{header}</thead><tbody>")
        for metric, s in block.items():
            cells = "".join(f"<td>{c}</td>" for c in _stats_cells(s))
            parts.append(f"<tr><td>{e(metric)}</td>{cells}</tr>")
        parts.append("</tbody></table>")
    parts.append("<h2>Raters</h2><table><thead><tr><th>rater</th><th>votes</th><th>complete cases</th>"
                 "<th>seed</th></tr></thead><tbody>")  # fmt: skip
    for r in report.raters:
        parts.append(f"<tr><td>{e(r['rater'])}</td><td>{r['answers']}</td><td>{r['complete_cases']} / "
                     f"{report.cases}</td><td>{r['seed']}</td></tr>")  # fmt: skip
    parts.append("</tbody></table>")
    parts.append(
        "<h2>Protocol</h2><ul>"
        "<li>Blinded: each rater saw the cases in an order, and each case's two results on sides, drawn from the "
        "rater's seed; the answers were stored as seen (left / same / right) and un-blinded with key.json.</li>"
        f"<li>Rates are over the votes of a metric; the ranges under them are {report.confidence:.0%} Wilson score "
        "intervals, treating votes as independent (votes of several raters on one case are not, so the intervals "
        "are optimistic when many raters share cases).</li>"
        "<li>Score = (G − B) / (G + S + B). Unrated = cells of raters with answers that they left open.</li>"
        "<li>α = Krippendorff's alpha for nominal data over the cases with votes of at least two raters (1 = full "
        "agreement, 0 = chance level); agreement = the fraction of rater pairs on those cases that gave the same "
        "answer; — where it cannot be computed (fewer than two raters on a case, or every vote the same).</li>"
        "</ul></body></html>"
    )
    return "\n".join(parts)


def write_study_report(report: StudyReport, out_dir: str | Path) -> dict[str, Path]:
    """study_results.json, study_results.csv, study_votes.csv, study_rates.png and study_report.html."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": out / "study_results.json",
        "csv": out / "study_results.csv",
        "votes": out / "study_votes.csv",
        "png": out / "study_rates.png",
        "html": out / "study_report.html",
    }
    files["json"].write_text(json.dumps(report.to_json(), indent=1) + "\n", encoding="utf-8")
    with files["csv"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["kind", "metric", "G", "S", "B", "unrated", "G_rate", "G_low", "G_high", "S_rate", "S_low",
                         "S_high", "B_rate", "B_low", "B_high", "score", "alpha", "agreement",
                         "cases_with_two_raters"])  # fmt: skip
        for kind, block in [("all", report.columns), *report.by_kind.items()]:
            for metric, s in block.items():
                c, r = s.counts, s.counts.rates()
                writer.writerow([kind, metric, c.good, c.same, c.bad, c.unrated,
                                 r["G"], *s.intervals["G"], r["S"], *s.intervals["S"], r["B"], *s.intervals["B"],
                                 c.score, s.alpha, s.agreement, s.cases_with_two])  # fmt: skip
    with files["votes"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        fields = ["rater", "pair", "case_id", "kind", "metric", "answer", "left_video", "left", "outcome", "time"]
        writer.writerow(fields)
        for v in report.votes:
            writer.writerow([getattr(v, f) for f in fields])
    study_chart(report, files["png"])
    files["html"].write_text(study_html(report, files["png"]), encoding="utf-8")
    return files


# ------------------------------------------------------------------------------------------------- MLflow


def benchmark_run(study_dir: str | Path) -> tuple[str, str] | None:
    """(tracking URI, run id) of the benchmark run that exported this study, from ``<run>/results.json``."""
    results = Path(study_dir).parent / "results.json"
    if not results.is_file():
        return None
    try:
        record = json.loads(results.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise StudyError(f"cannot read {results}: {exc}; pass --tracking-uri and --run-id") from exc
    run = record.get("run") or {}
    if not record.get("gsb") or not run.get("mlflow_run_id") or not run.get("mlflow_tracking_uri"):
        return None
    return run["mlflow_tracking_uri"], run["mlflow_run_id"]


def log_study_report(report: StudyReport, files: dict[str, Path], tracking_uri: str, run_id: str) -> None:
    """Add the study's rates, scores and agreement as metrics, and its files as artifacts (``study/``), to a run."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    client.get_run(run_id)  # fails with MLflow's own message when the run does not exist
    now = int(time.time() * 1000)
    metrics = [Metric("study_raters", float(sum(1 for r in report.raters if r["answers"])), now, 0),
               Metric("study_votes", float(len(report.votes)), now, 0)]  # fmt: skip
    for prefix, block in [("study", report.columns), *((f"study_{k}", v) for k, v in report.by_kind.items())]:
        for metric, s in block.items():
            name = f"{prefix}_{metric_key(metric)}"
            values = {**s.counts.rates(), "score": s.counts.score, "alpha": s.alpha}
            metrics += [Metric(f"{name}_{k}", float(v), now, 0) for k, v in values.items() if not math.isnan(v)]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    for path in files.values():
        client.log_artifact(run_id, str(path), "study")


def study_summary_lines(report: StudyReport) -> list[str]:
    lines = [f"GSB study {report.ours} vs {report.baseline}: {len(report.votes)} vote(s) from "
             f"{sum(1 for r in report.raters if r['answers'])} rater(s) on {report.cases} case(s)"]  # fmt: skip
    for metric, s in report.columns.items():
        r = s.counts.rates()
        (g_lo, g_hi) = s.intervals["G"]
        lines.append(f"  {metric:24s} G {_pct(r['G'])} [{_pct(g_lo)}, {_pct(g_hi)}]  S {_pct(r['S'])}  "
                     f"B {_pct(r['B'])}  score {_num(s.counts.score)}  alpha {_num(s.alpha)}  ({s.counts.rated} "
                     "votes)")  # fmt: skip
    return lines
