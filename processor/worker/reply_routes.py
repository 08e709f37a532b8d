"""Where replies go: a request's ``reply_to`` topic (or the default) and ``reply_partition``.

A reply that names a topic that does not exist, or a partition its topic lacks, is bad
input: the request gets a fault reply on the default reply topic (Kafka's partitioner
picks the partition) and a dead letter, rather than a batch that can never be published.

:func:`check_routes` is pure; :class:`ReplyRoutes` keeps the topics' partition counts,
read from the brokers when a request names a topic or partition not seen yet (at most
once a second), and applies it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Final

from aiokafka.errors import KafkaError

from processor.engine.envelope import Envelope
from processor.errors import InvalidArgument
from processor.kafka import clients as kafka
from processor.log import get_logger
from processor.worker.intake import Message, Rejected, reject

__all__ = ["ReplyRoutes", "check_routes"]

log = get_logger("processor.reply_routes")

Admitted = Sequence[tuple[Message, Envelope | Rejected]]
#: How often the partition counts may be read again when a request names an unknown route.
REFRESH_SECONDS: Final = 1.0


def _wanted(admitted: Admitted, default: str) -> dict[str, int]:
    """Topic -> the highest partition asked for on it (-1: the topic only)."""
    wanted: dict[str, int] = {}
    for _, item in admitted:
        if isinstance(item, Envelope):
            topic, partition = item.request.reply_to or default, item.request.reply_partition
        else:
            topic, partition = item.reply_to or default, item.reply_partition
        wanted[topic] = max(wanted.get(topic, -1), -1 if partition is None else partition)
    return wanted


def _fault(topic: str, partition: int | None, partitions: Mapping[str, int]) -> InvalidArgument:
    count = partitions.get(topic)
    if count is None:
        fault = InvalidArgument(f"reply_to topic {topic!r} does not exist")
        fault.path = "reply_to"
    else:
        fault = InvalidArgument(
            f"reply_partition {partition} does not exist: topic {topic!r} has {count} "
            f"partition{'s' if count != 1 else ''} (0-{count - 1})"
        )
        fault.path = "reply_partition"
    return fault


def _routable(topic: str, partition: int | None, partitions: Mapping[str, int]) -> bool:
    count = partitions.get(topic)
    return count is not None and (partition is None or partition < count)


def check_routes(
    admitted: Admitted, partitions: Mapping[str, int], default: str, now: datetime
) -> list[tuple[Message, Envelope | Rejected]]:
    """Reject the requests whose reply cannot go where they ask; ``partitions``: the
    partition count of every existing topic. A rejected message's reply falls back to the
    default topic (and the partitioner) instead."""
    checked: list[tuple[Message, Envelope | Rejected]] = []
    for message, item in admitted:
        if isinstance(item, Envelope):
            req = item.request
            topic = req.reply_to or default
            if not _routable(topic, req.reply_partition, partitions):
                item = reject(item, message, _fault(topic, req.reply_partition, partitions), now)
        elif not _routable(item.reply_to or default, item.reply_partition, partitions):
            item = dataclasses.replace(item, reply_to=None, reply_partition=None)
        checked.append((message, item))
    return checked


class ReplyRoutes:
    """The reply topics' partition counts, and the check of every request's reply route."""

    def __init__(self, access: kafka.KafkaAccess, default_topic: str) -> None:
        self._access = access
        self.default_topic = default_topic
        #: Topic -> partition count, as last read from the brokers.
        self.partitions: dict[str, int] = {}
        self._read_at = float("-inf")

    async def check(
        self, admitted: Admitted, now: datetime
    ) -> list[tuple[Message, Envelope | Rejected]]:
        wanted = _wanted(admitted, self.default_topic)
        if all(self.partitions.get(t, -1) > p for t, p in wanted.items()):
            return list(admitted)
        if time.monotonic() - self._read_at > REFRESH_SECONDS:
            await self.refresh()
        if not self.partitions:
            # The brokers did not answer: leave the routes to the commit (retried there)
            # rather than fault good requests.
            return list(admitted)
        return check_routes(admitted, self.partitions, self.default_topic, now)

    async def refresh(self) -> None:
        admin = kafka.admin_client(self._access)
        try:
            await asyncio.wait_for(admin.start(), kafka.CALL_TIMEOUT)
            topics = await asyncio.wait_for(admin.describe_topics(), kafka.CALL_TIMEOUT)
            self.partitions = {
                t["topic"]: len(t["partitions"]) for t in topics if t["error_code"] == 0
            }
            self._read_at = time.monotonic()
        except (KafkaError, TimeoutError, OSError) as exc:
            log.warning("cannot read the topics", error=repr(exc))
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
