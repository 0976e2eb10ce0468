"""Video and image I/O behind one interface: decord first, PyAV for what decord cannot open (AV1, ...).

Frames are always ``uint8`` arrays ``(F, H, W, 3)`` RGB. Every failure is a `VideoDecodeError` with a
short ``reason`` (``missing``, ``empty``, ``unreadable``, ``truncated``) so the datasets can count skips by
cause; nothing here retries forever or caches decoded frames.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

Backend = Literal["auto", "decord", "pyav"]
BACKENDS: tuple[str, ...] = ("auto", "decord", "pyav")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Largest image read (width x height), checked from the header before any pixel is decoded: a small PNG can
# declare billions of pixels (a decompression bomb). 8192 x 8192 is far above any training or inference size.
MAX_IMAGE_PIXELS = 8192 * 8192
# A frame interval further than this from the median interval counts as irregular (variable frame rate).
VFR_TOLERANCE = 0.25


class VideoDecodeError(RuntimeError):
    """A video (or image) that cannot be read. ``reason`` is a short category used for skip counting."""

    def __init__(self, path: str | Path, reason: str, detail: str):
        self.path = Path(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {reason}: {detail}")


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int  # as reported by the container (may be more than decodable for a truncated file)
    fps: float
    height: int
    width: int
    backend: str


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoDecodeError(path, "missing", "file not found")
    if path.is_dir():
        raise VideoDecodeError(path, "unreadable", "is a directory")
    if path.stat().st_size == 0:
        raise VideoDecodeError(path, "empty", "file has 0 bytes")


class _DecordSource:
    def __init__(self, path: Path, num_threads: int):
        import decord  # imported here: decord is only needed when a video is opened

        self._vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=num_threads)
        self._num_frames = len(self._vr)
        if self._num_frames <= 0:
            raise RuntimeError("no frames")
        self._fps = float(self._vr.get_avg_fps())
        self._size: tuple[int, int] | None = None

    @property
    def info(self) -> VideoInfo:
        if self._size is None:
            # decord has no size property: decode the first frame (only when asked before any read).
            self._size = tuple(self._vr[0].shape[:2])
        return VideoInfo(self._num_frames, self._fps, self._size[0], self._size[1], "decord")

    def read(self, indices: list[int]) -> np.ndarray:
        frames = self._vr.get_batch(indices).asnumpy()
        if self._size is None:
            self._size = tuple(frames.shape[1:3])
        return frames

    def close(self) -> None:
        del self._vr


class _PyAVSource:
    def __init__(self, path: Path, num_threads: int):
        import av

        self._path = path
        self._threads = num_threads
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise RuntimeError("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else 0.0
            n = stream.frames
            if n <= 0 and stream.duration is not None and stream.time_base is not None and fps > 0:
                # Containers without a frame count (mkv, webm): estimate from the duration.
                n = int(round(float(stream.duration * stream.time_base) * fps))
            if n <= 0 and container.duration and fps > 0:
                n = int(round(container.duration / 1e6 * fps))
            height, width = stream.codec_context.height, stream.codec_context.width
        if n <= 0 or height <= 0 or width <= 0:
            # No header information: count by decoding (small or unusual files only).
            frames = self._decode_until(None)
            if len(frames) == 0:
                raise RuntimeError("the stream decodes to 0 frames")
            n, (height, width) = len(frames), frames[0].shape[:2]
        self.info = VideoInfo(n, fps, height, width, "pyav")

    def _decode_until(self, last: int | None, wanted: set[int] | None = None) -> dict[int, np.ndarray] | list:
        """Decode from the start up to frame ``last`` (all frames when None)."""
        import av

        keep: dict[int, np.ndarray] = {}
        every: list[np.ndarray] = []
        with av.open(str(self._path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = self._threads
            # Sequential decoding (no seeking): exact frame indices whatever the timestamps say.
            for i, frame in enumerate(container.decode(stream)):
                if wanted is None:
                    every.append(frame.to_ndarray(format="rgb24"))
                elif i in wanted:
                    keep[i] = frame.to_ndarray(format="rgb24")
                if last is not None and i >= last:
                    break
        return every if wanted is None else keep

    def read(self, indices: list[int]) -> np.ndarray:
        keep = self._decode_until(max(indices), set(indices))
        missing = [i for i in indices if i not in keep]
        if missing:
            raise _ShortStream(min(missing), len(keep))
        return np.stack([keep[i] for i in indices])

    def close(self) -> None:
        pass


class _ShortStream(Exception):
    def __init__(self, index: int, decoded: int):
        self.index = index
        self.decoded = decoded


class VideoReader:
    """Random-access reader. ``backend='auto'`` opens with decord and falls back to PyAV.

    Use as a context manager (or call `close`) so the decoder is released at once.
    """

    def __init__(self, path: str | Path, backend: Backend = "auto", num_threads: int = 1):
        if backend not in BACKENDS:
            raise ValueError(f"unknown video backend {backend!r}; use one of {BACKENDS}")
        self.path = Path(path)
        self._threads = num_threads
        self._requested = backend
        _check_file(self.path)
        self._source: _DecordSource | _PyAVSource = self._open(backend)

    def _open(self, backend: str) -> _DecordSource | _PyAVSource:
        errors = []
        order = ("decord", "pyav") if backend == "auto" else (backend,)
        for name in order:
            try:
                cls = _DecordSource if name == "decord" else _PyAVSource
                return cls(self.path, self._threads)
            except Exception as exc:  # decord raises bare RuntimeError/DECORDError; PyAV raises av.FFmpegError
                errors.append(f"{name}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc) else ''}")
                log.debug("could not open %s with %s: %s", self.path, name, exc)
        raise VideoDecodeError(self.path, "unreadable", "; ".join(errors))

    @property
    def info(self) -> VideoInfo:
        return self._source.info

    @property
    def num_frames(self) -> int:
        return self._source.info.num_frames

    @property
    def fps(self) -> float:
        return self._source.info.fps

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)"""
        return self._source.info.height, self._source.info.width

    @property
    def backend(self) -> str:
        return self._source.info.backend

    def read(self, frame_indices: Sequence[int] | None = None) -> np.ndarray:
        """Frames at ``frame_indices`` (all when None) -> uint8 (F, H, W, 3)."""
        n = self.num_frames
        indices = list(range(n)) if frame_indices is None else [int(i) for i in frame_indices]
        if not indices:
            raise ValueError(f"no frame indices asked from {self.path}")
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise IndexError(f"frame {bad[0]} of {self.path} is out of range; the video has {n} frames (0..{n - 1})")
        try:
            frames = self._source.read(indices)
        except _ShortStream as exc:
            raise VideoDecodeError(
                self.path,
                "truncated",
                f"frame {exc.index} asked but the stream ends after {exc.decoded} frames (header says {n})",
            ) from None
        except Exception as exc:
            if not (self._requested == "auto" and isinstance(self._source, _DecordSource)):
                raise VideoDecodeError(self.path, "truncated", f"{type(exc).__name__}: {exc}") from exc
            # decord opened the file but cannot decode the frames (partial file, odd codec): PyAV decodes
            # sequentially and tells how far the stream really goes.
            log.debug("decord failed reading %s (%s); retrying with PyAV", self.path, exc)
            self._source.close()
            try:
                self._source = _PyAVSource(self.path, self._threads)
                return self.read(indices)
            except VideoDecodeError:
                raise
            except Exception as exc2:
                raise VideoDecodeError(self.path, "truncated", f"{type(exc2).__name__}: {exc2}") from exc2
        expected = (len(indices), self.size[0], self.size[1], 3)
        if frames.shape != expected or frames.dtype != np.uint8:
            raise VideoDecodeError(
                self.path, "unreadable", f"decoded {frames.dtype} {frames.shape}, expected uint8 {expected} (size changes mid-stream?)"
            )
        return frames

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def probe_video(path: str | Path, backend: Backend = "auto") -> VideoInfo:
    """Frame count, fps and size from the container (and the first frame)."""
    with VideoReader(path, backend) as reader:
        return reader.info


def read_video(path: str | Path, frame_indices: Sequence[int] | None = None, backend: Backend = "auto") -> np.ndarray:
    """Decode frames -> uint8 (F, H, W, 3). Raises `VideoDecodeError` (with a ``reason``) on bad files."""
    with VideoReader(path, backend) as reader:
        return reader.read(frame_indices)


def read_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """An image file -> uint8 (H, W, 3) RGB. An image of more than ``max_pixels`` pixels is refused from its
    header, before anything is decoded."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    _check_file(path)

    def too_large(size: str, pixels: int) -> VideoDecodeError:
        return VideoDecodeError(
            path,
            "unreadable",
            f"the image declares {size}{pixels / 1e6:.0f}M pixels, over the limit of {max_pixels / 1e6:.0f}M "
            "(scail2.data.video.MAX_IMAGE_PIXELS); downscale it (e.g. to 4096 pixels on the long side) or check the "
            "file: a small file declaring so many pixels is a decompression bomb",
        )

    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise too_large(f"{width}x{height} = ", width * height)
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except Image.DecompressionBombError as exc:  # Pillow's own, larger limit, met while opening
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise too_large("", int(found.group(1)) if found else max_pixels + 1) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise VideoDecodeError(path, "unreadable", f"{type(exc).__name__}: {exc}") from exc


def frame_times(path: str | Path) -> np.ndarray:
    """Presentation times (seconds, sorted) of the packets of the first video stream, read from the container
    without decoding (PyAV demuxing)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        base = float(stream.time_base) if stream.time_base else 0.0
        pts = [p.pts for p in container.demux(stream) if p.pts is not None and p.size > 0]
    return np.sort(np.asarray(pts, dtype=np.float64)) * base


def variable_rate(path: str | Path, tolerance: float = VFR_TOLERANCE) -> str | None:
    """Why the video at ``path`` does not have a constant frame rate, or None.

    Irregular: a frame interval (between consecutive presentation times) further than ``tolerance`` times the
    median interval from the median, for more than 2% of the intervals (at least 2). A constant-rate video
    whose times are rounded to its time base (29.97 fps in milliseconds) is regular; a video whose frames
    arrive at varying intervals but average 16 fps is not, and its frame indices are not 1/fps apart.
    """
    times = frame_times(path)
    if len(times) < 3:
        return None
    steps = np.diff(times)
    median = float(np.median(steps))
    if median <= 0:
        return f"variable frame rate: {int((steps <= 0).sum())} of {len(steps)} frames repeat the previous timestamp"
    irregular = np.abs(steps - median) > tolerance * median
    if int(irregular.sum()) <= max(1, int(0.02 * len(steps))):
        return None
    return (
        f"variable frame rate: {int(irregular.sum())} of {len(steps)} frame intervals differ from the median "
        f"{median * 1000:.1f} ms by more than {tolerance:.0%} (they range {steps.min() * 1000:.1f}-"
        f"{steps.max() * 1000:.1f} ms, {1 / steps.mean():.3g} fps on average); re-encode it at a constant rate, e.g. "
        "ffmpeg -i IN.mp4 -fps_mode cfr -r 16 OUT.mp4"
    )


def write_image(path: str | Path, image: np.ndarray) -> Path:
    """Write uint8 (H, W, 3) as an image (PNG for masks: lossless)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_as_uint8(image[None])[0]).save(path)
    return path


def _as_uint8(frames) -> np.ndarray:
    if hasattr(frames, "detach"):  # torch tensor
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames have shape {frames.shape}; need (F, H, W, 3) RGB (channels last)")
    if frames.dtype != np.uint8:
        raise ValueError(
            f"frames have dtype {frames.dtype}; need uint8: map [-1, 1] floats with ((x + 1) * 127.5).round().clip(0, 255)"
        )
    return np.ascontiguousarray(frames)


def _pick_codec(lossless: bool) -> tuple[str, str, dict[str, str]]:
    from av.codec import Codec

    def available(name: str) -> bool:
        try:
            Codec(name, "w")
            return True
        except Exception:
            return False

    if lossless:
        # RGB-lossless H.264 keeps mask colours exact (4:2:0 chroma would blur colour edges).
        if available("libx264rgb"):
            return "libx264rgb", "rgb24", {"qp": "0", "preset": "veryfast"}
        if available("ffv1"):
            return "ffv1", "bgr0", {}
        raise RuntimeError("no lossless video encoder (libx264rgb or ffv1) in this PyAV build; store masks as PNG frames")
    if available("libx264"):
        return "libx264", "yuv420p", {"crf": "18", "preset": "veryfast"}
    return "mpeg4", "yuv420p", {"qscale": "2"}


def write_video(
    path: str | Path,
    frames,
    fps: float,
    *,
    lossless: bool = False,
    codec: str | None = None,
    faststart: bool = False,
) -> Path:
    """Write uint8 (F, H, W, 3) RGB frames (numpy or torch) to ``path`` with PyAV.

    Default codec: H.264 (libx264, CRF 18, yuv420p) when the PyAV build has it, else MPEG-4 Part 2.
    ``lossless=True`` (mask videos): RGB-lossless H.264 (libx264rgb, qp 0) or FFV1 (use an .mkv path).
    ``codec`` forces an encoder name (e.g. ``"libsvtav1"``), with yuv420p. ``faststart`` moves the index to the
    front of an mp4 (streamable; a truncated file then still reports its full frame count).    Lossy H.264 output may differ by a few levels between runs on identical frames (x264 rarely makes
    different choices); lossless output always decodes to exactly the input.
    """
    import av

    frames = _as_uint8(frames)
    _check_rate(fps)
    f, height, width, _ = frames.shape
    if f == 0:
        raise ValueError(f"no frames to write to {path}")
    if codec is None:
        codec, pix_fmt, options = _pick_codec(lossless)
    else:
        pix_fmt, options = "yuv420p", {}
    if pix_fmt == "yuv420p" and (height % 2 or width % 2):
        raise ValueError(f"{codec} with yuv420p needs even sizes; got {height}x{width}: crop or pad by one pixel")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    container_options = {"movflags": "faststart"} if faststart else {}
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        with av.open(str(tmp), "w", format=_container_format(path), options=container_options) as container:
            stream = container.add_stream(codec, rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
            stream.options = options
            for i, frame in enumerate(frames):
                picture = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format=pix_fmt)
                # Explicit timestamps (the encoder reorders B-frames by them).
                picture.pts = i
                picture.time_base = 1 / rate
                for packet in stream.encode(picture):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        tmp.replace(path)  # never leave a half-written video under the final name
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def check_video_output(path: str | Path, height: int, width: int, fps: float, *, lossless: bool = False) -> None:
    """Raise (``ValueError``, ``OSError`` or PyAV's error, with the reason) when `write_video` cannot write a
    ``height`` x ``width`` video at ``fps`` to ``path``: one black frame is written next to it and removed, so
    the folder, the container, the codec, the size and the frame rate are all tried before any work is done."""
    path = Path(path)
    _check_rate(fps)
    probe = path.with_name(f".{path.stem}.{os.getpid()}.check{path.suffix}")
    try:
        write_video(probe, np.zeros((1, height, width, 3), np.uint8), fps, lossless=lossless)
    except Exception as exc:
        if type(exc).__module__.startswith("av"):
            raise ValueError(f"the video encoder refuses it ({exc})") from None
        raise
    finally:
        probe.unlink(missing_ok=True)


def _check_rate(fps: float) -> None:
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not (math.isfinite(fps) and 0 < fps <= 1000):
        raise ValueError(f"frame rate {fps!r}; need a finite rate in (0, 1000] frames per second, e.g. 16")


def _container_format(path: Path) -> str | None:
    return {".mp4": "mp4", ".mkv": "matroska", ".webm": "webm", ".avi": "avi", ".mov": "mov"}.get(path.suffix.lower())


def is_image_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES
