"""Statistics over per-pair (per-case) values, as the benchmarks report them, and JSON-safe results.

`mean_se`: mean and standard error (sample standard deviation / sqrt(n)) of the finite values.
`paired_difference`: the per-pair improvement of one method over another, its mean and standard error, and
whether it exceeds twice that error ("beats": the pairs, not the draws or frames, are the independent units).
`json_safe`: non-finite floats as None and numpy scalars as Python numbers, so results files are strict JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def mean_se(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "se", "n"}`` of the finite values (None, NaN and inf left out); the error is NaN for n < 2 and
    both are NaN for n = 0."""
    v = np.asarray([float(x) for x in values if x is not None and math.isfinite(float(x))], dtype=np.float64)
    if not len(v):
        return {"mean": math.nan, "se": math.nan, "n": 0}
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan
    return {"mean": float(v.mean()), "se": se, "n": int(len(v))}


def paired_difference(ours: Sequence[float], theirs: Sequence[float], higher_is_better: bool = False) -> dict[str, Any]:
    """Per-pair improvement of ``ours`` over ``theirs`` (``theirs - ours`` for an error, ``ours - theirs`` when
    higher is better; pairs where either value is not finite are left out): `mean_se` of it, and ``beats``, the
    mean improvement exceeds twice its standard error (needs at least 2 pairs)."""
    if len(ours) != len(theirs):
        raise ValueError(f"paired values differ in length ({len(ours)} vs {len(theirs)})")
    sign = -1.0 if higher_is_better else 1.0
    finite = [(a, b) for a, b in zip(ours, theirs) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    stats: dict[str, Any] = mean_se([sign * (b - a) for a, b in finite])
    stats["beats"] = bool(stats["n"] > 1 and stats["mean"] > 2 * stats["se"])
    return stats


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None and numpy scalars as Python numbers (for strict JSON files)."""
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
