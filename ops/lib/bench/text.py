"""Numbers as the report and the progress lines write them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def per_transaction(point: Mapping[str, Any]) -> float | None:
    """Requests per Kafka transaction of a run: the worker's batch size, as it adapts."""
    per_1k = point.get("transactions_per_1k")
    return 1000 / per_1k if per_1k else None


def fmt(value: float | None, digits: int = 0, unit: str = "") -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:,.{digits}f}{unit}"


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"
