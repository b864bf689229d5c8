"""Rates with honest uncertainty: a count, its denominator and a Wilson score interval.

Safety numbers in this project come from small prompt sets (32-520 prompts), where a refusal rate
of 60% can easily be 48-71%. Every reported rate therefore carries its counts and a 95% interval,
so two runs are only called different when their intervals say so. The Wilson interval is used
because, unlike the normal approximation, it stays inside [0, 1] and keeps close to its nominal
coverage at k = 0, k = n and small n (Newcombe 1998, "Two-sided confidence intervals for the single
proportion", method 3).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from statistics import NormalDist

from ..errors import SafesteerError


def _check_counts(k: int, n: int) -> tuple[int, int]:
    try:
        k, n = operator.index(k), operator.index(n)
    except TypeError:
        raise SafesteerError(f"counts must be integers, got k={k!r}, n={n!r}") from None
    if n < 0 or k < 0 or k > n:
        raise SafesteerError(f"invalid counts k={k}, n={n}: need 0 <= k <= n")
    return k, n


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n trials.

    n = 0 carries no information, so the interval is the whole of [0, 1].
    """
    k, n = _check_counts(k, n)
    if not 0.0 < confidence < 1.0:
        raise SafesteerError(f"confidence must be strictly between 0 and 1, got {confidence}")
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At k = 0 and k = n one bound is exactly 0 or 1; rounding would otherwise leave 1e-17 or
    # 0.9999999999999999, which prints oddly and fails equality checks downstream.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class Rate:
    """k of n, e.g. 37 refusals out of 64 prompts, with its 95% Wilson interval."""

    k: int
    n: int

    def __post_init__(self) -> None:
        _check_counts(self.k, self.n)

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else math.nan

    @property
    def low(self) -> float:
        return wilson_interval(self.k, self.n)[0]

    @property
    def high(self) -> float:
        return wilson_interval(self.k, self.n)[1]

    def to_dict(self) -> dict:
        """JSON-ready; the rate is None (not NaN, which is not valid JSON) when n = 0."""
        return {
            "k": self.k,
            "n": self.n,
            "rate": self.value if self.n else None,
            "ci_low": self.low,
            "ci_high": self.high,
        }

    def __str__(self) -> str:
        if self.n == 0:
            return "n/a (0/0)"
        return (
            f"{100 * self.value:.1f}% ({self.k}/{self.n}, "
            f"95% CI {100 * self.low:.1f}-{100 * self.high:.1f})"
        )


def rate_record(k: int, n: int, judge: str | None = None) -> dict:
    """`Rate(k, n).to_dict()`, with the name of the judge whose verdicts were counted when given."""
    out = Rate(k, n).to_dict()
    if judge:
        out["judge"] = judge
    return out
