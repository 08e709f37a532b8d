"""The worker's statement, lock and idle-in-transaction timeouts, against the real server.

Each timeout fires for real (a second session holds the row lock, a trigger sleeps, a
transaction idles), and the error it raises is one the worker retries (is_transient),
never a per-request UnExpected fault; once the cause is gone the request succeeds, once.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from processor.config import Settings
from processor.db import connect, create_pool, is_transient
from processor.errors import TransientError
from tests.conftest import Endpoints
from tests.integration.engine_kit import Kit, envelope
from tests.integration.harness import Scenario

pytestmark = pytest.mark.timeout(240)


def _settings(
    url: str, *, lock: int = 10_000, statement: int = 30_000, idle: int = 60_000
) -> Settings:
    return Settings(
        database_url=url,
        db_lock_timeout_ms=lock,
        db_statement_timeout_ms=statement,
        db_idle_in_transaction_timeout_ms=idle,
    )


def _update(request_id: str, key: int, counter: int) -> dict[str, object]:
    return {
        "type": "update",
        "request_id": request_id,
        "entity": "account",
        "id": key,
        "attributes": {"counter": counter},
    }


async def test_each_timeout_fires_with_an_error_the_worker_retries(
    stack_endpoints: Endpoints, pg: asyncpg.Connection, db_schema: str
) -> None:
    """lock_timeout -> 55P03, statement_timeout -> 57014, idle_in_transaction -> 25P03 (or
    the connection it closed): every one is transient."""
    url = stack_endpoints.database_url
    await pg.execute(f"CREATE TABLE {db_schema}.t (id int PRIMARY KEY)")
    await pg.execute(f"INSERT INTO {db_schema}.t VALUES (1)")
    conn = await connect(_settings(url, lock=100, statement=300), timeouts=True)
    try:
        async with pg.transaction():
            await pg.execute(f"SELECT * FROM {db_schema}.t WHERE id = 1 FOR UPDATE")
            started = time.monotonic()
            with pytest.raises(asyncpg.LockNotAvailableError) as lock:
                await conn.execute(f"SELECT * FROM {db_schema}.t WHERE id = 1 FOR UPDATE")
            assert time.monotonic() - started < 5
        assert lock.value.sqlstate == "55P03"
        assert is_transient(lock.value)
        with pytest.raises(asyncpg.QueryCanceledError) as statement:
            await conn.execute("SELECT pg_sleep(5)")
        assert statement.value.sqlstate == "57014"
        assert is_transient(statement.value)
    finally:
        await conn.close()

    idle = await connect(_settings(url, idle=200), timeouts=True)
    try:
        transaction = idle.transaction()
        await transaction.start()
        await idle.execute("SELECT 1")
        await asyncio.sleep(1.0)  # the server ends the session meanwhile
        with pytest.raises(Exception) as idled:  # noqa: PT011 - which one is asyncpg's choice
            await idle.execute("SELECT 1")
        assert is_transient(idled.value), repr(idled.value)
        if isinstance(idled.value, asyncpg.PostgresError):
            assert idled.value.sqlstate == "25P03"
    finally:
        idle.terminate()


async def test_a_locked_row_makes_the_engine_retry_and_succeed_once_it_is_released(
    stack_endpoints: Endpoints, pg: asyncpg.Connection, db_schema: str
) -> None:
    """A second session holds the row lock: the batch fails as TransientError (nothing
    committed, no fault outcome); after the lock is released the same batch succeeds."""
    kit = await Kit.create(pg, db_schema)
    await kit.seed("account", 1)
    settings = _settings(stack_endpoints.database_url, lock=150)
    pool = await create_pool(settings, max_size=2)
    holder = await asyncpg.connect(stack_endpoints.database_url)
    try:
        batch = [envelope(_update("locked-1", 1, 7))]
        holding = holder.transaction()
        await holding.start()
        await holder.execute(f"SELECT * FROM {kit.table('account')} WHERE id = 1 FOR UPDATE")
        async with pool.acquire() as conn:
            with pytest.raises(TransientError) as caught:
                await kit.engine.process(conn, batch)
        assert isinstance(caught.value.__cause__, asyncpg.LockNotAvailableError)
        assert await kit.ledger_count() == 0
        await holding.rollback()
        async with pool.acquire() as conn:
            (outcome,) = await kit.engine.process(conn, batch)
        assert outcome.reply.status == "success"
        assert outcome.applied
        row = await kit.row("account", 1)
        assert row is not None
        assert row["counter"] == 7
        assert await kit.ledger_count() == 1
    finally:
        await holder.close()
        await pool.close()


async def test_a_statement_past_statement_timeout_is_retried_not_faulted(
    stack_endpoints: Endpoints, pg: asyncpg.Connection, db_schema: str
) -> None:
    """A trigger that sleeps past statement_timeout: TransientError (57014), no outcome,
    nothing committed; without the sleep the same batch succeeds."""
    kit = await Kit.create(pg, db_schema)
    await kit.seed("account", 1)
    table = kit.table("account")
    await pg.execute(
        f"CREATE FUNCTION {db_schema}.slow() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_sleep(2); RETURN NEW; END $$"
    )
    await pg.execute(
        f"CREATE TRIGGER slow BEFORE UPDATE ON {table} "
        f"FOR EACH ROW EXECUTE FUNCTION {db_schema}.slow()"
    )
    batch = [envelope(_update("slow-1", 1, 3))]
    settings = _settings(stack_endpoints.database_url, statement=200)
    pool = await create_pool(settings, max_size=1)
    try:
        async with pool.acquire() as conn:
            with pytest.raises(TransientError) as caught:
                await kit.engine.process(conn, batch)
        assert isinstance(caught.value.__cause__, asyncpg.QueryCanceledError)
        assert await kit.ledger_count() == 0
        await pg.execute(f"DROP TRIGGER slow ON {table}")
        async with pool.acquire() as conn:
            (outcome,) = await kit.engine.process(conn, batch)
        assert outcome.reply.status == "success"
    finally:
        await pool.close()


async def test_a_worker_retries_a_row_locked_by_another_session_then_applies_it_once(
    scenario: Scenario, pg: asyncpg.Connection
) -> None:
    """End to end: a real worker (lock_timeout 200 ms) meets a row another session holds
    FOR UPDATE; it logs database retries and sends no fault; released, the update is
    applied once and its one reply is a success."""
    schema = scenario.schema
    await pg.execute(f"INSERT INTO {schema}.acct (id) VALUES (1)")
    holder = await asyncpg.connect(scenario.database_url)
    holding = holder.transaction()
    await holding.start()
    await holder.execute(f"SELECT * FROM {schema}.acct WHERE id = 1 FOR UPDATE")
    try:
        scenario.start_worker(PROCESSOR_DB_LOCK_TIMEOUT_MS="200")
        request = {
            "type": "update",
            "request_id": f"{scenario.run}-locked",
            "entity": "acct",
            "id": 1,
            "attributes": {"seq": 1, "last_request": f"{scenario.run}-locked"},
        }
        await scenario.send([request])
        deadline = time.monotonic() + 90
        while "LockNotAvailableError" not in scenario.logs():
            assert time.monotonic() < deadline, scenario.logs()
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # a few more retries while the lock is held
        assert await pg.fetchval(f"SELECT seq FROM {schema}.acct WHERE id = 1") == -1
    finally:
        await holding.rollback()
        await holder.close()
    replies = await scenario.replies(expect=1, timeout=60)
    assert [(r.request_id, r.status) for r in replies] == [(request["request_id"], "success")]
    log = await pg.fetch(f"SELECT last_request FROM {schema}.acct_log")
    assert [r["last_request"] for r in log] == [request["request_id"]]
    assert scenario.logs().count("database retry") >= 2


async def test_a_pooled_connection_comes_back_without_a_transaction_and_with_its_timeouts(
    stack_endpoints: Endpoints,
) -> None:
    """The worker's pool skips asyncpg's session reset on release (a round trip per lane
    per batch): what it relies on still holds. A transaction left open is rolled back;
    the timeouts are the connection's own settings, not session state a reset restores."""
    pool = await create_pool(_settings(stack_endpoints.database_url, lock=1234), max_size=1)
    try:
        async with pool.acquire() as conn:
            await conn.execute("BEGIN")  # unmanaged: asyncpg logs that it rolls it back
            await conn.execute("CREATE TEMP TABLE left_open (id int)")
            pid = await conn.fetchval("SELECT pg_backend_pid()")
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") == pid  # the same session
            assert not conn.is_in_transaction()
            gone = await conn.fetchval("SELECT to_regclass('pg_temp.left_open')")
            assert gone is None, "the open transaction was not rolled back"
            assert await conn.fetchval("SHOW lock_timeout") == "1234ms"
    finally:
        await pool.close()
