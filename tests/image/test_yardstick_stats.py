"""The yardstick's seed statistics (benchmarks/yardstick.py), against hand-computed values."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from yardstick import spread  # noqa: E402


def test_spread_range_and_standard_error_of_the_mean():
    # mean 110, range 20 -> 20/110; std (ddof 1) 10 -> sem 10/sqrt(3) = 5.7735 -> 5.7735/110
    s = spread([100.0, 110.0, 120.0])
    assert s["mean"] == 110.0 and s["rel_spread"] == pytest.approx(0.1818, abs=1e-4)
    assert s["rel_sem"] == pytest.approx(0.0525, abs=1e-4)
    # more seeds with the same scatter: the range does not shrink, the standard error does
    s6 = spread([100.0, 110.0, 120.0, 100.0, 110.0, 120.0])
    assert s6["rel_spread"] == s["rel_spread"] and s6["rel_sem"] < s["rel_sem"]
    assert spread([100.0, None])["rel_sem"] is None and spread([5.0])["rel_sem"] is None
