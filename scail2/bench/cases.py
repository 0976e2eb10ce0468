"""What one benchmark case is: a reference image, a driving video, and what else the layout provides."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scail2.conditioning.condition import MODES
TASKS: tuple[str, ...] = ("self_driven", "cross_identity", "replacement")
VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".mkv", ".webm", ".mov", ".avi")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class BenchmarkLayoutError(ValueError):
    """A benchmark folder that does not follow its layout; the message names the path and the fix."""


@dataclass(frozen=True)
class VideoFrame:
    """One frame of a video used as an image (the self-driven reference is the clip's first frame)."""

    video: Path
    index: int = 0


ImageSource = Path | VideoFrame


@dataclass(frozen=True)
class Case:
    """One benchmark case.

    reference: an image file, or a frame of a video (``VideoFrame``).
    driving: the driving video: a raw video (end-to-end) or a rendered pose / mesh video (pose-driven).
    ground_truth: the video the generation should reproduce (self-driven and replacement with ground truth);
        None when the case has none (cross-identity pairs).
    reference_mask / driving_mask: colour-coded masks (docs/inference.md), both or neither. A reference mask
        image is drawn on the mode's reference background (animation: white); a ``VideoFrame`` of a mask video
        is drawn on the driving background and is redrawn on the reference one before use.
    characters: number of characters (decides the GSB columns: single vs multi-character).
    """

    id: str
    reference: ImageSource
    driving: Path
    ground_truth: Path | None = None
    reference_mask: ImageSource | None = None
    driving_mask: Path | None = None
    prompt: str = ""
    mode: str = "animation"
    characters: int = 1
    category: str = ""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"case {self.id!r} has mode {self.mode!r}; use one of {MODES}")
        if (self.reference_mask is None) != (self.driving_mask is None):
            missing = "driving_mask" if self.driving_mask is None else "reference_mask"
            raise ValueError(
                f"case {self.id!r} has one mask but not the other ({missing} is missing); give both or neither"
            )
        if self.characters < 1:
            raise ValueError(f"case {self.id!r} has characters={self.characters}; need >= 1")

    @property
    def file_stem(self) -> str:
        """The case id as a file name (``/`` in X-Dance category ids becomes ``__``)."""
        return case_file_stem(self.id)

    @property
    def kind(self) -> str:
        """'replacement', 'multi' or 'single' (the GSB study columns depend on it)."""
        if self.mode == "replacement":
            return "replacement"
        return "multi" if self.characters > 1 else "single"


def case_file_stem(case_id: str) -> str:
    """File name stem of a case id: path separators become ``__`` so every case is one file in one folder."""
    return case_id.replace("/", "__").replace("\\", "__")


def find_video(folder: Path, stem: str) -> Path | None:
    """``folder/stem.<video suffix>`` if exactly one exists (None when there is none)."""
    found = [folder / f"{stem}{s}" for s in VIDEO_SUFFIXES if (folder / f"{stem}{s}").is_file()]
    if len(found) > 1:
        raise BenchmarkLayoutError(
            f"{folder} has several videos for {stem!r}: {[p.name for p in found]}; keep exactly one"
        )
    return found[0] if found else None


def find_image(folder: Path, stem: str) -> Path | None:
    """``folder/stem.<image suffix>`` if exactly one exists (None when there is none)."""
    found = [folder / f"{stem}{s}" for s in IMAGE_SUFFIXES if (folder / f"{stem}{s}").is_file()]
    if len(found) > 1:
        raise BenchmarkLayoutError(
            f"{folder} has several images for {stem!r}: {[p.name for p in found]}; keep exactly one"
        )
    return found[0] if found else None
