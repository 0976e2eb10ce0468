"""Loopback fake endpoints (127.0.0.1) for the data engine's tests: an OpenAI-compatible chat and image-edit server
and the JSON segmenter / keypoint protocol, with knobs for slow, garbage and failing answers."""

from __future__ import annotations

import base64
import email.parser
import email.policy
import io
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


def png_b64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB")).copy()


@dataclass
class Behaviour:
    """What the fake answers. Each ``*_replies`` list, when not empty, is consumed first (one reply text per
    request); ``sleep_s`` delays every chat reply; ``garbage`` answers a non-completion body."""

    caption: str = "a person dancing in a studio"
    caption_replies: list[str] = field(default_factory=list)
    choice: int = 0
    check_fails: int = 0  # the first N checks fail
    discard_every: int = 0  # the filter discards every N-th video (0: keeps all)
    sleep_s: float = 0.0
    garbage: bool = False
    redirect: bool = False
    image_colour: tuple[int, int, int] = (200, 60, 40)
    segment_reply: dict | None = None  # a fixed /segment reply


class FakeServer:
    """A ThreadingHTTPServer on 127.0.0.1:<free port> in a daemon thread; use as a context manager."""

    def __init__(self, behaviour: Behaviour | None = None):
        self.behaviour = behaviour or Behaviour()
        self.requests: list[tuple[str, dict]] = []  # (path, parsed body)
        self.checks = 0
        self.filtered = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):  # noqa: N802 - http.server hook
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                b = server.behaviour
                if b.redirect:
                    self.send_response(307)
                    self.send_header("Location", "http://127.0.0.2:9/elsewhere")
                    self.end_headers()
                    return
                if b.sleep_s:
                    time.sleep(b.sleep_s)
                try:
                    if self.path.endswith("/chat/completions"):
                        reply = server._chat(json.loads(body))
                    elif self.path.endswith("/images/edits"):
                        reply = server._images(body, self.headers["Content-Type"])
                    elif self.path.endswith("/segment"):
                        reply = server._segment(json.loads(body))
                    else:
                        self.send_response(404)
                        self.end_headers()
                        return
                except BrokenPipeError:
                    return
                data = b"this is not json" if b.garbage else json.dumps(reply).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> "FakeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- answers -------------------------------------------------------------------------------------------

    def _chat(self, body: dict) -> dict:
        parts = body["messages"][0]["content"] if body["messages"] else ""
        if isinstance(parts, str):
            parts = [{"type": "text", "text": parts}]
        text = next((p["text"] for p in parts if p["type"] == "text"), "")
        images = sum(p["type"] == "image_url" for p in parts)
        b = self.behaviour
        with self.lock:
            self.requests.append(("chat", {"text": text, "images": images, "model": body["model"]}))
            if text.startswith("You write the text prompt"):
                content = b.caption_replies.pop(0) if b.caption_replies else b.caption
            elif text.startswith("You choose a character"):
                content = json.dumps({"choice": b.choice, "reason": "closest body type"})
            elif text.startswith("You plan a prompt"):
                content = "```json\n" + json.dumps({"prompt": "draw the character in the posture"}) + "\n```"
            elif text.startswith("You revise"):
                content = json.dumps({"prompt": "fix the hands"})
            elif text.startswith("You check"):
                self.checks += 1
                ok = self.checks > b.check_fails
                content = json.dumps({"pass": ok, "feedback": "" if ok else "the hands are wrong"})
            elif text.startswith("You filter"):
                self.filtered += 1
                keep = not (b.discard_every and self.filtered % b.discard_every == 0)
                content = json.dumps({"keep": keep, "reason": "ok" if keep else "melting face"})
            else:
                content = "unknown request"
        return {"choices": [{"message": {"role": "assistant", "content": content}}]}

    def _images(self, body: bytes, content_type: str) -> dict:
        message = email.parser.BytesParser(policy=email.policy.default).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + body
        )
        fields, images = {}, []
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if part.get_filename():
                images.append(decode_png(part.get_payload(decode=True)))
            else:
                fields[name] = part.get_content()
        with self.lock:
            self.requests.append(("images", {"fields": fields, "images": len(images)}))
        # The "generated" character: the posture image (the last one), with its centre painted in one colour.
        base = images[-1].copy()
        h, w = base.shape[:2]
        base[h // 4 : h - h // 4, w // 4 : w - w // 4] = self.behaviour.image_colour
        return {"data": [{"b64_json": png_b64(base)}]}

    def _segment(self, body: dict) -> dict:
        with self.lock:
            self.requests.append(("segment", {"frames": len(body["frames"])}))
        if self.behaviour.segment_reply is not None:
            return self.behaviour.segment_reply
        # Everything that is not black is one character.
        masks = []
        for text in body["frames"]:
            frame = decode_png(base64.b64decode(text))
            masks.append(png_b64(np.repeat(((frame.max(-1) > 30) * 255).astype(np.uint8)[..., None], 3, -1)))
        return {"masks": [masks]}


def synth_videos(pairs: int = 5, frames: int = 9, size: tuple[int, int] = (64, 64)):
    """(videos folder, manifest) of a cached synth dataset: its target videos named ``<record id>.mp4``."""
    import shutil

    from scail2.data.manifest import load_manifest

    from .helpers import session_dir, synth_dataset

    manifest = synth_dataset(pairs, frames, (size,))
    folder = session_dir() / f"videos-{pairs}-{frames}-{size[0]}x{size[1]}"
    if not folder.exists():
        tmp = folder.with_name(folder.name + ".tmp")
        tmp.mkdir()
        for record in load_manifest(manifest):
            shutil.copy(record.target, tmp / f"{record.id}.mp4")
        tmp.rename(folder)
    return folder, manifest
