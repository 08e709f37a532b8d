"""Shared knobs of the property-based (hypothesis) tests.

Every fuzz test states a default example count sized for CI (the whole fuzz suite runs in
well under two minutes on a small machine). For a long local run, set
``PROCESSOR_FUZZ_EXAMPLES`` to the number of examples every fuzz test should run, e.g.
``PROCESSOR_FUZZ_EXAMPLES=2000 .venv/bin/pytest tests/unit/test_fuzz_intake.py
tests/integration/test_engine_state_machine.py --hypothesis-show-statistics``.
"""

from __future__ import annotations

import os

__all__ = ["examples"]


def examples(default: int) -> int:
    """``PROCESSOR_FUZZ_EXAMPLES`` when set, else the test's CI-sized ``default``."""
    raw = os.environ.get("PROCESSOR_FUZZ_EXAMPLES", "").strip()
    if not raw:
        return default
    count = int(raw)
    if count < 1:
        raise ValueError(f"PROCESSOR_FUZZ_EXAMPLES must be >= 1, got {raw!r}")
    return count
