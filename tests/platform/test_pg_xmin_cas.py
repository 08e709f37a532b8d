"""What the processor relies on from PostgreSQL: xmin as a row version for compare-and-set."""

from __future__ import annotations

import asyncio
import time

import asyncpg

CAS = "UPDATE t SET v = $3 WHERE id = $1 AND xmin = $2::xid RETURNING xmin"


async def make_row(pg: asyncpg.Connection) -> int:
    await pg.execute("CREATE TABLE t (id integer PRIMARY KEY, v integer NOT NULL)")
    xmin: int = await pg.fetchval("INSERT INTO t VALUES (1, 10) RETURNING xmin")
    return xmin


async def row(pg: asyncpg.Connection) -> tuple[int, int]:
    record = await pg.fetchrow("SELECT xmin, v FROM t WHERE id = 1")
    assert record is not None
    return record["xmin"], record["v"]


async def test_cas_with_the_current_xmin_updates_and_changes_xmin(pg: asyncpg.Connection) -> None:
    xmin = await make_row(pg)
    assert await row(pg) == (xmin, 10)
    new_xmin = await pg.fetchval(CAS, 1, xmin, 11)
    assert new_xmin is not None
    assert new_xmin != xmin
    assert await row(pg) == (new_xmin, 11)


async def test_cas_with_a_stale_xmin_updates_nothing(pg: asyncpg.Connection) -> None:
    stale = await make_row(pg)
    current = await pg.fetchval(CAS, 1, stale, 11)
    assert await pg.fetch(CAS, 1, stale, 99) == []  # 0 rows
    assert await pg.execute(CAS, 1, stale, 99) == "UPDATE 0"
    assert await row(pg) == (current, 11)  # unchanged


async def test_a_no_op_update_still_changes_xmin(pg: asyncpg.Connection) -> None:
    xmin = await make_row(pg)
    await pg.execute("UPDATE t SET v = v WHERE id = 1")
    new_xmin, v = await row(pg)
    assert v == 10
    assert new_xmin != xmin  # a new row version: a writer that saw the old one must fail
    assert await pg.fetch(CAS, 1, xmin, 11) == []


async def test_select_for_update_does_not_change_xmin(pg: asyncpg.Connection) -> None:
    xmin = await make_row(pg)
    async with pg.transaction():
        locked = await pg.fetchval("SELECT xmin FROM t WHERE id = 1 FOR UPDATE")
        assert locked == xmin
    assert await row(pg) == (xmin, 10)  # locking sets xmax, not xmin
    assert await pg.fetchval(CAS, 1, xmin, 11) is not None


async def test_concurrent_cas_with_the_same_xmin_has_exactly_one_winner(
    pg: asyncpg.Connection, pg_pool: asyncpg.Pool
) -> None:
    xmin = await make_row(pg)
    async with pg_pool.acquire() as first, pg_pool.acquire() as second:
        second_pid = await second.fetchval("SELECT pg_backend_pid()")
        tx = first.transaction()
        await tx.start()
        assert await first.fetchval(CAS, 1, xmin, 21) is not None  # holds the row lock
        loser = asyncio.create_task(second.fetch(CAS, 1, xmin, 22))
        deadline = time.monotonic() + 10
        while not await pg.fetchval(  # the second writer waits on the row lock
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", second_pid
        ):
            assert time.monotonic() < deadline, "the second CAS never blocked"
            await asyncio.sleep(0.02)
        await tx.commit()
        assert await loser == []  # re-checked against the committed version: stale
    assert (await row(pg))[1] == 21
