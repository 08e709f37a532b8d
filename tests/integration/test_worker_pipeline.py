"""The worker's pipelined commits and its fencing rules, with failures injected in-process.

The worker runs in the test's event loop (real Kafka, real PostgreSQL) so that a Kafka
commit can be made to fail, or to stall while another producer takes the partition over,
at an exact point of the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError

from processor import kafka
from processor import worker as worker_module
from processor.config import Settings
from processor.metrics import Metrics
from processor.service import build_engine
from processor.worker import Worker
from tests.conftest import Endpoints
from tests.integration.harness import Scenario, check_exactly_once, updates

pytestmark = pytest.mark.asyncio

Transaction = Callable[[AIOKafkaProducer, TopicPartition, list[Any], int], Awaitable[None]]


@contextlib.asynccontextmanager
async def running(scenario: Scenario) -> AsyncIterator[Worker]:
    """A worker of the scenario's group, in this event loop, stopped on exit."""
    settings = Settings.from_env(scenario.env())
    pool = await asyncpg.create_pool(scenario.database_url, min_size=1, max_size=4)
    assert pool is not None
    try:
        async with pool.acquire() as conn:
            engine = await build_engine(conn, settings)
        worker = Worker(settings, engine, pool, Metrics())
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            yield worker
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
    finally:
        await pool.close()
        # A fenced aiokafka producer leaves failed futures nobody awaits; collect them here,
        # while the loop runs: collected later, inside compile(), their finalizers trip
        # CPython 3.11.7 ("AST constructor recursion depth mismatch").
        gc.collect()


def sample(worker: Worker, name: str) -> float:
    return worker.metrics.registry.get_sample_value(name) or 0.0


async def test_a_partition_whose_commit_fails_is_rewound_and_no_reply_is_lost_or_doubled(
    scenario: Scenario, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Partition 0's Kafka commit fails three times (given up at once): the batch being
    prepared meanwhile drops its partition-0 records, the partition is read again from the
    failed batch, the redo is answered from the ledger, and every request still gets
    exactly one reply, applied once and in per-key order."""
    monkeypatch.setattr(worker_module, "COMMIT_RETRY_SECONDS", 0.0)
    await pg.execute(f"INSERT INTO {scenario.schema}.acct (id) SELECT generate_series(1, 40)")
    requests = updates(range(1, 41), 30, scenario.run)
    failures = 0
    async with running(scenario) as worker:
        original: Transaction = worker._transaction

        async def flaky(
            producer: AIOKafkaProducer, tp: TopicPartition, records: list[Any], offset: int
        ) -> None:
            nonlocal failures
            if tp.partition == 0 and failures < 3:
                failures += 1
                await asyncio.sleep(0.2)  # long enough for the next batch to be prepared
                raise KafkaConnectionError("injected: broker unreachable")
            await original(producer, tp, records, offset)

        monkeypatch.setattr(worker, "_transaction", flaky)
        await scenario.send(requests)
        replies = await scenario.replies(expect=len(requests))
        replayed = sample(worker, "processor_replayed_requests_total")
        retries = worker.metrics.registry.get_sample_value(
            "processor_retries_total", {"cause": "kafka"}
        )
    assert failures == 3
    assert retries == 3
    assert replayed > 0, "the failed batch was not redone from the ledger"
    await check_exactly_once(pg, scenario.schema, replies, requests)


@pytest.fixture
async def one_partition(
    stack_endpoints: Endpoints, db_schema: str, pg: asyncpg.Connection, tmp_path: Path
) -> Scenario:
    s = Scenario(
        stack_endpoints.kafka_bootstrap,
        stack_endpoints.database_url,
        db_schema,
        tmp_path,
        partitions=1,
    )
    await s.setup(pg)
    return s


async def take_over(scenario: Scenario, next_offset: int) -> None:
    """What a new owner of partition 0 does: start its producer (fencing the old one)
    and commit the group's offset past the records it processed."""
    tp = TopicPartition(scenario.request_topic, 0)
    producer = kafka.make_producer(
        kafka.KafkaAccess(scenario.kafka),
        txn_id=kafka.transactional_id(scenario.group, scenario.request_topic, 0),
    )
    await producer.start()
    try:
        await producer.begin_transaction()
        await producer.send_offsets_to_transaction({tp: next_offset}, scenario.group)
        await producer.commit_transaction()
    finally:
        await producer.stop()


@pytest.mark.parametrize("error", ["fenced", "connection"])
async def test_a_fenced_worker_leaves_the_new_owners_work_alone_and_resumes_after_it(
    one_partition: Scenario, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch, error: str
) -> None:
    """While a worker's commit of requests 10-19 stalls, another producer of the
    partition's transactional id takes over and commits the offset past them. When the
    stalled commit resumes, fenced (or failing as if the broker were unreachable, so the
    worker restarts its producer and fences the other back), the worker commits nothing
    for 10-19, and then carries on from the committed offset: 20-29 are answered once."""
    s = one_partition
    monkeypatch.setattr(worker_module, "FENCED_PAUSE_SECONDS", 0.5)
    await pg.execute(f"INSERT INTO {s.schema}.acct (id) SELECT generate_series(1, 10)")
    first, second, third = (updates(range(1, 11), 1, f"{s.run}-{w}") for w in "abc")
    async with running(s) as worker:
        await s.send(first)
        assert len(await s.replies(expect=10)) == 10

        original: Transaction = worker._transaction
        stalled = asyncio.Event()
        resume = asyncio.Event()

        async def stalling(
            producer: AIOKafkaProducer, tp: TopicPartition, records: list[Any], offset: int
        ) -> None:
            if offset == 20 and not resume.is_set():
                stalled.set()
                await resume.wait()
                if error == "connection":
                    raise KafkaConnectionError("injected: broker unreachable")
            await original(producer, tp, records, offset)

        monkeypatch.setattr(worker, "_transaction", stalling)
        await s.send(second)
        await asyncio.wait_for(stalled.wait(), 30)
        await take_over(s, 20)
        resume.set()
        await s.send(third)
        replies = await s.replies(expect=20)
    answered = sorted(r.request_id for r in replies)
    assert answered == sorted(r["request_id"] for r in first + third)
    assert all(r.status == "success" for r in replies)


async def test_a_partition_starts_at_the_groups_mark_when_the_brokers_offset_went_back(
    one_partition: Scenario, pg: asyncpg.Connection
) -> None:
    """After every successful commit the worker raises the partition's mark in the
    database. When the broker later answers with an older committed offset (as Kafka 4.3
    did after restarts in the chaos run), the next owner starts at the mark: the records
    between were answered already and are not answered twice."""
    s = one_partition
    await pg.execute(f"INSERT INTO {s.schema}.acct (id) SELECT generate_series(1, 10)")
    first, second = (updates(range(1, 11), 1, f"{s.run}-{w}") for w in "ab")
    async with running(s):
        await s.send(first)
        assert len(await s.replies(expect=10)) == 10
    mark = await pg.fetchval(
        f"SELECT next_offset FROM {s.schema}.offset_marks WHERE group_id = $1", s.group
    )
    assert mark == 10

    await take_over(s, 5)  # the group's committed offset goes back to 5
    await s.send(second)
    async with running(s):
        replies = await s.replies(expect=20)
    answered = sorted(r.request_id for r in replies)
    assert answered == sorted(r["request_id"] for r in first + second)


class FailingReturns:
    """A pool whose next ``left`` connections fail on their way back (after the body ran)."""

    def __init__(self, pool: asyncpg.Pool, left: int) -> None:
        self._pool = pool
        self.left = left

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    @contextlib.asynccontextmanager
    async def acquire(self, *, timeout: float | None = None) -> AsyncIterator[Any]:
        conn = await self._pool.acquire(timeout=timeout)
        try:
            yield conn
        finally:
            await self._pool.release(conn)
        if self.left > 0:
            self.left -= 1
            raise asyncpg.InternalClientError("cannot switch to state 15 (injected)")


async def test_a_connection_that_fails_on_its_way_back_to_the_pool_loses_no_outcome(
    scenario: Scenario, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine committed, then resetting the connection fails (as asyncpg's did during a
    PostgreSQL shutdown in the chaos run: InternalClientError). The committed outcomes
    stand: no UnExpected fault for applied requests, no retry, each applied once."""
    await pg.execute(f"INSERT INTO {scenario.schema}.acct (id) SELECT generate_series(1, 20)")
    requests = updates(range(1, 21), 5, scenario.run)
    async with running(scenario) as worker:
        failing = FailingReturns(worker.pool, 3)
        monkeypatch.setattr(worker, "pool", failing)
        await scenario.send(requests)
        replies = await scenario.replies(expect=len(requests))
        retries = worker.metrics.registry.get_sample_value(
            "processor_retries_total", {"cause": "database"}
        )
        monkeypatch.setattr(worker, "pool", failing._pool)  # stop() releases through it
    assert failing.left == 0
    assert not retries
    await check_exactly_once(pg, scenario.schema, replies, requests)
