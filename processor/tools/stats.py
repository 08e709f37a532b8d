"""Numbers the load generators and reports share: one percentile, one skew."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["percentile", "zipf_weights"]


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (``q`` in percent, 0-100) of ``values``.

    The smallest value with at least ``q`` % of the values at or below it: always one of
    the values, never an interpolation (p99 of 100 values is the 99th smallest). ``values``
    need not be sorted; nan when empty. The one definition of ``processor loadtest``,
    ``ops/bench`` and ``ops/chaos`` (BENCHMARKS.md).
    """
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def zipf_weights(rows: int, skew: float) -> list[float]:
    """Weight of the i-th hottest row: 1/(i+1)^skew; 0 uniform, inf = all on the first row."""
    if math.isinf(skew):
        return [1.0] + [0.0] * (rows - 1)
    return [1.0 / (i + 1) ** skew for i in range(rows)]
