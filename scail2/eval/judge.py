"""Video-Bench-style VLM judge: scores a generated video on 1-5 for four dimensions.

A chat-completions request per (video, dimension, repeat) goes to an OpenAI-compatible endpoint (OpenAI, or a
local vLLM server) with temperature 0. Frames are sent as low-detail JPEG data URLs, sampled as in Video-Bench:

- static dimensions (Imaging Quality, Appearance Consistency): every ``int(fps / 2)``-th frame plus the last
  frame, one image each;
- dynamic dimensions (Motion Smoothness, Temporal Consistency): every ``int(fps / 8)``-th frame, tiled into
  1x8 grids (left to right = forward in time).

The system prompt, the frame captions and the answer format come from versioned text files
(``scail2/eval/prompts/<version>/``). The score is read strictly in the format the prompt asks for: one line
``<Dimension title>: <integer 1-5>`` (``Imaging Quality: 4``); "4.5", "2/10", a number elsewhere in the text or
a refusal is a malformed reply. Malformed replies and transient HTTP errors are retried with exponential
back-off, and what still fails is reported as a failure, never guessed. Answers are cached on disk by (video
hash, prompt version and digest, judge model, dimension, repeat index, image settings) and every raw reply is
kept.

Requests: the API key is sent to ``base_url``'s origin only, and redirects are not followed (a redirect is
reported as a failure naming where it pointed); every request has a total deadline (``timeout_s``: connecting,
sending and reading the whole reply, not only each read), and replies are at most `MAX_REPLY_BYTES`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import math
import os
import re
import statistics
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from scail2.utils.http import RequestFailed, parse_url, post

Sampling = Literal["static", "dynamic"]
SCORE_RANGE = (1, 5)
GRID_FRAMES = 8
MAX_REPLY_BYTES = 4 * 2**20  # a chat reply of max_tokens tokens is a few KB; more is not a judge's answer
_REDIRECTS = range(300, 400)


@dataclass(frozen=True)
class Dimension:
    name: str  # prompt file stem and result key
    title: str
    sampling: Sampling


DIMENSIONS: tuple[Dimension, ...] = (
    Dimension("imaging_quality", "Imaging Quality", "static"),
    Dimension("motion_smoothness", "Motion Smoothness", "dynamic"),
    Dimension("temporal_consistency", "Temporal Consistency", "dynamic"),
    Dimension("appearance_consistency", "Appearance Consistency", "static"),
)


def dimension(name: str) -> Dimension:
    for d in DIMENSIONS:
        if d.name == name:
            return d
    raise ValueError(f"unknown judge dimension {name!r}; use one of {[d.name for d in DIMENSIONS]}")


@dataclass(frozen=True)
class JudgeConfig:
    """Where the judge runs and how it is asked. ``model`` is the served model name."""

    model: str
    base_url: str = "http://127.0.0.1:8000/v1"  # a local vLLM server; OpenAI: https://api.openai.com/v1
    api_key: str | None = None  # None: read the variable named by api_key_env when a request is made
    api_key_env: str = "OPENAI_API_KEY"
    prompt_version: str = "v1"
    repeats: int = 1  # k independent answers per (video, dimension); mean and std are over these
    max_attempts: int = 4  # per answer: first try plus retries on malformed replies and transient errors
    backoff_s: float = 2.0  # wait backoff_s * 2**(attempt - 1) before the next attempt
    timeout_s: float = 120.0  # total deadline of one request: connecting, sending and reading the whole reply
    max_tokens: int = 128
    image_detail: str = "low"
    max_image_side: int = 1024  # every image (frame or 1x8 grid) is downscaled to fit this
    jpeg_quality: int = 85
    cache_dir: str | None = None  # None disables the answer cache


@dataclass(frozen=True)
class JudgeAnswer:
    repeat: int
    score: int | None  # None when every attempt failed
    raw: str | None  # the last reply text (None if no reply arrived)
    attempts: int  # requests made for this answer (0 when served from the cache)
    cached: bool
    error: str | None = None


@dataclass(frozen=True)
class DimensionScore:
    dimension: str
    scores: tuple[int, ...]
    answers: tuple[JudgeAnswer, ...] = field(repr=False)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores) if self.scores else math.nan

    @property
    def std(self) -> float:
        """Population standard deviation over the repeats (0 for a single answer)."""
        return statistics.pstdev(self.scores) if self.scores else math.nan

    @property
    def failures(self) -> tuple[JudgeAnswer, ...]:
        return tuple(a for a in self.answers if a.score is None)


# ---------------------------------------------------------------------------------------------------------
# Prompts, sampling, images
# ---------------------------------------------------------------------------------------------------------


def load_prompt(version: str, name: str) -> str:
    """Text of ``prompts/<version>/<name>.txt`` shipped with the package."""
    root = resources.files("scail2.eval") / "prompts"
    path = root / version / f"{name}.txt"
    if not path.is_file():
        versions = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(f"judge prompt {version}/{name}.txt not found; available versions: {versions}")
    return path.read_text(encoding="utf-8").strip()


def parse_score(text: str, title: str) -> int | None:
    """The score of a reply in the requested format, else None (a malformed answer).

    The reply must hold exactly one line ``<title>: <integer>`` (the title case-insensitive, markdown bold
    around the title or the line tolerated, a final full stop allowed) and that integer must lie in 1..5.
    Anything else ("4.5", "2/10", "4 out of 5", a score under another name, two score lines, a refusal) is
    malformed: a number is never guessed from free text.
    """
    if not isinstance(text, str):
        return None
    line = re.compile(
        rf"^\s*(?:\*\*)?\s*{re.escape(title)}\s*(?:\*\*)?\s*:\s*(?:\*\*)?\s*(\d+)\s*(?:\*\*)?\s*\.?\s*$",
        re.IGNORECASE | re.MULTILINE,
    )
    matches = line.findall(text)
    mentions = re.findall(rf"^\W*{re.escape(title)}\W*:", text, re.IGNORECASE | re.MULTILINE)
    if len(matches) != 1 or len(mentions) != 1:
        return None
    score = int(matches[0])
    return score if SCORE_RANGE[0] <= score <= SCORE_RANGE[1] else None


def static_frame_indices(num_frames: int, fps: float) -> list[int]:
    """Every ``int(fps / 2)``-th frame (about 2 per second) plus the last frame."""
    step = max(1, int(fps / 2))
    indices = list(range(0, num_frames, step))
    if indices[-1] != num_frames - 1:
        indices.append(num_frames - 1)
    return indices


def dynamic_frame_groups(num_frames: int, fps: float) -> list[list[int]]:
    """Every ``int(fps / 8)``-th frame, in consecutive groups of 8 (one 1x8 grid each).

    A short last group is replaced by the last 8 sampled frames, so every grid has 8 cells and no sampled
    frame is dropped; with fewer than 8 sampled frames there is one shorter grid.
    """
    step = max(1, int(fps / 8))
    indices = list(range(0, num_frames, step))
    groups = [indices[i : i + GRID_FRAMES] for i in range(0, len(indices), GRID_FRAMES)]
    if len(groups) > 1 and len(groups[-1]) < GRID_FRAMES:
        groups[-1] = indices[-GRID_FRAMES:]
    return groups


def _to_pil(frame: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> RGB image."""
    array = (frame.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def tile_row(frames: Sequence[Image.Image]) -> Image.Image:
    """Frames side by side, left to right."""
    width, height = frames[0].size
    grid = Image.new("RGB", (width * len(frames), height))
    for k, frame in enumerate(frames):
        grid.paste(frame, (k * width, 0))
    return grid


def image_data_url(image: Image.Image, max_side: int, quality: int) -> str:
    """JPEG data URL, downscaled (bicubic) so the longer side is at most ``max_side``."""
    if max(image.size) > max_side:
        ratio = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * ratio)), max(1, round(image.height * ratio))), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _check_video(video: torch.Tensor, name: str = "video") -> torch.Tensor:
    if not isinstance(video, torch.Tensor) or video.ndim != 4 or video.shape[1] != 3:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"{name} has shape {shape}; the judge takes one video (T, 3, H, W) in [0, 1]")
    if not video.is_floating_point() or video.min() < 0 or video.max() > 1:
        raise ValueError(f"{name} must be float in [0, 1] (uint8 frames: divide by 255)")
    return video


def video_hash(video: torch.Tensor, fps: float, context: Sequence[torch.Tensor] = ()) -> str:
    """SHA-256 of the 8-bit frames, shape and fps, plus the first frames of the context videos."""
    digest = hashlib.sha256()
    for v in (video, *[c[:1] for c in context]):
        frames = (v.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
        digest.update(repr(tuple(frames.shape)).encode())
        digest.update(frames.numpy().tobytes())
    digest.update(f"fps={fps!r}".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# The judge
# ---------------------------------------------------------------------------------------------------------


class _Transient(Exception):
    """A failure worth retrying (5xx, 429, timeouts, connection errors, unreadable replies)."""


class _Fatal(Exception):
    """A failure retrying cannot fix (400, 401, 403, 404, ...)."""


class VideoJudge:
    """Scores videos through an OpenAI-compatible chat-completions endpoint.

    ``sleep`` is called with the back-off delay before each retry (inject a no-op in tests).
    """

    def __init__(self, config: JudgeConfig, *, sleep: Callable[[float], None] = time.sleep) -> None:
        if config.repeats < 1 or config.max_attempts < 1:
            raise ValueError(f"repeats ({config.repeats}) and max_attempts ({config.max_attempts}) must be >= 1")
        if not (isinstance(config.timeout_s, (int, float)) and math.isfinite(config.timeout_s) and config.timeout_s > 0):
            raise ValueError(f"timeout_s is {config.timeout_s!r}; need a finite number of seconds > 0 (120 by default)")
        if not (math.isfinite(config.backoff_s) and config.backoff_s >= 0):
            raise ValueError(f"backoff_s is {config.backoff_s!r}; need a finite number of seconds >= 0")
        self._url = _endpoint(config.base_url)
        self.config = config
        self._sleep = sleep

    # -- requests ----------------------------------------------------------------------------------------

    def _prompt_files(self, dim: Dimension, with_context: bool) -> dict[str, str]:
        names = [dim.name, f"frames_{dim.sampling}"] + (["context"] if with_context else [])
        return {n: load_prompt(self.config.prompt_version, n) for n in names}

    def prompt_digest(self, dim: Dimension, with_context: bool) -> str:
        """SHA-256 of the prompt texts a request uses (part of the cache key, beside the version name)."""
        texts = self._prompt_files(dim, with_context)
        return hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest()

    def build_messages(
        self, video: torch.Tensor, fps: float, dim: Dimension, context: Sequence[torch.Tensor] = ()
    ) -> list[dict]:
        """The chat messages of one request: the dimension prompt as system message, captions and images."""
        cfg = self.config
        texts = self._prompt_files(dim, bool(context))

        def image_part(image: Image.Image) -> dict:
            url = image_data_url(image, cfg.max_image_side, cfg.jpeg_quality)
            return {"type": "image_url", "image_url": {"url": url, "detail": cfg.image_detail}}

        content: list[dict] = []
        if context:
            content.append({"type": "text", "text": texts["context"].replace("{count}", str(len(context)))})
            content += [image_part(_to_pil(c[0])) for c in context]
        if dim.sampling == "static":
            images = [_to_pil(video[i]) for i in static_frame_indices(video.shape[0], fps)]
        else:
            groups = dynamic_frame_groups(video.shape[0], fps)
            images = [tile_row([_to_pil(video[i]) for i in group]) for group in groups]
        content.append({"type": "text", "text": texts[f"frames_{dim.sampling}"].replace("{count}", str(len(images)))})
        content += [image_part(image) for image in images]
        return [{"role": "system", "content": texts[dim.name]}, {"role": "user", "content": content}]

    def _post(self, body: dict) -> str:
        cfg = self.config
        headers = {"Content-Type": "application/json"}
        api_key = cfg.api_key if cfg.api_key is not None else os.environ.get(cfg.api_key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        try:
            reply = post(self._url, json.dumps(body).encode(), headers, cfg.timeout_s, MAX_REPLY_BYTES)
        except RequestFailed as exc:
            raise _Transient(f"{exc} (timeout_s={cfg.timeout_s:g})" if exc.reason == "timeout" else str(exc)) from exc
        status, location, payload = reply.status, reply.location, reply.body
        url = self._url.geturl()
        if status in _REDIRECTS:
            raise _Fatal(
                f"HTTP {status} from {url} redirects to {location!r}; the judge follows no redirect (its key goes to "
                "base_url's origin only): set judge.base_url to the address that answers"
            )
        if status >= 400 or status < 200:
            detail = payload[:300].decode("utf-8", "replace")
            message = f"HTTP {status} from {url}: {detail}"
            if status in (408, 409, 429) or status >= 500:
                raise _Transient(message)
            raise _Fatal(message)
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise _Transient(f"unreadable reply {payload[:200]!r}") from exc
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        if not isinstance(content, str):
            raise _Transient(f"reply content is {type(content).__name__}, not text")
        return content

    # -- cache -------------------------------------------------------------------------------------------

    def _cache_path(self, key: Mapping) -> Path | None:
        if self.config.cache_dir is None:
            return None
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return Path(self.config.cache_dir).expanduser() / f"{name}.json"

    @staticmethod
    def _read_cache(path: Path | None, repeat: int, title: str) -> JudgeAnswer | None:
        if path is None or not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"judge cache entry {str(path)!r} is not valid JSON ({exc}); delete it to re-ask") from exc
        score = parse_score(record.get("raw", ""), title) if isinstance(record, dict) else None
        if score is None:
            return None  # an entry that no longer parses is ignored and re-asked
        return JudgeAnswer(repeat=repeat, score=score, raw=record["raw"], attempts=0, cached=True)

    @staticmethod
    def _write_cache(path: Path | None, key: Mapping, raw: str, score: int) -> None:
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        record = {"key": dict(key), "raw": raw, "score": score, "created": time.time()}
        tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written entry

    # -- scoring -----------------------------------------------------------------------------------------

    def _answer(self, make_body: Callable[[], dict], key: Mapping, repeat: int, title: str) -> JudgeAnswer:
        path = self._cache_path(key)
        cached = self._read_cache(path, repeat, title)
        if cached is not None:
            return cached
        body = make_body()
        cfg = self.config
        raw: str | None = None
        error = ""
        for attempt in range(1, cfg.max_attempts + 1):
            try:
                raw = self._post(body)
            except _Fatal as exc:
                return JudgeAnswer(repeat, None, raw, attempt, False, str(exc))
            except _Transient as exc:
                error = str(exc)
            else:
                score = parse_score(raw, title)
                if score is not None:
                    self._write_cache(path, key, raw, score)
                    return JudgeAnswer(repeat, score, raw, attempt, False)
                error = f"malformed answer (no line '{title}: <1-5>'): {raw[:200]!r}"
            if attempt < cfg.max_attempts:
                self._sleep(cfg.backoff_s * 2 ** (attempt - 1))
        return JudgeAnswer(repeat, None, raw, cfg.max_attempts, False, f"gave up after {cfg.max_attempts} attempts: {error}")

    def score(
        self,
        video: torch.Tensor,
        fps: float,
        dimensions: Sequence[str] | None = None,
        *,
        context: Sequence[torch.Tensor] = (),
    ) -> dict[str, DimensionScore]:
        """Score one video (T, 3, H, W) in [0, 1] at ``fps`` on each dimension (default: all four).

        ``context``: videos of the same case from other methods; their first frames are shown unscored
        before the video (Video-Bench's few-shot setting) and are part of the cache key.
        """
        video = _check_video(video)
        for k, c in enumerate(context):
            _check_video(c, f"context[{k}]")
        if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps is {fps}; pass the video's frame rate, a finite number > 0 (e.g. 16)")
        cfg = self.config
        vhash = video_hash(video, fps, context)
        results: dict[str, DimensionScore] = {}
        for name in dimensions or [d.name for d in DIMENSIONS]:
            dim = dimension(name)
            digest = self.prompt_digest(dim, bool(context))

            @functools.cache
            def make_body() -> dict:
                # Built on the first cache miss only (encoding the images is most of a cached call's cost);
                # every call happens within this iteration, so `dim` is the current dimension.
                messages = self.build_messages(video, fps, dim, context)  # noqa: B023
                return {"model": cfg.model, "messages": messages, "temperature": 0, "max_tokens": cfg.max_tokens}

            answers = []
            for repeat in range(cfg.repeats):
                key = {
                    "video": vhash,
                    "prompt_version": cfg.prompt_version,
                    "prompt_sha256": digest,
                    "model": cfg.model,
                    "dimension": dim.name,
                    "repeat": repeat,
                    "images": [cfg.image_detail, cfg.max_image_side, cfg.jpeg_quality],
                }
                answers.append(self._answer(make_body, key, repeat, dim.title))
            scores = tuple(a.score for a in answers if a.score is not None)
            results[dim.name] = DimensionScore(dim.name, scores, tuple(answers))
        return results


def _endpoint(base_url: str) -> urllib.parse.SplitResult:
    """The chat-completions URL of ``base_url`` (an http(s) URL with a host and no credentials)."""
    return parse_url(str(base_url).rstrip("/") + "/chat/completions", "judge base_url")


def aggregate(results: Sequence[Mapping[str, DimensionScore]]) -> dict[str, dict[str, float]]:
    """Benchmark-level numbers: per dimension, the mean over videos of each video's mean score.

    Returns ``{dimension: {"mean", "std", "videos", "failed_answers"}}``; ``std`` is over videos, and videos
    whose answers all failed are left out of the mean (and counted in ``failed_answers``).
    """
    table: dict[str, dict[str, float]] = {}
    names = dict.fromkeys(name for r in results for name in r)
    for name in names:
        per_video = [r[name].mean for r in results if name in r and r[name].scores]
        failed = sum(len(r[name].failures) for r in results if name in r)
        table[name] = {
            "mean": statistics.fmean(per_video) if per_video else math.nan,
            "std": statistics.pstdev(per_video) if per_video else math.nan,
            "videos": len(per_video),
            "failed_answers": failed,
        }
    return table


def answers_as_records(results: Mapping[str, DimensionScore]) -> list[dict]:
    """Every raw answer as a JSON-ready dict (dimension, repeat, score, raw, attempts, cached, error)."""
    return [{"dimension": name, **asdict(a)} for name, r in results.items() for a in r.answers]
