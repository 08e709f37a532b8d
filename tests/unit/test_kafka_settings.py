"""Kafka client settings that ops/bench showed to matter, and the aiokafka internals they use."""

from __future__ import annotations

import aiokafka.producer.sender as sender

from processor.kafka import clients as kafka


async def test_transactional_producers_retry_quickly() -> None:
    """A transaction that races its predecessor's completion is retried in ms, not 100 ms."""
    producer = kafka.make_producer(kafka.KafkaAccess("127.0.0.1:1"), txn_id="g-t-0")
    try:
        assert producer._sender._retry_backoff == kafka.TXN_RETRY_BACKOFF_MS / 1000
    finally:
        await producer.stop()
    # aiokafka's fixed wait after CONCURRENT_TRANSACTIONS on the first AddPartitionsToTxn:
    # still a module global of that name (an aiokafka upgrade that renames it fails here).
    assert sender.BACKOFF_OVERRIDE == kafka.TXN_RETRY_BACKOFF


async def test_plain_producers_keep_the_default_backoff() -> None:
    producer = kafka.make_producer(kafka.KafkaAccess("127.0.0.1:1"))
    try:
        assert producer._sender._retry_backoff == 0.1
    finally:
        await producer.stop()
