"""The study's web server: one page per rater link, the media of the rater's cases, answers into SQLite.

Standard library only (``ThreadingHTTPServer``). Routes::

    GET  /                                  a note to open the link one was given (lists nothing)
    GET  /favicon.ico                       204 (no icon)
    GET  /static/study.js | study.css       the page's script and style (from the package, held in memory)
    GET  /r/<token>/                        the study page of the rater with that token
    GET  /r/<token>/api/study               the rater's cases (in the rater's order), metrics and own answers
    POST /r/<token>/api/answer              {"position": int, "metric": str, "answer": "left"|"same"|"right"}
    GET  /r/<token>/media/<position>/<role> role = reference | driving | left | right (byte ranges supported)

No part of a URL is ever used as a file path: media are looked up by (position, role) in the rater's plan and the
manifest, whose files were checked to lie inside the study folder when it was loaded; anything else is 404. A
rater's requests only see the rater's own answers. Bad requests get a 4xx answer and the server goes on.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from scail2.bench.gsb import COLUMN_HELP
from scail2.bench.study import (
    ROLES,
    SHOWN_ANSWERS,
    AnswerStore,
    Rater,
    Slot,
    Study,
    StudyError,
    StudyPair,
    rater_plan,
)

log = logging.getLogger(__name__)

MAX_BODY = 4096  # bytes of a POST body; an answer is ~80
CHUNK = 256 * 1024
_ASSETS = {"study.js": "application/javascript; charset=utf-8", "study.css": "text/css; charset=utf-8"}
_MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
                ".mp4": "video/mp4", ".webm": "video/webm"}  # fmt: skip
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")
_POSITION = re.compile(r"[0-9]{1,9}")
_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the token is in the URL: never send it to another site
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; media-src 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
}
_LANDING = (
    "<!doctype html><meta charset='utf-8'><title>Study</title><p>This is a Good/Same/Bad study server. "
    "Open the personal link you were given (it looks like <code>/r/…/</code>).</p>"
)
KIND_NOTES = {
    "single": "single character",
    "multi": "several characters",
    "replacement": "character replacement",
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _RaterView:
    """What one rater's requests may reach: the rater, the plan, and the study."""

    def __init__(self, rater: Rater, study: Study) -> None:
        self.rater = rater
        self.slots: list[Slot] = rater_plan((p.pair for p in study.pairs), rater.seed)
        self.pairs: dict[str, StudyPair] = {p.pair: p for p in study.pairs}

    def case(self, slot: Slot, base: str, answers: dict[str, str]) -> dict[str, Any]:
        pair = self.pairs[slot.pair]
        return {
            "position": slot.position,
            "kind": pair.kind,
            "kind_note": KIND_NOTES[pair.kind],
            "fps": pair.fps,
            "frames": pair.frames,
            "columns": [{"name": c, "help": COLUMN_HELP[c]} for c in pair.columns],
            "media": {role: f"{base}/media/{slot.position}/{role}" for role in ROLES},
            "answers": answers,
        }


class StudyApp:
    """The study's state shared by the server's threads: the study, the answer store and the rater views."""

    def __init__(self, study: Study, store: AnswerStore) -> None:
        self.study = study
        self.store = store
        self.views = {r.token: _RaterView(r, study) for r in store.raters()}
        assets = files("scail2.bench") / "study_page"
        self.page = (assets / "index.html").read_bytes()
        self.assets = {name: (assets / name).read_bytes() for name in _ASSETS}

    def view(self, token: str) -> _RaterView | None:
        return self.views.get(token) if _TOKEN.fullmatch(token) else None

    def state(self, view: _RaterView) -> dict[str, Any]:
        base = f"/r/{view.rater.token}"
        answers: dict[str, dict[str, str]] = {}
        for (_, pair, metric), a in self.store.latest(view.rater.rater).items():
            answers.setdefault(pair, {})[metric] = a.answer
        cases = [view.case(s, base, answers.get(s.pair, {})) for s in view.slots]
        return {"rater": view.rater.rater, "cases": cases, **self.progress(view, answers)}

    def progress(self, view: _RaterView, answers: dict[str, dict[str, str]] | None = None) -> dict[str, int]:
        if answers is None:
            answers = {}
            for (_, pair, metric), a in self.store.latest(view.rater.rater).items():
                answers.setdefault(pair, {})[metric] = a.answer
        complete = sum(1 for s in view.slots if set(view.pairs[s.pair].columns) <= set(answers.get(s.pair, {})))
        return {"total": len(view.slots), "complete": complete}

    def answer(self, view: _RaterView, body: Any) -> dict[str, Any]:
        """Store one answer; raises StudyError (-> 400) on anything that is not a valid answer of this rater."""
        if not isinstance(body, dict) or set(body) != {"position", "metric", "answer"}:
            raise StudyError('send a JSON object {"position": int, "metric": str, "answer": "left"|"same"|"right"}')
        position, metric, answer = body["position"], body["metric"], body["answer"]
        if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < len(view.slots):
            raise StudyError(f"position {position!r} is not a case of this study (0..{len(view.slots) - 1})")
        slot = view.slots[position]
        if not isinstance(metric, str) or metric not in view.pairs[slot.pair].columns:
            raise StudyError(f"metric {metric!r} does not apply to case {position + 1}")
        if answer not in SHOWN_ANSWERS:
            raise StudyError(f"answer {answer!r}; use one of {list(SHOWN_ANSWERS)}")
        saved = self.store.record(view.rater.rater, slot.pair, metric, answer, slot.left)
        return {"saved": True, "time": saved.time, **self.progress(view)}

    def media(self, view: _RaterView, position: str, role: str) -> Path | None:
        if not _POSITION.fullmatch(position) or role not in ROLES:
            return None
        index = int(position)
        if index >= len(view.slots):
            return None
        slot = view.slots[index]
        return view.pairs[slot.pair].media[slot.video(role)]


class _Handler(BaseHTTPRequestHandler):
    server_version = "scail2-study"
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # answer even a malformed request line with a status line (no HTTP/0.9)
    timeout = 60  # seconds a silent connection is kept open
    server: "StudyServer"

    # ---------------------------------------------------------------- plumbing

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {**_HEADERS, **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, record: Any) -> None:
        self._send(status, json.dumps(record).encode(), "application/json", {"Cache-Control": "no-store"})

    def _error(self, status: HTTPStatus, message: str, close: bool = False) -> None:
        if close:
            self.close_connection = True
        self._send(status, json.dumps({"error": message}).encode(), "application/json",
                   {"Cache-Control": "no-store", **({"Connection": "close"} if close else {})})  # fmt: skip

    def _route(self) -> tuple[str, list[str]] | None:
        """('landing' | 'static' | 'rater', segments) or None (-> 404)."""
        target = self.path
        if not target.startswith("/"):
            return None
        path = urlsplit(target).path
        if path == "/":
            return "landing", []
        if path == "/favicon.ico":
            return "icon", []
        parts = path.split("/")[1:]
        if len(parts) == 2 and parts[0] == "static":
            return "static", parts[1:]
        if len(parts) >= 2 and parts[0] == "r":
            return "rater", parts[1:]
        return None

    def _guarded(self, method) -> None:
        try:
            method()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the browser went away (media requests are often cancelled)
        except Exception:
            log.exception("error while answering %s %s", self.command, self.path)
            self.close_connection = True
            try:
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; the server goes on", close=True)
            except OSError:
                pass

    # ---------------------------------------------------------------- methods

    def do_GET(self) -> None:
        self._guarded(self._get)

    def do_HEAD(self) -> None:
        self._guarded(self._get)

    def do_POST(self) -> None:
        self._guarded(self._post)

    def _get(self) -> None:
        app = self.server.app
        route = self._route()
        if route is None:
            return self._error(HTTPStatus.NOT_FOUND, "not found")
        kind, parts = route
        if kind == "landing":
            return self._send(HTTPStatus.OK, _LANDING.encode(), "text/html; charset=utf-8")
        if kind == "icon":
            return self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        if kind == "static":
            name = parts[0]
            if name not in app.assets:
                return self._error(HTTPStatus.NOT_FOUND, "not found")
            return self._send(HTTPStatus.OK, app.assets[name], _ASSETS[name], {"Cache-Control": "no-cache"})
        view = app.view(parts[0])
        if view is None:
            return self._error(HTTPStatus.NOT_FOUND, "unknown rater link; ask for your personal link")
        rest = parts[1:]
        if rest in ([], [""]):
            return self._send(HTTPStatus.OK, app.page, "text/html; charset=utf-8", {"Cache-Control": "no-store"})
        if rest == ["api", "study"]:
            return self._json(HTTPStatus.OK, app.state(view))
        if len(rest) == 3 and rest[0] == "media":
            path = app.media(view, rest[1], rest[2])
            if path is None:
                return self._error(HTTPStatus.NOT_FOUND, "not found")
            return self._file(path)
        return self._error(HTTPStatus.NOT_FOUND, "not found")

    def _post(self) -> None:
        app = self.server.app
        route = self._route()
        view = app.view(route[1][0]) if route and route[0] == "rater" else None
        if view is None or route[1][1:] != ["api", "answer"]:
            return self._error(HTTPStatus.NOT_FOUND, "not found", close=True)
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._error(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length", close=True)
        length = self.headers.get("Content-Length")
        if length is None:
            return self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required", close=True)
        if not re.fullmatch(r"[0-9]{1,12}", length):
            return self._error(HTTPStatus.BAD_REQUEST, f"Content-Length {length!r} is not a size", close=True)
        if int(length) > MAX_BODY:
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY} bytes", close=True)
        body = self.rfile.read(int(length))
        if len(body) < int(length):
            self.close_connection = True  # the client sent less than it announced and went away
            return None
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send Content-Type: application/json")
        try:
            record = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            return self._error(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {exc}")
        try:
            result = app.answer(view, record)
        except StudyError as exc:
            return self._error(HTTPStatus.BAD_REQUEST, str(exc))
        return self._json(HTTPStatus.OK, result)

    def _file(self, path: Path) -> None:
        size = path.stat().st_size
        content_type = _MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
        start, end, status = 0, size - 1, HTTPStatus.OK
        headers = {"Accept-Ranges": "bytes", "Cache-Control": "no-cache"}
        wanted = _byte_range(self.headers.get("Range"), size)
        if wanted == "unsatisfiable":
            self._send(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, b"", "text/plain",
                       {"Content-Range": f"bytes */{size}"})  # fmt: skip
            return
        if wanted is not None:
            start, end = wanted
            status = HTTPStatus.PARTIAL_CONTENT
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1
        self.send_response(status)
        for name, value in {**_HEADERS, **headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            return
        with path.open("rb") as handle:
            handle.seek(start)
            left = length
            while left > 0:
                chunk = handle.read(min(CHUNK, left))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)


def _byte_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """(first, last) byte of a ``Range: bytes=...`` header, "unsatisfiable", or None to send the whole file.

    A header that is not one valid byte range (several ranges, other units, last < first) is ignored, as HTTP
    allows; a valid one that starts past the end, or asks for the last 0 bytes, is unsatisfiable.
    """
    match = _RANGE.fullmatch(header.strip()) if header is not None else None
    if match is None or not (match[1] or match[2]):
        return None
    if not match[1]:  # bytes=-N: the last N bytes
        n = int(match[2])
        return (max(0, size - n), size - 1) if n > 0 and size > 0 else "unsatisfiable"
    first = int(match[1])
    if match[2] and int(match[2]) < first:
        return None
    if first >= size:
        return "unsatisfiable"
    return first, min(int(match[2]), size - 1) if match[2] else size - 1


class StudyServer(ThreadingHTTPServer):
    """``StudyServer(app, host, port)``; ``serve_forever()`` until ``shutdown()``. Port 0 picks a free one."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, app: StudyApp, host: str = "127.0.0.1", port: int = 8765) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.app = app
        super().__init__((host, port), _Handler)

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}"

    def rater_url(self, rater: Rater) -> str:
        return f"{self.base_url}/r/{rater.token}/"

    def handle_error(self, request, client_address) -> None:
        # A connection that broke outside a handler method (e.g. while the request line was read): log, go on.
        log.debug("connection from %s failed", client_address, exc_info=True)
