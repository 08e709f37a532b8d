"""The worker's pipelined commits and its fencing rules, with failures injected in-process.

The worker runs in the test's event loop (real Kafka, real PostgreSQL) with its commit
pipeline's seam (:class:`processor.commit.Transactions`) wrapped, so that a Kafka commit
can fail, or carry another group generation, at an exact point of the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError

from processor.config import Settings
from processor.kafka import clients as kafka
from processor.kafka import kip447
from processor.metrics import Metrics
from processor.service import build_engine
from processor.worker.commit import KafkaTransactions, Transactions
from processor.worker.intake import OutRecord
from processor.worker.loop import Worker
from tests.conftest import Endpoints
from tests.integration.harness import Scenario, check_exactly_once, updates
from tests.support import until

Commit = Callable[
    [Sequence[OutRecord], Mapping[TopicPartition, int], kip447.GroupMetadata], Awaitable[None]
]


class Wrapped:
    """The worker's real transactions, with ``commit`` replaceable by the test."""

    def __init__(self, inner: KafkaTransactions) -> None:
        self.inner = inner
        self.transactional_id = inner.transactional_id
        self.commit_hook: Callable[[Commit], Commit] | None = None

    async def start(self) -> None:
        await self.inner.start()

    async def commit(
        self,
        records: Sequence[OutRecord],
        offsets: Mapping[TopicPartition, int],
        group: kip447.GroupMetadata,
    ) -> None:
        commit: Commit = self.inner.commit
        if self.commit_hook is not None:
            commit = self.commit_hook(commit)
        await commit(records, offsets, group)

    async def reset(self) -> None:
        await self.inner.reset()

    async def close(self) -> None:
        await self.inner.close()


@contextlib.asynccontextmanager
async def running(
    scenario: Scenario, *, commit_retry_seconds: float = 60.0
) -> AsyncIterator[tuple[Worker, Wrapped]]:
    """A worker of the scenario's group, in this event loop, stopped on exit; with the
    wrapper of its transactions."""
    settings = Settings.from_env(scenario.env(PROCESSOR_WORKER_ID="in-process"))
    pool = await asyncpg.create_pool(scenario.database_url, min_size=1, max_size=4)
    assert pool is not None
    try:
        async with pool.acquire() as conn:
            engine = await build_engine(conn, settings)
        access = settings.kafka_access()
        wrapped = Wrapped(
            KafkaTransactions(access, kafka.transactional_id(settings.group_id, "in-process"))
        )
        transactions: Transactions = wrapped
        worker = Worker(
            settings,
            engine,
            pool,
            Metrics(),
            transactions=transactions,
            commit_retry_seconds=commit_retry_seconds,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            yield worker, wrapped
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
    finally:
        await pool.close()
        # A fenced aiokafka producer leaves failed futures nobody awaits; collect them here,
        # while the loop runs: collected later, inside compile(), their finalizers trip
        # CPython 3.11.7 ("AST constructor recursion depth mismatch").
        gc.collect()


class FailFirst:
    """A commit hook: the first ``times`` commits fail as if the broker were unreachable
    (after ``pause`` seconds), the next ones go through."""

    def __init__(self, times: int, *, pause: float = 0.0) -> None:
        self.times = times
        self.pause = pause
        self.failures = 0

    def __call__(self, commit: Commit) -> Commit:
        async def failing(
            records: Sequence[OutRecord],
            offsets: Mapping[TopicPartition, int],
            group: kip447.GroupMetadata,
        ) -> None:
            if self.failures < self.times:
                self.failures += 1
                await asyncio.sleep(self.pause)
                raise KafkaConnectionError("injected: broker unreachable")
            await commit(records, offsets, group)

        return failing


def sample(worker: Worker, name: str) -> float:
    """A metric's value, summed over its labels."""
    return sum(
        s.value
        for metric in worker.metrics.registry.collect()
        for s in metric.samples
        if s.name == name
    )


async def test_a_batch_whose_commit_fails_is_rewound_and_no_reply_is_lost_or_doubled(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    """Three commits fail (given up at once): the batch being prepared meanwhile drops
    the failed batch's partitions, they are read again from the failed batch, the redo is
    answered from the ledger, and every request still gets exactly one reply, applied
    once and in per-row order."""
    await pg.execute(f"INSERT INTO {scenario.schema}.acct (id) SELECT generate_series(1, 40)")
    requests = updates(range(1, 41), 30, scenario.run)
    flaky = FailFirst(3, pause=0.2)  # long enough for the next batch to be prepared

    async with running(scenario, commit_retry_seconds=0.0) as (worker, wrapped):
        wrapped.commit_hook = flaky
        await scenario.send(requests)
        replies = await scenario.replies(expect=len(requests))
        replayed = sample(worker, "processor_replayed_requests_total")
    assert flaky.failures == 3
    assert replayed > 0, "the failed batches were not redone from the ledger"
    await check_exactly_once(pg, scenario.schema, replies, requests)


async def test_a_commit_that_fails_twice_is_retried_with_a_new_producer_and_lands(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    """Within the retry budget a failed commit is retried (the producer replaced, the
    same records in a new transaction): nothing is read again, nothing answered twice."""
    await pg.execute(f"INSERT INTO {scenario.schema}.acct (id) SELECT generate_series(1, 10)")
    requests = updates(range(1, 11), 10, scenario.run)
    flaky = FailFirst(2)

    async with running(scenario) as (worker, wrapped):
        wrapped.commit_hook = flaky
        await scenario.send(requests)
        replies = await scenario.replies(expect=len(requests))
        retries = worker.metrics.registry.get_sample_value(
            "processor_retries_total", {"cause": "kafka"}
        )
        replayed = sample(worker, "processor_replayed_requests_total")
    assert flaky.failures == 2
    assert retries == 2
    assert replayed == 0
    await check_exactly_once(pg, scenario.schema, replies, requests)


async def test_a_commit_whose_answer_was_lost_is_not_published_twice(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    """What the chaos run found after a broker kill -9: the broker took a commit (EndTxn
    written) and the answer never came back. The retry reads the committed offsets first
    and does not publish the batch again: one reply each."""
    await pg.execute(f"INSERT INTO {scenario.schema}.acct (id) SELECT generate_series(1, 10)")
    requests = updates(range(1, 11), 5, scenario.run)
    lost = 0

    def answer_lost(commit: Commit) -> Commit:
        async def committed_then_timeout(
            records: Sequence[OutRecord],
            offsets: Mapping[TopicPartition, int],
            group: kip447.GroupMetadata,
        ) -> None:
            nonlocal lost
            await commit(records, offsets, group)
            if lost == 0 and records:
                lost += 1
                raise TimeoutError("injected: the broker's answer was lost")

        return committed_then_timeout

    async with running(scenario) as (worker, wrapped):
        wrapped.commit_hook = answer_lost
        await scenario.send(requests)
        replies = await scenario.replies(expect=len(requests))
        retries = worker.metrics.registry.get_sample_value(
            "processor_retries_total", {"cause": "kafka"}
        )
    assert lost == 1
    assert retries == 1
    await check_exactly_once(pg, scenario.schema, replies, requests)


async def test_offsets_of_another_generation_are_refused_and_the_batch_is_redone(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    """A batch whose offsets carry a generation the group has left behind (what a zombie
    sends) is refused by the group coordinator: the transaction is aborted, none of its
    replies becomes visible, the worker counts the fencing and redoes the batch from the
    ledger; one reply each."""
    await pg.execute(f"INSERT INTO {scenario.schema}.acct (id) SELECT generate_series(1, 10)")
    requests = updates(range(1, 11), 5, scenario.run)
    tampered = 0

    def stale(commit: Commit) -> Commit:
        async def old_generation(
            records: Sequence[OutRecord],
            offsets: Mapping[TopicPartition, int],
            group: kip447.GroupMetadata,
        ) -> None:
            nonlocal tampered
            if tampered == 0 and records:
                tampered += 1
                group = kip447.GroupMetadata(
                    group.group_id, group.generation_id - 1, group.member_id
                )
            await commit(records, offsets, group)

        return old_generation

    async with running(scenario) as (worker, wrapped):
        wrapped.commit_hook = stale
        await scenario.send(requests)
        replies = await scenario.replies(expect=len(requests))
        fenced = worker.metrics.registry.get_sample_value(
            "processor_fenced_total", {"reason": "generation"}
        )
        replayed = sample(worker, "processor_replayed_requests_total")
    assert tampered == 1
    assert fenced == 1, "the coordinator did not refuse the old generation"
    assert replayed > 0, "the refused batch was not redone from the ledger"
    await check_exactly_once(pg, scenario.schema, replies, requests)


async def test_records_handed_out_after_a_refused_heartbeat_are_left_to_the_group(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    """Told by the coordinator that its member is unknown (a refused heartbeat), aiokafka
    resets to generation -1 and no member id but keeps the old assignment, and hands out
    its records, until it rejoins. The broker would take offsets committed in that state
    unchecked (test_kip447); the worker applies and commits none of them, rejoins, and
    every request is still answered once."""
    await pg.execute(f"INSERT INTO {scenario.schema}.acct (id) SELECT generate_series(1, 10)")
    requests = updates(range(1, 11), 5, scenario.run)
    dropped = polls = 0
    async with running(scenario) as (worker, _):
        await until(lambda: bool(worker.consumer and worker.consumer.assignment()), "assigned")
        consumer = worker.consumer
        assert consumer is not None
        real = consumer.getmany

        async def getmany(*partitions: TopicPartition, **kwargs: Any) -> Any:
            nonlocal dropped, polls
            polls += 1
            fetched = await real(*partitions, **kwargs)
            if fetched and not dropped:
                dropped += 1
                consumer._coordinator.reset_generation()  # what a refused heartbeat does
            return fetched

        consumer.getmany = getmany
        # The fetch in progress when it was replaced has returned: the next records pass here.
        await until(lambda: polls > 0, "a fetch through the replacement")
        await scenario.send(requests)
        replies = await scenario.replies(expect=len(requests))
        left = worker.metrics.registry.get_sample_value(
            "processor_fenced_total", {"reason": "stalled"}
        )
    assert dropped == 1
    assert left == 1, "the records fetched outside the group were not left"
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


async def test_a_new_owner_waits_for_the_open_transaction_of_the_old_one(
    one_partition: Scenario, pg: asyncpg.Connection
) -> None:
    """What the per-partition offset marks guarded, covered by require_stable: a previous
    owner's transaction holding the partition's offset (20) is open when a worker starts.
    The worker does not start from the offset before it (10): it waits until the
    transaction ends, then starts at 20, so requests 10-19 are not answered twice."""
    s = one_partition
    tp = TopicPartition(s.request_topic, 0)
    await pg.execute(f"INSERT INTO {s.schema}.acct (id) SELECT generate_series(1, 10)")
    first, second, third = (updates(range(1, 11), 1, f"{s.run}-{w}") for w in "abc")
    async with running(s):
        await s.send(first)
        assert len(await s.replies(expect=10)) == 10
    await s.send(second)

    previous = kafka.make_producer(kafka.KafkaAccess(s.kafka), txn_id=f"{s.group}-previous")
    await previous.start()
    try:
        await previous.begin_transaction()
        await kip447.send_offsets_to_transaction(
            previous, {tp: 20}, kip447.GroupMetadata(s.group, -1, ""), unfenced=True
        )
        unstable = kip447.counters["unstable_offset_fetch"]
        async with running(s) as (worker, _):
            await until(
                lambda: kip447.counters["unstable_offset_fetch"] > unstable + 2,
                "the worker's offset fetch to be answered UNSTABLE_OFFSET_COMMIT",
            )
            assert sample(worker, "processor_requests_total") == 0
            await previous.commit_transaction()
            await s.send(third)
            replies = await s.replies(expect=20)
    finally:
        await previous.stop()
    answered = sorted(r.request_id for r in replies)
    assert answered == sorted(r["request_id"] for r in first + third)


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
    async with running(scenario) as (worker, _):
        failing = FailingReturns(worker.applier.pool, 2)
        monkeypatch.setattr(worker.applier, "pool", failing)
        await scenario.send(requests)
        replies = await scenario.replies(expect=len(requests))
        retries = worker.metrics.registry.get_sample_value(
            "processor_retries_total", {"cause": "database"}
        )
        monkeypatch.setattr(worker.applier, "pool", failing._pool)  # stop() releases through it
    assert failing.left == 0
    assert not retries
    await check_exactly_once(pg, scenario.schema, replies, requests)
