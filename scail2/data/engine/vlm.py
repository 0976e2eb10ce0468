"""VLM components over an OpenAI-compatible chat endpoint: captioner, Candidate Selector, Prompt Weaver, Quality
Checker, video filter, and the multi-reference image generator over an image-edit endpoint.

Each sends images as JPEG data URLs with a versioned instruction (``prompts/<version>/<name>.txt``) and parses the
answer strictly: the captioner wants non-empty text, the others one JSON object with typed fields
(``{"choice": int}``, ``{"prompt": str}``, ``{"pass": bool, "feedback": str}``, ``{"keep": bool, "reason": str}``).
A malformed answer is asked again (``attempts``); what still fails raises `EndpointError`, which the engine counts
by reason — a caption is never silently empty. Accepted answers are cached on disk (``cache_dir``) by the model,
the prompt version and digest, and the request's content, so a resumed run asks nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from scail2.data.engine.components import FilterRequest, Verdict
from scail2.data.engine.endpoints import ChatClient, EndpointError, ImageClient, image_part
from scail2.data.engine.clips import Clip

PROMPT_VERSION = "v1"
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def load_prompt(name: str, version: str = PROMPT_VERSION) -> str:
    """Text of ``scail2/data/engine/prompts/<version>/<name>.txt``."""
    root = resources.files("scail2.data.engine") / "prompts"
    path = root / version / f"{name}.txt"
    if not path.is_file():
        versions = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(f"engine prompt {version}/{name}.txt not found; available versions: {versions}")
    return path.read_text(encoding="utf-8").strip()


class AnswerCache:
    """Accepted answers on disk, one JSON file per request key (atomic writes)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> Any | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))["answer"]
        except (ValueError, KeyError) as exc:
            raise ValueError(f"answer cache entry {path} is unreadable ({exc}); delete it to ask again") from None

    def put(self, key: str, answer: Any, raw: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"answer": answer, "raw": raw}), encoding="utf-8")
        os.replace(tmp, path)


def parse_json_object(text: str, fields: dict[str, type]) -> dict[str, Any]:
    """The one JSON object of an answer (optionally in a ``json`` code fence) with ``fields`` of the given types."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        value = json.loads(body)
    except ValueError:
        raise EndpointError("garbage", f"answer is not one JSON object: {text[:200]!r}", transient=True) from None
    if not isinstance(value, dict):
        raise EndpointError("garbage", f"answer is JSON {type(value).__name__}, not an object: {text[:200]!r}", True)
    for name, kind in fields.items():
        v = value.get(name)
        ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
        if not ok:
            raise EndpointError("garbage", f"answer field {name!r} is {v!r}, need {kind.__name__}: {text[:200]!r}", True)
    return value


class VLMComponent:
    """Shared request logic: messages, the answer cache and re-asking on malformed answers."""

    name = ""

    def __init__(self, client: ChatClient, *, prompt_version: str = PROMPT_VERSION, cache_dir: str | None = None,
                 attempts: int = 3, max_tokens: int = 512, image_detail: str = "low", max_side: int = 768):  # fmt: skip
        if attempts < 1:
            raise ValueError(f"attempts {attempts} must be >= 1")
        self.client = client
        self.prompt_version = prompt_version
        self.cache = AnswerCache(cache_dir) if cache_dir else None
        self.attempts, self.max_tokens = int(attempts), int(max_tokens)
        self.image_detail, self.max_side = image_detail, int(max_side)

    def instruction(self, name: str | None = None, **values: Any) -> str:
        text = load_prompt(name or self.name, self.prompt_version)
        for key, value in values.items():
            text = text.replace("{" + key + "}", str(value))
        return text

    def images(self, images: Sequence[np.ndarray]) -> list[dict]:
        return [image_part(img, self.image_detail, self.max_side) for img in images]

    def ask(self, instruction: str, images: Sequence[np.ndarray], parse: Callable[[str], Any]) -> Any:
        messages = [{"role": "user", "content": [{"type": "text", "text": instruction}, *self.images(images)]}]
        key = hashlib.sha256(json.dumps({"model": getattr(self.client, "model", ""), "version": self.prompt_version,
                                         "messages": messages}, sort_keys=True).encode()).hexdigest()  # fmt: skip
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        error: EndpointError | None = None
        for _ in range(self.attempts):
            raw = self.client.chat(messages, max_tokens=self.max_tokens, temperature=0.0)
            try:
                answer = parse(raw)
            except EndpointError as exc:
                if exc.reason != "garbage":
                    raise
                error = exc
                continue
            if self.cache is not None:
                self.cache.put(key, answer, raw)
            return answer
        assert error is not None
        raise EndpointError("garbage", f"{self.name}: {error.detail} (asked {self.attempts} times)")


def sample_frames(frames: np.ndarray, count: int) -> list[np.ndarray]:
    """``count`` frames evenly spread over the clip (first and last included)."""
    n = len(frames)
    idx = sorted({int(round(i)) for i in np.linspace(0, n - 1, min(count, n))})
    return [frames[i] for i in idx]


class VLMCaptioner(VLMComponent):
    """A caption from ``frames`` evenly sampled frames. Empty answers and answers over ``max_chars`` are malformed."""

    name = "caption"

    def __init__(self, client: ChatClient, *, frames: int = 4, max_chars: int = 1500, **kwargs: Any):
        super().__init__(client, **kwargs)
        self.frames, self.max_chars = int(frames), int(max_chars)

    def _parse(self, text: str) -> str:
        caption = " ".join(text.strip().strip('"').split())
        if not caption:
            raise EndpointError("garbage", "empty caption", transient=True)
        if len(caption) > self.max_chars:
            raise EndpointError("garbage", f"caption of {len(caption)} characters (max {self.max_chars})", True)
        return caption

    def caption(self, clip: Clip) -> str:
        images = sample_frames(clip.frames, self.frames)
        return self.ask(self.instruction(count=len(images)), images, self._parse)


class VLMCandidateSelector(VLMComponent):
    name = "select"

    def select(self, posture: np.ndarray, candidates: Sequence[np.ndarray]) -> int:
        n = len(candidates)

        def parse(text: str) -> int:
            choice = parse_json_object(text, {"choice": int})["choice"]
            if not 0 <= choice < n:
                raise EndpointError("garbage", f"choice {choice} is not a candidate number 0..{n - 1}", True)
            return choice

        return self.ask(self.instruction(count=n, last=n - 1), [posture, *candidates], parse)


class VLMPromptWeaver(VLMComponent):
    name = "weave"

    def weave(self, character: np.ndarray, posture: np.ndarray, feedback: str | None = None,
              previous: str | None = None) -> str:  # fmt: skip
        def parse(text: str) -> str:
            prompt = parse_json_object(text, {"prompt": str})["prompt"].strip()
            if not prompt:
                raise EndpointError("garbage", "empty prompt", transient=True)
            return prompt

        if feedback is None:
            return self.ask(self.instruction(), [character, posture], parse)
        return self.ask(self.instruction("revise", previous=previous or "", feedback=feedback), [character, posture], parse)


class VLMQualityChecker(VLMComponent):
    name = "check"

    def check(self, image: np.ndarray, character: np.ndarray, posture: np.ndarray, prompt: str) -> Verdict:
        def parse(text: str) -> list:
            value = parse_json_object(text, {"pass": bool})
            feedback = value.get("feedback", "")
            if not isinstance(feedback, str):
                raise EndpointError("garbage", f"feedback is {feedback!r}, need a string", transient=True)
            return [value["pass"], feedback]

        ok, feedback = self.ask(self.instruction(prompt=prompt), [character, posture, image], parse)
        return Verdict(bool(ok), feedback)


class VLMVideoFilter(VLMComponent):
    """Keep or discard a synthetic video from ``frames`` evenly sampled frames and its reference image(s)."""

    name = "filter"

    def __init__(self, client: ChatClient, *, frames: int = 8, **kwargs: Any):
        super().__init__(client, **kwargs)
        self.frames = int(frames)

    def judge(self, request: FilterRequest) -> Verdict:
        def parse(text: str) -> list:
            value = parse_json_object(text, {"keep": bool})
            reason = value.get("reason", "")
            return [value["keep"], reason if isinstance(reason, str) else str(reason)]

        frames = sample_frames(request.frames, self.frames)
        text = self.instruction(mode=request.mode, refs=len(request.references), count=len(frames))
        keep, reason = self.ask(text, [*request.references, *frames], parse)
        return Verdict(bool(keep), reason)


class EndpointImageGenerator:
    """The multi-reference image generator over an image-edit endpoint (`OpenAIImageClient`). Endpoints take no
    seed; results are cached by (model, prompt, input images) when ``cache_dir`` is given, so a resumed run gets the
    same image back."""

    def __init__(self, client: ImageClient, *, cache_dir: str | None = None):
        self.client = client
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None

    def generate(self, prompt: str, images: Sequence[np.ndarray], seed: int) -> np.ndarray:
        from scail2.data.video import read_image, write_image

        digest = hashlib.sha256(json.dumps([getattr(self.client, "model", ""), prompt, seed]).encode())
        for img in images:
            digest.update(repr(img.shape).encode())
            digest.update(np.ascontiguousarray(img).tobytes())
        path = self.cache_dir / f"{digest.hexdigest()}.png" if self.cache_dir else None
        if path is not None and path.is_file():
            return read_image(path)
        image = self.client.edit(prompt, list(images))
        if path is not None:
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
            write_image(tmp, image)
            os.replace(tmp, path)  # a killed run never leaves a half-written entry
        return image
