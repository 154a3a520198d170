"""Statistics of a study, without scipy: exact Student t quantiles for any degrees of
freedom, mean ± half-width of the 95 % t interval, and paired differences with a paired t-test.

The t distribution's CDF is the regularised incomplete beta function
(``P(|T| > t) = I_{df/(df+t²)}(df/2, 1/2)``), evaluated by its continued fraction (Lentz's
method, as Numerical Recipes §6.4); the quantile inverts it by bisection, to about 1e-12.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), converging for x < (a+1)/(a+b+2)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"incomplete_beta needs a, b > 0 and 0 <= x <= 1, got {a}, {b}, {x}")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(t):
        return 0.0
    return incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * t_two_sided_p(t, df)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (e.g. p = 0.975: the 95 % two-sided critical value)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs 0 < p < 1, got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:  # bracket: the quantile grows without bound as df -> 0
        low, high = high, high * 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low <= 1e-13 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Interval:
    """Mean over ``n`` values and the half-width of its two-sided ``level`` t interval
    (None with fewer than two values: no spread to estimate)."""

    mean: float | None
    half_width: float | None
    n: int
    sd: float | None = None
    level: float = CONFIDENCE

    def text(self, digits: int = 1) -> str:
        if self.mean is None:
            return "-"
        if self.half_width is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def _clean(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(v)]


def mean_interval(values: Sequence[float | None], level: float = CONFIDENCE) -> Interval:
    """Mean ± half-width of the t interval over the values given (None and NaN left out)."""
    xs = _clean(values)
    n = len(xs)
    if n == 0:
        return Interval(None, None, 0, None, level)
    mean = math.fsum(xs) / n
    if n == 1:
        return Interval(mean, None, 1, None, level)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(mean, half, n, sd, level)


@dataclass(frozen=True)
class PairedTest:
    """Differences a - b over matched pairs: their mean ± t interval and the two-sided paired
    t-test's p-value (None where it is undefined: fewer than two pairs, or no spread)."""

    difference: Interval
    t: float | None
    p: float | None


def paired_test(a: Sequence[float], b: Sequence[float], level: float = CONFIDENCE) -> PairedTest:
    if len(a) != len(b):
        raise ValueError(f"paired_test needs pairs: {len(a)} values against {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    interval = mean_interval(diffs, level)
    if interval.n < 2 or not interval.sd:
        return PairedTest(interval, None, None)
    t = interval.mean / (interval.sd / math.sqrt(interval.n))
    return PairedTest(interval, t, t_two_sided_p(t, interval.n - 1))
