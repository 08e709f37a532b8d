"""KIP-447 at the edge of aiokafka (processor.kip447), each piece on the real broker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from processor.kafka import clients as kafka
from processor.kafka import kip447
from tests.conftest import Endpoints
from tests.support import NewTopic, consume_all, until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def clients(
    stack_endpoints: Endpoints,
) -> AsyncIterator[Callable[..., Awaitable[AIOKafkaProducer | AIOKafkaConsumer]]]:
    """Start producers/consumers through processor.kafka; all stopped at the end."""
    access = kafka.KafkaAccess(stack_endpoints.kafka_bootstrap)
    started: list[AIOKafkaProducer | AIOKafkaConsumer] = []

    async def start(
        kind: str, *, txn_id: str | None = None, group: str | None = None
    ) -> AIOKafkaProducer | AIOKafkaConsumer:
        client: AIOKafkaProducer | AIOKafkaConsumer
        if kind == "producer":
            client = kafka.make_producer(access, txn_id=txn_id)
        else:
            client = kafka.make_consumer(access, group)
        await client.start()
        started.append(client)
        return client

    yield start
    for client in reversed(started):
        await client.stop()


async def member(
    clients: Callable[..., Awaitable[AIOKafkaProducer | AIOKafkaConsumer]], group: str, topic: str
) -> AIOKafkaConsumer:
    """A consumer of ``group`` subscribed to ``topic``, once it holds an assignment."""
    consumer = await clients("consumer", group=group)
    assert isinstance(consumer, AIOKafkaConsumer)
    consumer.subscribe([topic])
    await until(lambda: bool(consumer.assignment()), f"an assignment in {group}")
    return consumer


def test_a_broker_without_the_needed_versions_is_refused_with_one_line() -> None:
    old = {28: (0, 2), 9: (0, 6)}
    problem = kip447.broker_problem(old)
    assert problem is not None
    assert "TxnOffsetCommit v3 (it offers 2)" in problem
    assert "OffsetFetch v7 (it offers 6)" in problem
    assert "\n" not in problem
    assert kip447.broker_problem({28: (0, 5), 9: (0, 9)}) is None
    assert "none" in (kip447.broker_problem({9: (0, 9)}) or "")


async def test_the_local_broker_speaks_both_versions(
    clients: Callable[..., Awaitable[AIOKafkaProducer]],
) -> None:
    producer = await clients("producer")
    await kip447.check_broker(producer.client)  # raises if not


async def test_an_offset_fetch_waits_while_a_transaction_holds_the_offset_then_reads_it(
    clients: Callable[..., Awaitable[AIOKafkaProducer | AIOKafkaConsumer]], new_topic: NewTopic
) -> None:
    """require_stable: no answer from before the open transaction, the committed one after."""
    topic = await new_topic()
    tp = TopicPartition(topic, 0)
    group = f"g-{uuid.uuid4().hex[:8]}"
    producer = await clients("producer", txn_id=f"t-{uuid.uuid4().hex[:8]}")
    reader = await clients("consumer", group=group)
    assert isinstance(producer, AIOKafkaProducer)
    assert isinstance(reader, AIOKafkaConsumer)
    metadata = kip447.GroupMetadata(group, -1, "")

    # A committed offset to start from: 5.
    await producer.begin_transaction()
    await kip447.send_offsets_to_transaction(producer, {tp: 5}, metadata, unfenced=True)
    await producer.commit_transaction()
    assert await reader.committed(tp) == 5

    # A transaction holding offset 9, left open while another client reads.
    await producer.begin_transaction()
    await producer.send(topic, b"inside")
    await kip447.send_offsets_to_transaction(producer, {tp: 9}, metadata, unfenced=True)
    unstable_before = kip447.counters["unstable_offset_fetch"]
    fetch = asyncio.create_task(reader.committed(tp))
    await until(
        lambda: kip447.counters["unstable_offset_fetch"] >= unstable_before + 2,
        "the broker to answer UNSTABLE_OFFSET_COMMIT (twice: the fetch retries)",
    )
    assert not fetch.done(), "answered while the transaction was open: the offset is unstable"
    await producer.commit_transaction()
    assert await asyncio.wait_for(fetch, 30) == 9

    # The same with an abort: the offset from before it, once it ended.
    await producer.begin_transaction()
    await kip447.send_offsets_to_transaction(producer, {tp: 12}, metadata, unfenced=True)
    unstable_before = kip447.counters["unstable_offset_fetch"]
    fetch = asyncio.create_task(reader.committed(tp))
    await until(
        lambda: kip447.counters["unstable_offset_fetch"] > unstable_before, "an unstable answer"
    )
    await producer.abort_transaction()
    assert await asyncio.wait_for(fetch, 30) == 9


async def test_a_member_of_an_old_generation_is_refused_its_offsets_and_the_producer_lives_on(
    stack_endpoints: Endpoints,
    clients: Callable[..., Awaitable[AIOKafkaProducer | AIOKafkaConsumer]],
    new_topic: NewTopic,
) -> None:
    """TxnOffsetCommit v3: a zombie's generation is refused; its transaction is really
    aborted (its records never become visible); the same producer commits next time."""
    source, out = await new_topic(), await new_topic()
    tp = TopicPartition(source, 0)
    group = f"g-{uuid.uuid4().hex[:8]}"
    producer = await clients("producer", txn_id=f"t-{uuid.uuid4().hex[:8]}")
    assert isinstance(producer, AIOKafkaProducer)

    first = await member(clients, group, source)
    old = kip447.group_metadata(first)
    assert old.generation_id >= 1
    assert old.member_id
    await first.stop()  # leaves the group: the next member gets a new generation

    second = await member(clients, group, source)
    new = kip447.group_metadata(second)
    assert new.generation_id > old.generation_id

    assert await kip447.membership_problem(second) is None
    # What a stalled member asks before applying what it fetched: it is told it is stale.
    second._coordinator.generation -= 1
    try:
        assert await kip447.membership_problem(second) == "IllegalGenerationError"
    finally:
        second._coordinator.generation += 1

    fenced_before = kip447.counters["group_fenced"]
    await producer.begin_transaction()
    await producer.send(out, b"from-the-zombie")
    with pytest.raises(kip447.GroupFenced, match=r"ILLEGAL_GENERATION|UNKNOWN_MEMBER_ID"):
        await kip447.send_offsets_to_transaction(producer, {tp: 3}, old)
    await producer.abort_transaction()
    assert kip447.counters["group_fenced"] == fenced_before + 1

    await producer.begin_transaction()
    await producer.send(out, b"from-the-owner")
    await kip447.send_offsets_to_transaction(producer, {tp: 7}, new)
    await producer.commit_transaction()

    assert await second.committed(tp) == 7
    values = [r.value for r in await consume_all(stack_endpoints.kafka_bootstrap, out)]
    assert values == [b"from-the-owner"], "the refused transaction's record became visible"


async def test_a_member_that_lost_its_membership_sends_no_offsets(
    stack_endpoints: Endpoints,
    clients: Callable[..., Awaitable[AIOKafkaProducer | AIOKafkaConsumer]],
    new_topic: NewTopic,
) -> None:
    """After a refused heartbeat aiokafka resets its consumer to generation -1 and no
    member id, and keeps the old assignment until it rejoins. The broker validates a
    TxnOffsetCommit only if it names a member: sent in that state, the offsets overwrite
    the owner's unchecked (shown first, through aiokafka's own call). Ours refuses to
    send them."""
    source, out = await new_topic(), await new_topic()
    tp = TopicPartition(source, 0)
    group = f"g-{uuid.uuid4().hex[:8]}"
    producer = await clients("producer", txn_id=f"t-{uuid.uuid4().hex[:8]}")
    assert isinstance(producer, AIOKafkaProducer)
    owner = await member(clients, group, source)
    current = kip447.group_metadata(owner)
    assert current.is_member

    await producer.begin_transaction()
    await kip447.send_offsets_to_transaction(producer, {tp: 50}, current)
    await producer.commit_transaction()
    assert await owner.committed(tp) == 50

    # The hazard, on the real broker: an anonymous commit moves the owner's offset back.
    anonymous = kip447.GroupMetadata(group, -1, "")
    assert not anonymous.is_member
    producer._txn_manager.processor_group = anonymous
    await producer.begin_transaction()
    await producer.send_offsets_to_transaction({tp: 3}, group)
    await producer.commit_transaction()
    assert await owner.committed(tp) == 3, "the broker checked an anonymous commit after all"

    # Ours: refused before anything is sent; the transaction aborts, nothing visible.
    fenced_before = kip447.counters["group_fenced"]
    await producer.begin_transaction()
    await producer.send(out, b"from-the-ex-member")
    with pytest.raises(kip447.GroupFenced, match="not a member of group"):
        await kip447.send_offsets_to_transaction(producer, {tp: 1}, anonymous)
    await producer.abort_transaction()
    assert kip447.counters["group_fenced"] == fenced_before + 1
    assert await owner.committed(tp) == 3
    assert await kip447.membership_problem(owner) is None
    owner._coordinator.reset_generation()  # what a refused heartbeat does
    assert not kip447.group_metadata(owner).is_member
    assert await kip447.membership_problem(owner) == "not in the group"
    values = [r.value for r in await consume_all(stack_endpoints.kafka_bootstrap, out)]
    assert values == [], "the refused transaction's record became visible"
