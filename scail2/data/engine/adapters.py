"""Adapters that put real models behind the engine's interfaces: user commands, HTTP endpoints, our own pipeline.

Commands are argument lists (or one string, split like a shell would, without a shell) with placeholders
replaced per call; every command runs in its own process group with a timeout, and on timeout the whole group is
killed. Files go through a temporary folder removed afterwards:

| adapter | placeholders | the command writes |
|---|---|---|
| `CommandSegmenter` | {video} {frames_dir} {fps} {output} | {output}: ``.npz`` with ``masks`` (K, F, H, W) bool/0-1 |
| `CommandKeypoints` | {video} {frames_dir} {fps} {output} | {output}: ``.npz`` with ``keypoints`` (P, F, J, 2) pixels, NaN = undetected, optional ``scores`` (P, F, J) |
| `CommandAnimator` | {reference} {pose} {pose_mask} {prompt_file} {seed} {fps} {frames} {height} {width} {output} {output_masks} | {output}: the video; optionally {output_masks} ``.npz`` ``masks`` |
| `CommandReplacer` | {video} {mask} {reference} {prompt_file} {seed} {fps} {output} {output_masks} | same |
| `CommandOCR` | {video} {frames_dir} {fps} {output} | {output}: JSON, per frame a list of [x0, y0, x1, y1] |

{video}, {pose}, {pose_mask} and {mask} are RGB-lossless ``.mp4`` files ({mask}: white inside); {frames_dir} holds
``00000.png`` ... (written only when the placeholder is used). ``.npz`` files are read without pickle.

HTTP adapters POST JSON to a URL (`scail2.data.engine.endpoints.JSONEndpoint`: bounded, retried, redirects
refused): ``{"frames": [PNG base64, ...], "fps": f, "height": h, "width": w, ...}``, answered with
``{"masks": [[PNG base64 per frame] per character]}`` (`HTTPSegmenter`, a pixel is inside when its grey value is
above 127) or ``{"keypoints": [[[[x, y] or null per joint] per frame] per person]}`` (`HTTPKeypoints`).
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scail2.data.engine.components import AnimationRequest, ComponentError, PoolImage, ReplacementRequest
from scail2.data.engine.endpoints import EndpointError, JSONEndpoint, b64decode_strict, decode_image, encode_image
from scail2.data.engine.masks import binding_order, mode_masks
from scail2.data.engine.pose import layout_by_name, render_poses
from scail2.data.manifest import BoxTrack
from scail2.data.engine.clips import Clip, GeneratedVideo, PoseTrack, Reference
from scail2.data.video import IMAGE_SUFFIXES, VideoDecodeError, read_image, read_video, write_image, write_video

# --------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------


def _argv(command: str | Sequence[str]) -> list[str]:
    argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    if not argv:
        raise ValueError("empty command; give the program and its arguments, e.g. ['python', 'sam2_masks.py', '{video}', '{output}']")
    return argv


def run_command(argv: Sequence[str], values: dict[str, str], timeout_s: float, what: str, cwd: str | None = None) -> None:
    """Run ``argv`` with ``{name}`` placeholders replaced; raise `ComponentError` (timeout | failed) on failure."""
    args = []
    for arg in argv:
        for key, value in values.items():
            arg = arg.replace("{" + key + "}", value)
        args.append(arg)
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, cwd=cwd)  # fmt: skip
    except OSError as exc:
        raise ComponentError("failed", f"{what}: cannot start {args[0]!r}: {exc}") from None
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the command's own process group, children included
        except ProcessLookupError:
            pass
        proc.communicate()
        raise ComponentError("timeout", f"{what}: {args[0]} ran past {timeout_s:g} s and was killed") from None
    if proc.returncode != 0:
        tail = err.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise ComponentError("failed", f"{what}: {args[0]} exited with {proc.returncode}: {' | '.join(tail)}")


def _load_npz(path: Path, key: str, what: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ComponentError("bad_output", f"{what}: the command wrote no {path.name}")
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {k: data[k] for k in data.files}
    except (ValueError, OSError) as exc:
        raise ComponentError("bad_output", f"{what}: {path.name} is not a readable .npz ({exc})") from None
    if key not in out:
        raise ComponentError("bad_output", f"{what}: {path.name} has no {key!r} array (has {sorted(out)})")
    return out


class _VideoCommand:
    """Writes the clip for the command into a temporary folder, runs it, and hands the output path to ``read``."""

    what = "command"

    def __init__(self, command: str | Sequence[str], *, timeout_s: float = 600.0, cwd: str | None = None):
        self.argv = _argv(command)
        self.timeout_s = float(timeout_s)
        self.cwd = cwd

    def _call(self, clip: Clip, output_name: str, read):
        import shutil

        tmp = Path(tempfile.mkdtemp(prefix="scail2-engine-"))
        try:
            values = {"video": str(tmp / "clip.mp4"), "fps": f"{clip.fps:g}", "output": str(tmp / output_name),
                      "frames_dir": str(tmp / "frames")}  # fmt: skip
            write_video(values["video"], clip.frames, clip.fps, lossless=True)
            if any("{frames_dir}" in a for a in self.argv):
                for i, frame in enumerate(clip.frames):
                    write_image(tmp / "frames" / f"{i:05d}.png", frame)
            run_command(self.argv, values, self.timeout_s, f"{self.what} {clip.id}", self.cwd)
            return read(tmp / output_name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class CommandSegmenter(_VideoCommand):
    """Per-character masks from a user command (e.g. a SAM 2 / SAM 3 video predictor script)."""

    what = "segmenter"

    def segment(self, video: Clip) -> np.ndarray:
        out = self._call(video, "masks.npz", lambda path: _load_npz(path, "masks", f"segmenter {video.id}")["masks"])
        return np.asarray(out) != 0


class CommandKeypoints(_VideoCommand):
    """2-D keypoints from a user command. layout: the keypoint layout name (`scail2.data.engine.pose.LAYOUTS`);
    min_score: keypoints whose ``scores`` are below it become NaN (when the command writes scores)."""

    what = "keypoints"

    def __init__(self, command: str | Sequence[str], *, layout: str = "coco_wholebody", min_score: float = 0.3, **kwargs: Any):
        super().__init__(command, **kwargs)
        self.layout = layout_by_name(layout)
        self.min_score = float(min_score)

    def estimate(self, video: Clip) -> PoseTrack:
        data = self._call(video, "keypoints.npz", lambda path: _load_npz(path, "keypoints", f"keypoints {video.id}"))
        return _track(data["keypoints"], data.get("scores"), self.min_score, self.layout, video)


def _track(keypoints: Any, scores: Any, min_score: float, layout, video: Clip) -> PoseTrack:
    kp = np.asarray(keypoints, dtype=np.float64)
    f, h, w = video.frames.shape[:3]
    if kp.ndim != 4 or kp.shape[1:] != (f, len(layout.joints), 2):
        raise ComponentError("bad_output", f"keypoints {video.id}: shape {kp.shape}, need (P, {f}, {len(layout.joints)}, 2)")
    if scores is not None:
        s = np.asarray(scores, dtype=np.float64)
        if s.shape != kp.shape[:3]:
            raise ComponentError("bad_output", f"keypoints {video.id}: scores shape {s.shape}, need {kp.shape[:3]}")
        kp = np.where((s >= min_score)[..., None], kp, np.nan)
    return PoseTrack(kp, layout, h, w, video.fps)


class CommandOCR(_VideoCommand):
    """Text regions from a user command (JSON: per frame a list of [x0, y0, x1, y1] boxes)."""

    what = "ocr"

    def detect(self, clip: Clip) -> BoxTrack:
        def read(path: Path) -> Any:
            if not path.is_file():
                raise ComponentError("bad_output", f"ocr {clip.id}: the command wrote no ocr.json")
            try:
                return json.loads(path.read_text())
            except ValueError as exc:
                raise ComponentError("bad_output", f"ocr {clip.id}: ocr.json is not JSON ({exc})") from None

        return self._call(clip, "ocr.json", read)


# --------------------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------------------


def _frames_b64(frames: np.ndarray) -> list[str]:
    return [base64.b64encode(encode_image(f)).decode("ascii") for f in frames]


def _endpoint(url: str, kwargs: dict[str, Any]) -> JSONEndpoint:
    return JSONEndpoint(url, **kwargs)


class HTTPSegmenter:
    """Per-character masks from an HTTP endpoint (e.g. a SAM 2 / SAM 3 server). prompt: a text prompt passed along
    ("person" by default, for text-promptable models). Other keyword arguments configure `JSONEndpoint`."""

    def __init__(self, url: str, *, prompt: str = "person", **endpoint: Any):
        self.endpoint = _endpoint(url, endpoint)
        self.prompt = prompt

    def segment(self, video: Clip) -> np.ndarray:
        f, h, w = video.frames.shape[:3]

        def parse(reply: Any) -> np.ndarray:
            objects = reply.get("masks") if isinstance(reply, dict) else None
            if not isinstance(objects, list):
                raise EndpointError("garbage", f"{self.endpoint.url}: reply has no 'masks' list", transient=True)
            out = np.zeros((len(objects), f, h, w), dtype=bool)
            for k, frames in enumerate(objects):
                if not isinstance(frames, list) or len(frames) != f:
                    got = len(frames) if isinstance(frames, list) else type(frames).__name__
                    raise EndpointError("garbage", f"{self.endpoint.url}: character {k} has {got} masks for {f} frames", True)
                for i, text in enumerate(frames):
                    data = b64decode_strict(text, f"{self.endpoint.url} mask {k}/{i}")
                    image = decode_image(data, f"{self.endpoint.url} mask {k}/{i}")
                    if image.shape[:2] != (h, w):
                        raise EndpointError("garbage", f"{self.endpoint.url}: mask {k}/{i} is {image.shape[:2]}, need {(h, w)}", True)
                    out[k, i] = image.max(axis=-1) > 127
            return out

        body = {"frames": _frames_b64(video.frames), "fps": video.fps, "height": h, "width": w, "prompt": self.prompt}
        return self.endpoint.post(body, parse)


class HTTPKeypoints:
    """2-D keypoints from an HTTP endpoint; layout and min_score as `CommandKeypoints` (``scores`` optional in the
    reply, same nesting as ``keypoints`` without the last axis)."""

    def __init__(self, url: str, *, layout: str = "coco_wholebody", min_score: float = 0.3, **endpoint: Any):
        self.endpoint = _endpoint(url, endpoint)
        self.layout = layout_by_name(layout)
        self.min_score = float(min_score)

    def estimate(self, video: Clip) -> PoseTrack:
        f, h, w = video.frames.shape[:3]
        joints = len(self.layout.joints)

        def parse(reply: Any) -> PoseTrack:
            raw = reply.get("keypoints") if isinstance(reply, dict) else None
            try:
                kp = np.array([[[(np.nan, np.nan) if q is None else (float(q[0]), float(q[1])) for q in frame]
                                for frame in person] for person in raw], dtype=np.float64).reshape(-1, f, joints, 2)  # fmt: skip
            except (TypeError, ValueError, IndexError):
                raise EndpointError("garbage", f"{self.endpoint.url}: 'keypoints' is not persons x {f} frames x "
                                    f"{joints} joints x [x, y]", transient=True) from None  # fmt: skip
            scores = reply.get("scores")
            try:
                return _track(kp, scores, self.min_score, self.layout, video)
            except ComponentError as exc:
                raise EndpointError("garbage", exc.detail, transient=True) from None

        body = {"frames": _frames_b64(video.frames), "fps": video.fps, "height": h, "width": w, "layout": self.layout.name}
        return self.endpoint.post(body, parse)


# --------------------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------------------


def _read_generated(path: Path, masks_path: Path, what: str) -> GeneratedVideo:
    if not path.is_file():
        raise ComponentError("bad_output", f"{what}: the command wrote no {path.name}")
    try:
        video = read_video(path)
    except VideoDecodeError as exc:
        raise ComponentError("bad_output", f"{what}: {path.name}: {exc.reason}: {exc.detail}") from None
    masks = None
    if masks_path.is_file():
        masks = _load_npz(masks_path, "masks", what)["masks"] != 0
    return GeneratedVideo(video, masks)


class CommandAnimator:
    """A pose-driven animation generator run as a user command (SCAIL, Wan-Animate, ... inference scripts)."""

    def __init__(self, command: str | Sequence[str], *, timeout_s: float = 3600.0, cwd: str | None = None):
        self.argv = _argv(command)
        self.timeout_s = float(timeout_s)
        self.cwd = cwd

    def animate(self, request: AnimationRequest) -> GeneratedVideo:
        import shutil

        tmp = Path(tempfile.mkdtemp(prefix="scail2-animate-"))
        try:
            values = {"reference": str(tmp / "reference.png"), "pose": str(tmp / "pose.mp4"),
                      "pose_mask": str(tmp / "pose_mask.mp4"), "prompt_file": str(tmp / "prompt.txt"),
                      "seed": str(request.seed), "fps": f"{request.fps:g}", "frames": str(request.frames),
                      "height": str(request.height), "width": str(request.width), "output": str(tmp / "out.mp4"),
                      "output_masks": str(tmp / "out_masks.npz")}  # fmt: skip
            write_image(values["reference"], request.reference)
            write_video(values["pose"], request.pose_video, request.fps, lossless=True)
            if request.pose_mask is not None:
                write_video(values["pose_mask"], request.pose_mask, request.fps, lossless=True)
            Path(values["prompt_file"]).write_text(request.prompt, encoding="utf-8")
            run_command(self.argv, values, self.timeout_s, "animator", self.cwd)
            return _read_generated(tmp / "out.mp4", tmp / "out_masks.npz", "animator")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class CommandReplacer:
    """A replacement generator run as a user command (e.g. MoCha): one character per call."""

    def __init__(self, command: str | Sequence[str], *, timeout_s: float = 3600.0, cwd: str | None = None):
        self.argv = _argv(command)
        self.timeout_s = float(timeout_s)
        self.cwd = cwd

    def replace(self, request: ReplacementRequest) -> GeneratedVideo:
        import shutil

        tmp = Path(tempfile.mkdtemp(prefix="scail2-replace-"))
        try:
            values = {"video": str(tmp / "video.mp4"), "mask": str(tmp / "mask.mp4"),
                      "reference": str(tmp / "reference.png"), "prompt_file": str(tmp / "prompt.txt"),
                      "seed": str(request.seed), "fps": f"{request.fps:g}", "output": str(tmp / "out.mp4"),
                      "output_masks": str(tmp / "out_masks.npz")}  # fmt: skip
            write_video(values["video"], request.video, request.fps, lossless=True)
            white = np.repeat((request.mask.astype(np.uint8) * 255)[..., None], 3, axis=-1)
            write_video(values["mask"], white, request.fps, lossless=True)
            write_image(values["reference"], request.reference)
            Path(values["prompt_file"]).write_text(request.prompt, encoding="utf-8")
            run_command(self.argv, values, self.timeout_s, "replacer", self.cwd)
            return _read_generated(tmp / "out.mp4", tmp / "out_masks.npz", "replacer")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class PipelineAnimator:
    """Our own `SCAIL2Pipeline` in pose-driven mode: the skeleton render drives, the generated image is the
    reference (animation mode, no masks: single-character animation uses all-black masks).

    model: a pipeline folder (loaded on first use, so a config file can name it); pipeline: an already loaded
    `SCAIL2Pipeline` instead. dtype / device / offload: where it runs (``offload=True``: model CPU offload to
    ``device``). steps, guidance_scale, shift, negative_prompt: sampling (`SCAIL2Pipeline.generate`).
    """

    def __init__(self, model: str | None = None, *, pipeline: Any = None, dtype: str | None = "bfloat16",
                 device: str | None = None, offload: bool = False, steps: int = 40, guidance_scale: float = 5.0,
                 shift: float | None = None, negative_prompt: str = "", lora: str | None = None):  # fmt: skip
        if (model is None) == (pipeline is None):
            raise ValueError("PipelineAnimator needs exactly one of model (a pipeline folder) or pipeline")
        self.model, self._pipe = model, pipeline
        self.dtype, self.device, self.offload, self.lora = dtype, device, offload, lora
        self.steps, self.guidance_scale, self.shift = int(steps), float(guidance_scale), shift
        self.negative_prompt = negative_prompt

    @property
    def pipeline(self) -> Any:
        if self._pipe is None:
            import torch

            from scail2.pipeline import SCAIL2Pipeline

            dtype = getattr(torch, self.dtype) if self.dtype else None
            device = None if self.offload else self.device
            pipe = SCAIL2Pipeline.from_pretrained(self.model, dtype=dtype, device=device, lora=self.lora)
            if self.offload:
                pipe.enable_model_cpu_offload(self.device or "cuda")
            self._pipe = pipe
        return self._pipe

    def animate(self, request: AnimationRequest) -> GeneratedVideo:
        out = self.pipeline(
            request.reference,
            request.pose_video,
            mode="animation",
            height=request.height,
            width=request.width,
            fps=request.fps,
            prompt=request.prompt,
            negative_prompt=self.negative_prompt,
            seed=request.seed,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            shift=self.shift,
            progress=False,
        )
        frames = np.asarray(out.frames)
        if frames.shape[0] != request.frames:
            raise ComponentError("bad_output", f"the pipeline returned {frames.shape[0]} frames for {request.frames} "
                                 "(clips longer than 81 frames lose the frames past the last full segment)")  # fmt: skip
        return GeneratedVideo(frames)


class AnimatorGenerator:
    """An `Animator` as the preference builder's generator G (``scail2-data preference``): the poses are drawn with
    `render_poses` and animated with the reference image. prompt: used when the reference has no caption."""

    mode = "animation"

    def __init__(self, animator: Any, *, prompt: str = "", limb_radius: float | None = None):
        self.animator = animator
        self.prompt = prompt
        self.limb_radius = limb_radius

    def generate(self, poses: PoseTrack, reference: Reference, seed: int) -> GeneratedVideo:
        render = render_poses(poses, limb_radius=self.limb_radius)
        pose_mask = mode_masks(render.masks, "animation", "driving", binding_order(render.masks)) if poses.persons else None
        request = AnimationRequest(reference.image, poses, render.frames, pose_mask, poses.height, poses.width,
                                   poses.frames, poses.fps, reference.caption or self.prompt, int(seed))  # fmt: skip
        return self.animator.animate(request)


# --------------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------------


def _images(folder: str | Path) -> list[Path]:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not paths:
        raise ValueError(f"image folder {root} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


class ImageFolderPool:
    """The character pool of the reference loop: every image under ``folder`` (sorted; drawn without replacement)."""

    def __init__(self, folder: str):
        self.root = Path(folder).expanduser()
        self.paths = _images(folder)

    def sample(self, rng: np.random.Generator, count: int) -> list[PoolImage]:
        picks = rng.choice(len(self.paths), size=min(count, len(self.paths)), replace=False)
        return [PoolImage(self.paths[i].relative_to(self.root).as_posix(), read_image(self.paths[i])) for i in picks]


class ImageFolderReferences:
    """ref_a / ref_b for ``scail2-data preference``: character images from a folder (a ``.txt`` beside an image is
    its caption). ``persons`` is not used: every image is one reference."""

    def __init__(self, folder: str):
        self.root = Path(folder).expanduser()
        self.paths = _images(folder)

    def sample(self, rng: np.random.Generator, height: int, width: int, persons: int) -> Reference:
        path = self.paths[int(rng.integers(len(self.paths)))]
        caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip() if path.with_suffix(".txt").is_file() else ""
        return Reference(path.relative_to(self.root).as_posix(), read_image(path), caption)
