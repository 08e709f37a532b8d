"""Waiting until the services answer (a broker metadata request, a database query)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ops.lib.stack.config import DATABASE, Stack, StackError, redact, say
from ops.lib.stack.procs import kafka_pid, postgres_pid


async def kafka_answers(bootstrap: str, brokers: int = 1) -> str | None:
    """None when a metadata request succeeds and lists ``brokers`` brokers; else why not."""
    from aiokafka.client import AIOKafkaClient
    from aiokafka.errors import KafkaError

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await client.bootstrap()
        found = len(client.cluster.brokers())
        if found < brokers:
            return f"{found} of {brokers} brokers in the metadata"
        return None
    except (KafkaError, OSError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        await client.close()


async def postgres_answers(url: str) -> str | None:
    """None when `SELECT 1` succeeds over `url`; else why not."""
    rows = await pg_fetch(url, "SELECT 1")
    if isinstance(rows, str):
        return rows
    value = rows[0][0]
    return None if value == 1 else f"SELECT 1 returned {value!r}"


async def pg_fetch(url: str, query: str) -> list[Any] | str:
    """The rows of ``query`` over a fresh connection to ``url``, or why it could not connect
    (within 5 s)."""
    import asyncpg

    try:
        conn = await asyncpg.connect(url, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


async def ensure_database(stack: Stack) -> str | None:
    """Create the `processor` database once; None when it exists, else why not (yet)."""
    import asyncpg

    try:
        conn = await asyncpg.connect(stack.database_url("postgres"), timeout=10)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", DATABASE)
            if not exists:
                say(f"creating database {DATABASE}")
                await conn.execute(f"CREATE DATABASE {DATABASE}")
        finally:
            await conn.close()
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


async def wait_until(
    name: str,
    probe: Callable[[], Any],
    deadline: float,
    alive: Callable[[], bool] | None,
    logs: Sequence[Path],
) -> float:
    started = time.monotonic()
    why: str | None = "not tried"
    while True:
        why = await probe()
        if why is None:
            return time.monotonic() - started
        if alive is not None and not alive():
            raise StackError(f"{name} exited while starting ({why})", *logs)
        if time.monotonic() > deadline:
            raise StackError(
                f"{name} did not answer within the timeout (last: {why})",
                *logs,
            )
        await asyncio.sleep(0.25)


async def wait_services(
    bootstrap: str,
    database_url: str,
    seconds: float,
    stack: Stack | None = None,
) -> None:
    deadline = time.monotonic() + seconds
    say(f"waiting for Kafka at {bootstrap} and PostgreSQL at {redact(database_url)} ...")

    async def pg_probe() -> str | None:
        if stack is not None:
            why = await postgres_answers(stack.database_url("postgres"))
            if why is not None:
                return why
            why = await ensure_database(stack)
            if why is not None:
                return why
        return await postgres_answers(database_url)

    kafka_alive = (lambda: kafka_pid(stack) is not None) if stack else None
    pg_alive = (lambda: postgres_pid(stack) is not None) if stack else None
    results = await asyncio.gather(
        wait_until(
            "Kafka",
            lambda: kafka_answers(bootstrap),
            deadline,
            kafka_alive,
            [stack.kafka_log, stack.kafka_out] if stack else [],
        ),
        wait_until("PostgreSQL", pg_probe, deadline, pg_alive, [stack.pg_log] if stack else []),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    say(f"Kafka answers ({results[0]:.1f}s), PostgreSQL answers ({results[1]:.1f}s)")
