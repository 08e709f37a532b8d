"""Words the tools' reports share."""

from __future__ import annotations

__all__ = ["counted"]


def counted(count: int, word: str, plural: str | None = None) -> str:
    """``1 reply``, ``2 replies``, ``1,234 requests``: a count with its noun."""
    if count == 1:
        return f"{count:,} {word}"
    if plural is None:
        plural = word[:-1] + "ies" if word.endswith("y") and word[-2:] != "ey" else word + "s"
    return f"{count:,} {plural}"
