"""Tensor-by-tensor reading and writing of weight files, so that converting a checkpoint never holds it twice.

- :class:`TensorSource`: the tensors of a weights file or folder, read one at a time. Zip-format torch files
  are memory-mapped (``torch.load(mmap=True)`` through the weights-only loader); after a tensor is used its
  pages are handed back to the kernel (``madvise(MADV_DONTNEED)`` on Linux), so the resident set does not grow
  to the size of the file. Safetensors files are opened with ``safe_open`` and read per tensor.
- :func:`write_safetensors`: writes one ``.safetensors`` file from a list of (name, shape, dtype, producer)
  entries, computing the header from the shapes first and then producing, writing and dropping one tensor at
  a time. The format is the public safetensors layout (8-byte little-endian header length, a JSON header with
  dtype/shape/data_offsets, then the raw little-endian bytes), read back by ``safetensors.safe_open``.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from scail2.utils.torch_files import CheckpointError, is_zip_torch_file, load_torch_file

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FROM_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


# ------------------------------------------------------------------------------------------------ reading
def _release_pages(tensor: torch.Tensor) -> None:
    """Tell the kernel the pages of a memory-mapped tensor are not needed any more (Linux; else a no-op).

    The mapping is private and never written, so the pages are simply re-read from the file if touched again.
    """
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu":
        return
    storage = tensor.untyped_storage()
    start, size = storage.data_ptr(), storage.nbytes()
    page = mmap.PAGESIZE
    first = (start + page - 1) // page * page  # whole pages inside the storage only
    last = (start + size) // page * page
    if last <= first:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    madv_dontneed = 4
    libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(madv_dontneed))


class TensorSource:
    """Read-only access to the tensors of a weights file or folder, one tensor at a time.

    ``shape(key)`` / ``dtype(key)`` never read data; ``get(key)`` returns the tensor (memory-mapped for zip-format
    torch files, a fresh copy for safetensors); ``release(key)`` drops a memory-mapped tensor's pages.
    """

    def __init__(self, files: list[Path], unwrap: Callable[[object, Path], dict[str, torch.Tensor]]) -> None:
        self._torch: dict[str, torch.Tensor] = {}
        self._mapped: set[str] = set()  # keys whose tensors are memory-mapped from a zip-format torch file
        self._st_file: dict[str, Path] = {}
        self._st_meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._pending: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}  # the safetensors file being indexed
        for f in files:
            if f.suffix == ".safetensors":
                part_keys = self._index_safetensors(f)
            else:
                part = unwrap(load_torch_file(f, what="transformer weights"), f)
                part_keys = list(part)
            dup = sorted(set(part_keys) & (set(self._torch) | set(self._st_file)))
            if dup:
                raise CheckpointError(f"keys appear in more than one shard ({f.name}): {dup[:5]}")
            if f.suffix != ".safetensors":
                self._torch.update(part)
                if is_zip_torch_file(f):
                    self._mapped.update(part)
            else:
                self._commit_safetensors(f)

    def _index_safetensors(self, path: Path) -> list[str]:
        from safetensors import safe_open

        from scail2.utils.torch_files import describe_file

        self._pending = {}
        try:
            with safe_open(str(path), framework="pt") as handle:
                for k in handle.keys():
                    sl = handle.get_slice(k)
                    self._pending[k] = (tuple(sl.get_shape()), _FROM_SAFETENSORS[sl.get_dtype()])
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types; reported with the file
            raise CheckpointError(
                f"{path} ({describe_file(path)}) cannot be read as safetensors ({exc}); re-download or re-save it"
            ) from exc
        return list(self._pending)

    def _commit_safetensors(self, path: Path) -> None:
        for k, meta in self._pending.items():
            self._st_file[k] = path
            self._st_meta[k] = meta
        self._pending = {}

    def keys(self) -> list[str]:
        return [*self._torch, *self._st_file]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._torch[key].shape) if key in self._torch else self._st_meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._torch[key].dtype if key in self._torch else self._st_meta[key][1]

    def get(self, key: str) -> torch.Tensor:
        if key in self._torch:
            return self._torch[key]
        from safetensors import safe_open

        with safe_open(str(self._st_file[key]), framework="pt") as handle:
            return handle.get_tensor(key)

    def release(self, key: str) -> None:
        """Drop the resident pages of a memory-mapped tensor (it stays readable: pages are re-read on use).
        A no-op for tensors that are not memory-mapped."""
        if key in self._mapped:
            _release_pages(self._torch[key])

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {k: self.get(k) for k in self.keys()}


# ------------------------------------------------------------------------------------------------ writing
@dataclass(frozen=True)
class TensorEntry:
    """One tensor to write: its name, shape, dtype and a function producing it (called exactly once)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]
    done: Callable[[], None] | None = None  # called after the tensor was written (e.g. release its source)

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def write_safetensors(path: Path, entries: Iterable[TensorEntry], metadata: dict[str, str] | None = None) -> int:
    """Write ``entries`` to ``path`` in the safetensors format, one tensor in memory at a time; returns bytes
    of tensor data written. Every produced tensor must have the declared shape and dtype."""
    entries = list(entries)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for e in entries:
        if e.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{e.name}: dtype {e.dtype} cannot be written as safetensors")
        header[e.name] = {"dtype": SAFETENSORS_DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad the header so the data starts 8-byte aligned
    with Path(path).open("wb") as out:
        out.write(len(raw).to_bytes(8, "little"))
        out.write(raw)
        for e in entries:
            tensor = e.produce()
            if tuple(tensor.shape) != tuple(e.shape) or tensor.dtype != e.dtype:
                raise ValueError(
                    f"{e.name}: produced {tuple(tensor.shape)} {tensor.dtype}, declared {tuple(e.shape)} {e.dtype}"
                )
            data = tensor.detach().cpu().contiguous()
            if data.numel():
                out.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
            del tensor, data
            if e.done is not None:
                e.done()
    return offset


def plan_shards(entries: list[TensorEntry], max_shard_size: int) -> list[list[TensorEntry]]:
    """Split entries (in order) into shards of at most ``max_shard_size`` bytes (a larger tensor gets its own)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return [s for s in shards if s]


def parse_size(size: int | str) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"64KB"`` / an int -> bytes (decimal units, as huggingface_hub uses)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            number = text[: -len(unit)].strip()
            try:
                return int(float(number) * factor)
            except ValueError:
                break
    raise ValueError(f"shard size {size!r}: use a byte count or a number with GB / MB / KB (e.g. 5GB)")


__all__ = ["TensorEntry", "TensorSource", "parse_size", "plan_shards", "write_safetensors"]
