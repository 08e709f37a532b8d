"""Partition ownership: which fetched records this worker may process, and rewinds.

Where a partition starts is the group's committed offset, read with ``require_stable``
(:mod:`processor.kip447`): while a transaction holding that partition's offset is still
open (the previous owner died or froze mid-commit), the fetch waits until it is committed
or aborted, so a new owner never starts from an offset older than the last committed
batch, and never re-reads a batch whose replies are already visible. aiokafka reads it
when the partition is assigned; this worker only ever moves a position back (a rewind
after a failed commit) and only on partitions it still holds.

On revocation the batches in flight are committed first (under the old generation, which
the coordinator still accepts while the group prepares the rebalance), so a partition is
handed over at a committed offset.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from processor.log import get_logger
from processor.metrics import Metrics

__all__ = ["Ownership", "ReadCommitted"]

#: Reads the group's committed offsets of some partitions (stable: see kip447).
ReadCommitted: TypeAlias = Callable[
    [Sequence[TopicPartition]], Awaitable[dict[TopicPartition, int | None]]
]

log = get_logger("processor.ownership")
# The rewound partitions' checks kept the worker's logger name when they moved here.
_worker_log = get_logger("processor.worker")


class Ownership(ConsumerRebalanceListener):  # type: ignore[misc]
    """The consumer's rebalance listener and the questions about what it holds."""

    def __init__(self, metrics: Metrics, settle: Callable[[], Awaitable[None]]) -> None:
        self._metrics = metrics
        self._settle = settle
        self.consumer: AIOKafkaConsumer | None = None
        # Partitions rewound after a commit that did not (or may not) land: before their
        # next batch, their position is checked against the committed offset (verified).
        self.unverified: set[TopicPartition] = set()

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._settle()
        self._metrics.partitions_revoked(tp.partition for tp in revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        held = self.consumer.assignment() if self.consumer is not None else set(assigned)
        self._metrics.assigned.set(len(held))
        self._metrics.rebalances.inc()
        self._metrics.partitions_assigned(tp.partition for tp in assigned)
        log.info("partitions assigned", partitions=sorted(tp.partition for tp in assigned))

    def holds(self, tp: TopicPartition) -> bool:
        return self.consumer is not None and tp in self.consumer.assignment()

    def owned(
        self, fetched: Mapping[TopicPartition, Sequence[Any]]
    ) -> dict[TopicPartition, list[Any]]:
        """The fetched records of partitions this worker still holds (a partition revoked
        meanwhile is read by its new owner)."""
        return {tp: list(records) for tp, records in fetched.items() if records and self.holds(tp)}

    def rewind(self, rewinds: Mapping[TopicPartition, int]) -> None:
        """Read each partition again from its offset, if this worker still holds it."""
        assert self.consumer is not None
        for tp, offset in rewinds.items():
            if self.holds(tp):
                self.consumer.seek(tp, offset)

    async def verified(
        self,
        owned: dict[TopicPartition, list[Any]],
        read_committed: ReadCommitted,
    ) -> dict[TopicPartition, list[Any]]:
        """Owned records, less those of rewound partitions whose committed offset is past
        where the rewind put them: a commit given up on Kafka's silence may have landed
        (then the records are answered already), or a new owner may have moved on."""
        checked = self.unverified & owned.keys()
        try:
            committed = await read_committed(sorted(checked, key=lambda tp: tp.partition))
        except (KafkaError, TimeoutError, OSError) as exc:
            _worker_log.warning("cannot read committed offsets yet", error=repr(exc)[:300])
            self.rewind({tp: owned[tp][0].offset for tp in checked})
            return {tp: r for tp, r in owned.items() if tp not in checked}
        self.unverified -= checked
        keep = dict(owned)
        for tp in checked:
            offset = committed.get(tp)
            # Only ever forward: the rewind point was itself committed (offsets move only
            # through committed transactions), so an answer below it is stale. Kafka 4.3's
            # coordinator was seen (ops/chaos, broker kill -9) answering, after a restart,
            # offsets thousands of records old; moving back there republished them all.
            if offset is not None and offset > owned[tp][0].offset:
                _worker_log.info(
                    "partition moved to its committed offset",
                    partition=tp.partition,
                    committed=offset,
                    fetched_from=owned[tp][0].offset,
                )
                self.rewind({tp: offset})
                del keep[tp]
        return keep
