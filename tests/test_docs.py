"""The shell commands of README.md and docs/*.md run as documented, so a documented command cannot rot.

Every ```bash block carries a marker on the line before it (the convention is in README.md, "Running the tests"):

    <!-- doc-test: cpu -->       run here, on every test run
    <!-- doc-test: slow -->      run here, with the slow tests only (minutes: the demos)
    <!-- doc-test: gpu -->       needs CUDA GPUs: not run here
    <!-- doc-test: external -->  needs what the repository does not have (real weights, datasets, servers)
    <!-- doc-test: manual -->    not run: a synopsis, or a command that sets up the machine or edits the repository

The blocks of one file run in document order in one scratch working directory (so a resume finds the run before
it). Each line is one command (backslash continuations joined, ``#`` comments dropped); the console scripts run
as ``python -m`` of their module. In ``cpu`` blocks a ``scail2-train experiment=demo`` command trains on the
tests' small synthetic set (``data.pairs=6 data.frames=9 data.height=32 data.width=32``) instead of the demo's;
``slow`` blocks run exactly as written. ``<date_time>`` / ``<time>`` in a path stand for the newest run folder.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKERS = ("cpu", "slow", "gpu", "external", "manual")
MODULES = {
    "scail2-train": "scail2.train",
    "scail2-animate": "scail2.cli.animate",
    "scail2-data": "scail2.data.cli",
    "scail2-bench": "scail2.cli.bench",
    "scail2-convert": "scail2.cli.convert",
}
TINY_DATA = ["data.pairs=6", "data.frames=9", "data.height=32", "data.width=32", "data.batch_size=2"]
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
_MARKER = re.compile(r"<!--\s*doc-test:\s*(\w+)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    file: Path
    line: int
    marker: str | None
    commands: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.file.relative_to(REPO)}:{self.line}"


def _commands(body: str) -> tuple[str, ...]:
    joined = re.sub(r"\s*\\\n\s*", " ", body)
    return tuple(line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#"))


def shell_blocks(path: Path) -> list[Block]:
    """The ```bash / ```sh blocks of a Markdown file with their markers."""
    text = path.read_text()
    blocks = []
    for m in _FENCE.finditer(text):
        if m.group(1) not in ("bash", "sh", "shell", "console"):
            continue
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        found = _MARKER.search(before)
        blocks.append(Block(path, text[: m.start()].count("\n") + 1, found.group(1) if found else None, _commands(m.group(2))))
    return blocks


ALL = [b for doc in DOCS for b in shell_blocks(doc)]


def test_every_shell_block_is_marked():
    unmarked = [b.where for b in ALL if b.marker not in MARKERS]
    assert not unmarked, f"shell blocks without a `<!-- doc-test: {'|'.join(MARKERS)} -->` marker: {unmarked}"
    assert any(b.marker == "cpu" for b in ALL)


def _argv(command: str, scratch: Path, tiny: bool) -> list[str]:
    words = shlex.split(command.replace("$PWD", str(scratch)), comments=True)
    while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value prefixes (set in the environment below)
        words.pop(0)
    head, rest = words[0], words[1:]
    if head in MODULES:
        argv = [sys.executable, "-m", MODULES[head], *rest]
    elif head in ("python", "python3"):
        argv = [sys.executable, *rest]
    else:
        raise AssertionError(f"{command!r}: the doc test runs scail2's commands and python only, not {head!r}")
    if head == "scail2-train" and tiny and "experiment=demo" in rest and not any(a.startswith("data=") for a in rest):
        at = argv.index("experiment=demo") + 1  # next to it: Hydra's own flags (--cfg job) may follow
        argv[at:at] = TINY_DATA
    return [_placeholders(a, scratch) for a in argv]


def _placeholders(arg: str, scratch: Path) -> str:
    """``outputs/<run_name>/<date_time>/rest``: the newest run folder of run_name that holds ``rest``."""

    def newest(match: re.Match) -> str:
        rest = match.group(2) or ""
        runs = [p for p in (scratch / match.group(1)).iterdir()
                if p.is_dir() and not p.name.startswith("multirun_") and (p / rest.lstrip("/")).exists()]  # fmt: skip
        assert runs, f"{arg}: no run folder under {scratch / match.group(1)} holds {rest or 'anything'} yet"
        return str(max(runs, key=lambda p: p.stat().st_mtime).relative_to(scratch)) + rest

    return re.sub(r"(outputs/[\w.]+)/<(?:date_time|time)>(/[^'\"\s]*)?", newest, arg)


def _run_blocks(blocks: list[Block], scratch: Path, tiny: bool) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for block in blocks:
        for command in block.commands:
            proc = subprocess.run(_argv(command, scratch, tiny), cwd=scratch, env=env, capture_output=True, text=True, timeout=1200)
            assert proc.returncode == 0, f"{block.where}: `{command}` exited {proc.returncode}:\n{proc.stdout[-2500:]}\n{proc.stderr[-4000:]}"


def _by_file(marker: str) -> list[tuple[str, list[Block]]]:
    files: dict[str, list[Block]] = {}
    for b in ALL:
        if b.marker == marker:
            files.setdefault(str(b.file.relative_to(REPO)), []).append(b)
    return sorted(files.items())


@pytest.mark.parametrize("doc,blocks", _by_file("cpu"), ids=[d for d, _ in _by_file("cpu")])
def test_cpu_commands_run(doc, blocks, tmp_path):
    _run_blocks(blocks, tmp_path, tiny=True)


@pytest.mark.slow
@pytest.mark.parametrize("doc,blocks", _by_file("slow"), ids=[d for d, _ in _by_file("slow")])
def test_slow_commands_run(doc, blocks, tmp_path):
    _run_blocks(blocks, tmp_path, tiny=False)


def test_parsing_follows_the_convention(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "text\n<!-- doc-test: cpu -->\n```bash\nscail2-train experiment=demo \\\n    trainer.max_steps=3  # why\n"
        "# a comment line\nHF_HUB_OFFLINE=1 python -m x\n```\n\n```bash\nmake test\n```\n"
    )
    first, second = shell_blocks(doc)
    assert first.marker == "cpu" and second.marker is None and first.line == 3
    assert first.commands == ("scail2-train experiment=demo trainer.max_steps=3  # why", "HF_HUB_OFFLINE=1 python -m x")
    assert _argv(first.commands[0], tmp_path, tiny=True) == [sys.executable, "-m", "scail2.train", "experiment=demo", *TINY_DATA, "trainer.max_steps=3"]
    assert _argv(first.commands[1], tmp_path, tiny=False) == [sys.executable, "-m", "x"]
    (tmp_path / "outputs" / "demo" / "2026-01-01_00-00-00" / "model").mkdir(parents=True)
    (tmp_path / "outputs" / "demo" / "2026-01-02_00-00-00").mkdir(parents=True)  # newer, without a model
    os.utime(tmp_path / "outputs" / "demo" / "2026-01-01_00-00-00", (1e9, 1e9))
    assert _placeholders("outputs/demo/<date_time>/model", tmp_path) == "outputs/demo/2026-01-01_00-00-00/model"
    assert _placeholders("ckpt_path='outputs/demo/<time>'", tmp_path) == "ckpt_path='outputs/demo/2026-01-02_00-00-00'"
