"""The benchmark's contenders other than the processor, one process each (see ops/bench.py).

    python ops/bench_contenders.py naive|faststream|kafka|kafka-txn --bootstrap HOST:PORT
        --topic REQUESTS --reply-topic REPLIES --group GROUP [--dsn postgresql://...]

- ``naive``: what a developer writes in an afternoon: one message, one database
  transaction (the compare-and-set and a ledger row), ``send_and_wait`` the reply, commit
  the offset; then the next message.
- ``faststream``: the same work as an idiomatic FastStream handler (a pydantic model in,
  the reply returned to a publisher, asyncpg pool, offsets acknowledged after the handler).
- ``kafka``: the Kafka ceiling: no database; ``getmany`` batches, a reply per request with
  non-blocking ``send``, offsets committed after the batch's replies are acknowledged.
- ``kafka-txn``: the same with the processor's Kafka protocol: one transaction per input
  partition per batch, holding the replies and the offset.

Every contender answers in the processor's reply shape (request_id, status, row_version,
fault.code), so ops/bench.py checks them all the same way. They run until SIGTERM.
"""

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from asyncpg.pool import PoolConnectionProxy

MISMATCH = -2147088254  # ConcurrencyVersionMismatch
NOT_FOUND = -2147220969  # ObjectDoesNotExist

CAS_SQL = (
    "UPDATE bench.counter SET n = $3, version = version + 1 "
    "WHERE id = $1 AND version = $2 RETURNING version"
)
CURRENT_SQL = "SELECT version FROM bench.counter WHERE id = $1"
LEDGER_SQL = "INSERT INTO bench.app_ledger (request_id, status, reply) VALUES ($1, $2, $3)"


def _reply(request: dict[str, Any], version: int | None, current: int | None) -> dict[str, Any]:
    reply: dict[str, Any] = {
        "request_id": request["request_id"],
        "type": "update",
        "entity": request["entity"],
        "id": request["id"],
        "processed_at": datetime.now(UTC).isoformat(),
    }
    if version is not None:
        reply.update(status="success", row_version=str(version))
    elif current is None:
        reply.update(status="fault", fault={"code": NOT_FOUND, "name": "ObjectDoesNotExist"})
    else:
        reply.update(
            status="fault",
            fault={
                "code": MISMATCH,
                "name": "ConcurrencyVersionMismatch",
                "expected_version": request["row_version"],
                "current_version": str(current),
            },
        )
    return reply


async def _apply(
    conn: "asyncpg.Connection[Any] | PoolConnectionProxy[Any]", request: dict[str, Any]
) -> dict[str, Any]:
    """The compare-and-set and the ledger row, in one transaction."""
    async with conn.transaction():
        version = await conn.fetchval(
            CAS_SQL,
            request["id"],
            int(request["row_version"]),
            request["attributes"]["n"],
        )
        current = None if version is not None else await conn.fetchval(CURRENT_SQL, request["id"])
        reply = _reply(request, version, current)
        data = json.dumps(reply).encode()
        await conn.execute(LEDGER_SQL, reply["request_id"], reply["status"], data)
    return reply


async def _until_stopped(main: Callable[[], Awaitable[None]]) -> None:
    task = asyncio.ensure_future(main())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


# --- naive ----------------------------------------------------------------------------


def group_consumer(args: argparse.Namespace) -> AIOKafkaConsumer:
    """The contender's consumer of the request topic: in its group, committed by hand, from
    the earliest offset, committed records only (the backlog is one Kafka transaction)."""
    return AIOKafkaConsumer(
        args.topic,
        bootstrap_servers=args.bootstrap,
        group_id=args.group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )


async def naive(args: argparse.Namespace) -> None:
    consumer = group_consumer(args)
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, enable_idempotence=True)
    conn = await asyncpg.connect(args.dsn)
    await consumer.start()
    await producer.start()

    async def loop() -> None:
        while True:
            msg = await consumer.getone()
            request = json.loads(msg.value)
            reply = await _apply(conn, request)
            await producer.send_and_wait(args.reply_topic, json.dumps(reply).encode(), key=msg.key)
            await consumer.commit({TopicPartition(msg.topic, msg.partition): msg.offset + 1})

    try:
        await _until_stopped(loop)
    finally:
        await consumer.stop()
        await producer.stop()
        await conn.close()


# --- FastStream -----------------------------------------------------------------------


async def faststream(args: argparse.Namespace) -> None:
    from faststream import AckPolicy
    from faststream.kafka import KafkaBroker
    from pydantic import BaseModel

    class Attributes(BaseModel):
        n: int

    class CounterUpdate(BaseModel):
        type: str
        request_id: str
        entity: str
        id: int
        row_version: str
        concurrency_behavior: str = "Default"
        attributes: Attributes

    pool = await asyncpg.create_pool(args.dsn, min_size=1, max_size=2)
    assert pool is not None
    broker = KafkaBroker(args.bootstrap, log_level=logging.WARNING)
    publisher = broker.publisher(args.reply_topic)

    @broker.subscriber(  # type: ignore[untyped-decorator]  # FastStream's overloads
        args.topic,
        group_id=args.group,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        ack_policy=AckPolicy.ACK,
    )
    @publisher
    async def handle(request: CounterUpdate) -> dict[str, Any]:
        async with pool.acquire() as conn:
            return await _apply(conn, request.model_dump())

    async def serve() -> None:
        await broker.start()
        await asyncio.Event().wait()

    try:
        await _until_stopped(serve)
    finally:
        await broker.stop()
        await pool.close()


# --- the Kafka ceiling -----------------------------------------------------------------


class _Id(msgspec.Struct):
    request_id: str


_id_decoder = msgspec.json.Decoder(_Id)


def _echo(value: bytes) -> bytes:
    request_id = _id_decoder.decode(value).request_id
    return b'{"request_id":"%s","status":"success"}' % request_id.encode()


async def kafka_loop(args: argparse.Namespace, *, transactional: bool) -> None:
    consumer = group_consumer(args)
    plain = AIOKafkaProducer(bootstrap_servers=args.bootstrap, enable_idempotence=True)
    producers: dict[TopicPartition, AIOKafkaProducer] = {}
    await consumer.start()
    await plain.start()

    async def producer_for(tp: TopicPartition) -> AIOKafkaProducer:
        if tp not in producers:
            producer = AIOKafkaProducer(
                bootstrap_servers=args.bootstrap,
                transactional_id=f"{args.group}-{tp.topic}-{tp.partition}",
                enable_idempotence=True,
                linger_ms=2,
            )
            await producer.start()
            producers[tp] = producer
        return producers[tp]

    async def commit_partition(tp: TopicPartition, records: list[Any]) -> None:
        producer = await producer_for(tp)
        async with producer.transaction():
            for r in records:
                await producer.send(args.reply_topic, _echo(r.value), key=r.key)
            await producer.send_offsets_to_transaction({tp: records[-1].offset + 1}, args.group)

    async def loop() -> None:
        while True:
            fetched = await consumer.getmany(timeout_ms=200, max_records=args.max_batch)
            if not fetched:
                continue
            if transactional:
                await asyncio.gather(*(commit_partition(tp, rs) for tp, rs in fetched.items()))
                continue
            sent = []
            for records in fetched.values():
                for r in records:
                    sent.append(await plain.send(args.reply_topic, _echo(r.value), key=r.key))
            await asyncio.gather(*sent)
            await consumer.commit({tp: rs[-1].offset + 1 for tp, rs in fetched.items()})

    try:
        await _until_stopped(loop)
    finally:
        await consumer.stop()
        await plain.stop()
        for producer in producers.values():
            await producer.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("kind", choices=["naive", "faststream", "kafka", "kafka-txn"])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--reply-topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--dsn", default="")
    parser.add_argument("--max-batch", type=int, default=1000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    runners: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
        "naive": lambda: naive(args),
        "faststream": lambda: faststream(args),
        "kafka": lambda: kafka_loop(args, transactional=False),
        "kafka-txn": lambda: kafka_loop(args, transactional=True),
    }
    asyncio.run(runners[args.kind]())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
