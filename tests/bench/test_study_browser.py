"""The study page in headless Chromium (Debian's ``chromium`` driven by Playwright through its executable path).

What a rater does, end to end: answer with clicks and keys, change an answer, reload mid-way and resume, finish;
then the database and the report must hold exactly the answers given, un-blinded. The test tells which side shows
our result from the pixels the browser decoded (ours are red), and which case a position is from the bytes the
server sent, so the blinding is checked without trusting the code that does it. Screenshots of the page are kept
in ``test-artifacts/`` (``SCAIL2_TEST_ARTIFACTS`` moves them).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest

from scail2.bench.study import analyse_study

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("SCAIL2_TEST_ARTIFACTS", REPO / "test-artifacts"))
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
WAIT_S = 30.0  # generous: the machine may be loaded; no test asserts how long anything takes

pytestmark = pytest.mark.browser


def _chromium() -> str | None:
    for candidate in (os.environ.get("SCAIL2_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright for Python is not installed (`make setup` installs the [dev] extra)"
    )
    executable = _chromium()
    if executable is None:
        pytest.skip("Debian's chromium is not installed and could not be: `make setup` installs it when run as root")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # a fresh profile
            executable_path=executable,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()


class Page:
    """A rater's tab, with waits that poll the page's own state (the page's CSP forbids string evaluation)."""

    def __init__(self, browser, url: str) -> None:
        self.url = url
        self.page = browser.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.open(url)

    def open(self, url: str) -> None:
        self.page.goto("about:blank")  # a full load even when only the #fragment differs
        self.page.goto(url)
        self.ready()

    def ready(self) -> None:
        self.page.wait_for_selector("#study[data-ready='true']", state="attached", timeout=WAIT_S * 1000)
        assert self.page.is_hidden("#error"), self.page.inner_text("#error")

    def saved(self) -> None:
        self.page.wait_for_selector("body[data-pending='0']", state="attached", timeout=WAIT_S * 1000)

    def poll(self, script: str, until, what: str):
        deadline = time.monotonic() + WAIT_S
        while True:
            value = self.page.evaluate(script)
            if until(value):
                return value
            assert time.monotonic() < deadline, f"timed out waiting for {what}; last value {value!r}"
            time.sleep(0.05)

    def frame(self) -> int:
        return int(self.page.get_attribute("#frame-label", "data-frame"))

    def times(self) -> list[float]:
        return self.page.evaluate("['left', 'right', 'driving'].map(id => document.getElementById(id).currentTime)")

    def settled(self) -> None:
        """Every video has finished seeking and has the frame to show."""
        self.poll("['left', 'right', 'driving'].every(id => { const v = document.getElementById(id); "
                  "return !v.seeking && v.readyState >= 2; })", bool, "the videos to settle")  # fmt: skip

    def colours(self) -> dict[str, list[float]]:
        """Mean RGB of what each video element shows now (drawn through a canvas: what the browser decoded)."""
        self.settled()
        return self.page.evaluate(
            """['left', 'right', 'driving'].reduce((out, id) => {
                const c = document.createElement('canvas'); c.width = 16; c.height = 16;
                const g = c.getContext('2d'); g.drawImage(document.getElementById(id), 0, 0, 16, 16);
                const d = g.getImageData(0, 0, 16, 16).data; const s = [0, 0, 0];
                for (let i = 0; i < d.length; i += 4) { s[0] += d[i]; s[1] += d[i + 1]; s[2] += d[i + 2]; }
                out[id] = s.map(x => x / (d.length / 4)); return out; }, {})"""
        )

    def bar_column(self, video: str) -> int:
        """Column (0-31) of the white bar in what a video shows: it moves two columns per frame."""
        self.settled()
        return self.page.evaluate(
            f"""(() => {{ const v = document.getElementById('{video}'); const c = document.createElement('canvas');
                c.width = 32; c.height = 32; const g = c.getContext('2d'); g.drawImage(v, 0, 0, 32, 32);
                const d = g.getImageData(0, 0, 32, 32).data; let best = 0, at = 0;
                for (let x = 0; x < 32; x++) {{ let s = 0; for (let y = 0; y < 32; y++) s += d[(y * 32 + x) * 4 + 1];
                  if (s > best) {{ best = s; at = x; }} }} return at; }})()"""
        )

    def ours_side(self) -> str:
        c = self.colours()
        left_red, right_red = c["left"][0] > c["left"][2], c["right"][0] > c["right"][2]
        assert left_red != right_red, c  # one red (ours), one blue (baseline)
        assert c["driving"][1] > max(c["driving"][0], c["driving"][2])  # the driving video is the green one
        return "left" if left_red else "right"

    def questions(self) -> list[str]:
        return self.page.eval_on_selector_all("#metrics tr", "rows => rows.map(r => r.dataset.metric)")

    def pressed(self) -> dict[str, str]:
        return self.page.eval_on_selector_all(
            "#metrics tr", "rows => Object.fromEntries(rows.map(r => [r.dataset.metric, "
            "(r.querySelector('button[aria-pressed=true]') || {dataset: {}}).dataset.answer || null]))",
        )  # fmt: skip

    def progress(self) -> tuple[int, int, str]:
        text = self.page.inner_text("#progress-text")  # "case 2 of 4 · 1 of 4 complete"
        return int(text.split()[1]), int(self.page.get_attribute("#progress-text", "data-complete")), text

    def click(self, metric: str, answer: str) -> None:
        self.page.click(f"#metrics tr[data-metric='{metric}'] button[data-answer='{answer}']")
        self.saved()

    def key(self, key: str) -> None:
        self.page.keyboard.press(key)

    def answer_by_keys(self, index: int, answer: str) -> None:
        self.key(str(index + 1))
        self.key({"left": "a", "same": "s", "right": "d"}[answer])
        self.saved()

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        assert not self.errors, self.errors
        self.page.close()


def _media_owner(running, rater: str, position: int) -> tuple[str, str]:
    """(pair, video shown on the left) of a rater's position, found from the bytes the server sends."""
    host, port = running.server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.request("GET", f"/r/{running.raters[rater].token}/media/{position}/left")
    response = connection.getresponse()
    body = response.read()
    connection.close()
    assert response.status == 200
    digest = hashlib.sha256(body).digest()
    matches = [(p.pair, role) for p in running.study.pairs for role in ("a", "b")
               if hashlib.sha256(p.media[role].read_bytes()).digest() == digest]  # fmt: skip
    assert len(matches) == 1, matches
    return matches[0]


def _blind(outcome: str, ours_side: str) -> str:
    """The button that gives an intended outcome (G = ours better) when ours is on ``ours_side``."""
    if outcome == "S":
        return "same"
    theirs = "right" if ours_side == "left" else "left"
    return ours_side if outcome == "G" else theirs


def test_rater_completes_a_study_with_clicks_and_keys_and_resumes(browser, running):
    rater = "alice"
    page = Page(browser, running.url(rater))
    key = {p["pair"]: p for p in running.key["pairs"]}
    intended: dict[tuple[str, str], str] = {}  # (case id, metric) -> G / S / B
    shown: dict[tuple[str, str], str] = {}  # (pair, metric) -> the button finally pressed
    sides: dict[int, tuple[str, str]] = {}  # position -> (pair, video on the left)
    clicks = 0
    cycle = "GSBBGSGBSG"

    def answer_case(position: int, by_keys: bool, only: int | None = None) -> None:
        nonlocal clicks
        assert page.progress()[0] == position + 1
        pair, left_video = sides.setdefault(position, _media_owner(running, rater, position))
        ours = page.ours_side()
        # The pixels and the key agree on where ours is: a = the left half of the sheet video.
        a_is_ours = key[pair]["left"] == "ours"
        assert (ours == "left") == ((left_video == "a") == a_is_ours)
        metrics = page.questions()
        assert metrics == key[pair]["columns"]
        for i, metric in enumerate(metrics if only is None else metrics[:only]):
            outcome = cycle[(position * 3 + i) % len(cycle)]
            button = _blind(outcome, ours)
            if by_keys:
                page.answer_by_keys(i, button)
            else:
                page.click(metric, button)
            clicks += 1
            intended[key[pair]["case_id"], metric] = outcome
            shown[pair, metric] = button

    answer_case(0, by_keys=False)
    # Change one answer: the latest counts, the database keeps both.
    first_metric = page.questions()[0]
    pair0 = sides[0][0]
    other = next(a for a in ("left", "same", "right") if a != shown[pair0, first_metric])
    page.click(first_metric, other)
    page.click(first_metric, shown[pair0, first_metric])
    clicks += 2
    assert page.pressed() == {m: shown[pair0, m] for m in page.questions()}
    assert page.progress()[1] == 1

    page.key("n")
    page.ready()
    answer_case(1, by_keys=True)
    page.key("Enter")
    page.ready()
    answer_case(2, by_keys=True, only=1)  # stop mid-case
    assert page.progress()[1] == 2
    page.screenshot("study-page-midway.png")

    # Back to case 1 and reload: the same case comes back with its answers, the progress is kept.
    page.key("p")
    page.ready()
    page.key("p")
    page.ready()
    page.page.reload()
    page.ready()
    assert page.progress()[:2] == (1, 2)
    assert page.pressed() == {m: shown[sides[0][0], m] for m in page.questions()}
    # Opening the link afresh resumes at the first case that is not complete, with its one answer.
    page.open(running.url(rater))
    assert page.progress()[:2] == (3, 2)
    pressed = page.pressed()
    assert [m for m, a in pressed.items() if a] == page.questions()[:1]

    # Finish case 3 (the active question is the first open one) and case 4, by keys.
    pair2 = sides[2][0]
    ours = page.ours_side()
    for i, metric in enumerate(page.questions()[1:], start=1):
        outcome = cycle[(2 * 3 + i) % len(cycle)]
        page.key({"left": "a", "same": "s", "right": "d"}[_blind(outcome, ours)])  # no number: it advanced
        page.saved()
        clicks += 1
        intended[key[pair2]["case_id"], metric] = outcome
        shown[pair2, metric] = _blind(outcome, ours)
    page.key("n")
    page.ready()
    answer_case(3, by_keys=False)
    assert page.progress()[1] == 4 and page.page.is_visible("#done")
    assert page.screenshot("study-page-done.png").stat().st_size > 10_000

    # The database holds exactly the answers given, in order, and only this rater's.
    with sqlite3.connect(running.study.database) as db:
        rows = db.execute("SELECT rater, pair, metric, answer, left_video FROM answers ORDER BY id").fetchall()
    assert len(rows) == clicks and {r[0] for r in rows} == {rater}
    latest = {(pair, metric): answer for _, pair, metric, answer, _ in rows}
    assert latest == shown
    assert all(left == dict(sides.values())[pair] for _, pair, _, _, left in rows)
    # The report un-blinds them back to the outcomes intended.
    report = analyse_study(running.study.folder)
    assert {(v.case_id, v.metric): v.outcome for v in report.votes} == intended
    assert report.answers_given == clicks
    totals = Counter(intended.values())
    counts = Counter()
    for stats in report.columns.values():
        counts.update({"G": stats.counts.good, "S": stats.counts.same, "B": stats.counts.bad})
    assert counts == totals
    page.close()


def test_playback_stays_in_sync(browser, running):
    page = Page(browser, running.url("bob"))
    frames = int(page.page.get_attribute("#seek", "max")) + 1
    fps = 8.0

    def at(frame: int) -> None:
        assert page.frame() == frame
        assert page.page.inner_text("#frame-label") == f"frame {frame + 1} / {frames}"
        assert page.times() == pytest.approx([(frame + 0.5) / fps] * 3, abs=1e-3)
        for video in ("left", "right"):
            assert abs(page.bar_column(video) - (2 * frame + 0.5)) <= 1.5, video  # that frame is what is shown

    at(0)
    for _ in range(3):
        page.key(".")
    at(3)
    page.key(",")
    at(2)
    page.page.click("#step-forward")
    page.page.click("#step-forward")
    at(4)
    page.page.click("#step-back")
    at(3)
    page.key("Home")
    at(0)
    page.page.eval_on_selector("#seek", "s => { s.value = '6'; s.dispatchEvent(new Event('input')); }")
    at(6)
    page.key("ArrowLeft")
    at(5)
    page.key("ArrowRight")
    at(6)

    # Loop off: playing runs to the last frame and stops there, every video on it.
    page.key("l")
    assert not page.page.is_checked("#loop")
    page.key(" ")
    page.poll("document.getElementById('study').dataset.playing", lambda v: v == "false", "the end of the videos")
    at(frames - 1)

    # Loop on: playing wraps around to the start; pausing puts every video on one frame.
    page.key("l")
    assert page.page.is_checked("#loop")
    page.key(" ")
    assert page.page.get_attribute("#study", "data-playing") == "true"
    seen: list[int] = []
    page.poll("+document.getElementById('frame-label').dataset.frame",
              lambda f: seen.append(f) or (max(seen) >= frames - 2 and f < seen[-2] if len(seen) > 1 else False),
              "playback to wrap around")  # fmt: skip
    page.key(" ")
    assert page.page.get_attribute("#study", "data-playing") == "false"
    frame = page.frame()
    at(frame)
    page.close()


def test_two_raters_at_once_see_their_own_cases_and_answers(browser, running):
    alice, bob = Page(browser, running.url("alice")), Page(browser, running.url("bob"))
    orders = {r: [_media_owner(running, r, i)[0] for i in range(len(running.study.pairs))] for r in ("alice", "bob")}
    assert sorted(orders["alice"]) == sorted(orders["bob"]) and orders["alice"] != orders["bob"]  # seeds 11, 12
    metric_a, metric_b = alice.questions()[0], bob.questions()[0]
    alice.page.click(f"#metrics tr[data-metric='{metric_a}'] button[data-answer='left']")
    bob.page.click(f"#metrics tr[data-metric='{metric_b}'] button[data-answer='right']")
    alice.saved()
    bob.saved()
    rows = running.store.history()
    assert sorted((a.rater, a.pair, a.answer) for a in rows) == [
        ("alice", orders["alice"][0], "left"), ("bob", orders["bob"][0], "right")]  # fmt: skip
    bob.page.reload()
    bob.ready()
    assert bob.pressed()[metric_b] == "right" and list(bob.pressed().values()).count(None) == len(bob.questions()) - 1
    # Bob's view of the case that alice answered shows nothing of hers.
    position = orders["bob"].index(orders["alice"][0])
    bob.open(running.url("bob").rstrip("/") + f"/#case={position + 1}")
    assert bob.progress()[0] == position + 1
    if position != 0:
        assert set(bob.pressed().values()) == {None}
    alice.close()
    bob.close()
