"""The worker: consume requests, apply them, publish replies: one visible reply each.

A thin loop over four parts, each in its own module:

1. :mod:`processor.worker.ownership`: which partitions this worker holds, where each starts
   (the group's committed offset, read stable), and the rewinds;
2. :mod:`processor.worker.intake`: records decoded; bad ones become fault replies and dead
   letters without touching the database;
3. :mod:`processor.worker.lanes` and :mod:`processor.worker.applier`: the good ones split
   into lanes by the rows they touch, the lanes applied concurrently, each one database transaction
   (the engine) writing the rows and the request ledger;
4. :mod:`processor.worker.commit`: the batch's replies, dead letters and next offsets of all
   its partitions in one Kafka transaction of the worker's one transactional producer,
   the offsets fenced by the group generation the batch was fetched under (KIP-447).

If the worker dies after the database commit and before the Kafka commit, the Kafka
transaction is aborted and the records are read again; the ledger then returns the
stored replies without applying anything, so consumers reading ``read_committed`` see
exactly one reply per request.

**Pipelining.** Step 4 of a batch runs in the background while the next batch is fetched
and applied (steps 1-3), so a cycle costs max(database, Kafka) rather than their sum. The
next batch's commit waits for the previous one, and its database work starts only after
the previous batch's database commit, so a row's order holds. When a commit fails, the
next batch's records of the same partitions are dropped (their effects are in the
ledger) and the partitions are rewound to the failed batch's first offsets: offsets only
move forward through a committed transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from processor.config import Settings
from processor.engine.engine import Engine, Envelope, Outcome, rows_of
from processor.kafka import clients as kafka
from processor.kafka import kip447
from processor.log import get_logger
from processor.metrics import Metrics
from processor.worker.accounting import Accounting
from processor.worker.applier import Applier, GaveUp
from processor.worker.commit import (
    COMMIT_RETRY_SECONDS,
    Batch,
    CommitPipeline,
    KafkaTransactions,
    Transactions,
    WorkerIdInUse,
)
from processor.worker.intake import (
    Message,
    OutRecord,
    Rejected,
)
from processor.worker.lanes import lane_count, split
from processor.worker.ownership import Ownership
from processor.worker.reply_routes import ReplyRoutes
from processor.worker.retry import Retry

__all__ = ["Worker"]

log = get_logger("processor.worker")

#: How long the worker tries to start its producer before it gives up (exit): a broker
#: restarting meanwhile is waited for; one that is not there is reported.
START_RETRY_SECONDS = 15.0
#: A loop that did not come back to its fetch for this long was stalled (the process
#: paused, the machine starved): a heartbeat interval, so that the group may have
#: evicted it. Before applying what it fetched, it asks the coordinator.
STALL_SECONDS = 3.0


# Over the ~250-line class budget (~270): what is left is the loop itself (start, fetch,
# hand a batch through ownership, lanes and the commit pipeline, stop) and the two calls
# its parts share (`_committed`, read by both the ownership checks and the pipeline;
# `_still_member`). Each concern around it is already its own module.
class Worker:
    """One member of the consumer group. ``await run(stop)`` until ``stop`` is set.

    ``transactions`` replaces the Kafka producer side (tests inject failures there);
    ``commit_retry_seconds`` bounds how long one batch's commit is retried.
    """

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        pool: asyncpg.Pool,
        metrics: Metrics,
        *,
        transactions: Transactions | None = None,
        commit_retry_seconds: float = COMMIT_RETRY_SECONDS,
    ) -> None:
        settings.require("kafka_bootstrap_servers")
        # The brokers and how to reach them (TLS, SASL), for every client of this worker's;
        # read once (password files, the TLS context), not at every producer start.
        self._access = settings.kafka_access()
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.worker_id = settings.worker_id or socket.gethostname()
        self.transactional_id = kafka.transactional_id(settings.group_id, self.worker_id)
        self._stop = asyncio.Event()
        self.applier = Applier(engine, pool, metrics, stop=self._stop)
        self.transactions = transactions or KafkaTransactions(self._access, self.transactional_id)
        self.pipeline = CommitPipeline(
            self.transactions,
            metrics,
            committed=self._committed,
            stop=self._stop,
            retry_seconds=commit_retry_seconds,
        )
        self.batch_lock = asyncio.Lock()
        self.ownership = Ownership(metrics, self._settle_locked)
        self.consumer: AIOKafkaConsumer | None = None
        # The previous batch's Kafka commit, running while the next batch is prepared;
        # it returns the partitions to rewind, and where.
        self._committing: asyncio.Task[dict[TopicPartition, int]] | None = None
        self._fatal: BaseException | None = None
        self._routes = ReplyRoutes(self._access, settings.reply_topic)
        self._accounting = Accounting(settings, metrics)
        self._last_poll = 0.0

    def ready(self) -> bool:
        return self.consumer is not None and time.monotonic() - self._last_poll < 60

    # -- the loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        relay = asyncio.create_task(self._relay(stop), name="stop-relay")
        try:
            await self._run(stop)
        finally:
            relay.cancel()

    async def _relay(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._stop.set()

    async def _run(self, stop: asyncio.Event) -> None:
        # The producer first: its InitProducerId ends what a previous life of this worker
        # left open, and the broker's API versions are checked before joining the group.
        starting = Retry(kafka.is_transient, START_RETRY_SECONDS, stop=self._stop)
        try:
            await starting.run(self.transactions.start)
        except GaveUp as exc:
            # The service's own error, for the command to explain (e.g. unreachable: exit 4).
            raise exc.__cause__ or exc from None
        consumer = kafka.make_consumer(
            self._access, self.settings.group_id, client_id=f"processor-{self.worker_id}"
        )
        self.consumer = self.ownership.consumer = consumer
        consumer.subscribe([self.settings.request_topic], listener=self.ownership)
        log.info(
            "worker starting",
            group=self.settings.group_id,
            topic=self.settings.request_topic,
            transactional_id=self.transactional_id,
        )
        try:
            await asyncio.wait_for(consumer.start(), kafka.CALL_TIMEOUT)
            log.info("worker started", group=self.settings.group_id)
            while not stop.is_set():
                if self._fatal is not None:
                    raise self._fatal
                self._last_poll = time.monotonic()
                try:
                    # While a commit is in flight, take what is already fetched, or settle.
                    fetched = await consumer.getmany(
                        timeout_ms=0 if self._committing else 200,
                        max_records=self.settings.max_batch,
                    )
                except KafkaError as exc:
                    log.warning("fetch failed", error=repr(exc))
                    await self._settle_locked()
                    await asyncio.sleep(1)
                    continue
                async with self.batch_lock:
                    if fetched:
                        await self._handle(fetched)
                    else:
                        await self.settle()
        finally:
            log.info("worker stopping")
            try:
                await self._settle_locked()
            except Exception:
                log.exception("last commit failed; its records will be read again")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), kafka.CALL_TIMEOUT)
            await self.transactions.close()
            self.consumer = None
            log.info("worker stopped")
        if self._fatal is not None:
            raise self._fatal

    async def _settle_locked(self) -> None:
        async with self.batch_lock:
            await self.settle()

    async def settle(self) -> dict[TopicPartition, int]:
        """Wait for the Kafka commit in flight; rewind the partitions it could not commit.

        Returns those partitions with the offset they were rewound to. Call it holding
        ``batch_lock``.
        """
        task = self._committing
        if task is None:
            return {}
        try:
            rewinds = await asyncio.shield(task)
        except WorkerIdInUse as exc:
            # Raised again by the loop: a rebalance callback would only log it.
            self._fatal = exc
            rewinds = {}
        finally:
            if task.done():
                self._committing = None
        self.ownership.rewind(rewinds)
        self.ownership.unverified.update(rewinds)
        return rewinds

    async def _handle(self, fetched: dict[TopicPartition, list[Any]]) -> None:
        """Apply a batch, then start its Kafka commit once the previous one has settled."""
        assert self.consumer is not None
        # The membership these records are fetched under: their offsets commit with it.
        group = kip447.group_metadata(self.consumer)
        now = datetime.now(UTC)
        owned = self.ownership.owned(fetched)
        if self.ownership.unverified & owned.keys():
            owned = await self.ownership.verified(owned, self._committed)
        if owned and not await self._still_member(owned, group):
            await self.settle()
            return
        total = sum(len(r) for r in owned.values())
        if not total:
            await self.settle()
            return
        self.metrics.in_flight.set(total)
        self.metrics.batch_size.observe(total)
        admitted: list[tuple[Message, Envelope | Rejected]] = []
        for records in owned.values():
            admitted.extend((r, self._accounting.admit(r, now)) for r in records)
        admitted = await self._routes.check(admitted, now)

        good = [(m, item) for m, item in admitted if isinstance(item, Envelope)]
        registry = self.engine.registry
        lanes = split(
            good,
            [rows_of(registry, e.request) for _, e in good],
            lane_count(len(good), self.settings.lanes),
        )
        started = time.monotonic()
        outcomes: dict[tuple[int, int], Outcome] | None
        try:
            outcomes = await self.applier.apply(lanes)
        except GaveUp:
            outcomes = None
        applied = time.monotonic()
        self.metrics.phase.labels("database").observe(applied - started)
        # The previous commit first: its failures rewind partitions of this batch too.
        rewound = await self.settle()
        waited = time.monotonic() - applied
        self.metrics.phase.labels("wait").observe(waited)
        log.debug(
            "batch applied",
            records=total,
            database_seconds=round(applied - started, 4),
            wait_seconds=round(waited, 4),
        )
        if outcomes is None:
            # What the other lanes committed is in the ledger: the redo replays it.
            self.ownership.rewind(
                {tp: records[0].offset for tp, records in owned.items() if tp not in rewound}
            )
            self.metrics.in_flight.set(0)
            return
        for tp in rewound:
            owned.pop(tp, None)  # rewound to the previous batch: these are read again
        if not owned:
            self.metrics.in_flight.set(0)
            return
        out: list[OutRecord] = []
        for message, item in admitted:
            if TopicPartition(message.topic, message.partition) in owned:
                out.extend(self._accounting.records_of(message, item, outcomes, now))
        batch = Batch(
            records=out,
            first={tp: records[0].offset for tp, records in owned.items()},
            next={tp: records[-1].offset + 1 for tp, records in owned.items()},
            group=group,
            timestamps=[r.timestamp for records in owned.values() for r in records],
        )
        self._committing = asyncio.create_task(self._commit(batch), name="commit")

    async def _still_member(
        self, owned: dict[TopicPartition, list[Any]], group: kip447.GroupMetadata
    ) -> bool:
        """False, the records rewound, when this worker may no longer be a current member.

        The group's Kafka commit would refuse the batch, but its database writes would land
        first, possibly ahead of the new owner's on the same rows. Asked after a stall, or
        when not a member at all: aiokafka, told by a refused heartbeat, dropped the
        membership and keeps the old assignment (and hands out its records) until it
        rejoins.
        """
        assert self.consumer is not None
        stalled = time.monotonic() - self._last_poll
        if stalled <= STALL_SECONDS and group.is_member:
            return True
        problem = await kip447.membership_problem(self.consumer)
        if problem is None:
            return True
        self.metrics.fenced.labels("stalled").inc()
        log.warning(
            "no longer a current member of the group: the fetched records are left to the group",
            stalled_seconds=round(stalled, 1),
            problem=problem,
        )
        self.ownership.rewind({tp: records[0].offset for tp, records in owned.items()})
        return False

    async def _committed(
        self, partitions: Sequence[TopicPartition]
    ) -> dict[TopicPartition, int | None]:
        """The group's committed offsets, read stable (kip447): an open transaction
        holding them is waited for."""
        assert self.consumer is not None
        consumer = self.consumer
        return {
            tp: await asyncio.wait_for(consumer.committed(tp), kafka.CALL_TIMEOUT)
            for tp in partitions
        }

    async def _commit(self, batch: Batch) -> dict[TopicPartition, int]:
        """Commit a batch; returns the partitions to read again, and where."""
        try:
            committed = await self.pipeline.commit(batch)
        finally:
            self.metrics.in_flight.set(0)
        if not committed:
            return dict(batch.first)
        self._accounting.committed(batch, self.consumer)
        return {}
