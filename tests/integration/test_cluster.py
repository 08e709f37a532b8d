"""The worker on a cluster: three Kafka brokers, a PostgreSQL primary with a synchronous standby.

The module starts a cluster stack of its own (``ops/stack up --cluster``: its own state dir
and ports, 39000-39999 unless ``PROCESSOR_TEST_CLUSTER_PORTS=LOW-HIGH``), so it needs no
fixture of the shared stack and runs wherever the single stack does (CI included). The
faults are real: kill -9 of a broker's JVM, kill -9 of the primary's postmaster and its
backends, SIGSTOP of the standby, ``pg_ctl promote``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from ops.lib.common import free_block
from processor.client import Client
from processor.contract import decode_reply
from tests.integration.harness import Scenario, answered_once, updates
from tests.support import ROOT, until

pytestmark = [pytest.mark.cluster, pytest.mark.faults, pytest.mark.timeout(900)]

#: Kafka client ports (3); controller, inter-broker and routed ports (9); PostgreSQL (2).
PORTS_NEEDED = 14


def _port_block() -> int:
    raw = os.environ.get("PROCESSOR_TEST_CLUSTER_PORTS", "39000-39999")
    low, _, high = raw.partition("-")
    base = free_block(PORTS_NEEDED, int(low), int(high), tries=500)
    if base is None:
        raise RuntimeError(f"no {PORTS_NEEDED} free consecutive ports in {raw}")
    return base


@dataclass
class ClusterStack:
    """A running ``ops/stack --cluster`` and what it says about itself."""

    env: dict[str, str]

    def run(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run(
            [str(ROOT / "ops" / "stack"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"ops/stack {' '.join(args)}:\n{done.stderr[-3000:]}"
        return done.stdout

    def status(self) -> dict[str, Any]:
        done = subprocess.run(
            [str(ROOT / "ops" / "stack"), "status", "--json"],
            env=self.env,
            capture_output=True,
            text=True,
        )
        status: dict[str, Any] = json.loads(done.stdout)
        return status

    @property
    def bootstrap(self) -> str:
        return str(self.status()["KAFKA_BOOTSTRAP_SERVERS"])

    @property
    def database_url(self) -> str:
        return str(self.status()["DATABASE_URL"])

    def node(self, name: str) -> dict[str, Any]:
        node: dict[str, Any] = self.status()["nodes"][name]
        return node

    def pg(self, role: str) -> tuple[str, dict[str, Any]]:
        """(name, status) of the PostgreSQL node with ``role`` (primary or standby)."""
        nodes = self.status()["nodes"]
        return next((n, v) for n, v in nodes.items() if v.get("role") == role)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterStack]:
    state = tmp_path_factory.mktemp("cluster-stack")
    base = _port_block()
    env = {
        k: v for k, v in os.environ.items() if k not in {"KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL"}
    }
    env.update(
        PROCESSOR_STACK_DIR=str(state),
        PROCESSOR_STACK_CLUSTER="1",
        PROCESSOR_STACK_KAFKA_PORT=str(base),
        PROCESSOR_STACK_CONTROLLER_PORT=str(base + 3),
        PROCESSOR_STACK_PG_PORT=str(base + 12),
    )
    stack = ClusterStack(env)
    try:
        stack.run("up", timeout=400)
        yield stack
    finally:
        subprocess.run(
            [str(ROOT / "ops" / "stack"), "down", "--immediate"],
            env=env,
            capture_output=True,
            timeout=300,
        )
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
async def scenario(cluster: ClusterStack, tmp_path: Path) -> AsyncIterator[Scenario]:
    """A scenario (its schema, topics with three replicas, a group) on the cluster."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    url = cluster.database_url
    s = Scenario(cluster.bootstrap, url, schema, tmp_path, partitions=3, replication=3)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await s.setup(conn)
        await conn.execute(f"INSERT INTO {schema}.acct (id) SELECT generate_series(1, 20)")
    finally:
        await conn.close()
    yield s
    s.stop_all()


def _family(pid: int) -> list[int]:
    """A postmaster and its children (backends, walreceiver, ...)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True)
    kids = [int(c) for c, p in (line.split() for line in out.stdout.splitlines()) if int(p) == pid]
    return [pid, *kids]


async def _until_counted(port: int, query: str, what: str, limit: float = 60) -> None:
    """Until ``query`` (a count) on the server at ``port`` is at least 1: ``what``."""
    conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/processor")
    try:
        deadline = time.monotonic() + limit
        while await conn.fetchval(query) < 1:
            assert time.monotonic() < deadline, f"not seen within {limit:.0f} s: {what}"
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def _until_sync(port: int) -> None:
    """The primary streams to a synchronous standby (commits wait for it)."""
    query = "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
    await _until_counted(port, query, "a synchronous standby")


async def _ledger_ids(url: str, schema: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(f"SELECT request_id FROM {schema}.request_ledger WHERE applied")
    finally:
        await conn.close()
    return {r["request_id"] for r in rows}


async def test_an_update_acknowledged_before_a_failover_is_present_after_it(
    cluster: ClusterStack, scenario: Scenario
) -> None:
    """Updates answered before the primary is killed (-9) are on the promoted standby, and
    the worker follows the failover without operator action (its DATABASE_URL names both
    servers, target_session_attrs=read-write): the updates sent across it are each applied
    once, in order, and answered once."""
    s = scenario
    old_primary, _ = cluster.pg("primary")
    s.start_worker()
    acknowledged = updates(range(1, 21), range(0, 5), f"{s.run}-a")
    await s.send(acknowledged)
    replies = await s.replies(expect=len(acknowledged), timeout=180)
    assert {r.request_id for r in replies} == {r["request_id"] for r in acknowledged}
    assert all(r.status == "success" for r in replies)

    across = updates(range(1, 21), range(5, 25), f"{s.run}-b")
    sender = asyncio.create_task(s.send(across, rate=100))
    await asyncio.to_thread(cluster.run, "failover")
    await sender
    new_primary, _ = cluster.pg("primary")
    assert new_primary != old_primary

    present = await _ledger_ids(cluster.database_url, s.schema)
    missing = {r["request_id"] for r in acknowledged} - present
    assert not missing, f"acknowledged before the failover, gone after it: {sorted(missing)[:5]}"
    await answered_once(s, acknowledged + across)


@contextlib.asynccontextmanager
async def _standby_frozen(
    cluster: ClusterStack, s: Scenario
) -> AsyncIterator[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """A worker answers a warm-up update; the standby is frozen (SIGSTOP) and a second
    update sent, whose COMMIT then waits for the standby (wait event SyncRep). Yields
    (warm-up, stuck); the standby resumes (SIGCONT) on exit."""
    s.start_worker()
    warm = updates(range(1, 2), range(0, 1), f"{s.run}-warm")
    await s.send(warm)
    assert len(await s.replies(expect=1, timeout=180)) == 1
    _, primary = cluster.pg("primary")
    _, standby = cluster.pg("standby")
    await _until_sync(primary["port"])
    frozen = _family(standby["pid"])
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        stuck = updates(range(2, 3), range(7, 8), f"{s.run}-stuck")
        await s.send(stuck)
        await _until_waiting_for_the_standby(primary["port"])
        yield warm, stuck
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)


async def _answered_ids(s: Scenario, expect: int, seconds: float) -> list[str]:
    """The request ids of the replies on the reply topic, read for ``seconds``."""
    seen = await s.read_all(s.reply_topic, expect=expect, timeout=seconds, settle=seconds)
    return [decode_reply(r.value).request_id for r in seen]


async def test_a_commit_the_standby_never_got_is_not_answered_and_is_applied_once_after_failover(
    cluster: ClusterStack, scenario: Scenario
) -> None:
    """What synchronous replication buys: with the standby frozen (SIGSTOP), an update's
    COMMIT is written on the primary but waits for the standby (wait event SyncRep), so no
    reply goes out. The primary is then killed (-9) and the standby, which never got the
    write, promoted: the worker redoes the request on the new primary, and it is answered
    and applied once."""
    s = scenario
    primary_name, primary = cluster.pg("primary")
    standby_name, _ = cluster.pg("standby")
    async with _standby_frozen(cluster, s) as (warm, stuck):
        # written on the primary, waiting for the standby: no reply may be visible
        assert await _answered_ids(s, expect=1, seconds=3) == [warm[0]["request_id"]]
        for pid in _family(primary["pid"]):
            os.kill(pid, signal.SIGKILL)
    await asyncio.to_thread(cluster.run, "promote", standby_name)
    await asyncio.to_thread(cluster.run, "up")  # the old primary, rebuilt as the standby
    assert cluster.pg("primary")[0] == standby_name
    assert cluster.pg("standby")[0] == primary_name
    await answered_once(s, warm + stuck)


async def test_a_commit_waiting_longer_than_the_command_timeout_for_the_standby_is_not_answered(
    cluster: ClusterStack, scenario: Scenario
) -> None:
    """A standby frozen for longer than the worker's command timeout (60 s). The timeout
    cancels the COMMIT's wait and PostgreSQL commits on the primary alone; the worker's
    retry finds the request in the ledger, and its transaction (made to write WAL by the
    lookup: processor/db/ledger.py) waits for the standby in turn, so nothing is answered
    while the update is on the primary alone (an answered update would be lost by the
    next failover). Once the standby is back: answered and applied once."""
    s = scenario
    async with _standby_frozen(cluster, s) as (warm, stuck):
        # past the command timeout: only the warm-up's reply
        answered = await _answered_ids(s, expect=2, seconds=75)
    assert answered == [warm[0]["request_id"]], "answered while on the primary alone"
    await answered_once(s, warm + stuck)


async def _until_waiting_for_the_standby(port: int) -> None:
    """A backend of the primary waits in its COMMIT for the synchronous standby."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
    await _until_counted(port, query, "a commit waiting for the standby")


async def _leaders(bootstrap: str, topics: list[str], partitions: int) -> dict[str, list[int]]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.client.force_metadata_update()
        cluster = producer.client.cluster
        return {
            t: [cluster.leader_for_partition(TopicPartition(t, p)) or -1 for p in range(partitions)]
            for t in topics
        }
    finally:
        await producer.stop()


async def test_a_worker_keeps_answering_through_a_leader_change_of_its_input_and_reply_partitions(
    cluster: ClusterStack, scenario: Scenario
) -> None:
    """kill -9 of the broker leading a request partition and a reply partition: their
    leadership moves to an in-sync replica, and requests on every partition are answered
    while that broker is down; restarted, it rejoins, and every request was applied and
    answered once, in order."""
    s = scenario
    s.start_worker()
    leaders = await _leaders(s.kafka, [s.request_topic, s.reply_topic], s.partitions)
    both = [b for b in (1, 2, 3) if b in leaders[s.request_topic] and b in leaders[s.reply_topic]]
    assert both, f"no broker leads a request and a reply partition: {leaders}"
    victim = both[0]
    moved_in = [p for p, b in enumerate(leaders[s.request_topic]) if b == victim]
    moved_out = [p for p, b in enumerate(leaders[s.reply_topic]) if b == victim]

    before = updates(range(1, 21), range(0, 5), f"{s.run}-a")
    sender = asyncio.create_task(s.send(before, rate=200))
    await until(lambda: "partitions assigned" in s.logs(), "the worker's assignment", 120)
    await asyncio.to_thread(cluster.run, "stop", f"kafka-{victim}", "--immediate")
    await sender

    async def moved() -> bool:
        now = await _leaders(s.kafka, [s.request_topic, s.reply_topic], s.partitions)
        return all(now[s.request_topic][p] not in (victim, -1) for p in moved_in) and all(
            now[s.reply_topic][p] not in (victim, -1) for p in moved_out
        )

    deadline = time.monotonic() + 60
    while not await moved():
        assert time.monotonic() < deadline, "leadership did not move off the killed broker"
        await asyncio.sleep(0.2)

    # While the broker is down: a request on every partition gets its answer.
    async with Client(s.kafka, request_topic=s.request_topic, reply_topic=s.reply_topic) as client:
        during = await asyncio.gather(
            *(
                client.update(
                    "acct",
                    k,
                    {"seq": 5, "last_request": f"{s.run}-b-{k}-5"},
                    request_id=f"{s.run}-b-{k}-5",
                    timeout=90,
                )
                for k in range(1, 21)
            )
        )
    assert all(r.status == "success" for r in during)
    assert cluster.node(f"kafka-{victim}")["running"] is False

    await asyncio.to_thread(cluster.run, "up")
    after = updates(range(1, 21), range(6, 10), f"{s.run}-c")
    await s.send(after, rate=200)
    everything = before + updates(range(1, 21), range(5, 6), f"{s.run}-b") + after
    await answered_once(s, everything)
