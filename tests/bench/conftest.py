"""A tiny browser study (four cases: two single-character, one multi-character, one replacement) exported by
`export_gsb`, and an in-process study server on a free loopback port.

Our videos are red, the baseline's blue, the driving videos green, so a test (or a browser) can tell from the
pixels alone which result a side shows, without asking the code under test. Each case has its own shade, so every
media file differs from the others byte for byte.
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from scail2.bench.cases import Case
from scail2.bench.gsb import export_gsb, load_key
from scail2.bench.study import AnswerStore, Rater, Study, load_study, open_store
from scail2.bench.study_server import StudyApp, StudyServer
from scail2.data.video import write_image, write_video

FRAMES = 9
FPS = 8.0
SIZE = 32
OURS = np.array([220, 40, 40])
BASELINE = np.array([40, 40, 220])
DRIVING = (40, 200, 40)


def _video(colour: tuple[int, int, int], frames: int, h: int = SIZE, w: int = SIZE) -> np.ndarray:
    """A solid colour with a white bar that moves one column per frame (frames differ from each other)."""
    video = np.broadcast_to(np.array(colour, np.uint8), (frames, h, w, 3)).copy()
    for i in range(frames):
        video[i, :, 2 * i : 2 * i + 2] = 255
    return video


def build_study(folder: Path) -> Path:
    """Export the four-case study into ``folder/gsb`` and return that study folder."""
    inputs, ours, base = folder / "inputs", folder / "ours", folder / "base"
    inputs.mkdir(parents=True)
    write_image(inputs / "ref.png", np.full((40, 30, 3), (200, 180, 20), np.uint8))
    write_video(inputs / "drive.mp4", _video(DRIVING, FRAMES + 3, 48, 36), 25.0)
    common = {"reference": inputs / "ref.png", "driving": inputs / "drive.mp4"}
    cases = [
        Case(id="solo_a", **common),
        Case(id="solo_b", **common),
        Case(id="duo", characters=2, **common),
        Case(id="swap", mode="replacement", reference_mask=inputs / "ref.png", driving_mask=inputs / "drive.mp4",
             **common),
    ]  # fmt: skip
    pairs = []
    for k, case in enumerate(cases):
        shade = np.array([12 * k, 0, 12 * k])
        pairs.append((case, write_video(ours / f"{case.id}.mp4", _video(tuple(OURS - shade), FRAMES), FPS)))
        write_video(base / f"{case.id}.mp4", _video(tuple(BASELINE - shade), FRAMES + 2), FPS)
    export_gsb(pairs, base, folder / "gsb", ours_name="ours", baseline_name="wan", seed=5)
    return folder / "gsb"


@pytest.fixture(scope="session")
def exported_study(tmp_path_factory) -> Path:
    return build_study(tmp_path_factory.mktemp("study-export"))


@pytest.fixture
def study_dir(exported_study, tmp_path) -> Path:
    """A fresh copy of the exported study (its own answers database) for one test."""
    target = tmp_path / "gsb"
    shutil.copytree(exported_study, target)
    return target


@dataclass
class Running:
    study: Study
    store: AnswerStore
    server: StudyServer
    raters: dict[str, Rater]

    def url(self, rater: str) -> str:
        return self.server.rater_url(self.raters[rater])

    @property
    def key(self) -> dict:
        return load_key(self.study.folder / "key.json")


@pytest.fixture
def running(study_dir):
    """The study served on 127.0.0.1 (free port) for the raters alice and bob (fixed seeds)."""
    study = load_study(study_dir)
    store = open_store(study)
    raters = {"alice": store.add_rater("alice", seed=11), "bob": store.add_rater("bob", seed=12)}
    server = StudyServer(StudyApp(study, store), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Running(study, store, server, raters)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        store.close()
