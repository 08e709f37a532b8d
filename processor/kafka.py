"""Kafka clients with safe settings, and the topics the processor needs.

aiokafka's defaults are unsafe for this product (auto-commit, read_uncommitted, no
idempotence); every client is made here so that no call site can forget an override.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import aiokafka.producer.sender as _aiokafka_sender
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

__all__ = ["admin_client", "ensure_topics", "make_consumer", "make_producer", "transactional_id"]

#: Bound on any single client call that could otherwise hang while a broker is down.
CALL_TIMEOUT = 30.0

#: How long aiokafka waits before it retries adding the first partition to a transaction
#: that the broker refused with CONCURRENT_TRANSACTIONS because the previous transaction's
#: markers are still being written (KAFKA-5477). aiokafka hard-codes 20 ms; a worker runs
#: its transactions back to back, so batches paid it often. The markers take 1-2 ms on
#: a local broker: retry after 2 ms.
TXN_RETRY_BACKOFF = 0.002
#: retry_backoff_ms of the transactional producers (aiokafka's default: 100). The broker's
#: transaction verification (KIP-890) answers a TxnOffsetCommit that races the previous
#: transaction's completion with COORDINATOR_NOT_AVAILABLE (its code for
#: CONCURRENT_TRANSACTIONS to old clients), and a produce with NOT_ENOUGH_REPLICAS; both
#: are retried after this backoff. ops/bench measured ~10% of partition commits paying
#: 100 ms this way, most batches (6 partitions) with at least one.
TXN_RETRY_BACKOFF_MS = 10


def transactional_id(group_id: str, topic: str, partition: int) -> str:
    """One id per input partition: a new owner of the partition fences the old one."""
    return f"{group_id}-{topic}-{partition}"


def make_consumer(bootstrap: str, group_id: str | None, **extra: Any) -> AIOKafkaConsumer:
    settings: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "group_id": group_id,
        "enable_auto_commit": False,
        "isolation_level": "read_committed",
        "auto_offset_reset": "earliest",
        "max_poll_interval_ms": 300_000,
        "session_timeout_ms": 10_000,
        "heartbeat_interval_ms": 3_000,
        "max_partition_fetch_bytes": 1_048_576,
        "fetch_max_bytes": 16 * 1_048_576,
        "request_timeout_ms": 40_000,
    }
    settings.update(extra)
    return AIOKafkaConsumer(**settings)


def make_producer(bootstrap: str, *, txn_id: str | None = None, **extra: Any) -> AIOKafkaProducer:
    settings: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "enable_idempotence": True,
        "acks": "all",
        "linger_ms": 2,
        "request_timeout_ms": 30_000,
    }
    if txn_id is not None:
        _aiokafka_sender.BACKOFF_OVERRIDE = TXN_RETRY_BACKOFF
        settings["transactional_id"] = txn_id
        settings["transaction_timeout_ms"] = 60_000
        settings["retry_backoff_ms"] = TXN_RETRY_BACKOFF_MS
    settings.update(extra)
    return AIOKafkaProducer(**settings)


def admin_client(bootstrap: str) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)


async def ensure_topics(bootstrap: str, topics: Iterable[str], *, partitions: int) -> list[str]:
    """Create the topics that do not exist yet; returns the names it created."""
    admin = admin_client(bootstrap)
    await asyncio.wait_for(admin.start(), CALL_TIMEOUT)
    try:
        existing = set(await asyncio.wait_for(admin.list_topics(), CALL_TIMEOUT))
        wanted = [t for t in dict.fromkeys(topics) if t not in existing]
        created = []
        for topic in wanted:
            try:
                await asyncio.wait_for(
                    admin.create_topics(
                        [NewTopic(topic, num_partitions=partitions, replication_factor=1)]
                    ),
                    CALL_TIMEOUT,
                )
                created.append(topic)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        await admin.close()
