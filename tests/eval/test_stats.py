import json
import math

import pytest

from safesteer.errors import SafesteerError
from safesteer.eval.stats import Rate, wilson_interval

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_by_quadratic(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Independent reference: the Wilson bounds are the p solving (k/n - p)^2 = z^2 p (1 - p) / n,
    i.e. (1 + z^2/n) p^2 - (2 k/n + z^2/n) p + (k/n)^2 = 0."""
    ph = k / n
    a = 1 + z * z / n
    b = -(2 * ph + z * z / n)
    c = ph * ph
    disc = math.sqrt(b * b - 4 * a * c)
    return (-b - disc) / (2 * a), (-b + disc) / (2 * a)


# Published values: Newcombe (1998), Stat Med 17:857-872, Table I, method 3 (Wilson score
# without continuity correction), plus the textbook 0/10 and 5/10 cases.
PUBLISHED = [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
    (29, 29, 0.8830, 1.0),
    (0, 10, 0.0, 0.2775),
    (5, 10, 0.2366, 0.7634),
]


@pytest.mark.parametrize("k,n,low,high", PUBLISHED)
def test_wilson_matches_published_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=6e-5)
    assert hi == pytest.approx(high, abs=6e-5)


@pytest.mark.parametrize("k,n", [(1, 7), (37, 64), (81, 263), (3, 1000), (999, 1000), (50, 51)])
def test_wilson_matches_quadratic_roots(k, n):
    assert wilson_interval(k, n) == pytest.approx(wilson_by_quadratic(k, n), abs=1e-12)


def test_edges():
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(10, 10)
    assert 0.0 < lo < 1.0
    # The interval is symmetric under swapping successes and failures.
    lo0, hi0 = wilson_interval(0, 10)
    assert (lo, hi) == pytest.approx((1 - hi0, 1 - lo0))


def test_confidence_widens_interval():
    lo95, hi95 = wilson_interval(20, 50)
    lo99, hi99 = wilson_interval(20, 50, confidence=0.99)
    assert lo99 < lo95 < 0.4 < hi95 < hi99
    z99 = 2.5758293035489004
    assert (lo99, hi99) == pytest.approx(wilson_by_quadratic(20, 50, z99), abs=1e-12)


@pytest.mark.parametrize("k,n", [(11, 10), (-1, 10), (0, -1), (1.5, 10)])
def test_bad_counts_raise(k, n):
    with pytest.raises(SafesteerError):
        wilson_interval(k, n)
    with pytest.raises(SafesteerError):
        Rate(k, n)


@pytest.mark.parametrize("confidence", [0.0, 1.0, 95])
def test_bad_confidence_raises(confidence):
    with pytest.raises(SafesteerError):
        wilson_interval(1, 2, confidence)


def test_rate_properties_and_str():
    r = Rate(37, 64)
    assert r.value == 37 / 64
    assert (r.low, r.high) == wilson_interval(37, 64)
    # 37/64 = 0.578125; Wilson bounds 0.45610 and 0.69130 (see wilson_by_quadratic).
    assert str(r) == "57.8% (37/64, 95% CI 45.6-69.1)"
    assert (r.low, r.high) == pytest.approx((0.45610, 0.69130), abs=1e-5)
    d = r.to_dict()
    assert d == {"k": 37, "n": 64, "rate": 37 / 64, "ci_low": r.low, "ci_high": r.high}


def test_empty_rate():
    r = Rate(0, 0)
    assert math.isnan(r.value)
    assert (r.low, r.high) == (0.0, 1.0)
    assert str(r) == "n/a (0/0)"
    # Must survive strict JSON (NaN is not JSON).
    json.dumps(r.to_dict(), allow_nan=False)
    assert r.to_dict()["rate"] is None
