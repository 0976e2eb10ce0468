"""Shared helpers of the benchmark runners: machine/version records and robust timing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def versions(*names: str, repo: Path | None = None) -> dict:
    """Python, torch and the named packages' versions, and the library's git commit.

    ``scail2_git`` is the commit checked out in ``repo`` (default: this checkout); ``scail2_git_dirty`` says whether
    tracked files other than the recorded results differ from it, so a figure measured on uncommitted code is
    marked as such (``None`` where git cannot tell).
    """
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for n in ("torch", *names):
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = None
    where = Path(__file__).resolve().parent.parent if repo is None else Path(repo)
    out["scail2_git"], out["scail2_git_dirty"] = None, None
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=where)
        if head.returncode == 0 and head.stdout.strip():
            out["scail2_git"] = head.stdout.strip()
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results"],
                capture_output=True, text=True, cwd=where,
            )
            if status.returncode == 0:
                out["scail2_git_dirty"] = bool(status.stdout.strip())
    except OSError:
        pass
    return out


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Time several callables in alternation (so drifts in machine load hit all alike); median and spread."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {
        k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "repeats": len(v)}
        for k, v in times.items()
    }


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    payload = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
