"""The quiet period and the check: the group at the end of its topics, then what was observed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import asyncpg
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from ops.lib.chaos.config import Config
from processor.config import Settings
from processor.kafka import clients as kafka
from processor.tools.chaos_check import (
    ClientHistory,
    Observed,
)


async def _ends(bootstrap: str, topic: str, partitions: int, isolation: str) -> dict[int, int]:
    consumer = kafka.make_consumer(kafka.KafkaAccess(bootstrap), None, isolation_level=isolation)
    await asyncio.wait_for(consumer.start(), kafka.CALL_TIMEOUT)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        found = await asyncio.wait_for(consumer.end_offsets(tps), kafka.CALL_TIMEOUT)
        return {tp.partition: int(offset) for tp, offset in found.items()}
    finally:
        await asyncio.wait_for(consumer.stop(), kafka.CALL_TIMEOUT)


async def quiet(settings: Settings, partitions: int, limit: float) -> tuple[bool, str]:
    """Wait until the group consumed every request and no transaction is open."""
    assert settings.kafka_bootstrap_servers is not None
    bootstrap = settings.kafka_bootstrap_servers
    deadline = time.monotonic() + limit
    why = ""
    while time.monotonic() < deadline:
        try:
            admin = kafka.admin_client(kafka.KafkaAccess(bootstrap))
            await asyncio.wait_for(admin.start(), kafka.CALL_TIMEOUT)
            try:
                committed = await kafka.group_offsets(
                    admin, settings.group_id, settings.request_topic, range(partitions)
                )
            finally:
                await admin.close()
            request_end = await _ends(
                bootstrap, settings.request_topic, partitions, "read_uncommitted"
            )
            lag = {p: request_end[p] - committed.get(p, 0) for p in request_end}
            open_txn = {}
            for topic in (settings.reply_topic, settings.dlq_topic):
                stable = await _ends(bootstrap, topic, partitions, "read_committed")
                high = await _ends(bootstrap, topic, partitions, "read_uncommitted")
                open_txn.update(
                    {f"{topic}[{p}]": high[p] - stable[p] for p in high if high[p] != stable[p]}
                )
            if not any(lag.values()) and not open_txn:
                return True, "group at the end of the request topic, no open transaction"
            why = f"lag {sum(lag.values())}, open transactions on {sorted(open_txn) or 'none'}"
        except (KafkaError, TimeoutError, OSError) as exc:
            why = f"cannot read offsets: {exc!r}"
        await asyncio.sleep(1.0)
    return False, why


async def read_topic(
    bootstrap: str, topic: str, partitions: int, handle: Callable[[bytes | None], None]
) -> None:
    """Every committed record of the topic, from offset 0 to its last stable offset."""
    consumer = kafka.make_consumer(kafka.KafkaAccess(bootstrap), None)  # read_committed
    await asyncio.wait_for(consumer.start(), kafka.CALL_TIMEOUT)
    try:
        ends = await kafka.offsets(consumer, topic, range(partitions), end=True)
        spans = {p: (0, end) for p, end in ends.items()}
        await kafka.read_spans(consumer, topic, spans, lambda record: handle(record.value))
    finally:
        await asyncio.wait_for(consumer.stop(), kafka.CALL_TIMEOUT)


async def observe(settings: Settings, partitions: int, history: ClientHistory) -> Observed:
    assert settings.database_url is not None
    assert settings.kafka_bootstrap_servers is not None
    seen = Observed()
    conn = await asyncpg.connect(settings.database_url, timeout=30)
    try:
        rows = await conn.fetch(
            "SELECT id, n FROM demo.counter WHERE id = ANY($1::int[])",
            [*history.initial, *history.delete_ids],
        )
    finally:
        await conn.close()
    present = {int(r["id"]): int(r["n"]) for r in rows}
    seen.counters = {i: present.get(i) for i in history.initial}
    seen.delete_left = {i for i in history.delete_ids if i in present}
    await read_topic(
        settings.kafka_bootstrap_servers, settings.reply_topic, partitions, seen.add_reply
    )
    await read_topic(
        settings.kafka_bootstrap_servers,
        settings.dlq_topic,
        partitions,
        lambda v: seen.add_dead_letter(v, settings.request_topic),
    )
    return seen


async def prepare_rows(database_url: str, cfg: Config, history: ClientHistory) -> None:
    counters = list(range(1, cfg.rows + 1))
    deletes = list(range(cfg.rows + 1, cfg.rows + 1 + cfg.delete_rows))
    conn = await asyncpg.connect(database_url, timeout=30)
    try:
        await conn.execute(
            "INSERT INTO demo.counter (id, n) SELECT g, 0 FROM unnest($1::int[]) AS g "
            "ON CONFLICT (id) DO UPDATE SET n = 0",
            counters + deletes,
        )
    finally:
        await conn.close()
    history.initial = dict.fromkeys(counters, 0)
    history.delete_ids = deletes


async def stale_versions(database_url: str, rows: Sequence[int]) -> dict[int, str]:
    """Each row's version now, then a plain SQL write to each: those versions are stale.

    Done before any request, so the write outside the processor starts each record's
    version chain instead of breaking it.
    """
    conn = await asyncpg.connect(database_url, timeout=30)
    try:
        found = await conn.fetch(
            "SELECT id, xmin::text AS v FROM demo.counter WHERE id = ANY($1::int[])", list(rows)
        )
        await conn.execute("UPDATE demo.counter SET n = n WHERE id = ANY($1::int[])", list(rows))
    finally:
        await conn.close()
    return {int(r["id"]): str(r["v"]) for r in found}
