"""No lost update: concurrent read-modify-write clients, each on its own connection.

Each task repeats: retrieve the counter and its token, add one, update with
IfRowVersionMatches; on ConcurrencyVersionMismatch it re-reads and retries with a new
request_id. Every success must be one increment: the final counter equals the number of
successful updates, which equals tasks * increments (Hermitage's P4, on the engine).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg
import pytest

from tests.conftest import Endpoints
from tests.integration.engine_kit import FLAVORS, Flavor, Kit, retrieve, update

pytestmark = pytest.mark.timeout(120)

TASKS = 8
INCREMENTS = 10


@dataclass
class Tally:
    successes: int = 0
    mismatches: int = 0
    attempts: int = 0


async def _increment(
    kit: Kit,
    pool: asyncpg.Pool,
    entity: str,
    key: int | str,
    tally: Tally,
    start: asyncio.Barrier,
) -> None:
    """One client: INCREMENTS read-modify-write cycles, retrying each until it lands. The
    first read of every client happens before any client writes: a guaranteed collision."""
    done = 0
    first = True
    while done < INCREMENTS:
        tally.attempts += 1
        assert tally.attempts < TASKS * INCREMENTS * 50, "no progress"
        async with pool.acquire() as conn:
            read = await kit.one(retrieve(entity, key), conn=conn)
        assert read.reply.status == "success", read.reply.fault
        assert read.reply.attributes is not None
        counter = read.reply.attributes["counter"]
        if first:
            await start.wait()
            first = False
        async with pool.acquire() as conn:
            write = await kit.one(
                update(
                    entity,
                    key,
                    {"counter": counter + 1},
                    version=read.reply.row_version,
                    behavior="IfRowVersionMatches",
                ),
                conn=conn,
            )
        if write.reply.status == "success":
            tally.successes += 1
            done += 1
            continue
        assert write.reply.fault is not None
        assert write.reply.fault.name == "ConcurrencyVersionMismatch", write.reply.fault
        assert write.reply.fault.retryable
        tally.mismatches += 1
        await asyncio.sleep(0)


@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_concurrent_increments_lose_nothing(
    kit: Kit, flavor: Flavor, stack_endpoints: Endpoints
) -> None:
    """8 clients x 10 increments through the engine on 8 connections: counter == 80 ==
    successes; some attempts collided (the race was real) and were refused."""
    key = flavor.key(1)
    await kit.seed(flavor.plain, key, counter=0)
    tally = Tally()
    start = asyncio.Barrier(TASKS)
    pool = await asyncpg.create_pool(stack_endpoints.database_url, min_size=TASKS, max_size=TASKS)
    try:
        await asyncio.gather(
            *(_increment(kit, pool, flavor.plain, key, tally, start) for _ in range(TASKS))
        )
    finally:
        await pool.close()
    row = await kit.row(flavor.plain, key)
    assert row is not None
    assert tally.successes == TASKS * INCREMENTS
    assert row["counter"] == tally.successes
    assert tally.mismatches >= TASKS - 1, "the first round alone must collide"
    # Every success is in the ledger as an applied write, every mismatch as a fault.
    applied = await kit.pg.fetchval(
        f"SELECT count(*) FROM {kit.ledger.table} WHERE type = 'update' AND applied"
    )
    refused = await kit.pg.fetchval(
        f"SELECT count(*) FROM {kit.ledger.table} WHERE type = 'update' AND NOT applied"
    )
    assert (applied, refused) == (tally.successes, tally.mismatches)
    # The version chain has no fork: each applied write's prior is the previous one's new.
    chain = await kit.pg.fetch(
        f"SELECT w->>'prior' AS prior, w->>'new' AS new FROM {kit.ledger.table}, "
        "jsonb_array_elements(writes) AS w WHERE applied"
    )
    priors = [r["prior"] for r in chain]
    news = [r["new"] for r in chain]
    assert len(set(priors)) == len(priors), "two writes applied on the same version"
    assert len(set(news)) == len(news), "two writes handed out the same token"
    assert await kit.token(flavor.plain, key) in news


@pytest.mark.parametrize("flavor", FLAVORS, ids=str)
async def test_blind_overwrites_do_lose_updates(
    kit: Kit, flavor: Flavor, stack_endpoints: Endpoints
) -> None:
    """The control: the same clients with AlwaysOverwrite, every round reading before anyone
    writes, lose all but one increment per round: the guarded test is not passing by
    luck of scheduling."""
    key = flavor.key(1)
    await kit.seed(flavor.plain, key, counter=0)
    pool = await asyncpg.create_pool(stack_endpoints.database_url, min_size=TASKS, max_size=TASKS)
    successes = 0
    barrier = asyncio.Barrier(TASKS)

    async def blind() -> None:
        nonlocal successes
        for _ in range(INCREMENTS):
            async with pool.acquire() as conn:
                read = await kit.one(retrieve(flavor.plain, key), conn=conn)
            assert read.reply.attributes is not None
            await barrier.wait()  # everyone has read before anyone writes
            async with pool.acquire() as conn:
                write = await kit.one(
                    update(flavor.plain, key, {"counter": read.reply.attributes["counter"] + 1}),
                    conn=conn,
                )
            assert write.reply.status == "success"
            successes += 1
            await barrier.wait()  # everyone has written before the next round reads

    try:
        await asyncio.gather(*(blind() for _ in range(TASKS)))
    finally:
        await pool.close()
    row = await kit.row(flavor.plain, key)
    assert row is not None
    assert successes == TASKS * INCREMENTS
    assert row["counter"] == INCREMENTS  # 80 successful writes, 10 increments
