"""What the processor relies on from Kafka + aiokafka: transactions and read_committed."""

from __future__ import annotations

import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from tests.conftest import Endpoints
from tests.support import NewTopic, consume_all


def txn_producer(endpoints: Endpoints) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=endpoints.kafka_bootstrap,
        enable_idempotence=True,
        transactional_id=f"test-tx-{uuid.uuid4().hex}",
    )


def values(records: list[object]) -> list[bytes]:
    return [r.value for r in records]  # type: ignore[attr-defined]


async def committed_offsets(endpoints: Endpoints, group: str) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=endpoints.kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp: meta.offset for tp, meta in offsets.items()}


async def test_committed_transaction_is_seen_exactly_once_by_read_committed(
    stack_endpoints: Endpoints, new_topic: NewTopic
) -> None:
    topic = await new_topic(partitions=2)
    sent = [f"r{i}".encode() for i in range(10)]
    producer = txn_producer(stack_endpoints)
    await producer.start()
    try:
        async with producer.transaction():
            for i, value in enumerate(sent):
                await producer.send(topic, value, key=str(i % 3).encode())
    finally:
        await producer.stop()

    got = await consume_all(stack_endpoints.kafka_bootstrap, topic)
    assert sorted(values(got)) == sorted(sent)  # all of them, none twice
    per_key: dict[bytes, list[bytes]] = {}
    for record in got:
        per_key.setdefault(record.key, []).append(record.value)
    for key, vals in per_key.items():  # per key, in the order sent
        assert vals == [v for i, v in enumerate(sent) if str(i % 3).encode() == key]


async def test_aborted_and_open_transactions_are_never_seen_by_read_committed(
    stack_endpoints: Endpoints, new_topic: NewTopic
) -> None:
    topic = await new_topic(partitions=1)
    producer = txn_producer(stack_endpoints)
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send(topic, b"before")
        await producer.begin_transaction()
        for i in range(3):
            await producer.send(topic, f"aborted{i}".encode())
        await producer.flush()
        await producer.abort_transaction()

        await producer.begin_transaction()
        await producer.send(topic, b"open")
        await producer.flush()
        # the open transaction holds back the last stable offset: invisible, not lost
        assert values(await consume_all(stack_endpoints.kafka_bootstrap, topic)) == [b"before"]
        await producer.commit_transaction()
        async with producer.transaction():
            await producer.send(topic, b"after")
    finally:
        await producer.stop()

    committed = await consume_all(stack_endpoints.kafka_bootstrap, topic)
    assert values(committed) == [b"before", b"open", b"after"]
    # the aborted records were written (so the filter above did real work)
    everything = await consume_all(
        stack_endpoints.kafka_bootstrap, topic, isolation_level="read_uncommitted"
    )
    assert values(everything) == [
        b"before",
        b"aborted0",
        b"aborted1",
        b"aborted2",
        b"open",
        b"after",
    ]


async def test_consume_transform_produce_commits_offsets_atomically_with_output(
    stack_endpoints: Endpoints, new_topic: NewTopic
) -> None:
    source, sink = await new_topic(partitions=1), await new_topic(partitions=1)
    group = f"test-group-{uuid.uuid4().hex}"
    tp = TopicPartition(source, 0)
    plain = AIOKafkaProducer(bootstrap_servers=stack_endpoints.kafka_bootstrap)
    producer = txn_producer(stack_endpoints)
    await plain.start()
    await producer.start()

    async def step(*, commit: bool) -> list[bytes]:
        """Consume what the group has not committed, produce it upper-cased, commit both."""
        consumer = AIOKafkaConsumer(
            source,
            bootstrap_servers=stack_endpoints.kafka_bootstrap,
            group_id=group,
            isolation_level="read_committed",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            batch = await consumer.getmany(timeout_ms=10_000, max_records=3)
            records = batch.get(tp, [])
            await producer.begin_transaction()
            for record in records:
                await producer.send(sink, record.value.upper())
            await producer.send_offsets_to_transaction({tp: await consumer.position(tp)}, group)
            if commit:
                await producer.commit_transaction()
            else:
                await producer.abort_transaction()
            return [r.value for r in records]
        finally:
            await consumer.stop()

    try:
        for value in (b"a", b"b", b"c", b"d", b"e", b"f"):
            await plain.send_and_wait(source, value)

        assert await step(commit=True) == [b"a", b"b", b"c"]
        assert await committed_offsets(stack_endpoints, group) == {tp: 3}

        assert await step(commit=False) == [b"d", b"e", b"f"]  # crash-equivalent: aborted
        assert await committed_offsets(stack_endpoints, group) == {tp: 3}  # offsets too
        assert values(await consume_all(stack_endpoints.kafka_bootstrap, sink)) == [
            b"A",
            b"B",
            b"C",
        ]

        assert await step(commit=True) == [b"d", b"e", b"f"]  # redelivered, redone once
        assert await committed_offsets(stack_endpoints, group) == {tp: 6}
    finally:
        await producer.stop()
        await plain.stop()

    assert values(await consume_all(stack_endpoints.kafka_bootstrap, sink)) == [
        b"A",
        b"B",
        b"C",
        b"D",
        b"E",
        b"F",
    ]
