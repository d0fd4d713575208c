"""The report's summary statistics: mean, sample standard deviation and a Student-t interval.

Every aggregate in a results tree is :func:`stats` of a list of values
(``{"mean", "std", "n", "values"}``, with ``ci95`` from :func:`t_interval`
when n >= 3), over model pairs, searches or seeds. The collection of the
main experiments (:mod:`lmckit.report.results`), the studies and the paper
section all use it.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from scipy.stats import t as student_t

__all__ = ["stats", "t_interval"]


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Two-sided Student-t confidence interval for the mean of ``values`` (n >= 2; sample std, n - 1 dof).

    ``mean -/+ t_{(1+level)/2, n-1} * std / sqrt(n)``: the interval the report prints as "95% CI (t)".
    """
    n = len(values)
    if n < 2:
        raise ValueError("a t interval needs at least two values")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


def stats(values: Iterable[float], over: str | None = None) -> dict[str, Any]:
    """Mean, sample std (0 for one value), n and the values; ``over`` says what varies across the values.

    With n >= 3 a 95% Student-t interval for the mean is added as ``ci95`` (``[low, high]``, ``ci_method`` "t").
    """
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if not n:
        out: dict[str, Any] = {"mean": 0.0, "std": 0.0, "n": 0, "values": []}
    else:
        mean = sum(vals) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
        out = {"mean": mean, "std": std, "n": n, "values": vals}
        if n >= 3:
            out["ci95"] = list(t_interval(vals))
            out["ci_method"] = "t"
    if over is not None:
        out["over"] = over
    return out
