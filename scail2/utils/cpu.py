"""Process-wide CPU numerics of a run: the torch intra-op thread count and flushing denormal floats to zero.

Both decide the last bits of CPU results, so a run sets them for its duration and restores them afterwards
(`cpu_numerics`), leaving the calling process (a notebook, a test session) as it was.

Flushing denormals is a per-thread CPU flag (x86 MXCSR FTZ/DAZ). ``torch.set_flush_denormal`` sets it on the
calling thread only; threads created afterwards inherit it, threads that already exist keep theirs. Measured with
2 threads: after the OpenMP pool exists, an element-wise op on denormal inputs is flushed in the main thread's
half of the tensor only. A fresh process that sets the flag before any parallel work (``scail2-train`` does)
flushes in every intra-op thread; a process whose pool was started earlier flushes in its main thread only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# The smallest normal float32 is about 1.18e-38; this is a denormal that survives a multiply by 2 without FTZ/DAZ.
_DENORMAL = 1e-39


def flush_denormal_enabled() -> bool:
    """Whether the calling thread flushes denormals (torch has no getter: probed with a one-element product)."""
    return bool((torch.tensor([_DENORMAL], dtype=torch.float32) * 2).item() == 0.0)


@contextlib.contextmanager
def cpu_numerics(threads: int | None = None, flush_denormal: bool | None = None) -> Iterator[None]:
    """Run with ``threads`` torch intra-op threads and denormal flushing on or off (None: leave each as it is),
    then restore both."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads={threads!r}: need a positive number of torch threads, or None for the default")
    before_threads = torch.get_num_threads()
    before_flush = flush_denormal_enabled()
    try:
        if flush_denormal is not None:
            torch.set_flush_denormal(bool(flush_denormal))  # a no-op where unsupported
        if threads is not None:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(before_threads)
        torch.set_flush_denormal(before_flush)
