"""A fake installed distribution that registers config targets (entry point group ``scail2.config_targets``), for
the tests of the allow-list: put its folder on ``sys.path`` (``monkeypatch.syspath_prepend``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def fake_distribution(site: Path, name: str, entries: Mapping[str, str], sources: Mapping[str, str] | None = None) -> Path:
    """Write distribution ``name`` into the folder ``site``: a dist-info folder whose entry points register
    ``entries`` (entry name -> ``"module:Class"``) and the files ``sources`` (path below ``site`` -> text), which
    its RECORD lists as the distribution's own. Returns ``site``."""
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = "".join(f"{key} = {value}\n" for key, value in entries.items())
    (info / "entry_points.txt").write_text(f"[scail2.config_targets]\n{lines}")
    files = [f"{info.name}/METADATA", f"{info.name}/entry_points.txt"]
    for rel, text in (sources or {}).items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
        files.append(rel)
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))
    return site
