"""A worker running as a least-privilege role: `processor grants --apply`, then end to end.

The role is created fresh (LOGIN, a password) with nothing but what `processor grants`
gives it: the registry's tables (SELECT, DELETE, UPDATE on the attributes and version
column) and the ledger (SELECT, INSERT). It runs a real worker through Kafka, and cannot
do DDL nor touch a table outside the registry. Roles are cluster-wide: unique names,
dropped (DROP OWNED, DROP ROLE) afterwards.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from processor.config import Settings
from processor.db import create_pool
from tests.integration.harness import Scenario

pytestmark = pytest.mark.timeout(300)


@dataclass(frozen=True)
class Role:
    name: str
    password: str
    url: str


def _as_role(url: str, role: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{role}:{password}@{parts.hostname}:{parts.port or 5432}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
async def worker_role(scenario: Scenario) -> AsyncIterator[Role]:
    """A fresh LOGIN role with a password and no privileges; the scenario's acct trigger
    (which logs into acct_log, a table outside the registry) runs as its owner."""
    name = f"lp_{uuid.uuid4().hex[:12]}"
    password = uuid.uuid4().hex
    owner = await asyncpg.connect(scenario.database_url)
    try:
        await owner.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        await owner.execute(
            f"ALTER FUNCTION {scenario.schema}.log_acct() SECURITY DEFINER "
            "SET search_path = pg_catalog"
        )
        await owner.execute(f"CREATE TABLE {scenario.schema}.secret (id int, body text)")
    finally:
        await owner.close()
    yield Role(name, password, _as_role(scenario.database_url, name, password))
    scenario.stop_all()
    owner = await asyncpg.connect(scenario.database_url)
    try:
        await owner.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", name
        )
        await owner.execute(f"DROP OWNED BY {name}")
        await owner.execute(f"DROP ROLE {name}")
    finally:
        await owner.close()


def _grants(scenario: Scenario, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "processor", "grants", *args],
        env=scenario.env(),  # DATABASE_URL: the owner
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_a_worker_without_the_grants_stops_at_start_naming_what_it_lacks(
    scenario: Scenario, worker_role: Role
) -> None:
    """Before `processor grants`, the worker exits at start (configuration error) listing
    the missing privileges, instead of faulting every request later."""
    worker = scenario.start_worker(DATABASE_URL=worker_role.url)
    assert await asyncio.to_thread(worker.wait, 60) == 2
    logs = scenario.logs()
    assert "lacks privileges" in logs
    assert f"permission denied for schema {scenario.schema}" in logs
    assert "processor grants" in logs
    assert "Traceback" not in logs
    owner = await asyncpg.connect(scenario.database_url)
    try:
        await owner.execute(f"GRANT USAGE ON SCHEMA {scenario.schema} TO {worker_role.name}")
    finally:
        await owner.close()
    worker = scenario.start_worker(DATABASE_URL=worker_role.url)
    assert await asyncio.to_thread(worker.wait, 60) == 2
    logs = scenario.logs()
    for lacking in (
        f'SELECT on "{scenario.schema}"."acct"',
        f'UPDATE on "{scenario.schema}"."acct" (balance)',
        f'DELETE on "{scenario.schema}"."note"',
        f'INSERT on "{scenario.schema}".request_ledger',
    ):
        assert lacking in logs
    assert worker_role.password not in logs


async def test_a_least_privilege_role_runs_the_worker_end_to_end_and_can_do_nothing_else(
    scenario: Scenario, worker_role: Role, pg: asyncpg.Connection
) -> None:
    """`processor grants --apply` as the owner; a worker as the role applies updates,
    deletes and retrieves with correct replies and ledger rows; the role cannot CREATE,
    ALTER, DROP, TRUNCATE or INSERT, nor read or write tables outside the registry, nor
    change or delete ledger rows; its sessions carry the configured timeouts."""
    schema = scenario.schema
    applied = _grants(scenario, "--role", worker_role.name, "--apply")
    assert applied.returncode == 0, applied.stderr
    assert "holds nothing more" in applied.stderr
    assert f'GRANT SELECT, INSERT ON TABLE "{schema}".request_ledger' in applied.stdout
    assert "CREATE" not in applied.stdout

    await pg.execute(f"INSERT INTO {schema}.acct (id) VALUES (1)")
    await pg.execute(f"INSERT INTO {schema}.item (sku) VALUES ('w')")
    await pg.execute(f"INSERT INTO {schema}.note (id, body) VALUES (1, 'a'), (2, 'b')")
    await pg.execute(f"INSERT INTO {schema}.counter (id) VALUES (1)")
    counter_version = await pg.fetchval(f"SELECT xmin::text FROM {schema}.counter WHERE id = 1")
    r = scenario.run
    requests: list[dict[str, object]] = [
        {
            "type": "update",
            "request_id": f"{r}-acct",
            "entity": "acct",
            "id": 1,
            "attributes": {"seq": 1, "last_request": f"{r}-acct", "balance": 5},
        },
        {"type": "update", "request_id": f"{r}-item", "entity": "item", "id": "w",
         "row_version": "1", "concurrency_behavior": "IfRowVersionMatches",
         "attributes": {"qty": 3}},
        {"type": "update", "request_id": f"{r}-note", "entity": "note", "id": 1,
         "attributes": {"body": "changed"}},
        {"type": "update", "request_id": f"{r}-counter", "entity": "counter", "id": 1,
         "row_version": counter_version, "attributes": {"n": 41}},
        {"type": "delete", "request_id": f"{r}-delete", "entity": "note", "id": 2},
        {"type": "retrieve", "request_id": f"{r}-retrieve", "entity": "item", "id": "w"},
    ]  # fmt: skip
    scenario.start_worker(DATABASE_URL=worker_role.url, PROCESSOR_DB_LOCK_TIMEOUT_MS="1234")
    await scenario.send(requests)
    replies = {reply.request_id: reply for reply in await scenario.replies(expect=6)}
    assert set(replies) == {str(q["request_id"]) for q in requests}, scenario.logs()
    assert all(reply.status == "success" for reply in replies.values()), replies
    assert replies[f"{r}-item"].row_version == "2"
    retrieved = replies[f"{r}-retrieve"]
    assert retrieved.attributes == {"sku": "w", "qty": 3}
    assert retrieved.row_version == "2"
    assert await pg.fetchval(f"SELECT balance FROM {schema}.acct WHERE id = 1") == 5
    assert await pg.fetchval(f"SELECT body FROM {schema}.note WHERE id = 1") == "changed"
    assert await pg.fetchval(f"SELECT n FROM {schema}.counter WHERE id = 1") == 41
    assert await pg.fetchval(f"SELECT count(*) FROM {schema}.note WHERE id = 2") == 0
    ledgered = await pg.fetch(f"SELECT request_id, status FROM {schema}.request_ledger")
    assert {row["request_id"] for row in ledgered} >= {
        f"{r}-acct",
        f"{r}-item",
        f"{r}-note",
        f"{r}-counter",
        f"{r}-delete",
    }
    assert {row["status"] for row in ledgered} == {"success"}
    sessions = await pg.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND application_name = $2",
        worker_role.name,
        "processor",
    )
    assert sessions >= 1  # the worker's pool is logged in as the role

    role = await asyncpg.connect(worker_role.url)
    try:
        assert await role.fetchval("SELECT current_user") == worker_role.name
        forbidden = [
            f"CREATE TABLE {schema}.evil (id int)",
            f"CREATE TABLE public.evil_{r} (id int)",
            f"CREATE SCHEMA evil_{r}",
            f"ALTER TABLE {schema}.acct ADD COLUMN evil int",
            f"CREATE INDEX ON {schema}.acct (balance)",
            f"DROP TABLE {schema}.note",
            f"TRUNCATE {schema}.note",
            f"INSERT INTO {schema}.acct (id) VALUES (99)",
            f"UPDATE {schema}.acct SET id = 98 WHERE id = 1",  # the key is not writable
            f"SELECT * FROM {schema}.acct_log",  # tables outside the registry
            f"INSERT INTO {schema}.acct_log (id, seq) VALUES (1, 1)",
            f"SELECT * FROM {schema}.secret",
            f"UPDATE {schema}.secret SET body = 'x'",
            f"DELETE FROM {schema}.request_ledger",  # the ledger is append-only for it
            f"UPDATE {schema}.request_ledger SET status = 'fault'",
            f"DROP TABLE {schema}.request_ledger",
        ]
        for statement in forbidden:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await role.execute(statement)
    finally:
        await role.close()

    settings = Settings(
        database_url=worker_role.url,
        db_statement_timeout_ms=4321,
        db_lock_timeout_ms=1234,
        db_idle_in_transaction_timeout_ms=5678,
    )
    pool = await create_pool(settings, max_size=2)  # what the worker's start-up calls
    try:
        async with pool.acquire() as conn:
            shown = [
                await conn.fetchval(f"SHOW {name}")
                for name in (
                    "statement_timeout",
                    "lock_timeout",
                    "idle_in_transaction_session_timeout",
                )
            ]
            assert await conn.fetchval("SELECT current_user") == worker_role.name
    finally:
        await pool.close()
    assert shown == ["4321ms", "1234ms", "5678ms"]


async def test_grants_apply_reports_a_role_that_could_still_do_ddl(
    scenario: Scenario, worker_role: Role
) -> None:
    """A role that may CREATE in the schema is not least-privilege: --apply says so and
    exits 1; the printed GRANTs never include CREATE."""
    owner = await asyncpg.connect(scenario.database_url)
    try:
        await owner.execute(f"GRANT CREATE ON SCHEMA {scenario.schema} TO {worker_role.name}")
    finally:
        await owner.close()
    applied = _grants(scenario, "--role", worker_role.name, "--apply")
    assert applied.returncode == 1, applied.stderr
    assert f"may create objects in schema {scenario.schema}" in applied.stderr
    assert "CREATE" not in applied.stdout


async def test_the_prune_role_may_prune_the_ledger_and_nothing_else(
    scenario: Scenario, worker_role: Role, pg: asyncpg.Connection
) -> None:
    """`grants --prune --apply`: prune-ledger runs as that role; it cannot read the
    registry's tables nor insert into the ledger."""
    applied = _grants(scenario, "--role", worker_role.name, "--prune", "--apply")
    assert applied.returncode == 0, applied.stderr
    prune = subprocess.run(
        [sys.executable, "-m", "processor", "prune-ledger", "--older-than-days", "1"],
        env=scenario.env(DATABASE_URL=worker_role.url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert prune.returncode == 0, prune.stderr
    assert "deleted 0 ledger entries" in prune.stdout
    role = await asyncpg.connect(worker_role.url)
    try:
        for statement in (
            f"SELECT * FROM {scenario.schema}.acct",
            f"INSERT INTO {scenario.schema}.request_ledger (request_id) VALUES ('x')",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await role.execute(statement)
    finally:
        await role.close()


def test_grants_apply_refuses_a_role_that_does_not_exist(scenario: Scenario) -> None:
    """Exit 2 and the CREATE ROLE to run first; nothing is granted."""
    started = time.monotonic()
    missing = f"lp_missing_{uuid.uuid4().hex[:8]}"
    applied = _grants(scenario, "--role", missing, "--apply")
    assert applied.returncode == 2
    assert "does not exist" in applied.stderr
    assert time.monotonic() - started < 60


def test_grants_warns_when_the_role_does_not_exist(scenario: Scenario) -> None:
    """Printing is still useful (to review, or to run later), but the role is named."""
    missing = f"lp_missing_{uuid.uuid4().hex[:8]}"
    printed = _grants(scenario, "--role", missing)
    assert printed.returncode == 0, printed.stderr
    assert f'TO "{missing}";' in printed.stdout
    assert f"processor grants: warning: role '{missing}' does not exist" in printed.stderr
    assert f"CREATE ROLE {missing} LOGIN" in printed.stderr


def test_grants_for_an_existing_role_print_no_warning(scenario: Scenario) -> None:
    printed = _grants(scenario, "--role", "postgres", "--prune")
    assert printed.returncode == 0, printed.stderr
    assert "warning" not in printed.stderr
