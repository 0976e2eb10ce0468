"""Browser GSB study without a browser: the export's study folder, blinding plans, the answer store, the analysis
(Wilson intervals, Krippendorff's alpha), the report and MLflow record, and the server under hostile requests."""

from __future__ import annotations

import csv
import http.client
import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scail2.bench.gsb import GSB_COLUMNS, load_key
from scail2.bench.study import (
    AnswerStore,
    StudyError,
    analyse_study,
    krippendorff_alpha_nominal,
    load_study,
    open_store,
    pairwise_agreement,
    rater_plan,
    wilson_interval,
)
from scail2.cli.bench import main
from scail2.data.video import read_image, read_video

from .conftest import FRAMES, FPS

REPO = Path(__file__).resolve().parents[2]


def _is_ours(video_path: Path) -> bool:
    """Red (ours) or blue (baseline), from the pixels."""
    frames = read_video(video_path).astype(float)
    return frames[..., 0].mean() > frames[..., 2].mean()


# ----------------------------------------------------------------------------------------------- export


def test_export_writes_the_study_folder(exported_study):
    study = load_study(exported_study)
    key = {p["pair"]: p for p in load_key(exported_study / "key.json")["pairs"]}
    assert sorted(p.pair for p in study.pairs) == sorted(key)
    kinds = {}
    for pair in study.pairs:
        entry = key[pair.pair]
        kinds[entry["case_id"]] = pair.kind
        assert pair.columns == tuple(entry["columns"]) and pair.kind == entry["kind"]
        # a = the left half of the sheet video: ours exactly when the key says ours is on the left.
        assert _is_ours(pair.media["a"]) == (entry["left"] == "ours")
        assert _is_ours(pair.media["b"]) == (entry["left"] != "ours")
        a, b, driving = (read_video(pair.media[r]) for r in ("a", "b", "driving"))
        assert len(a) == len(b) == len(driving) == pair.frames == FRAMES  # cut to the shorter result
        assert a.shape == b.shape == (FRAMES, 32, 32, 3)
        assert driving.shape[1] == 32 and driving[..., 1].mean() > driving[..., 0].mean()  # green, at their height
        assert pair.fps == FPS
        assert read_image(pair.media["reference"]).shape == (40, 30, 3)
        # The moving bar (columns 2i, 2i + 1 of the 36 px wide source, here 24 px wide): frame i of the driving
        # video is frame i of the source, re-timed from 25 fps to the results' 8 fps, not resampled in time.
        bar = driving[..., 0].astype(float).mean(axis=1).argmax(axis=1)  # (F,) brightest red column
        expected = (2 * np.arange(FRAMES) + 1) * 24 / 36 - 0.5
        assert np.abs(bar - expected).max() <= 1.5, bar
        assert [int(np.argmax(f[..., 2].mean(axis=0))) // 2 for f in (a if _is_ours(pair.media["b"]) else b)] == \
            list(range(FRAMES))  # ours: its frames in order
    assert kinds == {"solo_a": "single", "solo_b": "single", "duo": "multi", "swap": "replacement"}


def test_load_study_refuses_media_outside_the_folder(study_dir):
    manifest = study_dir / "study" / "study.json"
    record = json.loads(manifest.read_text())
    record["pairs"][0]["media"]["a"] = "../key.json"
    manifest.write_text(json.dumps(record))
    with pytest.raises(StudyError, match="points outside the study folder"):
        load_study(study_dir)
    record["pairs"][0]["media"]["a"] = "P001/link.mp4"
    (study_dir / "study" / "P001" / "link.mp4").symlink_to(study_dir / "key.json")
    manifest.write_text(json.dumps(record))
    with pytest.raises(StudyError, match="points outside the study folder"):
        load_study(study_dir)
    record["pairs"][0]["media"]["a"] = str(study_dir / "study" / "P001" / "a.mp4")
    manifest.write_text(json.dumps(record))
    with pytest.raises(StudyError, match="must be a path inside"):
        load_study(study_dir)
    with pytest.raises(StudyError, match="is a benchmark run folder; pass its study folder"):
        load_study(study_dir.parent)


# ----------------------------------------------------------------------------------------------- blinding


def test_rater_plan_is_a_seeded_permutation_with_drawn_sides():
    pairs = [f"P{i:03d}" for i in range(1, 41)]
    plan = rater_plan(pairs, 7)
    assert plan == rater_plan(reversed(pairs), 7)  # from the seed alone, not the order given
    assert sorted(s.pair for s in plan) == pairs and [s.position for s in plan] == list(range(40))
    other = rater_plan(pairs, 8)
    assert [s.pair for s in other] != [s.pair for s in plan]
    lefts = [s.left for s in plan]
    assert 8 < lefts.count("a") < 32  # both sides drawn (p < 1e-4 of failing for a fair coin)
    assert all(s.video("left") == s.left and s.video("right") != s.left for s in plan)


# ----------------------------------------------------------------------------------------------- statistics


def test_krippendorff_alpha_matches_the_published_example():
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", nominal example: alpha = 0.743.
    coders = ["1 2 3 3 2 1 4 1 2 . . .", "1 2 3 3 2 2 4 1 2 5 . 3", ". 3 3 3 2 3 4 2 2 5 1 .",
              "1 2 3 3 2 4 4 1 2 5 1 ."]  # fmt: skip
    units = [[v for v in unit if v != "."] for unit in zip(*(c.split() for c in coders))]
    assert krippendorff_alpha_nominal(units) == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha_nominal([["G", "G"], ["B", "B"], ["S", "S", "S"]]) == 1.0
    assert krippendorff_alpha_nominal([["G", "B"], ["B", "G"]]) < 0  # systematic disagreement
    assert math.isnan(krippendorff_alpha_nominal([["G"], ["B"]]))  # nothing pairable
    assert math.isnan(krippendorff_alpha_nominal([["G", "G"], ["G", "G"]]))  # one category: undefined
    assert pairwise_agreement([["G", "G", "B"], ["S", "S"]]) == pytest.approx(2 / 4)


@pytest.mark.parametrize("k, n", [(3, 10), (0, 7), (12, 12), (40, 97)])
def test_wilson_interval_closed_form(k, n):
    z = 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson_interval(k, n, 0.95) == pytest.approx((centre - half, centre + half), abs=1e-9)
    assert all(math.isnan(x) for x in wilson_interval(0, 0, 0.95))


# ----------------------------------------------------------------------------------------------- store


def test_answer_store_raters_answers_and_refusals(study_dir):
    study = load_study(study_dir)
    with open_store(study) as store:
        alice = store.add_rater("alice")
        with pytest.raises(StudyError, match="exists already"):
            store.add_rater("alice")
        for bad in ("", "a b", "../x", "x" * 65, "é"):
            with pytest.raises(StudyError, match="is not usable"):
                store.add_rater(bad)
        again, bob = store.ensure_raters(["alice", "bob"])
        assert again == alice and bob.token != alice.token and len(alice.token) >= 24
        store.record("alice", "P001", "Motion Accuracy", "left", "a")
        store.record("alice", "P001", "Motion Accuracy", "same", "a")
        with pytest.raises(StudyError):
            store.record("alice", "P001", "Motion Accuracy", "maybe", "a")
        latest = store.latest()
        assert [a.answer for a in store.history()] == ["left", "same"]
        assert latest["alice", "P001", "Motion Accuracy"].answer == "same" and len(latest) == 1
    # The database is tied to its export.
    with pytest.raises(StudyError, match="another export of this study"):
        AnswerStore(study.database, "0" * 64)
    junk = study_dir / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StudyError, match="not a study database"):
        AnswerStore(junk, study.digest)


# ----------------------------------------------------------------------------------------------- analysis


def _answers_for(study, key, plan, outcomes: dict[str, dict[str, str]]):
    """Blind intended outcomes (G/S/B per case id and metric) for one rater's plan -> (pair, metric, shown, left)."""
    by_case = {p["case_id"]: p for p in key["pairs"]}
    slots = {s.pair: s for s in plan}
    rows = []
    for case_id, metrics in outcomes.items():
        entry = by_case[case_id]
        slot = slots[entry["pair"]]
        ours_left = _is_ours(study.pair(entry["pair"]).media[slot.left])  # from the pixels
        for metric, outcome in metrics.items():
            shown = "same" if outcome == "S" else ("left" if (outcome == "G") == ours_left else "right")
            rows.append((entry["pair"], metric, shown, slot.left))
    return rows


INTENDED = {
    "r1": {"solo_a": {"Motion Accuracy": "G", "Identity Consistency": "G", "Physical Plausibility": "B"},
           "solo_b": {"Motion Accuracy": "G", "Identity Consistency": "S"},
           "duo": {"Motion Accuracy": "B", "Identity Consistency": "G", "Identity Isolation": "G"},
           "swap": {"Motion Accuracy": "G", "Identity Consistency": "G", "Environment Integration": "S"}},
    "r2": {"solo_a": {"Motion Accuracy": "G", "Identity Consistency": "B", "Physical Plausibility": "B"},
           "duo": {"Motion Accuracy": "B", "Identity Isolation": "G"}},
}  # fmt: skip


def _fill(study_dir):
    study = load_study(study_dir)
    key = load_key(study_dir / "key.json")
    with open_store(study) as store:
        for seed, (rater, outcomes) in enumerate(INTENDED.items(), start=20):
            r = store.add_rater(rater, seed=seed)
            for pair, metric, shown, left in _answers_for(study, key, rater_plan([p.pair for p in study.pairs],
                                                                                   r.seed), outcomes):  # fmt: skip
                store.record(rater, pair, metric, shown, left)
        store.add_rater("idle")  # no answers: not counted as unrated
    return study


def test_analysis_unblinds_counts_and_agreement(study_dir):
    _fill(study_dir)
    report = analyse_study(study_dir)
    ma = report.columns["Motion Accuracy"]
    assert (ma.counts.good, ma.counts.same, ma.counts.bad) == (4, 0, 2)
    assert ma.counts.unrated == 4 * 2 - 6  # two active raters x four cases
    assert ma.counts.score == pytest.approx((4 - 2) / 6)
    assert ma.intervals["G"] == pytest.approx(wilson_interval(4, 6, 0.95))
    # Two raters on solo_a and duo for Motion Accuracy agree on both: alpha over G, B, G, B is 1.
    assert ma.cases_with_two == 2 and ma.alpha == 1.0 and ma.agreement == 1.0
    ic = report.columns["Identity Consistency"]
    assert (ic.counts.good, ic.counts.same, ic.counts.bad) == (3, 1, 1) and ic.cases_with_two == 1
    assert ic.agreement == 0.0
    pp = report.by_kind["single"]["Physical Plausibility"]
    assert (pp.counts.good, pp.counts.bad, pp.counts.unrated) == (0, 2, 2)
    assert set(report.by_kind) == {"single", "multi", "replacement"}
    assert "Environment Integration" not in report.by_kind["single"]
    assert report.by_kind["replacement"]["Environment Integration"].counts.same == 1
    votes = {(v.rater, v.case_id, v.metric): v.outcome for v in report.votes}
    intended = {(r, c, m): o for r, cases in INTENDED.items() for c, ms in cases.items() for m, o in ms.items()}
    assert votes == intended
    assert [r["rater"] for r in report.raters] == ["r1", "r2", "idle"] and report.raters[0]["complete_cases"] == 3


def test_analysis_refuses_a_tampered_side(study_dir):
    study = _fill(study_dir)
    with sqlite3.connect(study.database) as db:
        db.execute("UPDATE answers SET left_video = CASE left_video WHEN 'a' THEN 'b' ELSE 'a' END WHERE id = 2")
    with pytest.raises(StudyError, match="the rater's seed puts"):
        analyse_study(study_dir)


def test_report_files(study_dir, tmp_path):
    _fill(study_dir)
    assert main(["study", "report", str(study_dir), "--no-mlflow"]) == 0
    out = study_dir / "report"
    saved = json.loads((out / "study_results.json").read_text())
    assert saved["columns"]["Motion Accuracy"]["good"] == 4 and len(saved["votes"]) == 16
    assert saved["columns"]["Motion Accuracy"]["intervals"]["G"] == pytest.approx(list(wilson_interval(4, 6, 0.95)))
    assert saved["by_kind"]["single"]["Physical Plausibility"]["bad"] == 2
    with (out / "study_votes.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["rater"], r["case_id"], r["metric"]): r["outcome"] for r in rows} == {
        (r, c, m): o for r, cases in INTENDED.items() for c, ms in cases.items() for m, o in ms.items()
    }
    html = (out / "study_report.html").read_text()
    assert "data:image/png;base64," in html and "Identity Isolation" in html and "r2" in html
    png = (out / "study_rates.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # No benchmark results.json beside the study: the files are written and the command says why nothing is logged.
    assert main(["study", "report", str(study_dir), "--out", str(tmp_path / "r2")]) == 0
    assert (tmp_path / "r2" / "study_rates.png").is_file()
    assert main(["study", "report", str(study_dir), "--run-id", "abc"]) == 2  # a run id needs its store


@pytest.mark.slow  # creating an MLflow SQLite store takes ~20 s on a loaded 2-core machine
def test_report_is_logged_to_the_benchmark_run(study_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    _fill(study_dir)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("bench", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.set_terminated(run_id, "FINISHED")
    # The benchmark run's results.json names the run the study belongs to.
    (study_dir.parent / "results.json").write_text(json.dumps(
        {"gsb": {"key": "gsb/key.json"}, "run": {"mlflow_run_id": run_id, "mlflow_tracking_uri": uri}}))  # fmt: skip
    assert main(["study", "report", str(study_dir)]) == 0
    metrics = client.get_run(run_id).data.metrics
    assert metrics["study_motion_accuracy_G"] == pytest.approx(4 / 6)
    assert metrics["study_motion_accuracy_score"] == pytest.approx(2 / 6)
    assert metrics["study_single_physical_plausibility_B"] == 1.0 and metrics["study_raters"] == 2
    assert metrics["study_motion_accuracy_alpha"] == 1.0 and metrics["study_votes"] == 16
    artifacts = {a.path for a in client.list_artifacts(run_id, "study")}
    assert {"study/study_report.html", "study/study_rates.png", "study/study_votes.csv"} <= artifacts
    # A run that does not exist is an error naming it.
    assert main(["study", "report", str(study_dir), "--tracking-uri", uri, "--run-id", "f" * 32]) == 2


def test_report_without_answers_names_the_fix(study_dir):
    assert main(["study", "report", str(study_dir), "--no-mlflow"]) == 2
    with pytest.raises(StudyError, match="no rater has answered yet"):
        analyse_study(study_dir)


# ----------------------------------------------------------------------------------------------- server


def _request(running, method: str, target: str, body: bytes | None = None, headers: dict | None = None):
    host, port = running.server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def _post(running, rater: str, record, raw: bytes | None = None, content_type: str = "application/json"):
    token = running.raters[rater].token
    body = raw if raw is not None else json.dumps(record).encode()
    return _request(running, "POST", f"/r/{token}/api/answer", body, {"Content-Type": content_type})


def _state(running, rater: str) -> dict:
    status, _, body = _request(running, "GET", f"/r/{running.raters[rater].token}/api/study")
    assert status == 200
    return json.loads(body)


def test_token_isolation(running):
    alice, bob = _state(running, "alice"), _state(running, "bob")
    assert alice["rater"] == "alice" and bob["rater"] == "bob"
    metric = alice["cases"][0]["columns"][0]["name"]
    status, _, body = _post(running, "alice", {"position": 0, "metric": metric, "answer": "left"})
    assert status == 200 and json.loads(body)["saved"] is True
    assert _state(running, "alice")["cases"][0]["answers"] == {metric: "left"}
    assert all(not c["answers"] for c in _state(running, "bob")["cases"])  # bob sees none of alice's answers
    history = running.store.history()
    assert [(a.rater, a.answer) for a in history] == [("alice", "left")]
    plan = {s.position: s for s in rater_plan([p.pair for p in running.study.pairs], running.raters["alice"].seed)}
    assert history[0].pair == plan[0].pair and history[0].left_video == plan[0].left
    # Unknown, truncated or another rater's token reaches nothing; the landing page lists no link.
    token = running.raters["alice"].token
    for target in (f"/r/{token[:-1]}/api/study", f"/r/{token}x/api/study", "/r/alice/api/study", "/r//api/study"):
        status, _, body = _request(running, "GET", target)
        assert status == 404, target
    status, _, body = _request(running, "GET", "/")
    assert status == 200 and token.encode() not in body and running.raters["bob"].token.encode() not in body
    # Media of a position follow the rater's own plan: alice's left at position 0 is her plan's video.
    status, _, video = _request(running, "GET", f"/r/{token}/media/0/left")
    pair = running.study.pair(plan[0].pair)
    assert status == 200 and video == pair.media[plan[0].left].read_bytes()
    # Headers that keep the token on this site.
    _, headers, _ = _request(running, "GET", f"/r/{token}/")
    assert headers["Referrer-Policy"] == "no-referrer" and "default-src 'self'" in headers["Content-Security-Policy"]


def test_path_traversal_is_refused(running):
    token = running.raters["alice"].token
    secrets_on_disk = [(running.study.folder / "key.json").read_bytes()[:40], b"SQLite format"]
    targets = [
        "/key.json", "/answers.sqlite", "/study/study.json", "/study/P001/a.mp4", "/for_raters/sheet.csv",
        "/static/../key.json", "/static/%2e%2e/key.json", "/static/..%2fkey.json", "/static/study.js/../../key.json",
        "/static/index.html", "/static/", f"/r/{token}/../../key.json", f"/r/{token}/media/0/../../../key.json",
        f"/r/{token}/media/0/a", f"/r/{token}/media/0/b", f"/r/{token}/media/0/key", f"/r/{token}/media/-1/left",
        f"/r/{token}/media/99/left", f"/r/{token}/media/0x0/left", f"/r/{token}/media/%30/left",
        f"/r/{token}/media/0/left/..", f"/r/{token}/media/0/..%2F..%2Fkey.json", f"/r/{token}/study.json",
        "//etc/passwd", "/../../../../etc/passwd", "/r/%2e%2e/%2e%2e/key.json", "http://evil/key.json", "*",
    ]  # fmt: skip
    for target in targets:
        status, _, body = _request(running, "GET", target)
        assert status in (400, 404), (target, status)
        assert not any(s in body for s in secrets_on_disk), target
    # Bytes outside ASCII (a superscript two is a digit to str.isdigit, not a position).
    answer = _raw(running, b"GET /r/" + token.encode() + b"/media/\xb2/left HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404")
    status, _, _ = _request(running, "GET", f"/r/{token}/media/0/reference")
    assert status == 200


def test_range_requests(running):
    token = running.raters["alice"].token
    plan = rater_plan([p.pair for p in running.study.pairs], running.raters["alice"].seed)
    data = running.study.pair(plan[1].pair).media["driving"].read_bytes()
    target = f"/r/{token}/media/1/driving"
    status, headers, body = _request(running, "GET", target, headers={"Range": "bytes=10-99"})
    assert status == 206 and body == data[10:100] and headers["Content-Range"] == f"bytes 10-99/{len(data)}"
    status, _, body = _request(running, "GET", target, headers={"Range": "bytes=-16"})
    assert status == 206 and body == data[-16:]
    status, _, body = _request(running, "GET", target, headers={"Range": "bytes=100-"})
    assert status == 206 and body == data[100:]
    status, headers, _ = _request(running, "GET", target, headers={"Range": f"bytes={len(data)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"
    for ignored in ("bytes=5-1", "bytes=0-1,5-9", "items=0-1", "bytes=-", "nonsense"):  # not one valid range
        status, _, body = _request(running, "GET", target, headers={"Range": ignored})
        assert (status, body) == (200, data), ignored
    assert _request(running, "GET", target, headers={"Range": "bytes=-0"})[0] == 416
    status, headers, body = _request(running, "HEAD", target)
    assert status == 200 and body == b"" and headers["Content-Length"] == str(len(data))


def _raw(running, payload: bytes, read: bool = True) -> bytes:
    with socket.create_connection(running.server.server_address[:2], timeout=10) as sock:
        sock.sendall(payload)
        if not read:
            return b""
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_malformed_requests_leave_the_server_running(running):
    token = running.raters["alice"].token
    metric = _state(running, "alice")["cases"][0]["columns"][0]["name"]
    raw_payloads = [
        b"GARBAGE\r\n\r\n", b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"\x00\xff\xfe\r\n\r\n",
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nX: " + b"y" * 70000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(150)) + b"\r\n",
        b"POST /r/" + token.encode() + b"/api/answer HTTP/1.1\r\nContent-Length: 50\r\n"
        b"Content-Type: application/json\r\n\r\n{\"posi",  # body shorter than announced, then closed
    ]  # fmt: skip
    for payload in raw_payloads:
        answer = _raw(running, payload)
        assert answer == b"" or answer.startswith(b"HTTP/1."), payload[:30]  # never a bare HTTP/0.9 reply
        assert not answer or int(answer.split(b" ")[1]) >= 400, answer[:60]
    _raw(running, b"GET / HT", read=False)  # half a request line, then gone
    _raw(running, b"", read=False)  # connect and leave
    bad_bodies = [
        (None, b"{not json", "application/json", 400), (None, b"\xff\xfe", "application/json", 400),
        ([1, 2], None, "application/json", 400), ({"position": 0}, None, "application/json", 400),
        ({"position": "0", "metric": metric, "answer": "left"}, None, "application/json", 400),
        ({"position": True, "metric": metric, "answer": "left"}, None, "application/json", 400),
        ({"position": 99, "metric": metric, "answer": "left"}, None, "application/json", 400),
        ({"position": -1, "metric": metric, "answer": "left"}, None, "application/json", 400),
        ({"position": 0, "metric": "Nope", "answer": "left"}, None, "application/json", 400),
        ({"position": 0, "metric": metric, "answer": "maybe"}, None, "application/json", 400),
        ({"position": 0, "metric": metric, "answer": "left", "rater": "bob"}, None, "application/json", 400),
        ({"position": 0, "metric": metric, "answer": "left"}, None, "text/plain", 415),
        ({"position": 0, "metric": metric, "answer": "left"}, b"x" * 5000, "application/json", 413),
    ]  # fmt: skip
    for record, raw, content_type, expected in bad_bodies:
        status, _, body = _post(running, "alice", record, raw, content_type)
        assert status == expected, (record, raw, status, body)
        assert "error" in json.loads(body)
    # A metric that exists but does not apply to this case (e.g. Identity Isolation on a single-character case).
    case0 = _state(running, "alice")["cases"][0]
    foreign = next(c for c in GSB_COLUMNS if c not in [x["name"] for x in case0["columns"]])
    assert _post(running, "alice", {"position": 0, "metric": foreign, "answer": "left"})[0] == 400
    head = b"POST /r/" + token.encode() + b"/api/answer HTTP/1.1\r\nContent-Type: application/json\r\n"
    for extra, expected in ((b"", 411), (b"Content-Length: -5\r\n", 400), (b"Content-Length: abc\r\n", 400),
                            (b"Content-Length: \xb2\r\n", 400), (b"Transfer-Encoding: chunked\r\n", 411)):
        answer = _raw(running, head + extra + b"\r\n")
        assert int(answer.split(b" ")[1]) == expected, answer[:60]
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        assert _request(running, method, f"/r/{token}/api/answer")[0] == 501
    assert _request(running, "POST", "/static/study.js", b"{}", {"Content-Type": "application/json"})[0] == 404
    # Nothing was stored, and the server still answers.
    assert running.store.history() == []
    assert _post(running, "alice", {"position": 0, "metric": metric, "answer": "same"})[0] == 200
    assert _request(running, "GET", "/static/study.js")[0] == 200


# ----------------------------------------------------------------------------------------------- CLI


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_cli_serve_prints_links_and_stops_on_interrupt(study_dir):
    command = [sys.executable, "-m", "scail2.cli.bench", "study", "serve", str(study_dir), "--rater", "carol",
               "--rater", "dave", "--port", "0"]  # fmt: skip
    # A shell without job control starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler in the child: give the server the default disposition, as a terminal would.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        lines = [process.stdout.readline() for _ in range(4)]
        assert "4 case(s)" in lines[0] and lines[1].startswith("serving on http://127.0.0.1:")
        links = {line.split()[0]: line.split()[1] for line in lines[2:]}
        assert set(links) == {"carol", "dave"}
        url = links["carol"].removeprefix("http://")
        host_port, path = url.split("/", 1)
        connection = http.client.HTTPConnection(*host_port.split(":"), timeout=10)
        connection.request("GET", f"/{path}api/study")
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["rater"] == "carol"
        connection.close()
    finally:
        process.send_signal(signal.SIGINT)
        try:
            out, err = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            pytest.fail(f"the server did not stop within 120 s of SIGINT; stdout {out!r}, stderr {err[-3000:]!r}")
    assert process.returncode == 0, err
    assert "stopped" in out and "warning" not in err
    # A second start keeps the links (same tokens) and adds no rater twice.
    with open_store(load_study(study_dir)) as store:
        assert [r.rater for r in store.raters()] == ["carol", "dave"]
        assert store.raters()[0].token in links["carol"]


def test_cli_serve_warns_off_loopback_and_refuses_bad_input(study_dir, capsys):
    assert main(["study", "serve", str(study_dir / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["study", "serve", str(study_dir), "--port", "0"]) == 2
    assert "no raters yet; add them with --rater" in capsys.readouterr().err
    assert main(["study", "serve", str(study_dir), "--rater", "bad id", "--port", "0"]) == 2
    assert "is not usable" in capsys.readouterr().err
    assert main(["study", "serve", str(study_dir), "--rater", "x", "--port", "70000"]) == 2
    assert "is not a port" in capsys.readouterr().err
    # 192.0.2.1 (TEST-NET-1) belongs to no interface here: the warning comes first, then binding fails. No packet
    # is sent anywhere.
    assert main(["study", "serve", str(study_dir), "--rater", "x", "--host", "192.0.2.1", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "warning: listening on 192.0.2.1" in err and "cannot listen on 192.0.2.1" in err
