"""The engine's endpoint client, VLM components and command adapters against loopback fakes (bounded)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from scail2.data.engine.adapters import CommandSegmenter, HTTPSegmenter, run_command
from scail2.data.engine.components import ComponentError
from scail2.data.engine.endpoints import EndpointError, OpenAIChatClient, OpenAIImageClient, parse_chat_reply
from scail2.data.engine.vlm import (
    EndpointImageGenerator,
    VLMCandidateSelector,
    VLMCaptioner,
    VLMQualityChecker,
    parse_json_object,
)
from scail2.data.engine.clips import Clip

from .engine_fakes import Behaviour, FakeServer, png_b64

pytestmark = pytest.mark.timeout(120)
_NOSLEEP = {"sleep": lambda s: None}


def _clip(frames: int = 3) -> Clip:
    video = np.zeros((frames, 16, 16, 3), dtype=np.uint8)
    video[:, 4:12, 4:12] = 200
    return Clip("c0", video, 16.0)


def test_chat_text_and_failures():
    with FakeServer() as srv:
        client = OpenAIChatClient(srv.url, "m", **_NOSLEEP)
        assert client.chat([{"role": "user", "content": [{"type": "text", "text": "You write the text prompt"}]}]) == (
            "a person dancing in a studio"
        )
    with FakeServer(Behaviour(garbage=True)) as srv:
        with pytest.raises(EndpointError) as err:
            OpenAIChatClient(srv.url, "m", max_attempts=2, **_NOSLEEP).chat([{"role": "user", "content": "x"}])
        assert err.value.reason == "garbage" and "2 attempts" in err.value.detail
    with FakeServer(Behaviour(redirect=True)) as srv:
        with pytest.raises(EndpointError) as err:
            OpenAIChatClient(srv.url, "m", max_attempts=3, **_NOSLEEP).chat([{"role": "user", "content": "x"}])
        assert err.value.reason == "redirect" and "127.0.0.2" in err.value.detail  # refused, never followed
    with pytest.raises(EndpointError) as err:  # nobody listens on the port
        OpenAIChatClient("http://127.0.0.1:9/v1", "m", max_attempts=1).chat([{"role": "user", "content": "x"}])
    assert err.value.reason == "unreachable"
    with pytest.raises(EndpointError, match="not set"):
        OpenAIChatClient("http://127.0.0.1:9/v1", "m", api_key_env="SCAIL2_TEST_NO_SUCH_KEY").chat([])


def test_timeouts_and_the_total_deadline_bound_a_slow_endpoint():
    with FakeServer(Behaviour(sleep_s=2.0)) as srv:
        with pytest.raises(EndpointError) as err:
            OpenAIChatClient(srv.url, "m", timeout_s=0.2, max_attempts=2, backoff_s=0.0).chat([{"role": "user", "content": "x"}])
        assert err.value.reason == "timeout"
        with pytest.raises(EndpointError) as err:  # a long per-request timeout is cut by the deadline
            OpenAIChatClient(srv.url, "m", timeout_s=60, deadline_s=0.3, max_attempts=5).chat([{"role": "user", "content": "x"}])
        assert err.value.reason == "timeout"


def test_parse_strictly():
    assert parse_chat_reply({"choices": [{"message": {"content": [{"type": "text", "text": "hi"}]}}]}) == "hi"
    for bad in ({}, {"choices": []}, {"choices": [{"message": {"content": "  "}}]}, {"choices": [{"message": {"content": 3}}]}):
        with pytest.raises(EndpointError, match="garbage"):
            parse_chat_reply(bad)
    assert parse_json_object('```json\n{"choice": 2}\n```', {"choice": int}) == {"choice": 2}
    for bad in ('{"choice": true}', '{"choice": "2"}', "[1]", "choice: 2", '{"choice": 1} and more'):
        with pytest.raises(EndpointError, match="garbage"):
            parse_json_object(bad, {"choice": int})


def test_captioner_retries_empty_answers_and_caches(tmp_path):
    with FakeServer(Behaviour(caption_replies=["   ", "", '"a dancer spins"'])) as srv:
        client = OpenAIChatClient(srv.url, "m", max_attempts=3, **_NOSLEEP)  # empty replies are retried
        captioner = VLMCaptioner(client, cache_dir=str(tmp_path), frames=2)
        assert captioner.caption(_clip()) == "a dancer spins"
        asked = len(srv.requests)
        assert asked == 3 and srv.requests[0][1]["images"] == 2
        assert captioner.caption(_clip()) == "a dancer spins"  # from the cache
        assert len(srv.requests) == asked
    with FakeServer(Behaviour(caption_replies=["", "", "", "", "", ""])) as srv:
        client = OpenAIChatClient(srv.url, "m", max_attempts=1, **_NOSLEEP)
        with pytest.raises(EndpointError) as err:  # never a silent empty caption
            VLMCaptioner(client, attempts=2).caption(_clip())
        assert err.value.reason == "garbage"


def test_selector_checker_and_image_generator(tmp_path):
    images = [np.full((16, 16, 3), v, dtype=np.uint8) for v in (10, 20, 30)]
    with FakeServer(Behaviour(choice=1, check_fails=1)) as srv:
        client = OpenAIChatClient(srv.url, "m", **_NOSLEEP)
        assert VLMCandidateSelector(client).select(images[0], images[1:]) == 1
        checker = VLMQualityChecker(client)
        first = checker.check(images[0], images[1], images[2], "p")
        assert not first.ok and first.feedback == "the hands are wrong"
        assert checker.check(images[1], images[1], images[2], "p").ok
        generator = EndpointImageGenerator(OpenAIImageClient(srv.url, "img", **_NOSLEEP), cache_dir=str(tmp_path))
        out = generator.generate("draw", images[:2], seed=3)
        assert out.shape == (16, 16, 3) and tuple(out[8, 8]) == (200, 60, 40) and tuple(out[0, 0]) == (20, 20, 20)
        edits = [r for r in srv.requests if r[0] == "images"]
        assert edits[0][1] == {"fields": {"model": "img", "prompt": "draw", "n": "1"}, "images": 2}
        np.testing.assert_array_equal(generator.generate("draw", images[:2], seed=3), out)  # cached
        assert len([r for r in srv.requests if r[0] == "images"]) == 1
    with FakeServer(Behaviour(choice=7)) as srv:
        with pytest.raises(EndpointError, match="not a candidate number"):
            VLMCandidateSelector(OpenAIChatClient(srv.url, "m", **_NOSLEEP), attempts=2).select(images[0], images[1:])


def test_http_segmenter(tmp_path):
    clip = _clip()
    with FakeServer() as srv:
        masks = HTTPSegmenter(srv.url.rsplit("/", 1)[0] + "/segment").segment(clip)
        assert masks.shape == (1, 3, 16, 16) and masks[0, :, 4:12, 4:12].all() and masks.sum() == 3 * 64
    wrong = {"masks": [[png_b64(np.zeros((16, 16, 3), np.uint8))]]}  # one mask for three frames
    with FakeServer(Behaviour(segment_reply=wrong)) as srv:
        with pytest.raises(EndpointError, match="1 masks for 3 frames"):
            HTTPSegmenter(srv.url.rsplit("/", 1)[0] + "/segment", max_attempts=1).segment(clip)


def test_commands_are_bounded_and_their_failures_named(tmp_path):
    with pytest.raises(ComponentError) as err:  # the whole process group is killed, grandchildren included
        run_command(["sh", "-c", "sleep 30 & sleep 30"], {}, 0.3, "test")
    assert err.value.reason == "timeout"
    with pytest.raises(ComponentError) as err:
        run_command([sys.executable, "-c", "import sys; sys.stderr.write('model not found\\n'); sys.exit(3)"], {}, 30, "test")
    assert err.value.reason == "failed" and "exited with 3" in err.value.detail and "model not found" in err.value.detail
    with pytest.raises(ComponentError, match="cannot start"):
        run_command(["/no/such/program"], {}, 5, "test")
    script = tmp_path / "seg.py"
    script.write_text(
        "import sys, numpy as np\n"
        "from scail2.data.video import read_video\n"
        "v = read_video(sys.argv[1])\n"
        "np.savez(sys.argv[2], masks=(v.max(-1) > 100)[None])\n"
    )
    masks = CommandSegmenter([sys.executable, str(script), "{video}", "{output}"], timeout_s=120).segment(_clip())
    assert masks.shape == (1, 3, 16, 16) and masks[0, :, 4:12, 4:12].all() and masks.sum() == 3 * 64
    with pytest.raises(ComponentError, match="wrote no masks.npz"):
        CommandSegmenter([sys.executable, "-c", "pass"], timeout_s=60).segment(_clip())
