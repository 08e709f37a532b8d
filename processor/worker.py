"""The worker: consume requests, apply them, publish replies: one visible reply each.

Per poll (``getmany``), for the partitions this worker owns:

1. records are decoded (:mod:`processor.intake`); bad ones become fault replies and
   dead letters without touching the database;
2. the good ones are split into *lanes* by a hash of their Kafka key, and the lanes run
   concurrently, each one database transaction on its own connection (the engine). A key
   always maps to the same lane, so its requests apply in offset order and its writes
   never run on two connections at once;
3. per input partition, its replies, dead letters and next offset are committed in one
   Kafka transaction by that partition's own transactional producer
   (``<group>-<topic>-<partition>``). A new owner of the partition starts a producer with
   the same id, which fences a zombie and aborts its open transaction before the new
   owner reads the committed offset.

If the worker dies after the database commit and before the Kafka commit, the Kafka
transaction is aborted and the records are read again; the ledger then returns the
stored replies without applying anything, so consumers reading ``read_committed`` see
exactly one reply per request.

**Pipelining.** Step 3 of a batch runs in the background while the next batch is fetched
and applied (steps 1-2), so a cycle costs max(database, Kafka) rather than their sum.
The next batch's Kafka commit waits for the previous one. Its database work runs only
after the previous batch's database commit, so per-key order holds. When a partition's
commit fails or is fenced, the next batch's records of that partition are dropped (their
effects are in the ledger) and the partition is rewound to the failed batch's first
offset: offsets only move forward through a committed transaction.

**Fencing.** Every time this worker starts a partition's producer (which fences any
other producer of that id), it reads the partition's committed offset again before its
first commit with that producer, and drops the batch unless the batch starts there. A
worker that was fenced itself leaves the partition alone for a while (the group is
rebalancing it away) and then checks again, rather than fencing the new owner back.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from processor import kafka
from processor.config import Settings
from processor.engine import Engine, Envelope, Outcome, is_transient, rows_of
from processor.errors import InvalidArgument, TransientError
from processor.intake import (
    Message,
    OutRecord,
    Rejected,
    admit,
    outcome_records,
    rejected_records,
)
from processor.lanes import split
from processor.log import get_logger
from processor.metrics import Metrics
from processor.reply_routes import ReplyRoutes

__all__ = ["Worker"]

log = get_logger("processor.worker")

#: How long a partition's Kafka commit is retried before the batch is left to be redone.
COMMIT_RETRY_SECONDS = 60.0
#: How long a lane's database transaction is retried before the batch is left to be redone:
#: well under max_poll_interval, so a long outage does not cost the group membership.
DATABASE_RETRY_SECONDS = 120.0
#: How long a fenced partition is left alone before this worker, if it still holds the
#: partition, takes it back (longer than a session timeout: a rebalance moves it first).
FENCED_PAUSE_SECONDS = 15.0


class _GiveUp(Exception):
    """Leave this batch: its records are read again (and replayed from the ledger)."""


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _backoff(attempt: int, cap: float = 5.0) -> float:
    return float(min(cap, 0.05 * 2**attempt) * (0.5 + random.random()))


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Waits for the batches in flight: their partitions commit before they are handed over.
        async with self._worker.batch_lock:
            await self._worker.settle()
            await asyncio.gather(*(self._worker.close_producer(tp) for tp in revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self._worker.take_partitions(assigned)


class Worker:
    """One member of the consumer group. ``await run(stop)`` until ``stop`` is set."""

    def __init__(
        self, settings: Settings, engine: Engine, pool: asyncpg.Pool, metrics: Metrics
    ) -> None:
        settings.require("kafka_bootstrap_servers")
        # The brokers and how to reach them (TLS, SASL), for every client of this worker's;
        # read once (password files, the TLS context), not at every producer start.
        self._access = settings.kafka_access()
        self.settings = settings
        self.engine = engine
        self.pool = pool
        self.metrics = metrics
        self.batch_lock = asyncio.Lock()
        self.consumer: AIOKafkaConsumer | None = None
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}
        self._opening: dict[TopicPartition, asyncio.Task[AIOKafkaProducer]] = {}
        # Assigned partitions whose fetch position is not yet checked against the
        # committed offset read *after* their producer fenced the previous owner.
        self._unverified: set[TopicPartition] = set()
        # Partitions whose producer was fenced, with when: left alone for a while.
        self._fenced: dict[TopicPartition, float] = {}
        # The previous batch's Kafka commit, running while the next batch is prepared.
        self._committing: asyncio.Task[dict[TopicPartition, int]] | None = None
        self._in_flight: frozenset[TopicPartition] = frozenset()
        self._routes = ReplyRoutes(self._access, settings.reply_topic)
        self._last_poll = 0.0
        self._stop = asyncio.Event()

    def ready(self) -> bool:
        return self.consumer is not None and time.monotonic() - self._last_poll < 60

    # -- partitions and their producers --------------------------------------------------

    async def take_partitions(self, assigned: Sequence[TopicPartition]) -> None:
        self._unverified.update(assigned)
        for tp in assigned:
            if self._fenced.pop(tp, None) is not None and self.consumer is not None:
                self.consumer.resume(tp)
        await asyncio.gather(
            *(self._ensure_producer(tp) for tp in assigned), return_exceptions=True
        )
        log.info("partitions assigned", partitions=sorted(tp.partition for tp in assigned))

    async def _ensure_producer(self, tp: TopicPartition) -> AIOKafkaProducer:
        """The partition's producer; started once even when asked for concurrently."""
        producer = self._producers.get(tp)
        if producer is not None:
            return producer
        opening = self._opening.get(tp)
        if opening is None:
            opening = asyncio.create_task(self._open_producer(tp), name=f"producer-{tp}")
            self._opening[tp] = opening
            opening.add_done_callback(lambda _: self._opening.pop(tp, None))
        return await asyncio.shield(opening)

    async def _open_producer(self, tp: TopicPartition) -> AIOKafkaProducer:
        attempt = 0
        while True:
            producer = kafka.make_producer(
                self._access,
                txn_id=kafka.transactional_id(self.settings.group_id, tp.topic, tp.partition),
            )
            try:
                # Starting it runs InitProducerId: the broker fences any older producer with
                # this id (a zombie) and finishes or aborts its open transaction.
                await asyncio.wait_for(producer.start(), kafka.CALL_TIMEOUT)
                break
            except (KafkaError, TimeoutError, OSError) as exc:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.stop(), 5)
                if attempt >= 5:
                    raise TransientError(f"cannot start producer for {tp}: {exc!r}") from exc
                await asyncio.sleep(_backoff(attempt))
                attempt += 1
        self._producers[tp] = producer
        # It fenced the others: check the committed offset before its first commit.
        self._unverified.add(tp)
        self.metrics.assigned.set(len(self._producers))
        return producer

    async def close_producer(self, tp: TopicPartition) -> None:
        self._unverified.discard(tp)
        opening = self._opening.get(tp)
        if opening is not None:
            with contextlib.suppress(Exception):
                await opening
        producer = self._producers.pop(tp, None)
        self.metrics.assigned.set(len(self._producers))
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 10)

    # -- the loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        consumer = kafka.make_consumer(self._access, self.settings.group_id)
        self.consumer = consumer
        consumer.subscribe([self.settings.request_topic], listener=_Rebalance(self))
        await asyncio.wait_for(consumer.start(), kafka.CALL_TIMEOUT)
        log.info("worker started", group=self.settings.group_id, topic=self.settings.request_topic)
        try:
            while not stop.is_set():
                self._last_poll = time.monotonic()
                self._resume_fenced()
                try:
                    # While a commit is in flight, take what is already fetched, or settle.
                    fetched = await consumer.getmany(
                        timeout_ms=0 if self._committing else 200,
                        max_records=self.settings.max_batch,
                    )
                except KafkaError as exc:
                    log.warning("fetch failed", error=repr(exc))
                    async with self.batch_lock:
                        await self.settle()
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
                async with self.batch_lock:
                    await self.settle()
            except Exception:
                log.exception("last commit failed; its records will be read again")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), kafka.CALL_TIMEOUT)
            for tp in list(self._producers):
                await self.close_producer(tp)
            self.consumer = None
            log.info("worker stopped")

    async def settle(self) -> dict[TopicPartition, int]:
        """Wait for the Kafka commit in flight; rewind the partitions it could not commit.

        Returns those partitions with the offset they were rewound to. Call it holding
        ``batch_lock``.
        """
        task = self._committing
        if task is None:
            return {}
        try:
            restart = await asyncio.shield(task)
        finally:
            if task.done():
                self._committing = None
                self._in_flight = frozenset()
        for tp, offset in restart.items():
            self._rewind(tp, offset)
        return restart

    def _resume_fenced(self) -> None:
        """Take back the fenced partitions this worker still holds after their pause."""
        now = time.monotonic()
        for tp, fenced_at in list(self._fenced.items()):
            if now - fenced_at >= FENCED_PAUSE_SECONDS:
                del self._fenced[tp]
                if self.consumer is not None and tp in self.consumer.assignment():
                    # Its next batch opens a producer, which checks the committed offset.
                    self.consumer.resume(tp)

    def _rewind(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` again from ``offset``, if this worker still holds it."""
        if self.consumer is not None and tp in self.consumer.assignment():
            self.consumer.seek(tp, offset)

    async def _owned(
        self, fetched: dict[TopicPartition, list[Any]]
    ) -> dict[TopicPartition, list[Any]]:
        """The fetched records this worker may process now; the rest are read again later."""
        assert self.consumer is not None
        assignment = self.consumer.assignment()
        owned = {}
        for tp, records in fetched.items():
            if not records or tp not in assignment:
                continue  # revoked meanwhile: the new owner reads them
            if tp in self._in_flight:
                # Its producer is committing the previous batch; that commit checks it.
                owned[tp] = records
                continue
            if tp in self._fenced:
                continue  # paused meanwhile: its position is checked when it resumes
            try:
                await self._ensure_producer(tp)
            except TransientError as exc:
                log.warning("no producer; will read again", partition=tp.partition, error=str(exc))
                self.consumer.seek(tp, records[0].offset)
                continue
            if tp in self._unverified:
                self._unverified.discard(tp)
                committed = await self._committed(tp)
                log.info(
                    "partition checked",
                    partition=tp.partition,
                    committed=committed,
                    fetched_from=records[0].offset,
                )
                if committed is not None and committed != records[0].offset:
                    # Fetched from an offset read before the fencing: start over from the
                    # stable one, or a zombie's last commit would be processed twice.
                    self.consumer.seek(tp, committed)
                    continue
            owned[tp] = records
        return owned

    async def _handle(self, fetched: dict[TopicPartition, list[Any]]) -> None:
        """Apply a batch, then start its Kafka commit once the previous one has settled."""
        now = datetime.now(UTC)
        owned = await self._owned(fetched)
        total = sum(len(r) for r in owned.values())
        if not total:
            await self.settle()
            return
        self.metrics.in_flight.set(total)
        self.metrics.batch_size.observe(total)
        admitted: list[tuple[Message, Envelope | Rejected]] = []
        for records in owned.values():
            admitted.extend((r, self._admit(r, now)) for r in records)
        admitted = await self._routes.check(admitted, now)

        good = [(m, item) for m, item in admitted if isinstance(item, Envelope)]
        registry = self.engine.registry
        lanes = split(good, [rows_of(registry, e.request) for _, e in good], self.settings.lanes)
        started = time.monotonic()
        results = await asyncio.gather(
            *(self._run_lane(lane) for lane in lanes if lane), return_exceptions=True
        )
        applied = time.monotonic()
        self.metrics.phase.labels("database").observe(applied - started)
        # The previous commit first: its failures rewind partitions of this batch too.
        restart = await self.settle()
        waited = time.monotonic() - applied
        self.metrics.phase.labels("wait").observe(waited)
        log.debug(
            "batch applied",
            records=total,
            database_seconds=round(applied - started, 4),
            wait_seconds=round(waited, 4),
        )
        outcomes: dict[tuple[int, int], Outcome] = {}
        for lane_result in results:
            if isinstance(lane_result, BaseException):
                if not isinstance(lane_result, _GiveUp):
                    raise lane_result
                # What the other lanes committed is in the ledger: the redo replays it.
                for tp, records in owned.items():
                    if tp not in restart:
                        self._rewind(tp, records[0].offset)
                self.metrics.in_flight.set(0)
                return
            outcomes.update(lane_result)
        for tp in restart:
            owned.pop(tp, None)  # rewound to the previous batch: these are read again

        out: dict[TopicPartition, list[OutRecord]] = {tp: [] for tp in owned}
        for message, item in admitted:
            tp = TopicPartition(message.topic, message.partition)
            if tp in out:
                out[tp].extend(self._records_of(message, item, outcomes, now))
        self._in_flight = frozenset(owned)
        self._committing = asyncio.create_task(self._commit(owned, out), name="commit")

    def _records_of(
        self,
        message: Message,
        item: Envelope | Rejected,
        outcomes: dict[tuple[int, int], Outcome],
        now: datetime,
    ) -> list[OutRecord]:
        """The reply and dead-letter records of one request; counts and logs its outcome."""
        settings = self.settings
        if isinstance(item, Rejected):
            self._count(item.reply.type if item.reply else None, "fault", item.fault.code)
            self.metrics.dead_letters.inc()
            log.warning(
                "dead letter",
                partition=message.partition,
                offset=message.offset,
                request_id=item.request_id,
                error=item.fault.message[:200],
            )
            return rejected_records(
                item, reply_topic=settings.reply_topic, dlq_topic=settings.dlq_topic, now=now
            )
        outcome = outcomes[(message.partition, message.offset)]
        reply = outcome.reply
        self._count(reply.type, reply.status, reply.fault.code if reply.fault else None)
        if outcome.replayed:
            self.metrics.replayed.inc()
        if outcome.dead_letter:
            self.metrics.dead_letters.inc()
        if reply.fault is not None:
            log.info(
                "fault",
                request_id=reply.request_id,
                entity=reply.entity,
                partition=message.partition,
                offset=message.offset,
                code=reply.fault.code,
            )
        return outcome_records(
            item,
            message,
            outcome,
            reply_topic=settings.reply_topic,
            dlq_topic=settings.dlq_topic,
            now=now,
        )

    async def _commit(
        self, owned: dict[TopicPartition, list[Any]], out: dict[TopicPartition, list[OutRecord]]
    ) -> dict[TopicPartition, int]:
        """Commit each partition's records; returns the partitions to read again, and where."""
        started = time.monotonic()
        committed = await asyncio.gather(
            *(self._commit_partition(tp, out[tp], recs) for tp, recs in owned.items())
        )
        self.metrics.phase.labels("kafka").observe(time.monotonic() - started)
        restart = {
            tp: recs[0].offset
            for (tp, recs), ok in zip(owned.items(), committed, strict=True)
            if not ok
        }
        await self._record_marks(
            {tp: recs[-1].offset + 1 for tp, recs in owned.items() if tp not in restart}
        )
        done = time.time()
        for tp, records in owned.items():
            if tp in restart:
                continue
            for r in records:
                self.metrics.latency.observe(max(0.0, done - r.timestamp / 1000))
            high = self.consumer.highwater(tp) if self.consumer is not None else None
            if high is not None:
                self.metrics.lag.labels(str(tp.partition)).set(high - records[-1].offset - 1)
        self.metrics.in_flight.set(0)
        log.debug(
            "batch committed",
            partitions=sorted(tp.partition for tp in owned),
            records=sum(len(r) for r in owned.values()),
            kafka_seconds=round(time.monotonic() - started, 4),
        )
        return restart

    def _admit(self, message: Message, now: datetime) -> Envelope | Rejected:
        try:
            return admit(message, max_bytes=self.settings.max_message_bytes, now=now)
        except Exception as exc:  # admit() is built never to raise: this is the last guard
            log.exception("intake failed", partition=message.partition, offset=message.offset)
            fault = InvalidArgument(f"undecodable message ({type(exc).__name__})")
            return Rejected(message, fault, None, None, None)

    def _count(self, type_: str | None, status: str, code: int | None) -> None:
        self.metrics.requests.labels(type_ or "unknown", status, str(code or "")).inc()

    # -- the database side ----------------------------------------------------------------

    async def _run_lane(
        self, lane: list[tuple[Message, Envelope]]
    ) -> dict[tuple[int, int], Outcome]:
        envelopes = [env for _, env in lane]
        attempt = 0
        deadline = time.monotonic() + DATABASE_RETRY_SECONDS
        while True:
            try:
                outcomes = await self._process(envelopes)
                break
            except Exception as exc:
                if not is_transient(exc):
                    log.exception("engine failed on a batch; isolating", error=repr(exc)[:300])
                    outcomes = await self._isolate(envelopes)
                    break
                self.metrics.retries.labels("database").inc()
                log.warning("database retry", attempt=attempt, error=repr(exc)[:300])
                if self._stop.is_set() or time.monotonic() > deadline:
                    raise _GiveUp() from exc
                await self.pool.expire_connections()
                await asyncio.sleep(_backoff(attempt))
                attempt += 1
        return {(m.partition, m.offset): o for (m, _), o in zip(lane, outcomes, strict=True)}

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
            attempt = 0
            while True:
                try:
                    results.extend(await self._process([env]))
                    break
                except Exception as exc:
                    if not is_transient(exc):
                        log.exception("request failed", request_id=env.request.request_id)
                        results.append(self.engine.unexpected(env, exc))
                        break
                    if self._stop.is_set() or attempt > 10:
                        raise _GiveUp() from exc
                    await self.pool.expire_connections()
                    await asyncio.sleep(_backoff(attempt))
                    attempt += 1
        return results

    # -- the Kafka side -------------------------------------------------------------------

    async def _commit_partition(
        self, tp: TopicPartition, records: list[OutRecord], consumed: list[Any]
    ) -> bool:
        """Commit one partition's replies, dead letters and next offset in one transaction.

        False when they were not committed: the caller reads the records again (a redo
        replays them from the ledger).
        """
        next_offset = consumed[-1].offset + 1
        deadline = time.monotonic() + COMMIT_RETRY_SECONDS
        attempt = 0
        while True:
            producer = self._producers.get(tp)
            if producer is None:
                return False  # revoked meanwhile: the new owner redoes these from the ledger
            try:
                # A new producer fenced the others: is the partition still where we left it?
                if tp in self._unverified and not await self._still_at(tp, consumed[0].offset):
                    return False
                await asyncio.wait_for(
                    self._transaction(producer, tp, records, next_offset), kafka.CALL_TIMEOUT
                )
                self._unverified.discard(tp)
                return True
            except ProducerFenced:
                log.warning("fenced: partition taken over", partition=tp.partition)
                await self.close_producer(tp)
                # The group is moving it to another worker: stop reading it for a while
                # rather than fence the new owner back.
                self._fenced[tp] = time.monotonic()
                if self.consumer is not None and tp in self.consumer.assignment():
                    self.consumer.pause(tp)
                return False
            except (KafkaError, TimeoutError, OSError) as exc:
                self.metrics.retries.labels("kafka").inc()
                log.warning("kafka commit retry", partition=tp.partition, error=repr(exc)[:300])
                await self._reset_producer(tp, producer)
                if time.monotonic() > deadline or self._stop.is_set():
                    return False  # for now: read these records again
                await asyncio.sleep(_backoff(attempt))
                attempt += 1

    async def _committed(self, tp: TopicPartition) -> int | None:
        """Where the partition's next batch must start: the group's committed offset, or
        this group's mark in the database when that is further.

        Kafka 4.3's group coordinator was seen (ops/chaos) to answer, after a broker
        restart, with an offset older than one committed minutes before (the offset of a
        transaction a zombie had started when it was fenced); starting there publishes every
        reply since a second time. The mark is raised only after a commit succeeded, so the
        records below it are answered for sure.
        """
        assert self.consumer is not None
        committed: int | None = await asyncio.wait_for(
            self.consumer.committed(tp), kafka.CALL_TIMEOUT
        )
        try:
            async with self.pool.acquire(timeout=10) as conn:
                mark = await self.engine.ledger.mark(
                    conn, self.settings.group_id, tp.topic, tp.partition
                )
        except Exception as exc:  # the mark is a safeguard: Kafka's answer stands alone
            log.warning("cannot read the offset mark", partition=tp.partition, error=repr(exc))
            return committed
        if mark is not None and (committed is None or committed < mark):
            log.warning(
                "committed offset behind the mark: the broker's went back; starting at the mark",
                partition=tp.partition,
                committed=committed,
                mark=mark,
            )
            return mark
        return committed

    async def _record_marks(self, marks: dict[TopicPartition, int]) -> None:
        """Raise the partitions' marks after their Kafka commits succeeded."""
        if not marks:
            return
        try:
            async with self.pool.acquire(timeout=10) as conn:
                await self.engine.ledger.record_marks(
                    conn,
                    self.settings.group_id,
                    {(tp.topic, tp.partition): offset for tp, offset in marks.items()},
                )
        except Exception as exc:  # a missed mark: the next commit raises it past this one
            log.warning("cannot record offset marks", error=repr(exc)[:300])

    async def _still_at(self, tp: TopicPartition, offset: int) -> bool:
        """Whether the group's committed offset of ``tp`` is still ``offset``.

        Read after this worker's producer fenced the others: if another worker committed
        past it meanwhile, this batch is theirs already.
        """
        committed = await self._committed(tp)
        if committed is None or committed == offset:
            return True
        log.warning(
            "partition moved on meanwhile", partition=tp.partition, committed=committed, at=offset
        )
        return False

    async def _transaction(
        self,
        producer: AIOKafkaProducer,
        tp: TopicPartition,
        records: list[OutRecord],
        next_offset: int,
    ) -> None:
        await producer.begin_transaction()
        try:
            for r in records:
                sent = await producer.send(
                    r.topic, r.value, key=r.key, headers=r.headers, partition=r.partition
                )
                # The commit reports a failed send; this keeps asyncio from logging it again.
                sent.add_done_callback(_retrieve)
            await producer.send_offsets_to_transaction({tp: next_offset}, self.settings.group_id)
            await producer.commit_transaction()
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.abort_transaction(), 10)
            raise

    async def _reset_producer(self, tp: TopicPartition, old: AIOKafkaProducer) -> None:
        """aiokafka can wedge after a broker failure: replace the producer outright."""
        current = self._producers.get(tp)
        if current is None or current is not old:
            return
        del self._producers[tp]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(old.stop(), 5)
        with contextlib.suppress(TransientError):
            await self._open_producer(tp)
