"""One retry policy for every service call the worker repeats: exponential backoff with
jitter, bounded by a time budget and by the worker's stop signal.

The worker retries four things (starting its producer, a lane's database transaction, a
request alone, a batch's Kafka commit); each states what is transient and how long it
may try, and nothing else differs.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

__all__ = ["GaveUp", "Retry", "backoff"]

T = TypeVar("T")


class GaveUp(Exception):
    """The budget ran out (or the worker is stopping); ``__cause__`` is the last error."""


def backoff(attempt: int, *, base: float = 0.05, cap: float = 5.0) -> float:
    """``base * 2**attempt`` capped, times a jitter in [0.5, 1.5): retries of several
    workers hitting one recovering service spread out."""
    return float(min(cap, base * 2**attempt) * (0.5 + random.random()))


@dataclass(frozen=True, slots=True)
class Retry:
    """How one kind of call is retried.

    ``transient(exc)`` says whether an error is worth another try (anything else is
    raised at once); ``seconds`` bounds the whole effort, ``attempts`` the number of
    tries (None: only the time); ``stop`` set ends it early.
    """

    transient: Callable[[BaseException], bool]
    seconds: float
    attempts: int | None = None
    cap: float = 5.0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    clock: Callable[[], float] = time.monotonic

    async def run(
        self,
        call: Callable[[], Awaitable[T]],
        *,
        before_retry: Callable[[int, BaseException], Awaitable[None]] | None = None,
    ) -> T:
        """``await call()`` until it succeeds; :class:`GaveUp` from the last error when
        the budget is spent. ``before_retry(attempt, error)`` runs before each new try
        (count it, log it, reset a connection)."""
        deadline = self.clock() + self.seconds
        attempt = 0
        while True:
            try:
                return await call()
            except Exception as exc:
                if not self.transient(exc):
                    raise
                attempt += 1
                spent = self.attempts is not None and attempt >= self.attempts
                if spent or self.stop.is_set() or self.clock() >= deadline:
                    raise GaveUp(f"gave up after {attempt} attempt(s): {exc!r}"[:500]) from exc
                if before_retry is not None:
                    await before_retry(attempt, exc)
                await asyncio.sleep(backoff(attempt - 1, cap=self.cap))
