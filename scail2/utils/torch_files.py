"""Reading weight files without running pickled code, and errors that say what a refused file is.

Every ``.pt/.pth/.bin/.ckpt`` file goes through :func:`load_torch_file`: ``torch.load(weights_only=True)``,
which builds tensors and plain containers only, plus a narrow allow-list of NumPy names that training
checkpoints need for the NumPy RNG state they store next to the weights (``np.random.get_state()``: a uint32
array). The allow-list admits array reconstruction, ``numpy.ndarray``, ``numpy.dtype`` and the numeric dtype
classes, under both the NumPy-1 module paths (``numpy.core.multiarray._reconstruct``; the SCAIL-2 release was
pickled under NumPy 1) and the NumPy-2 ones (``numpy._core.multiarray``). Object and structured dtypes stay
refused, and so does every other global (``os.system``, ``builtins.eval``, NumPy's own code-running helpers).

Without NumPy installed the same names are mapped to an inert placeholder: the file still loads, its NumPy
objects (the RNG state) are skipped, and :func:`load_torch_file` logs which top-level entries were skipped.

:func:`describe_file` sniffs what a file really is (zip-format torch file, legacy pickle, safetensors, GGUF,
a Git LFS pointer, an HTML page, empty ...), so that every refusal names the file, the format found and what
would load.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

TORCH_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".bin", ".ckpt")
_LFS_POINTER = b"version https://git-lfs"
# dtype characters of the numeric NumPy dtypes admitted (bool, signed/unsigned ints, floats): pure data.
_NUMERIC_DTYPE_CHARS = "?bBhHiIlLqQefd"
_RECONSTRUCT = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct")
_SCALAR = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")


class CheckpointError(ValueError):
    """A weights file that cannot be loaded as asked; the message names the file, what it is and what loads."""


# ----------------------------------------------------------------------------------------------- sniffing
def describe_file(path: str | os.PathLike) -> str:
    """A short description of what ``path`` holds, read from its first bytes (never unpickled)."""
    p = Path(path)
    if not p.exists():
        return "nothing (the path does not exist)"
    if p.is_dir():
        return "a folder"
    size = p.stat().st_size
    if size == 0:
        return "an empty file (0 bytes; an interrupted download?)"
    with p.open("rb") as handle:
        head = handle.read(4096)
    if head.startswith(_LFS_POINTER):
        return (
            f"a Git LFS pointer ({size} bytes), not the weights: fetch the real file with `git lfs pull` "
            "or download it directly"
        )
    if head.startswith(b"PK\x03\x04"):
        return f"a zip-format torch.save file ({_human(size)})"
    if head.startswith(b"GGUF"):
        return f"a GGUF file ({_human(size)}; quantised weights for llama.cpp-style runtimes)"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return f"a legacy (non-zip) pickle / torch.save file, protocol {head[1]} ({_human(size)})"
    lowered = head.lstrip()[:64].lower()
    if lowered.startswith((b"<!doctype", b"<html", b"<?xml")):
        return f"an HTML/XML page ({size} bytes; a failed download or a login page), not weights"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len < size and head[8:9] == b"{":
            return f"a safetensors file ({_human(size)})"
    if lowered.startswith((b"{", b"[")):
        try:
            json.loads(p.read_text(encoding="utf-8"))
            return f"a JSON file ({size} bytes), not weights"
        except (UnicodeDecodeError, ValueError):
            pass
    return f"an unrecognised file ({_human(size)}; first bytes {head[:8]!r})"


def _human(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    for unit, factor in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size / 1024:.1f} KB"


def is_zip_torch_file(path: str | os.PathLike) -> bool:
    with Path(path).open("rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


# ------------------------------------------------------------------------------------------- NumPy names
class SkippedNumpyObject:
    """Stands for a NumPy object of a checkpoint read without NumPy installed (e.g. a stored RNG state).

    It holds nothing: the weights of such files never are NumPy objects, so nothing a model needs is lost."""

    def __init__(self, *args: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "SkippedNumpyObject()"


def _skip_numpy(*args: Any) -> SkippedNumpyObject:
    return SkippedNumpyObject()


def _import_numpy():
    """NumPy, or None when it is not installed (then NumPy objects in checkpoints are skipped)."""
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def numpy_safe_globals() -> list:
    """The ``torch.serialization.safe_globals`` entries that admit a stored NumPy RNG state, and nothing more.

    With NumPy: its array constructor, ``ndarray``, ``dtype`` and the numeric dtype classes, each under every
    module path NumPy 1 and NumPy 2 pickle them with. Without NumPy: the same names map to
    :class:`SkippedNumpyObject`.
    """
    np = _import_numpy()
    if np is None:
        names = (*_RECONSTRUCT, *_SCALAR)
        entries: list = [(_skip_numpy, name) for name in names]
        entries += [(SkippedNumpyObject, "numpy.ndarray"), (SkippedNumpyObject, "numpy.dtype")]
        return entries
    try:  # NumPy >= 2 keeps its implementation in numpy._core; numpy.core is a deprecated alias
        from numpy._core import multiarray
    except ImportError:  # NumPy 1
        from numpy.core import multiarray
    entries = [(multiarray._reconstruct, name) for name in _RECONSTRUCT]
    entries += [(multiarray.scalar, name) for name in _SCALAR]
    entries += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    # dtype objects are rebuilt by numpy.dtype(...) and then given their state: their classes must be admitted
    # (only numeric ones; object and structured dtypes stay refused).
    entries += [type(np.dtype(char)) for char in _NUMERIC_DTYPE_CHARS]
    return entries


def _skipped_entries(obj: Any) -> list[str]:
    """Top-level keys of a loaded checkpoint that contain a :class:`SkippedNumpyObject`."""

    def contains(value: Any, depth: int = 0) -> bool:
        if isinstance(value, SkippedNumpyObject):
            return True
        if depth > 8:
            return False
        if isinstance(value, dict):
            return any(contains(v, depth + 1) for v in value.values())
        if isinstance(value, (list, tuple)):
            return any(contains(v, depth + 1) for v in value)
        return False

    if isinstance(obj, dict):
        return sorted(str(k) for k, v in obj.items() if contains(v))
    return ["<root>"] if contains(obj) else []


# ---------------------------------------------------------------------------------------------- loading
def load_torch_file(path: str | os.PathLike, *, what: str = "weights", loads: str | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` with the NumPy allow-list; zip-format files are memory-mapped.

    Args:
        what: what the file should hold, for error messages ("transformer weights", "a LoRA adapter" ...).
        loads: what would load instead, for error messages (default: safetensors or a weights-only torch file).
    Raises:
        CheckpointError naming the file, the format found and what would load.
    """
    p = Path(path)
    hint = loads or "a .safetensors file, or a torch.save file of tensors (loadable with weights_only=True)"
    if not p.is_file():
        raise CheckpointError(f"no {what} at {p} (found {describe_file(p)}); expected {hint}")
    if not is_zip_torch_file(p) and not describe_file(p).startswith("a legacy"):
        raise CheckpointError(f"{p} should hold {what} but is {describe_file(p)}; expected {hint}")
    mmap = is_zip_torch_file(p)  # legacy (non-zip) files cannot be memory-mapped
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()):
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - reported with the file, its format and what would load
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{p} ({describe_file(p)}) is refused: it needs more than tensors and plain containers to unpickle "
            f"({reason}); scail2 never runs pickled code. What loads: {hint}"
        ) from exc
    skipped = _skipped_entries(obj)
    if skipped:
        log.warning(
            "%s was read without NumPy installed: its NumPy objects were skipped (entries %s, e.g. the NumPy RNG "
            "state; weights are unaffected)",
            p,
            skipped,
        )
    return obj


__all__ = [
    "CheckpointError",
    "SkippedNumpyObject",
    "TORCH_SUFFIXES",
    "describe_file",
    "is_zip_torch_file",
    "load_torch_file",
    "numpy_safe_globals",
]
