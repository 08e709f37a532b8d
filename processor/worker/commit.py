"""The commit pipeline: one Kafka transaction per batch, for all the worker's partitions.

A batch's replies, dead letters and next offsets (of every partition it holds) go out in
one transaction of the worker's single transactional producer. The offsets carry the
consumer group's generation and member id as they were when the batch was fetched
(KIP-447, :mod:`processor.kip447`): if the group has moved a partition on meanwhile, the
coordinator refuses them, the transaction is aborted, and the new owner redoes the
records (the ledger answers them without applying anything twice).

Outcomes of :meth:`CommitPipeline.commit`:

* committed: the records are visible to ``read_committed`` readers, the offsets moved;
* not committed (False): nothing of the batch is visible; the caller reads the records
  again from the batch's first offsets (if it still owns the partitions). That is the
  answer to a refusal by the group (a zombie, a rebalance), to this producer being
  fenced, and to Kafka failing for longer than the retry budget.

The transactional id is ``<group>-<worker id>``: unique among live workers, the same
after a restart of the worker, so a restarted worker's first InitProducerId aborts the
transaction its previous life left open, instead of the new owners of its partitions
waiting ``transaction.timeout.ms`` for it. Two live workers configured with one id
fence each other in turn; after :data:`FENCINGS_TO_FAIL` fencings within
:data:`FENCING_WINDOW` seconds the worker stops with :class:`WorkerIdInUse`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from processor.errors import ConfigError
from processor.kafka import clients as kafka
from processor.kafka import kip447
from processor.log import get_logger
from processor.metrics import Metrics
from processor.worker.intake import OutRecord
from processor.worker.retry import GaveUp, Retry

__all__ = [
    "Batch",
    "CommitPipeline",
    "KafkaTransactions",
    "TransactionTimedOut",
    "Transactions",
    "WorkerIdInUse",
]

log = get_logger("processor.commit")

#: How long one batch's commit is retried (Kafka unreachable, a broker restarting)
#: before its records are left to be read again.
COMMIT_RETRY_SECONDS = 60.0
#: Fencings of this worker's own producer within FENCING_WINDOW seconds that mean another
#: live worker holds the same transactional id. One fencing alone can have an innocent
#: cause (the broker aborts a transaction open longer than transaction.timeout.ms and
#: bumps the epoch); two workers sharing an id fence each other at every batch.
FENCINGS_TO_FAIL = 3
FENCING_WINDOW = 120.0


class WorkerIdInUse(ConfigError):
    """Another live worker uses this worker's transactional id."""


class TransactionTimedOut(Exception):
    """The broker aborted this transaction: it stayed open past transaction.timeout.ms
    (the worker was paused, or the broker slow), and bumped the producer's epoch, which
    old clients see as being fenced. Not another worker: the producer is replaced."""


@dataclass(frozen=True, slots=True)
class Batch:
    """What one transaction commits: records, and per partition the range they answer."""

    records: Sequence[OutRecord]
    first: Mapping[TopicPartition, int]  # first offset of the batch, per partition
    next: Mapping[TopicPartition, int]  # the offset to commit: last + 1
    group: kip447.GroupMetadata  # the membership the records were fetched under
    timestamps: Sequence[int] = field(default_factory=list)  # of the requests, ms


class _MovedOn(Exception):
    """Another worker committed past the batch: leave it."""


#: Reads the group's committed offsets (stable) of some partitions: the worker's consumer.
Committed = Callable[[Sequence[TopicPartition]], Awaitable[Mapping[TopicPartition, int | None]]]


class Transactions(Protocol):
    """The seam of the pipeline: one transactional producer (tests inject their own)."""

    async def start(self) -> None: ...

    async def commit(
        self,
        records: Sequence[OutRecord],
        offsets: Mapping[TopicPartition, int],
        group: kip447.GroupMetadata,
    ) -> None:
        """One transaction: the records and the offsets, committed or aborted."""

    async def reset(self) -> None:
        """Replace the producer (after a broken connection, or after being fenced)."""

    async def close(self) -> None: ...


class KafkaTransactions:
    """:class:`Transactions` with one aiokafka producer; checks the broker at start."""

    def __init__(self, access: kafka.KafkaAccess, transactional_id: str) -> None:
        self._access = access
        self.transactional_id = transactional_id
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        producer = kafka.make_producer(self._access, txn_id=self.transactional_id)
        try:
            # InitProducerId: fences this id's previous life and ends its open transaction.
            await asyncio.wait_for(producer.start(), kafka.CALL_TIMEOUT)
            await kip447.check_broker(producer.client)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 5)
            raise
        self._producer = producer

    async def commit(
        self,
        records: Sequence[OutRecord],
        offsets: Mapping[TopicPartition, int],
        group: kip447.GroupMetadata,
    ) -> None:
        producer = self._producer
        if producer is None:
            await self.start()
            producer = self._producer
            assert producer is not None
        await asyncio.wait_for(
            self._transaction(producer, records, offsets, group), kafka.CALL_TIMEOUT
        )

    @staticmethod
    async def _transaction(
        producer: AIOKafkaProducer,
        records: Sequence[OutRecord],
        offsets: Mapping[TopicPartition, int],
        group: kip447.GroupMetadata,
    ) -> None:
        await producer.begin_transaction()
        try:
            for r in records:
                sent = await producer.send(
                    r.topic, r.value, key=r.key, headers=r.headers, partition=r.partition
                )
                # The commit reports a failed send; this keeps asyncio from logging it again.
                sent.add_done_callback(_retrieve)
            await kip447.send_offsets_to_transaction(producer, offsets, group)
            await producer.commit_transaction()
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.abort_transaction(), 10)
            raise

    async def reset(self) -> None:
        """aiokafka can wedge after a broker failure: replace the producer outright."""
        await self.close()
        await self.start()

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 10)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _transient(exc: BaseException) -> bool:
    # Fencings are answers, not failures: retrying them cannot succeed.
    return kafka.is_transient(exc) and not isinstance(exc, kip447.GroupFenced | ProducerFenced)


class CommitPipeline:
    """Commits batches through :class:`Transactions`, one at a time, with the retries,
    fencing decisions and metrics described in the module docstring."""

    def __init__(
        self,
        transactions: Transactions,
        metrics: Metrics,
        *,
        committed: Committed,
        stop: asyncio.Event,
        retry_seconds: float = COMMIT_RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.transactions = transactions
        self._committed = committed
        self._metrics = metrics
        self._clock = clock
        self._retry = Retry(_transient, retry_seconds, stop=stop, clock=clock)
        self._fenced_at: list[float] = []

    async def commit(self, batch: Batch) -> bool:
        """Commit ``batch``; False when nothing of it was committed (read it again).

        Raises :class:`WorkerIdInUse` when this worker keeps being fenced.
        """
        started = self._clock()
        attempts = 0

        async def attempt() -> None:
            nonlocal attempts
            attempts += 1
            if attempts > 1 and await self._landed(batch):
                return
            await self.transactions.commit(batch.records, batch.next, batch.group)

        try:
            await self._retry.run(attempt, before_retry=self._before_retry)
        except _MovedOn:
            return False
        except kip447.GroupFenced as exc:
            self._metrics.fenced.labels("generation").inc()
            log.warning(
                "fenced by the group: the batch is left to the partitions' owners",
                error=str(exc),
                generation=batch.group.generation_id,
                partitions=_names(batch.first),
            )
            return False
        except ProducerFenced:
            await self._producer_fenced()
            return False
        except TransactionTimedOut as exc:
            self._metrics.fenced.labels("timeout").inc()
            log.warning(
                "transaction aborted by the broker: it outlived transaction.timeout.ms",
                error=str(exc),
                partitions=_names(batch.first),
            )
            await self._reset()
            return False
        except GaveUp as exc:
            log.warning(
                "kafka commit failed; the batch will be read again",
                error=str(exc),
                partitions=_names(batch.first),
            )
            await self._reset()
            return False
        finally:
            self._metrics.phase.labels("kafka").observe(self._clock() - started)
        self._metrics.transactions.inc()
        return True

    async def _landed(self, batch: Batch) -> bool:
        """Whether a failed attempt committed after all (:class:`_MovedOn` if another
        worker has committed past the batch meanwhile).

        A commit that failed on a timeout or a broken connection may have reached the
        broker's decision before it failed: the EndTxn was written, the answer lost. Sent
        again, its replies would be published twice. The committed offsets, read stable
        (the broker resolves that transaction first), say which it was.
        """
        offsets = await self._committed(list(batch.next))
        if all(offsets.get(tp) == end for tp, end in batch.next.items()):
            log.info("a failed commit had landed after all", partitions=_names(batch.first))
            return True
        if all(_at_or_before(offsets.get(tp), first) for tp, first in batch.first.items()):
            return False  # not committed: send it again
        log.warning(
            "kafka commit abandoned: the partitions moved on meanwhile",
            partitions=_names(batch.first),
            committed={f"{tp.topic}-{tp.partition}": offsets.get(tp) for tp in batch.first},
        )
        raise _MovedOn

    async def _before_retry(self, attempt: int, exc: BaseException) -> None:
        self._metrics.retries.labels("kafka").inc()
        log.warning("kafka commit retry", attempt=attempt, error=repr(exc)[:300])
        await self._reset()

    async def _reset(self) -> None:
        try:
            await self.transactions.reset()
        except (KafkaError, TimeoutError, OSError) as exc:
            # The next commit starts a producer again; that one is retried.
            log.warning("cannot restart the producer yet", error=repr(exc)[:300])

    async def _producer_fenced(self) -> None:
        now = self._clock()
        self._fenced_at = [t for t in self._fenced_at if now - t < FENCING_WINDOW] + [now]
        self._metrics.fenced.labels("producer").inc()
        txn_id = getattr(self.transactions, "transactional_id", "?")
        if len(self._fenced_at) >= FENCINGS_TO_FAIL:
            raise WorkerIdInUse(
                f"the transactional id {txn_id!r} was fenced {len(self._fenced_at)} times in "
                f"{FENCING_WINDOW:.0f} s: another live worker uses it. Give every worker its "
                "own PROCESSOR_WORKER_ID (kept across its restarts)"
            )
        log.warning(
            "producer fenced: another producer took this transactional id, or the broker "
            "aborted a transaction that outlived transaction.timeout.ms",
            transactional_id=txn_id,
        )
        await self._reset()


def _at_or_before(committed: int | None, offset: int) -> bool:
    return committed is None or committed <= offset


def _names(offsets: Mapping[TopicPartition, int]) -> list[str]:
    return sorted(f"{tp.topic}-{tp.partition}" for tp in offsets)
