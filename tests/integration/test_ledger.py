"""The request ledger on real PostgreSQL: migrations, lookups, inserts and pruning."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from processor.db.ledger import Ledger, LedgerEntry
from processor.errors import ConfigError, TransientError
from tests.conftest import Endpoints


def _entry(request_id: str, processed_at: datetime, reply: bytes = b"{}") -> LedgerEntry:
    return LedgerEntry(
        request_id=request_id,
        fingerprint=b"\x01" * 32,
        type="update",
        entity="account",
        record_id="1",
        status="success",
        fault_code=None,
        applied=True,
        writes='[{"entity": "account", "id": 1, "prior": "1", "new": "2"}]',
        reply=reply,
        source_topic="requests",
        source_partition=0,
        source_offset=7,
        processed_at=processed_at,
    )


async def _ledger_objects(pg: asyncpg.Connection, schema: str) -> list[str]:
    rows = await pg.fetch(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = $1 ORDER BY c.relname",
        schema,
    )
    return [r["relname"] for r in rows]


@pytest.fixture
async def scratch_schemas(pg: asyncpg.Connection, db_schema: str) -> AsyncIterator[list[str]]:
    """Names for ledger schemas the test lets migrate() create; dropped afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        await pg.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


async def test_migrate_creates_the_table_and_is_idempotent(
    pg: asyncpg.Connection, db_schema: str
) -> None:
    """Twice in a row is fine and leaves exactly the ledger (its key, two indexes)."""
    ledger = Ledger(db_schema)
    await ledger.migrate(pg)
    await ledger.insert(pg, [_entry("r1", datetime.now(UTC))])
    await ledger.migrate(pg)
    assert await _ledger_objects(pg, db_schema) == [
        "request_ledger",
        "request_ledger_pkey",
        "request_ledger_processed_at",
        "request_ledger_record",
    ]
    assert await pg.fetchval(f"SELECT count(*) FROM {ledger.table}") == 1  # data kept


async def test_migrate_creates_its_schema(
    pg: asyncpg.Connection, db_schema: str, scratch_schemas: list[str]
) -> None:
    """The ledger's schema need not exist beforehand."""
    name = f"{db_schema}_ledger"
    scratch_schemas.append(name)
    await Ledger(name).migrate(pg)
    assert "request_ledger" in await _ledger_objects(pg, name)


async def test_concurrent_migrations_from_two_connections(
    stack_endpoints: Endpoints, db_schema: str, scratch_schemas: list[str], pg: asyncpg.Connection
) -> None:
    """Two workers starting at once (several times, each on a fresh schema): both succeed,
    one ledger results."""
    conns = [await asyncpg.connect(stack_endpoints.database_url) for _ in range(2)]
    try:
        for n in range(5):
            name = f"{db_schema}_c{n}"
            scratch_schemas.append(name)
            ledger = Ledger(name)
            await asyncio.gather(*(ledger.migrate(c) for c in conns))
            assert await _ledger_objects(pg, name) == [
                "request_ledger",
                "request_ledger_pkey",
                "request_ledger_processed_at",
                "request_ledger_record",
            ]
    finally:
        for c in conns:
            await c.close()


async def test_a_lookup_that_finds_a_stored_reply_makes_its_transaction_wait_at_commit(
    pg: asyncpg.Connection, db_schema: str
) -> None:
    """A ledger row can be visible before it is on a synchronous standby (its commit's wait
    was cancelled: PostgreSQL then commits locally). A transaction that finds one writes
    WAL (a transactional logical message: a transaction id alone does not make a COMMIT
    wait), so its own COMMIT waits for the standby before the stored reply is published
    again; one that finds nothing writes none (no cost for new requests). The wait
    itself, on a real standby: tests/integration/test_cluster.py."""
    ledger = Ledger(db_schema)
    await ledger.migrate(pg)
    await ledger.insert(pg, [_entry("a", datetime.now(UTC), b"{}")])
    # What the message leaves in the transaction that is visible to it alone: an xid
    # (the WAL position is global: other sessions move it too).
    assigned = "SELECT pg_current_xact_id_if_assigned() IS NOT NULL"
    async with pg.transaction():
        assert await ledger.lookup(pg, ["unknown"]) == {}
        assert await pg.fetchval(assigned) is False, "a lookup that found nothing wrote"
    async with pg.transaction():
        assert set(await ledger.lookup(pg, ["unknown", "a"])) == {"a"}
        assert await pg.fetchval(assigned) is True, "a lookup that found a reply wrote nothing"


async def test_lookup_returns_stored_replies_by_request_id(
    pg: asyncpg.Connection, db_schema: str
) -> None:
    """lookup finds what insert stored (exact bytes and fingerprint), ignores unknown ids."""
    ledger = Ledger(db_schema)
    await ledger.migrate(pg)
    now = datetime.now(UTC)
    await ledger.insert(pg, [_entry("a", now, b'{"a":1}'), _entry("b", now, b"\x00\xff")])
    found = await ledger.lookup(pg, ["a", "b", "c", "a"])
    assert set(found) == {"a", "b"}
    assert found["a"].reply == b'{"a":1}'
    assert found["b"].reply == b"\x00\xff"
    assert found["a"].fingerprint == b"\x01" * 32
    assert await ledger.lookup(pg, []) == {}
    await ledger.insert(pg, [])  # nothing to do is fine


async def test_insert_of_a_claimed_request_id_is_transient(
    pg: asyncpg.Connection, db_schema: str
) -> None:
    """A request_id committed by someone else: TransientError (the batch is redone and then
    finds the entry), and the first entry is kept."""
    ledger = Ledger(db_schema)
    await ledger.migrate(pg)
    now = datetime.now(UTC)
    await ledger.insert(pg, [_entry("a", now, b"first")])
    with pytest.raises(TransientError):
        await ledger.insert(pg, [_entry("b", now), _entry("a", now, b"second")])
    assert (await ledger.lookup(pg, ["a"]))["a"].reply == b"first"
    assert await ledger.lookup(pg, ["b"]) == {}  # the statement failed as a whole


@pytest.mark.parametrize("chunk", [10_000, 2])
async def test_prune_deletes_only_entries_older_than_the_retention(
    pg: asyncpg.Connection, db_schema: str, chunk: int
) -> None:
    """Entries processed before now - retention go (in chunks); newer ones stay."""
    ledger = Ledger(db_schema)
    await ledger.migrate(pg)
    now = await pg.fetchval("SELECT now()")
    ages = {
        "ancient": timedelta(days=400),
        "old-1": timedelta(days=31),
        "old-2": timedelta(days=30, minutes=1),
        "old-3": timedelta(days=30, seconds=1),
        "old-4": timedelta(days=45),
        "edge": timedelta(days=29, hours=23),
        "recent": timedelta(days=1),
        "now": timedelta(0),
        "future": -timedelta(days=1),
    }
    await ledger.insert(pg, [_entry(rid, now - age) for rid, age in ages.items()])
    deleted = await ledger.prune(pg, timedelta(days=30), chunk=chunk)
    assert deleted == 5
    left = {r["request_id"] for r in await pg.fetch(f"SELECT request_id FROM {ledger.table}")}
    assert left == {"edge", "recent", "now", "future"}
    assert await ledger.prune(pg, timedelta(days=30), chunk=chunk) == 0


async def test_prune_of_an_empty_ledger(pg: asyncpg.Connection, db_schema: str) -> None:
    """Nothing to delete: 0."""
    ledger = Ledger(db_schema)
    await ledger.migrate(pg)
    assert await ledger.prune(pg, timedelta(days=1)) == 0


@pytest.mark.parametrize("schema", ["Processor", "a-b", "x; DROP TABLE y", "1abc", "", "a" * 64])
def test_ledger_schema_must_be_a_plain_identifier(schema: str) -> None:
    """The schema name goes into SQL text, so it is allowlisted."""
    with pytest.raises(ConfigError):
        Ledger(schema)


def test_ledger_table_name() -> None:
    """The table is <schema>.request_ledger."""
    name = f"s_{uuid.uuid4().hex[:8]}"
    assert Ledger(name).table == f'"{name}".request_ledger'


async def test_prune_ledger_dry_run_counts_and_deletes_nothing(
    pg: asyncpg.Connection, db_schema: str, stack_endpoints: Endpoints
) -> None:
    ledger = Ledger(db_schema)
    await ledger.migrate(pg)
    now = await pg.fetchval("SELECT now()")
    ages = [timedelta(days=40), timedelta(days=31), timedelta(days=1)]
    await ledger.insert(pg, [_entry(f"r{i}", now - age) for i, age in enumerate(ages)])
    env = {
        **os.environ,
        "DATABASE_URL": stack_endpoints.database_url,
        "PROCESSOR_LEDGER_SCHEMA": db_schema,
    }
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "processor", "prune-ledger", "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "dry run: would delete 2 ledger entries older than 30 days\n"
    assert await pg.fetchval(f"SELECT count(*) FROM {ledger.table}") == 3
    assert await ledger.prunable(pg, timedelta(days=30)) == 2
    assert await ledger.prune(pg, timedelta(days=30)) == 2
