"""A batch's accounting: each request admitted (intake, guarded), its outcome turned into
its reply and dead-letter records, counted and logged; a committed batch's latency and lag.

Apart from the loop (``loop.py``) so that the loop holds only the batch's path through
ownership, lanes, applier and commit. The lines keep the worker's logger name.
"""

from __future__ import annotations

import time
from datetime import datetime

from aiokafka import AIOKafkaConsumer

from processor.config import Settings
from processor.engine.envelope import Envelope, Outcome
from processor.errors import InvalidArgument
from processor.log import get_logger
from processor.metrics import Metrics
from processor.worker.commit import Batch
from processor.worker.intake import (
    Message,
    OutRecord,
    Rejected,
    admit,
    outcome_records,
    rejected_records,
)

__all__ = ["Accounting"]

log = get_logger("processor.worker")


class Accounting:
    """The per-request and per-batch bookkeeping of one worker."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics

    def records_of(
        self,
        message: Message,
        item: Envelope | Rejected,
        outcomes: dict[tuple[int, int], Outcome],
        now: datetime,
    ) -> list[OutRecord]:
        """The reply and dead-letter records of one request; counts and logs its outcome."""
        settings = self.settings
        if isinstance(item, Rejected):
            self.count(item.reply.type if item.reply else None, "fault", item.fault.code)
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
        self.count(reply.type, reply.status, reply.fault.code if reply.fault else None)
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

    def admit(self, message: Message, now: datetime) -> Envelope | Rejected:
        try:
            return admit(message, max_bytes=self.settings.max_message_bytes, now=now)
        except Exception as exc:  # admit() is built never to raise: this is the last guard
            log.exception("intake failed", partition=message.partition, offset=message.offset)
            fault = InvalidArgument(f"undecodable message ({type(exc).__name__})")
            return Rejected(message, fault, None, None, None)

    def count(self, type_: str | None, status: str, code: int | None) -> None:
        self.metrics.requests.labels(type_ or "unknown", status, str(code or "")).inc()

    def committed(self, batch: Batch, consumer: AIOKafkaConsumer | None) -> None:
        """A batch's Kafka commit landed: its requests' latency, the partitions' lag."""
        done = time.time()
        for timestamp in batch.timestamps:
            self.metrics.latency.observe(max(0.0, done - timestamp / 1000))
        if consumer is not None:
            for tp, next_offset in batch.next.items():
                high = consumer.highwater(tp)
                if high is not None:
                    self.metrics.lag.labels(str(tp.partition)).set(high - next_offset)
        log.debug(
            "batch committed",
            partitions=sorted(tp.partition for tp in batch.next),
            records=len(batch.timestamps),
        )
