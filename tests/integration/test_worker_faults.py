"""The worker survives restarts of PostgreSQL and of the Kafka broker, with no operator action.

These restart the local stack's services (``ops/stack``), so they need the stack the tests
run on to be the local one; against services given from outside they cannot run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from processor.kafka import clients as kafka
from tests.integration.harness import Scenario, answered_once, json_log_lines, updates
from tests.support import ROOT, until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]


def _local_stack_matches(endpoints: Any) -> bool:
    env = subprocess.run(
        [ROOT / "ops" / "stack", "env", "--json"], capture_output=True, text=True, check=False
    )
    if env.returncode != 0:
        return False
    values = json.loads(env.stdout)
    if not (
        values.get("KAFKA_BOOTSTRAP_SERVERS") == endpoints.kafka_bootstrap
        and values.get("DATABASE_URL") == endpoints.database_url
    ):
        return False
    # Same endpoints is not enough: another checkout's stack may hold those ports. This
    # checkout's state dir must be the one running them (status exits 0 only then).
    status = subprocess.run(
        [ROOT / "ops" / "stack", "status"], capture_output=True, text=True, check=False
    )
    return status.returncode == 0


def _stack(*args: str) -> None:
    done = subprocess.run([ROOT / "ops" / "stack", *args], capture_output=True, text=True)
    assert done.returncode == 0, f"ops/stack {' '.join(args)} failed:\n{done.stderr[-3000:]}"


@pytest.fixture
async def scenario(stack_endpoints: Any, db_schema: str, tmp_path: Path) -> AsyncIterator[Scenario]:
    if not _local_stack_matches(stack_endpoints):
        pytest.skip("restarts need the local stack (ops/stack); the endpoints are external")
    s = Scenario(stack_endpoints.kafka_bootstrap, stack_endpoints.database_url, db_schema, tmp_path)
    conn = await asyncpg.connect(stack_endpoints.database_url)
    try:
        await s.setup(conn)
        await conn.execute(f"INSERT INTO {db_schema}.acct (id) SELECT generate_series(1, 30)")
    finally:
        await conn.close()
    yield s
    s.stop_all()


async def test_postgres_immediate_stop_and_start_mid_stream_needs_no_operator(
    scenario: Scenario,
) -> None:
    """`pg_ctl stop -m immediate` mid-stream, then start: every request once, in order."""
    requests = updates(range(1, 31), 40, scenario.run)
    scenario.start_worker()
    sender = asyncio.create_task(scenario.send(requests, rate=400))
    # Mid-stream: once the worker is processing (a loaded machine takes seconds to start it).
    await until(lambda: "partitions assigned" in scenario.logs(), "the worker's assignment", 60)
    await asyncio.sleep(0.5)
    await asyncio.to_thread(_stack, "stop", "postgres", "--immediate")
    await asyncio.sleep(2.0)
    await asyncio.to_thread(_stack, "up")
    await sender
    await answered_once(scenario, requests)


async def test_kafka_broker_kill_and_restart_mid_stream_needs_no_operator(
    scenario: Scenario,
) -> None:
    """kill -9 of the broker mid-stream, then start: every request once, in order."""
    requests = updates(range(1, 31), 30, scenario.run)
    scenario.start_worker()
    sender = asyncio.create_task(scenario.send(requests[: len(requests) // 2], rate=400))
    await sender
    await asyncio.sleep(0.5)
    await asyncio.to_thread(_stack, "stop", "kafka", "--immediate")
    await asyncio.sleep(2.0)
    await asyncio.to_thread(_stack, "up")
    await scenario.send(requests[len(requests) // 2 :], rate=400)
    await answered_once(scenario, requests)
    # aiokafka's retries while the broker was away: JSON lines too, none above info
    lines = json_log_lines(scenario.tmp / "worker-0.log")
    assert all(line["level"] == "info" for line in lines if line.get("client_event"))


async def test_committed_offsets_read_right_after_a_broker_restart_are_the_committed_ones(
    stack_endpoints: Any,
) -> None:
    """While a restarted broker reloads __consumer_offsets, OffsetFetch answers with a
    group-level COORDINATOR_LOAD_IN_PROGRESS; unpatched aiokafka read that as "no committed
    offset" for ~0.5 s (a new owner would start the partition over: replies twice). With
    processor.aiokafka_fixes every answer read after the restart is the committed offset."""
    if not _local_stack_matches(stack_endpoints):
        pytest.skip("restarts need the local stack (ops/stack); the endpoints are external")
    access = kafka.KafkaAccess(stack_endpoints.kafka_bootstrap)
    group, topic = f"offsets-{uuid.uuid4().hex[:8]}", f"offsets-{uuid.uuid4().hex[:8]}"
    await kafka.ensure_topics(access, [topic], partitions=1)
    tp = TopicPartition(topic, 0)
    committer = kafka.make_consumer(access, group)
    await committer.start()
    try:
        committer.assign([tp])
        for offset in range(1, 3001):  # records for the coordinator to reload
            await committer.commit({tp: offset})
    finally:
        await committer.stop()

    await asyncio.to_thread(_stack, "stop", "kafka", "--immediate")
    restart = asyncio.create_task(asyncio.to_thread(_stack, "up"))
    answers: list[int | None] = []
    deadline = time.monotonic() + 90
    while len(answers) < 20 and time.monotonic() < deadline:
        reader = kafka.make_consumer(access, group, request_timeout_ms=5000)
        try:
            await asyncio.wait_for(reader.start(), 5)
            answers.append(await asyncio.wait_for(reader.committed(tp), 30))
        except (KafkaError, TimeoutError, OSError):
            await asyncio.sleep(0.05)  # the broker is not up yet
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader.stop(), 5)
    await restart
    assert len(answers) == 20, "the broker did not come back"
    assert answers == [3000] * 20
