"""The VLM judge against hostile servers on 127.0.0.1: redirects to another origin, replies dripped a byte at a
time, oversized replies, and answers that are not a score in the requested format."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from scail2.eval.judge import JudgeConfig, VideoJudge, parse_score

pytestmark = pytest.mark.hostile
KEY = "sk-hostile-test-key"


class _Server(ThreadingHTTPServer):
    """``reply(handler)`` answers every POST; every request's path and headers are recorded."""

    daemon_threads = True

    def __init__(self, reply) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.reply = reply
        self.requests: list[dict] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers)})
        self.server.reply(self)

    def log_message(self, *args) -> None:
        pass


def _send(handler, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}.items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(body)


def _answer(text) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()


@pytest.fixture
def serve():
    servers = []

    def start(reply) -> _Server:
        srv = _Server(reply)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _judge(base_url: str, **overrides) -> VideoJudge:
    config = JudgeConfig(model="judge-test", base_url=base_url, api_key=KEY, **{"max_attempts": 2, **overrides})
    return VideoJudge(config, sleep=lambda s: None)


def _video() -> torch.Tensor:
    return torch.rand(9, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _score(judge: VideoJudge, cache_dir=None):
    return judge.score(_video(), 16, ["imaging_quality"])["imaging_quality"]


def _bounded(fn, seconds: float = 120.0):
    """Run ``fn`` in a thread; a call still running after ``seconds`` is a hang (the test fails, never blocks)."""
    out: dict = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the judge request still hangs after {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


# ----------------------------------------------------------------------------------------------- credentials
@pytest.mark.parametrize("status", [302, 307, 308])
def test_redirect_to_another_origin_gets_no_key_and_no_score(serve, status):
    other = serve(lambda h: _send(h, 200, _answer("Imaging Quality: 5\nReason: sharp")))
    first = serve(lambda h: _send(h, status, b"", {"Location": other.base_url + "/chat/completions"}))
    score = _score(_judge(first.base_url))
    assert other.requests == []  # neither the request nor the key reached the other host
    assert first.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"
    assert score.scores == () and len(score.failures) == 1
    failure = score.failures[0]
    assert f"HTTP {status}" in failure.error and other.base_url in failure.error and "redirect" in failure.error
    assert failure.attempts == 1  # a redirect is not retried
    assert KEY not in failure.error


def test_same_origin_redirect_is_not_followed_either(serve):
    def reply(h):
        if h.path.endswith("/chat/completions") and "moved" not in h.path:
            _send(h, 307, b"", {"Location": "/moved/chat/completions"})
        else:
            _send(h, 200, _answer("Imaging Quality: 5"))

    srv = serve(reply)
    score = _score(_judge(srv.base_url))
    assert [r["path"] for r in srv.requests] == ["/v1/chat/completions"]
    assert score.scores == () and "redirect" in score.failures[0].error


@pytest.mark.parametrize(
    "base_url",
    ["file:///etc/passwd#", "ftp://127.0.0.1/v1", "http://user:secret@127.0.0.1:9/v1", "127.0.0.1:8000/v1", "http:///v1"],
)
def test_base_url_must_be_http_with_a_host_and_no_credentials(base_url):
    with pytest.raises(ValueError, match="base_url"):
        VideoJudge(JudgeConfig(model="m", base_url=base_url))


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf")])
def test_timeout_must_be_a_finite_positive_deadline(timeout):
    with pytest.raises(ValueError, match="timeout_s"):
        VideoJudge(JudgeConfig(model="m", timeout_s=timeout))


# ----------------------------------------------------------------------------------------------- deadlines
class _Dripper:
    """A raw TCP server that answers with headers (or, with ``in_headers``, a status line) and then one byte
    every ``every_s`` seconds, for as long as the client listens."""

    def __init__(self, every_s: float, in_headers: bool) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.every_s, self.in_headers = every_s, in_headers
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(1 << 20)
                head = b"HTTP/1.1 200 OK\r\n" if self.in_headers else b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
                conn.sendall(head)
                while not self.stop.wait(self.every_s):
                    conn.sendall(b"X" if not self.in_headers else b"X-Drip: y\r\n")
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.mark.parametrize("in_headers", [False, True], ids=["body", "headers"])
def test_a_dripping_server_cannot_hold_the_client_past_the_deadline(in_headers):
    # Every read gets a byte well within timeout_s, so only a total deadline ends the request.
    server = _Dripper(every_s=0.2, in_headers=in_headers)
    try:
        judge = _judge(server.base_url, timeout_s=1.5, max_attempts=2)
        score = _bounded(lambda: _score(judge))
    finally:
        server.close()
    assert score.scores == () and len(score.failures) == 1
    assert "within 1.5 s (timeout_s=1.5)" in score.failures[0].error and score.failures[0].attempts == 2


def test_an_oversized_reply_is_refused(serve):
    big = b"{" + b" " * (5 * 2**20) + b"}"
    score = _score(_judge(serve(lambda h: _send(h, 200, big)).base_url, max_attempts=1))
    assert score.scores == () and "larger than" in score.failures[0].error


# ----------------------------------------------------------------------------------------------- strict scores
UNPARSEABLE = [
    "Imaging Quality: 4.5\nReason: mostly sharp",
    "Imaging Quality: 2/10\nReason: blurry",
    "Note: 3 frames are blurry.\nImaging Quality: n/a",
    "Note: 3 frames are blurry, overall 4",
    "I'm sorry, but I can't rate this video.",
    "Imaging Quality: 4 out of 5",
    "Imaging Quality: 6\nReason: better than perfect",
    "Imaging Quality: 4\nImaging Quality: 2",
    "Motion Smoothness: 4\nReason: another dimension's score",
    "Score: 4",
    "",
]


@pytest.mark.parametrize("text", UNPARSEABLE)
def test_unparseable_replies_are_retried_then_counted_as_failures(serve, tmp_path, text):
    srv = serve(lambda h: _send(h, 200, _answer(text)))
    judge = _judge(srv.base_url, max_attempts=3, cache_dir=str(tmp_path))
    score = _score(judge)
    assert parse_score(text, "Imaging Quality") is None
    assert score.scores == () and len(srv.requests) == 3
    assert score.failures[0].attempts == 3 and "malformed answer" in score.failures[0].error
    assert not list(tmp_path.glob("*.json"))  # never cached


@pytest.mark.parametrize("content", [5, None, {"text": "Imaging Quality: 4"}, [{"text": 4}]])
def test_replies_whose_content_is_not_text_are_failures(serve, content):
    srv = serve(lambda h: _send(h, 200, _answer(content)))
    score = _score(_judge(srv.base_url, max_attempts=2))
    assert score.scores == () and len(srv.requests) == 2


def test_a_cache_entry_that_is_not_in_the_requested_format_is_asked_again(serve, tmp_path):
    srv = serve(lambda h: _send(h, 200, _answer("Imaging Quality: 3\nReason: ok")))
    judge = _judge(srv.base_url, cache_dir=str(tmp_path))
    assert _score(judge).scores == (3,)
    (entry,) = tmp_path.glob("*.json")
    record = json.loads(entry.read_text())
    record["raw"], record["score"] = "Score: 5", 5  # an entry a looser parser once accepted (or a tampered one)
    entry.write_text(json.dumps(record))
    again = _score(judge)
    assert again.scores == (3,) and not again.answers[0].cached and len(srv.requests) == 2


@pytest.mark.parametrize("fps", [float("nan"), float("inf"), -16])
def test_non_finite_or_negative_fps_is_refused(serve, fps):
    srv = serve(lambda h: _send(h, 200, _answer("Imaging Quality: 3")))
    with pytest.raises(ValueError, match="fps"):
        _judge(srv.base_url).score(_video(), fps, ["imaging_quality"])
    assert srv.requests == []
