"""The statistics the benchmarks report: mean and standard error over pairs, paired differences, strict JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from scail2.utils.stats import json_safe, mean_se, paired_difference


def test_mean_se_exact():
    assert mean_se([1.0, 2.0, 3.0, 4.0]) == pytest.approx({"mean": 2.5, "se": math.sqrt(5 / 3) / 2, "n": 4})
    # deviations from 0.625: 0.375, -0.625, -0.125, 0.375; squares sum to 0.6875; sd = sqrt(0.6875 / 3)
    assert mean_se([1.0, 0.0, 0.5, 1.0]) == pytest.approx({"mean": 0.625, "se": math.sqrt(0.6875 / 3) / 2, "n": 4}, rel=1e-12)
    one = mean_se([float("nan"), 2.0, None, float("inf")])  # only finite values count
    assert one["mean"] == 2.0 and one["n"] == 1 and math.isnan(one["se"])
    empty = mean_se([])
    assert empty["n"] == 0 and math.isnan(empty["mean"]) and math.isnan(empty["se"])


def test_paired_difference_exact():
    # Improvements 1, 1, 1.5 (lower is better): mean 7/6, SE sqrt(1/12)/sqrt(3) = 1/6, beats (7/6 > 2/6).
    d = paired_difference([1.0, 2.0, 0.5, 9.0], [2.0, 3.0, 2.0, float("nan")])
    assert d["n"] == 3 and d["mean"] == pytest.approx(7 / 6) and d["se"] == pytest.approx(1 / 6) and d["beats"]
    # Higher is better: the same numbers are now losses.
    assert not paired_difference([1.0, 2.0, 0.5], [2.0, 3.0, 2.0], higher_is_better=True)["beats"]
    assert paired_difference([2.0, 3.0, 2.0], [1.0, 2.0, 0.5], higher_is_better=True)["beats"]
    # Mean improvement 0.1 with SE 0.1: not more than twice the SE.
    assert not paired_difference([0.0, 0.0], [0.0, 0.2])["beats"]
    # One pair has no standard error, so it never beats.
    assert not paired_difference([0.0], [5.0])["beats"]
    with pytest.raises(ValueError, match="length"):
        paired_difference([1.0], [1.0, 2.0])


def test_json_safe_is_strict_json():
    value = {"a": [np.float32(0.5), float("nan")], "b": (np.int64(3), float("-inf")), "c": "x"}
    text = json.dumps(json_safe(value), allow_nan=False)
    assert json.loads(text) == {"a": [0.5, None], "b": [3, None], "c": "x"}
