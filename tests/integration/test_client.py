"""processor.client against real `processor run` workers, and `processor send`."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import pytest

from processor.client import Client
from processor.contract import Reply
from processor.errors import (
    AttributeNotFound,
    ConcurrencyVersionMismatch,
    ConcurrencyVersionNotProvided,
    DuplicateRequest,
    EntityNotFound,
    Fault,
    InvalidArgument,
    ObjectDoesNotExist,
    OptimisticConcurrencyNotEnabled,
    ReplyTimeout,
    RequestExpired,
    RequestTooLarge,
)
from tests.integration.harness import Scenario

pytestmark = pytest.mark.timeout(300)


async def until_answered(client: Client, scenario: Scenario, limit: float = 90) -> None:
    """Until a worker answers (joining the group takes a few seconds)."""
    deadline = time.monotonic() + limit
    while True:
        try:
            await client.retrieve("note", 0, timeout=3)
        except ObjectDoesNotExist:
            return
        except ReplyTimeout:
            assert time.monotonic() < deadline, f"no worker answered:\n{scenario.logs()}"


async def test_success_replies_and_each_fault_as_its_typed_exception(
    scenario: Scenario, client: Client, pg: asyncpg.Connection
) -> None:
    schema = scenario.schema
    await pg.execute(f"INSERT INTO {schema}.acct (id) VALUES (1), (2), (3)")
    await pg.execute(f"INSERT INTO {schema}.note (id, body) VALUES (1, 'x')")
    await pg.execute(f"INSERT INTO {schema}.counter (id) VALUES (1)")
    scenario.start_worker(PROCESSOR_MAX_MESSAGE_BYTES="2000")
    await until_answered(client, scenario)

    got = await client.retrieve("acct", 1)
    assert got.status == "success"
    assert got.attributes == {"id": 1, "seq": -1, "last_request": None, "balance": 0}
    version = got.row_version
    assert version is not None
    updated = await client.update(
        "acct", 1, {"balance": 5}, row_version=version, behavior="IfRowVersionMatches"
    )
    assert updated.row_version not in (None, version)
    assert updated.behavior_applied == "IfRowVersionMatches"
    assert (await client.delete("acct", 3)).status == "success"

    async def fault(call: Any, kind: type[Fault]) -> Fault:
        with pytest.raises(kind) as caught:
            await call
        exc = caught.value
        assert type(exc) is kind
        assert isinstance(exc.reply, Reply)
        assert exc.reply.status == "fault"
        assert exc.reply.fault is not None
        assert exc.reply.fault.code == kind.code == exc.code
        assert exc.message == exc.reply.fault.message
        return exc

    stale = await fault(
        client.update(
            "acct", 1, {"balance": 6}, row_version=version, behavior="IfRowVersionMatches"
        ),
        ConcurrencyVersionMismatch,
    )
    assert (stale.expected_version, stale.current_version) == (version, updated.row_version)
    assert stale.retryable
    await fault(client.update("counter", 1, {"n": 1}), ConcurrencyVersionNotProvided)
    await fault(
        client.update("note", 1, {"body": "y"}, row_version="1", behavior="IfRowVersionMatches"),
        OptimisticConcurrencyNotEnabled,
    )
    await fault(client.delete("acct", 404), ObjectDoesNotExist)
    bad = await fault(client.update("acct", 2, {"balance": "lots"}), InvalidArgument)
    assert bad.path == "attributes.balance"
    negative = await fault(client.update("acct", 2, {"balance": -1}), InvalidArgument)
    assert negative.path is None or "balance" in negative.path
    await fault(client.retrieve("nope", 1), EntityNotFound)
    noattr = await fault(client.update("acct", 2, {"owner": 1}), AttributeNotFound)
    assert noattr.path == "attributes.owner"
    past = datetime.now(UTC) - timedelta(minutes=1)
    await fault(client.delete("acct", 2, expires_at=past), RequestExpired)
    await client.update("acct", 2, {"balance": 7}, request_id=f"{scenario.run}-dup")
    await fault(
        client.update("acct", 2, {"balance": 8}, request_id=f"{scenario.run}-dup"),
        DuplicateRequest,
    )
    await fault(client.update("acct", 2, {"last_request": "x" * 3000}), RequestTooLarge)
    assert await pg.fetchval(f"SELECT balance FROM {schema}.acct WHERE id = 2") == 7
    assert client.pending == 0

    # on the wire: keyed entity:id, the request_id header, traceparent passed along
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    traced = await client.retrieve(
        "acct", 1, request_id=f"{scenario.run}-traced", traceparent=trace
    )
    sent = await scenario.read_all(scenario.request_topic, expect=1, settle=0.5)
    request = next(r for r in sent if (("request_id", traced.request_id.encode()) in r.headers))
    assert request.key == b"acct:1"
    assert ("traceparent", trace.encode()) in request.headers
    replies = await scenario.read_all(scenario.reply_topic, expect=1, settle=0.5)
    record = next(r for r in replies if ("request_id", traced.request_id.encode()) in r.headers)
    assert ("traceparent", trace.encode()) in record.headers


async def test_reply_timeout_without_worker_then_a_resend_applies_once(
    scenario: Scenario, client: Client, pg: asyncpg.Connection
) -> None:
    """No worker: ReplyTimeout. The same request_id once one runs: one application, and
    the same (stored) reply for every resend."""
    schema = scenario.schema
    await pg.execute(f"INSERT INTO {schema}.acct (id) VALUES (1)")
    rid = f"{scenario.run}-resend"
    with pytest.raises(ReplyTimeout) as caught:
        await client.update("acct", 1, {"seq": 1, "last_request": rid}, request_id=rid, timeout=1)
    assert caught.value.request_id == rid
    assert caught.value.request.request_id == rid
    assert caught.value.timeout == 1
    assert client.pending == 0  # the timed-out waiter is gone

    scenario.start_worker()
    first = await client.update("acct", 1, {"seq": 1, "last_request": rid}, request_id=rid)
    again = await client.send(caught.value.request)  # the exception's request, as is
    assert first.status == again.status == "success"
    assert first == again  # the ledger's stored reply, byte for byte (processed_at too)
    log = await pg.fetch(f"SELECT last_request FROM {schema}.acct_log")
    assert [r["last_request"] for r in log] == [rid], "applied exactly once"
    assert await pg.fetchval(f"SELECT xmin::text FROM {schema}.acct WHERE id = 1") == (
        first.row_version
    )
    # the topic holds three sends' replies, all the same bytes
    replies = await scenario.replies(expect=3, timeout=30)
    assert [r for r in replies if r.request_id == rid] == [first] * 3


async def test_two_hundred_concurrent_callers_share_one_client(
    scenario: Scenario, client: Client, pg: asyncpg.Connection
) -> None:
    schema = scenario.schema
    await pg.execute(f"INSERT INTO {schema}.acct (id) SELECT generate_series(1, 200)")
    scenario.start_worker()
    await until_answered(client, scenario)

    async def caller(i: int) -> tuple[int, Reply]:
        if i % 2:
            return i, await client.update("acct", i, {"balance": i, "last_request": str(i)})
        return i, await client.retrieve("acct", i)

    results = await asyncio.gather(*(caller(i) for i in range(1, 201)))
    for i, reply in results:
        assert reply.id == i
        assert reply.type == ("update" if i % 2 else "retrieve")
    assert len({reply.request_id for _, reply in results}) == 200
    rows = await pg.fetch(f"SELECT id, balance FROM {schema}.acct")
    balances = {r["id"]: r["balance"] for r in rows}
    assert all(balances[i] == (i if i % 2 else 0) for i in range(1, 201))
    assert client.pending == 0


async def test_read_modify_write_under_contention_counts_every_success(
    scenario: Scenario, client: Client, pg: asyncpg.Connection
) -> None:
    schema = scenario.schema
    await pg.execute(f"INSERT INTO {schema}.counter (id) VALUES (1)")
    scenario.start_worker()
    await until_answered(client, scenario)
    conflicts: list[ConcurrencyVersionMismatch] = []
    successes = 0
    gave_up = 0

    async def incrementer() -> None:
        nonlocal successes, gave_up
        for _ in range(8):
            try:
                reply = await client.read_modify_write(
                    "counter",
                    1,
                    lambda a: {"n": a["n"] + 1},
                    attempts=30,
                    on_conflict=conflicts.append,
                )
            except ConcurrencyVersionMismatch:
                gave_up += 1
            else:
                assert reply.status == "success"
                successes += 1

    await asyncio.gather(*(incrementer() for _ in range(6)))
    n = await pg.fetchval(f"SELECT n FROM {schema}.counter WHERE id = 1")
    assert n == successes
    assert successes + gave_up == 48
    assert successes > 0
    # all six read the first version before any update was applied: five lost that race
    assert conflicts
    assert all(c.expected_version and c.current_version for c in conflicts)


async def test_read_modify_write_gives_up_after_its_attempts(
    scenario: Scenario, client: Client, pg: asyncpg.Connection
) -> None:
    """fn bumps the row behind the client's back: every update is stale."""
    schema = scenario.schema
    await pg.execute(f"INSERT INTO {schema}.counter (id) VALUES (1)")
    scenario.start_worker()
    await until_answered(client, scenario)
    bump = await asyncpg.connect(scenario.database_url)
    calls = 0

    def meddle(attributes: dict[str, Any]) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return {"n": attributes["n"] + 1}

    async def sabotage() -> None:
        while True:
            await bump.execute(f"UPDATE {schema}.counter SET n = n + 100 WHERE id = 1")
            await asyncio.sleep(0.002)

    task = asyncio.create_task(sabotage())
    try:
        with pytest.raises(ConcurrencyVersionMismatch):
            await client.read_modify_write("counter", 1, meddle, attempts=3, backoff=0.001)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await bump.close()
    assert calls == 3


def run_send(
    scenario: Scenario, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "processor", "send", *args],
        input=stdin,
        env=scenario.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_processor_send_exit_codes(
    scenario: Scenario, client: Client, pg: asyncpg.Connection
) -> None:
    await pg.execute(f"INSERT INTO {scenario.schema}.acct (id) VALUES (1)")
    request = '{"type": "retrieve", "entity": "acct", "id": 1}'
    timed_out = await asyncio.to_thread(run_send, scenario, "--timeout", "1", request)
    assert timed_out.returncode == 3, timed_out.stderr
    assert "no reply" in timed_out.stderr

    scenario.start_worker()
    await until_answered(client, scenario)
    ok = await asyncio.to_thread(run_send, scenario, stdin=request)
    assert ok.returncode == 0, ok.stderr
    reply = msgspec.json.decode(ok.stdout)
    assert reply["status"] == "success"
    assert reply["attributes"]["id"] == 1
    assert len(reply["request_id"]) == 32  # filled in

    given = '{"type": "delete", "entity": "acct", "id": 9, "request_id": "mine-1"}'
    fault = await asyncio.to_thread(run_send, scenario, given)
    assert fault.returncode == 1, fault.stderr
    assert msgspec.json.decode(fault.stdout)["fault"]["name"] == "ObjectDoesNotExist"
    assert msgspec.json.decode(fault.stdout)["request_id"] == "mine-1"

    for bad in ("{", "[1]", '{"type": "retrieve", "entity": "acct", "id": 1.5}'):
        usage = await asyncio.to_thread(run_send, scenario, bad)
        assert usage.returncode == 2, (bad, usage.stderr)
