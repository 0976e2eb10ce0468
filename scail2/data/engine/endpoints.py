"""A small client for OpenAI-compatible HTTP endpoints: chat completions (VLMs) and image edits (generators).

Every request is bounded: a per-request socket timeout and a total deadline over all attempts (the reply is read
in chunks and the deadline is checked between them, so a server that trickles bytes cannot hold a run). Redirects
are refused rather than followed, so an API key is never sent to another host. A reply is parsed strictly: an
answer that is not the documented JSON, or whose text is empty, is an `EndpointError` with reason ``garbage``.
Transient failures (timeouts, connection errors, 408/409/429/5xx, garbage) are retried with exponential back-off
within the deadline; others (400, 401, 403, 404, redirects) fail at once.

Components talk to a `ChatClient` / `ImageClient` protocol, so any other client (a local model, a test double)
fits in their place.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

# Reasons an endpoint call fails; each is counted in the engine's reports.
ENDPOINT_REASONS: tuple[str, ...] = ("timeout", "unreachable", "http", "redirect", "garbage")
_CHUNK = 64 * 1024
_MAX_REPLY_BYTES = 64 * 1024 * 1024


class EndpointError(RuntimeError):
    """A failed endpoint call. ``reason`` is one of `ENDPOINT_REASONS`; ``transient`` says whether a retry may help."""

    def __init__(self, reason: str, detail: str, transient: bool = False):
        self.reason = reason
        self.detail = detail
        self.transient = transient
        super().__init__(f"{reason}: {detail}")


@runtime_checkable
class ChatClient(Protocol):
    model: str

    def chat(self, messages: list[dict], *, max_tokens: int = 512, temperature: float = 0.0) -> str:
        """The text of the first choice of a chat completion (non-empty), or raise `EndpointError`."""
        ...


@runtime_checkable
class ImageClient(Protocol):
    model: str

    def edit(self, prompt: str, images: Sequence[np.ndarray]) -> np.ndarray:
        """A generated image (H, W, 3) uint8 from a prompt and reference images (each (H, W, 3) uint8)."""
        ...


# --------------------------------------------------------------------------------------------------------
# Transport
# --------------------------------------------------------------------------------------------------------


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 - urllib hook
        raise EndpointError(
            "redirect", f"{req.full_url} answered {code} to {newurl}; redirects are refused (give the final URL)"
        )


_OPENER = urllib.request.build_opener(_RefuseRedirects)


class Deadline:
    """A total time budget (monotonic clock)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.end = clock() + seconds

    def left(self) -> float:
        return self.end - self._clock()

    def check(self, what: str) -> float:
        left = self.left()
        if left <= 0:
            raise EndpointError("timeout", f"{what}: the total deadline passed", transient=False)
        return left


def http_post(url: str, body: bytes, content_type: str, *, headers: dict[str, str], timeout_s: float, deadline: Deadline) -> bytes:
    """POST ``body`` and return the reply bytes; every failure is an `EndpointError`."""
    timeout = min(timeout_s, deadline.check(url))
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type, **headers}, method="POST")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            chunks, size = [], 0
            while True:
                chunk = response.read(_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > _MAX_REPLY_BYTES:
                    raise EndpointError("garbage", f"{url}: reply larger than {_MAX_REPLY_BYTES} bytes")
                chunks.append(chunk)
                deadline.check(url)
            return b"".join(chunks)
    except EndpointError:
        raise
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode("utf-8", "replace") if exc.fp is not None else ""
        transient = exc.code in (408, 409, 429) or exc.code >= 500
        raise EndpointError("http", f"HTTP {exc.code} from {url}: {detail}", transient=transient) from None
    except (socket.timeout, TimeoutError) as exc:
        raise EndpointError("timeout", f"no reply from {url} within {timeout:.3g} s ({exc})", transient=True) from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (socket.timeout, TimeoutError)):
            raise EndpointError("timeout", f"no reply from {url} within {timeout:.3g} s", transient=True) from None
        raise EndpointError("unreachable", f"{url}: {exc.reason}", transient=True) from None
    except (ConnectionError, OSError) as exc:
        raise EndpointError("unreachable", f"{url}: {type(exc).__name__}: {exc}", transient=True) from None


def with_retries(call: Callable[[], Any], *, max_attempts: int, backoff_s: float, deadline: Deadline,
                 sleep: Callable[[float], None] = time.sleep) -> Any:  # fmt: skip
    """Run ``call`` until it succeeds, retrying transient `EndpointError` s with exponential back-off."""
    last: EndpointError | None = None
    for attempt in range(1, max_attempts + 1):
        try:
            return call()
        except EndpointError as exc:
            last = exc
            if not exc.transient or attempt == max_attempts:
                break
            wait = backoff_s * 2 ** (attempt - 1)
            if deadline.left() <= wait:
                break
            sleep(wait)
    assert last is not None
    raise EndpointError(last.reason, f"{last.detail} (after {attempt} attempt{'s' * (attempt > 1)})", last.transient)


def _auth_headers(api_key_env: str | None) -> dict[str, str]:
    if not api_key_env:
        return {}
    key = os.environ.get(api_key_env)
    if not key:
        raise EndpointError("http", f"the API key variable {api_key_env} is not set (or set api_key_env: null)")
    return {"Authorization": f"Bearer {key}"}


def _json(payload: bytes, url: str) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise EndpointError("garbage", f"{url} answered non-JSON {payload[:200]!r}", transient=True) from None


# --------------------------------------------------------------------------------------------------------
# Images <-> bytes
# --------------------------------------------------------------------------------------------------------


def encode_image(image: np.ndarray, fmt: str = "PNG", max_side: int | None = None, quality: int = 90) -> bytes:
    """(H, W, 3) uint8 -> PNG (lossless) or JPEG bytes, downscaled (bicubic) to ``max_side`` when given."""
    from PIL import Image

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image is {image.dtype} {tuple(image.shape)}; need uint8 (H, W, 3)")
    pil = Image.fromarray(np.ascontiguousarray(image))
    if max_side is not None and max(pil.size) > max_side:
        ratio = max_side / max(pil.size)
        pil = pil.resize((max(1, round(pil.width * ratio)), max(1, round(pil.height * ratio))), Image.BICUBIC)
    buffer = io.BytesIO()
    pil.save(buffer, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def decode_image(data: bytes, what: str = "image") -> np.ndarray:
    """PNG/JPEG/WebP bytes -> (H, W, 3) uint8; undecodable bytes are an `EndpointError` (garbage)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise EndpointError("garbage", f"{what} is not a decodable image ({exc})", transient=True) from None


def image_url(image: np.ndarray, max_side: int = 768, quality: int = 85) -> str:
    """A JPEG data URL for a chat message."""
    return "data:image/jpeg;base64," + base64.b64encode(encode_image(image, "JPEG", max_side, quality)).decode("ascii")


def image_part(image: np.ndarray, detail: str = "low", max_side: int = 768) -> dict:
    """A chat-completions content part showing ``image``."""
    return {"type": "image_url", "image_url": {"url": image_url(image, max_side), "detail": detail}}


def b64decode_strict(text: Any, what: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise EndpointError("garbage", f"{what} is not a base64 string", transient=True)
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise EndpointError("garbage", f"{what} is not valid base64", transient=True) from None


# --------------------------------------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------------------------------------


class OpenAIChatClient:
    """Chat completions at ``{base_url}/chat/completions`` (OpenAI, vLLM, SGLang, Gemini's OpenAI endpoint ...).

    api_key_env: the environment variable holding the key, read at each request (None: no key, e.g. a local
    server). timeout_s bounds one request, deadline_s all attempts of one call; max_attempts and backoff_s set
    the retries of transient failures. ``sleep`` is injectable for tests.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None, timeout_s: float = 120.0,
                 deadline_s: float = 600.0, max_attempts: int = 4, backoff_s: float = 2.0,
                 sleep: Callable[[float], None] = time.sleep):  # fmt: skip
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {base_url!r} must start with http:// or https://")
        if max_attempts < 1 or timeout_s <= 0 or deadline_s <= 0:
            raise ValueError(f"max_attempts {max_attempts} >= 1, timeout_s {timeout_s} > 0, deadline_s {deadline_s} > 0")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s, self.deadline_s = float(timeout_s), float(deadline_s)
        self.max_attempts, self.backoff_s = int(max_attempts), float(backoff_s)
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"OpenAIChatClient({self.base_url!r}, {self.model!r})"

    def chat(self, messages: list[dict], *, max_tokens: int = 512, temperature: float = 0.0) -> str:
        url = f"{self.base_url}/chat/completions"
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": max_tokens,
                           "temperature": temperature}).encode()  # fmt: skip
        deadline = Deadline(self.deadline_s)

        def once() -> str:
            payload = http_post(url, body, "application/json", headers=_auth_headers(self.api_key_env),
                                timeout_s=self.timeout_s, deadline=deadline)  # fmt: skip
            return parse_chat_reply(_json(payload, url), url)

        return with_retries(once, max_attempts=self.max_attempts, backoff_s=self.backoff_s, deadline=deadline,
                            sleep=self._sleep)  # fmt: skip


def parse_chat_reply(reply: Any, url: str = "endpoint") -> str:
    """The first choice's text of a chat-completions reply; anything else is an `EndpointError` (garbage)."""
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise EndpointError("garbage", f"{url}: not a chat completion: {json.dumps(reply)[:200]}", transient=True) from None
    if isinstance(content, list):  # content parts
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type", "text") == "text"]
        if not all(isinstance(t, str) for t in texts):
            raise EndpointError("garbage", f"{url}: content parts without text", transient=True)
        content = "".join(texts)
    if not isinstance(content, str):
        raise EndpointError("garbage", f"{url}: reply content is {type(content).__name__}, not text", transient=True)
    if not content.strip():
        raise EndpointError("garbage", f"{url}: empty reply text", transient=True)
    return content


class OpenAIImageClient:
    """Image edits at ``{base_url}/images/edits`` (multipart: ``model``, ``prompt``, ``n=1``, one ``image[]`` file per
    reference image, PNG), answered with ``data[0].b64_json``. A multi-reference model (the paper uses one) takes
    all images; ``size`` is passed through when given. Bounds and retries as `OpenAIChatClient`. A reply with a
    ``url`` instead of ``b64_json`` is refused (nothing is fetched from where a reply points)."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None, size: str | None = None,
                 timeout_s: float = 300.0, deadline_s: float = 900.0, max_attempts: int = 3, backoff_s: float = 2.0,
                 sleep: Callable[[float], None] = time.sleep):  # fmt: skip
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {base_url!r} must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.size = size
        self.timeout_s, self.deadline_s = float(timeout_s), float(deadline_s)
        self.max_attempts, self.backoff_s = int(max_attempts), float(backoff_s)
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"OpenAIImageClient({self.base_url!r}, {self.model!r})"

    def edit(self, prompt: str, images: Sequence[np.ndarray]) -> np.ndarray:
        url = f"{self.base_url}/images/edits"
        fields = {"model": self.model, "prompt": prompt, "n": "1", **({"size": self.size} if self.size else {})}
        files = [("image[]", f"image{i}.png", encode_image(img)) for i, img in enumerate(images)]
        body, content_type = multipart(fields, files)
        deadline = Deadline(self.deadline_s)

        def once() -> np.ndarray:
            payload = http_post(url, body, content_type, headers=_auth_headers(self.api_key_env),
                                timeout_s=self.timeout_s, deadline=deadline)  # fmt: skip
            reply = _json(payload, url)
            try:
                item = reply["data"][0]
            except (KeyError, IndexError, TypeError):
                raise EndpointError("garbage", f"{url}: no data[0] in {json.dumps(reply)[:200]}", transient=True) from None
            if not isinstance(item, dict) or "b64_json" not in item:
                raise EndpointError("garbage", f"{url}: data[0] has no b64_json (a url reply is not fetched)", transient=True)
            return decode_image(b64decode_strict(item["b64_json"], f"{url} data[0].b64_json"), f"{url} image")

        return with_retries(once, max_attempts=self.max_attempts, backoff_s=self.backoff_s, deadline=deadline,
                            sleep=self._sleep)  # fmt: skip


def multipart(fields: dict[str, str], files: Sequence[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, filename, data in files:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                  "Content-Type: image/png\r\n\r\n".encode())  # fmt: skip
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


class JSONEndpoint:
    """POST a JSON body to ``url`` and return the parsed JSON reply (for the segmenter and keypoint endpoints).
    Bounds and retries as `OpenAIChatClient`."""

    def __init__(self, url: str, *, api_key_env: str | None = None, timeout_s: float = 300.0, deadline_s: float = 900.0,
                 max_attempts: int = 3, backoff_s: float = 2.0, sleep: Callable[[float], None] = time.sleep):  # fmt: skip
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url {url!r} must start with http:// or https://")
        self.url = url
        self.api_key_env = api_key_env
        self.timeout_s, self.deadline_s = float(timeout_s), float(deadline_s)
        self.max_attempts, self.backoff_s = int(max_attempts), float(backoff_s)
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"JSONEndpoint({self.url!r})"

    def post(self, body: dict, parse: Callable[[Any], Any]) -> Any:
        """``parse(reply)`` of the JSON reply; ``parse`` raises `EndpointError` (garbage) on a malformed one, which
        is retried like a transient failure."""
        data = json.dumps(body).encode()
        deadline = Deadline(self.deadline_s)

        def once() -> Any:
            payload = http_post(self.url, data, "application/json", headers=_auth_headers(self.api_key_env),
                                timeout_s=self.timeout_s, deadline=deadline)  # fmt: skip
            return parse(_json(payload, self.url))

        return with_retries(once, max_attempts=self.max_attempts, backoff_s=self.backoff_s, deadline=deadline,
                            sleep=self._sleep)  # fmt: skip
