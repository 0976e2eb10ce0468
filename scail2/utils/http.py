"""One bounded HTTP POST for the clients that send API keys (the VLM judge, the data engine's endpoints).

- No redirect is followed, so a key in the headers never reaches another origin; a 3xx comes back as a status.
- ``timeout_s`` bounds the whole exchange (connecting, sending, the status line, the headers and the complete
  body): a watchdog shuts the socket down at the deadline, so a server that drips bytes cannot hold the client.
- Replies are capped at ``max_bytes``.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass


class RequestFailed(Exception):
    """No complete reply: ``reason`` is ``timeout`` (the deadline passed), ``unreachable`` or ``too_large``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Reply:
    status: int
    location: str | None  # the Location header (redirects)
    body: bytes


def parse_url(url: str, what: str = "URL") -> urllib.parse.SplitResult:
    """``url`` split; only http(s) URLs naming a host, without credentials in them (``ValueError`` otherwise)."""
    parts = urllib.parse.urlsplit(str(url))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} {url!r} is not an http(s) URL with a host, e.g. http://127.0.0.1:8000/v1")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{what} {url!r} holds credentials; give the key as an API key setting instead")
    try:
        parts.port
    except ValueError as exc:
        raise ValueError(f"{what} {url!r}: {exc}") from None
    return parts


def post(url: urllib.parse.SplitResult, body: bytes, headers: dict[str, str], timeout_s: float,
         max_bytes: int) -> Reply:  # fmt: skip
    """POST ``body`` to ``url`` over one connection; raises `RequestFailed` on a missing, late or oversized reply."""
    deadline = time.monotonic() + timeout_s
    cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    conn = cls(url.hostname, url.port, timeout=timeout_s)
    expired = threading.Event()

    def abort() -> None:
        expired.set()
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    where = url.geturl()
    late = RequestFailed("timeout", f"no complete reply from {where} within {timeout_s:g} s")
    watchdog = threading.Timer(timeout_s, abort)
    watchdog.daemon = True
    watchdog.start()
    try:
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        chunks, size = [], 0
        while not expired.is_set():
            if conn.sock is not None:
                conn.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = response.read1(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise RequestFailed("too_large", f"the reply from {where} is larger than {max_bytes} bytes")
            chunks.append(chunk)
        if expired.is_set():
            raise late
        return Reply(response.status, response.getheader("Location"), b"".join(chunks))
    except (OSError, http.client.HTTPException) as exc:
        if expired.is_set() or time.monotonic() >= deadline:
            raise late from exc
        raise RequestFailed("unreachable", f"no reply from {where}: {type(exc).__name__}: {exc}") from exc
    finally:
        watchdog.cancel()
        conn.close()
