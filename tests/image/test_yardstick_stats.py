"""The yardstick's seed statistics (benchmarks/yardstick.py), against hand-computed values."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from yardstick import ratio, spread, summarise  # noqa: E402


def test_spread_range_and_standard_error_of_the_mean():
    # mean 110, range 20 -> 20/110; std (ddof 1) 10 -> sem 10/sqrt(3) = 5.7735 -> 5.7735/110
    s = spread([100.0, 110.0, 120.0])
    assert s["mean"] == 110.0 and s["rel_spread"] == pytest.approx(0.1818, abs=1e-4)
    assert s["rel_sem"] == pytest.approx(0.0525, abs=1e-4)
    # more seeds with the same scatter: the range does not shrink, the standard error does
    s6 = spread([100.0, 110.0, 120.0, 100.0, 110.0, 120.0])
    assert s6["rel_spread"] == s["rel_spread"] and s6["rel_sem"] < s["rel_sem"]
    assert spread([100.0, None])["rel_sem"] is None and spread([5.0])["rel_sem"] is None


def test_speedup_standard_error_adds_in_quadrature():
    # 110 / 88 = 1.25; ranges 20/110 and 16/88 (both 0.1818) add; standard errors 0.0525 each -> hypot = 0.0742
    r = ratio(spread([100.0, 110.0, 120.0]), spread([80.0, 88.0, 96.0]), [0, 1, 2], [0, 1, 2])
    assert r["value"] == 1.25 and r["per_seed"] == [1.25, 1.25, 1.25]
    assert r["rel_spread"] == pytest.approx(0.3636, abs=1e-4) and r["rel_sem"] == pytest.approx(0.0742, abs=1e-4)
    assert ratio(spread([100.0, None]), spread([80.0, 88.0]), [0, 1], [0, 1])["rel_sem"] is None


def test_the_two_readings_of_the_resolution_check():
    """Two SiT seeds with exact power laws FD = A / step (the smoothing keeps them), A = 1e5 and 1.2e5, evaluated at
    100, 200, 400, 800 of an 800-step budget. Threshold at 25%: max(A) / 200 = 600. Seed 1 crosses it between 100
    (FD 1000) and 200 (500) at 100 * 2 ** 0.8 = 174.11 (FD linear in log step), seed 2 at 200: mean 187.06, range
    25.89 / 187.06 = 13.8% (> 10%: not resolved), standard error 12.94 / 187.06 = 6.9% (<= 10%: resolved); the same
    at 50% and 100% (every crossing scales by 2)."""
    def seed(s: int, a: float) -> dict:
        point = {"accuracy": 0.1, "malformed": 0.0, "attribute_tv": {"colour": 0.0}}
        return {"seed": s, "curve": {str(t): {"fd": a / t, **point} for t in (100, 200, 400, 800)}}

    results = {"settings": {"steps": 800}, "methods": {"sit": {"seeds": [seed(0, 1e5), seed(1, 1.2e5)]}}}
    summarise(results)
    assert [t["value"] for t in results["thresholds"].values()] == pytest.approx([600.0, 300.0, 150.0])
    for k, (key, rec) in enumerate(results["methods"]["sit"]["steps_to_threshold"].items()):
        assert rec["per_seed"] == pytest.approx([174.11 * 2**k, 200.0 * 2**k], abs=0.02)
        assert rec["rel_spread"] == pytest.approx(0.1384, abs=1e-4)
        assert rec["rel_sem"] == pytest.approx(0.0692, abs=1e-4)
        assert results["resolution_ok"][key] is False and results["resolution_ok_sem"][key] is True
