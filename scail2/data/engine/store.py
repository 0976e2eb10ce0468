"""Bookkeeping shared by the engine's commands: atomic folders and files, the settings a resume must match,
failure reasons and the tally of kept and skipped items."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scail2.data.engine.components import ComponentError
from scail2.data.engine.endpoints import EndpointError
from scail2.data.video import VideoDecodeError

# Keys of a component spec that change how a model is reached, not what it answers: left out of the settings
# fingerprint, so a resumed run may use another port, timeout or cache folder.
TRANSPORT_KEYS = frozenset({"base_url", "url", "api_key_env", "timeout_s", "deadline_s", "max_attempts", "backoff_s",
                            "cache_dir", "cwd", "device", "offload"})  # fmt: skip


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@contextlib.contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """A hidden temporary folder beside ``final``, renamed to ``final`` when the block ends without error (removed
    otherwise). A folder under the final name is therefore always complete."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # cannot be complete (it would have been skipped): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)


def remove_stale(folder: Path) -> int:
    """Delete the temporary folders and files an interrupted run left under ``folder``; returns how many."""
    count = 0
    if not folder.is_dir():
        return 0
    for path in folder.rglob(".*.tmp*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        count += 1
    return count


def fingerprint(value: Any) -> Any:
    """A spec without its transport keys (`TRANSPORT_KEYS`), for the settings a resume must match. A target
    name alone and ``{_target_: name}`` are the same component and give the same fingerprint."""
    if isinstance(value, Mapping) and set(value) == {"_target_"}:
        return fingerprint(value["_target_"])
    if isinstance(value, Mapping):
        return {k: fingerprint(v) for k, v in sorted(value.items()) if k not in TRANSPORT_KEYS}
    if isinstance(value, (list, tuple)):
        return [fingerprint(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def check_settings(path: Path, settings: Mapping[str, Any]) -> None:
    """Record ``settings`` in ``path``, or refuse when the file holds other ones (a resume must use the same)."""
    settings = json.loads(json.dumps(settings))  # normalised (tuples -> lists)
    if path.exists():
        before = read_json(path)
        changed = sorted(k for k in set(settings) | set(before) if before.get(k) != settings.get(k))
        if changed:
            raise ValueError(
                f"{path.parent} was made with other settings ({', '.join(changed)} differ; see {path.name}); "
                "use a new output folder, or the same settings to continue"
            )
        return
    write_json(path, settings)


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def item_key(relative: str) -> str:
    """A file-name-safe, unique id for a relative path: its stem plus 8 hex digits of the path's hash."""
    stem = _SAFE.sub("-", Path(relative).stem).strip("-.") or "video"
    return f"{stem[:60]}-{hashlib.blake2b(relative.encode(), digest_size=4).hexdigest()}"


def stable_seed(*parts: Any) -> list[int]:
    """Entropy for ``np.random.default_rng`` from a seed and names (independent of Python's hash salt)."""
    out = []
    for part in parts:
        if isinstance(part, int):
            out.append(part)
        else:
            out.append(int.from_bytes(hashlib.blake2b(str(part).encode(), digest_size=8).digest(), "little") >> 1)
    return out


def failure(stage: str, exc: BaseException) -> tuple[str, str]:
    """(reason, detail) of a failed stage: ``<stage>_<reason>`` for component, endpoint and decode errors, else
    ``<stage>_error`` with the exception's type."""
    if isinstance(exc, (ComponentError, EndpointError)):
        return f"{stage}_{exc.reason}", exc.detail
    if isinstance(exc, VideoDecodeError):
        return f"video_{exc.reason}", exc.detail
    return f"{stage}_error", f"{type(exc).__name__}: {exc}"


class Skip(Exception):
    """An item skipped for ``reason`` (counted in the report)."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def call(stage: str, fn, *args, **kwargs):
    """``fn(*args)``; any exception becomes `Skip` with the stage's reason (KeyboardInterrupt and exit pass)."""
    try:
        return fn(*args, **kwargs)
    except Skip:
        raise
    except Exception as exc:  # a user component may raise anything: count it, do not crash the run
        reason, detail = failure(stage, exc)
        raise Skip(reason, detail) from exc


@dataclass
class Tally:
    """Kept items and skips by reason, with one detail line per skip."""

    kept: int = 0
    new: int = 0
    skipped: Counter = field(default_factory=Counter)
    details: list[dict[str, str]] = field(default_factory=list)

    def skip(self, reason: str, detail: str, **where: str) -> None:
        self.skipped[reason] += 1
        self.details.append({**where, "reason": reason, "detail": detail})

    def lines(self) -> list[str]:
        return [f"  {reason}: {n}" for reason, n in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0]))]
