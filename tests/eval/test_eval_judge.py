"""The VLM judge against a scripted OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

from scail2.eval.judge import (
    DIMENSIONS,
    JudgeConfig,
    VideoJudge,
    aggregate,
    answers_as_records,
    dynamic_frame_groups,
    load_prompt,
    parse_score,
    static_frame_indices,
)

GOOD = "Imaging Quality: 4\nReason: sharp frames with minor blur on the hands."


class _JudgeServer(ThreadingHTTPServer):
    """Replies from ``script`` (status, text) in order, then ``default``; records every request."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.script: list[tuple[int, str]] = []
        self.default = (200, GOOD)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: _JudgeServer

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        status, text = self.server.script.pop(0) if self.server.script else self.server.default
        if status == 200:
            payload = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
        else:
            payload = json.dumps({"error": {"message": text}})
        data = payload.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # keep test output clean
        pass


@pytest.fixture
def server():
    srv = _JudgeServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _judge(server, sleeps=None, **overrides) -> VideoJudge:
    config = JudgeConfig(model="judge-test", base_url=server.base_url, api_key="test-key", **overrides)
    return VideoJudge(config, sleep=(sleeps.append if sleeps is not None else lambda s: None))


def _video(t=17, h=24, w=32, seed=0) -> torch.Tensor:
    return torch.rand(t, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _images(request: dict) -> list[Image.Image]:
    parts = [p for p in request["body"]["messages"][1]["content"] if p["type"] == "image_url"]
    out = []
    for part in parts:
        url = part["image_url"]["url"]
        assert url.startswith("data:image/jpeg;base64,") and part["image_url"]["detail"] == "low"
        out.append(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    return out


# ------------------------------------------------------------------------------------------------------
# Parsing, sampling, prompts
# ------------------------------------------------------------------------------------------------------


def test_parse_score():
    assert parse_score("Imaging Quality: 4\nReason: fine", "Imaging Quality") == 4
    assert parse_score("imaging quality:5", "Imaging Quality") == 5
    assert parse_score("**Imaging Quality:** 3\nReason: ok", "Imaging Quality") == 3
    assert parse_score("Imaging Quality: 7", "Imaging Quality") is None
    assert parse_score("Imaging Quality: 0", "Imaging Quality") is None
    assert parse_score("looks good, 4 out of 5", "Imaging Quality") is None
    assert parse_score("Score: 4", "Imaging Quality") is None  # a score under another name


def test_frame_sampling():
    assert static_frame_indices(81, 16) == list(range(0, 81, 8))  # last frame 80 already included
    assert static_frame_indices(20, 16) == [0, 8, 16, 19]
    assert static_frame_indices(3, 1) == [0, 1, 2]  # int(fps / 2) = 0 -> every frame
    groups = dynamic_frame_groups(33, 16)  # every 2nd frame: 17 indices
    assert [len(g) for g in groups] == [8, 8, 8]
    assert groups[0] == list(range(0, 16, 2)) and groups[-1] == list(range(18, 33, 2))
    assert dynamic_frame_groups(10, 24) == [[0, 3, 6, 9]]  # fewer than 8 sampled: one short grid


def test_prompt_files_follow_the_structure():
    for dim in DIMENSIONS:
        text = load_prompt("v1", dim.name)
        assert f"{dim.title}: <one integer from 1 to 5>" in text
        assert all(f"\n{k} - " in text for k in range(1, 6)) and "Task:" in text
    assert "{count}" in load_prompt("v1", "frames_static") and "{count}" in load_prompt("v1", "frames_dynamic")
    with pytest.raises(FileNotFoundError, match="available versions"):
        load_prompt("v999", "imaging_quality")


# ------------------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------------------


def test_request_shape_for_a_static_dimension(server):
    result = _judge(server).score(_video(t=17), fps=16, dimensions=["imaging_quality"])
    assert result["imaging_quality"].scores == (4,) and result["imaging_quality"].mean == 4.0
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer test-key"
    body = request["body"]
    assert body["model"] == "judge-test" and body["temperature"] == 0
    system, user = body["messages"]
    assert system["role"] == "system" and "Imaging Quality" in system["content"]
    assert user["role"] == "user" and user["content"][0]["type"] == "text"
    images = _images(request)
    assert len(images) == len(static_frame_indices(17, 16)) == 3  # frames 0, 8 and 16 (the last)
    assert images[0].size == (32, 24) and images[0].format == "JPEG"


def test_request_shape_for_a_dynamic_dimension(server):
    _judge(server).score(_video(t=33), fps=16, dimensions=["motion_smoothness"])
    images = _images(server.requests[0])
    assert len(images) == 3 and all(im.size == (8 * 32, 24) for im in images)  # 1x8 grids
    assert "Motion Smoothness" in server.requests[0]["body"]["messages"][0]["content"]


def test_large_frames_are_downscaled_and_context_frames_are_sent_first(server):
    judge = _judge(server, max_image_side=64)
    judge.score(_video(t=9, h=48, w=96), fps=16, dimensions=["imaging_quality"], context=[_video(t=5, h=48, w=96, seed=1)])
    content = server.requests[0]["body"]["messages"][1]["content"]
    assert content[0]["type"] == "text" and "other method" in content[0]["text"]
    assert content[1]["type"] == "image_url" and content[2]["type"] == "text"
    assert all(im.size == (64, 32) for im in _images(server.requests[0]))


# ------------------------------------------------------------------------------------------------------
# Caching, retries, failures, repeats
# ------------------------------------------------------------------------------------------------------


def test_answers_are_cached_on_disk(server, tmp_path):
    video = _video()
    first = _judge(server, cache_dir=str(tmp_path)).score(video, 16, ["imaging_quality"])
    assert len(server.requests) == 1 and not first["imaging_quality"].answers[0].cached
    again = _judge(server, cache_dir=str(tmp_path)).score(video.clone(), 16, ["imaging_quality"])
    assert len(server.requests) == 1  # served from the cache: no request
    answer = again["imaging_quality"].answers[0]
    assert answer.cached and answer.score == 4 and answer.raw == GOOD and answer.attempts == 0
    (entry,) = tmp_path.glob("*.json")
    key = json.loads(entry.read_text())["key"]
    assert {"video", "prompt_version", "model", "dimension", "repeat"} <= key.keys()
    # Any part of the key changing means a new request: another judge model, another video, another repeat.
    _judge(server, cache_dir=str(tmp_path)).score(_video(seed=5), 16, ["imaging_quality"])
    other = VideoJudge(JudgeConfig(model="other", base_url=server.base_url, cache_dir=str(tmp_path)))
    other.score(video, 16, ["imaging_quality"])
    _judge(server, cache_dir=str(tmp_path), repeats=2).score(video, 16, ["imaging_quality"])
    assert len(server.requests) == 4


def test_retries_on_http_500_with_exponential_backoff(server):
    server.script = [(500, "overloaded"), (503, "busy"), (200, "Imaging Quality: 5\nReason: clean")]
    sleeps: list[float] = []
    result = _judge(server, sleeps, backoff_s=0.5).score(_video(), 16, ["imaging_quality"])
    answer = result["imaging_quality"].answers[0]
    assert answer.score == 5 and answer.attempts == 3 and len(server.requests) == 3
    assert sleeps == [0.5, 1.0]


def test_retries_on_malformed_answers(server):
    server.script = [(200, "The video looks good."), (200, "Imaging Quality: 9"), (200, "Imaging Quality: 3\nReason: ok")]
    answer = _judge(server).score(_video(), 16, ["imaging_quality"])["imaging_quality"].answers[0]
    assert answer.score == 3 and answer.attempts == 3


def test_final_failure_is_reported_and_not_cached(server, tmp_path):
    server.default = (200, "I cannot rate this video.")
    sleeps: list[float] = []
    result = _judge(server, sleeps, max_attempts=3, backoff_s=1.0, cache_dir=str(tmp_path)).score(
        _video(), 16, ["imaging_quality"]
    )
    score = result["imaging_quality"]
    assert score.scores == () and math.isnan(score.mean) and len(score.failures) == 1
    failure = score.failures[0]
    assert failure.score is None and failure.attempts == 3 and "gave up after 3 attempts" in failure.error
    assert failure.raw == "I cannot rate this video." and sleeps == [1.0, 2.0]
    assert not list(tmp_path.glob("*.json"))
    records = answers_as_records(result)
    assert records[0]["dimension"] == "imaging_quality" and records[0]["score"] is None


def test_client_errors_are_not_retried(server):
    server.script = [(401, "bad key")]
    answer = _judge(server).score(_video(), 16, ["imaging_quality"])["imaging_quality"].answers[0]
    assert answer.score is None and answer.attempts == 1 and "HTTP 401" in answer.error
    assert len(server.requests) == 1


def test_unreachable_server_is_retried_then_reported():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps: list[float] = []
    judge = VideoJudge(
        JudgeConfig(model="m", base_url=f"http://127.0.0.1:{port}/v1", max_attempts=2, timeout_s=2), sleep=sleeps.append
    )
    answer = judge.score(_video(), 16, ["imaging_quality"])["imaging_quality"].answers[0]
    assert answer.score is None and "no reply" in answer.error and len(sleeps) == 1


def test_mean_and_std_over_repeats_and_videos(server):
    server.script = [(200, f"Motion Smoothness: {s}") for s in (3, 4, 5)]
    result = _judge(server, repeats=3).score(_video(), 16, ["motion_smoothness"])
    score = result["motion_smoothness"]
    assert score.scores == (3, 4, 5) and score.mean == 4.0
    assert score.std == pytest.approx(math.sqrt(2 / 3))
    assert [a.repeat for a in score.answers] == [0, 1, 2]
    server.script = [(200, "Motion Smoothness: 2")]
    other = _judge(server).score(_video(seed=3), 16, ["motion_smoothness"])
    table = aggregate([result, other])
    assert table["motion_smoothness"]["mean"] == 3.0 and table["motion_smoothness"]["videos"] == 2


def test_bad_inputs(server):
    judge = _judge(server)
    with pytest.raises(ValueError, match=r"\(T, 3, H, W\)"):
        judge.score(torch.rand(1, 4, 3, 8, 8), 16)
    with pytest.raises(ValueError, match="fps"):
        judge.score(_video(), 0)
    with pytest.raises(ValueError, match="unknown judge dimension"):
        judge.score(_video(), 16, ["aesthetics"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        judge.score(_video() * 2, 16)
    assert not server.requests
