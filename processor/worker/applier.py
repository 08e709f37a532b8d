"""The database side of a batch: its lanes, each one transaction on its own connection.

Lanes (:mod:`processor.lanes`) touch disjoint rows, so they run concurrently. A lane
whose transaction fails on a transient error (connection lost, restart, serialization
failure, deadlock, lock timeout) is retried whole, after the pool's stale connections
are dropped: the same requests in the same order, so a row's order holds, and the
ledger makes a retry safe when a COMMIT's outcome was unknown. A lane that trips a
non-transient error is redone one request at a time, so only the guilty request faults.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence

import asyncpg

from processor.engine.engine import Engine, Envelope, Outcome, is_transient
from processor.log import get_logger
from processor.metrics import Metrics
from processor.worker.intake import Message
from processor.worker.retry import GaveUp, Retry

__all__ = ["DATABASE_RETRY_SECONDS", "Applier", "GaveUp"]

log = get_logger("processor.applier")

#: How long a lane's database transaction is retried before the batch is left to be
#: redone: well under max_poll_interval, so a long outage does not cost the membership.
DATABASE_RETRY_SECONDS = 120.0
#: Tries of a request alone (after its lane failed on a non-transient error).
ISOLATED_ATTEMPTS = 10

Lane = Sequence[tuple[Message, Envelope]]


class Applier:
    """Applies lanes with the engine on pooled connections."""

    def __init__(
        self, engine: Engine, pool: asyncpg.Pool, metrics: Metrics, *, stop: asyncio.Event
    ) -> None:
        self.engine = engine
        self.pool = pool
        self._metrics = metrics
        self._lane_retry = Retry(is_transient, DATABASE_RETRY_SECONDS, stop=stop)
        self._alone_retry = Retry(
            is_transient, DATABASE_RETRY_SECONDS, attempts=ISOLATED_ATTEMPTS, stop=stop
        )

    async def apply(self, lanes: Sequence[Lane]) -> dict[tuple[int, int], Outcome]:
        """Every lane's outcomes by (partition, offset); :class:`GaveUp` if any lane gave
        up (what the others committed is in the ledger: a redo replays it)."""
        results = await asyncio.gather(
            *(self._lane(lane) for lane in lanes if lane), return_exceptions=True
        )
        outcomes: dict[tuple[int, int], Outcome] = {}
        for result in results:
            if isinstance(result, BaseException):
                raise result
            outcomes.update(result)
        return outcomes

    async def _lane(self, lane: Lane) -> dict[tuple[int, int], Outcome]:
        envelopes = [env for _, env in lane]
        try:
            outcomes = await self._lane_retry.run(
                lambda: self._process(envelopes), before_retry=self._before_retry
            )
        except GaveUp:
            raise
        except Exception as exc:  # not transient: a request trips a bug or a value
            log.exception("engine failed on a batch; isolating", error=repr(exc)[:300])
            outcomes = await self._isolate(envelopes)
        return {(m.partition, m.offset): o for (m, _), o in zip(lane, outcomes, strict=True)}

    async def _before_retry(self, attempt: int, exc: BaseException) -> None:
        self._metrics.retries.labels("database").inc()
        log.warning("database retry", attempt=attempt, error=repr(exc)[:300])
        await self.pool.expire_connections()

    async def _process(self, envelopes: list[Envelope]) -> list[Outcome]:
        """The engine on a pooled connection. Once it returned, its transaction committed
        and the outcomes stand, whatever happens when the connection goes back to the pool
        (resetting a connection broken by a server shutdown can fail): taking that for a
        failed batch would answer applied requests with UnExpected faults."""
        outcomes: list[Outcome] | None = None
        try:
            async with self.pool.acquire(timeout=10) as conn:
                outcomes = await self.engine.process(conn, envelopes)
        except Exception as exc:
            if outcomes is None:
                raise
            log.warning("connection failed after its commit; dropped", error=repr(exc)[:300])
        assert outcomes is not None
        return outcomes

    async def _isolate(self, envelopes: list[Envelope]) -> list[Outcome]:
        """One request at a time, so a request that trips a bug faults alone."""
        results: list[Outcome] = []
        for env in envelopes:
            try:
                results.extend(
                    await self._alone_retry.run(
                        functools.partial(self._process, [env]), before_retry=self._before_retry
                    )
                )
            except GaveUp:
                raise
            except Exception as exc:
                log.exception("request failed", request_id=env.request.request_id)
                results.append(self.engine.unexpected(env, exc))
        return results
