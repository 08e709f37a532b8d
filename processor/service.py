"""Wiring for ``processor run``: pool, registry, engine, metrics server and the worker."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable

import asyncpg

from processor.config import Settings
from processor.db import Connection, create_pool
from processor.db.grants import missing_privileges
from processor.db.ledger import Ledger
from processor.db.registry import load_registry
from processor.engine.engine import Engine
from processor.errors import ConfigError
from processor.log import get_logger
from processor.metrics import Metrics, serve_http
from processor.worker.loop import Worker

__all__ = ["build_engine", "check_connection_capacity", "pool_size", "serve"]

log = get_logger("processor.service")


async def build_engine(conn: Connection, settings: Settings) -> Engine:
    """Load and validate the registry, check the ledger was migrated and that the role
    holds every privilege the worker needs (a clear error at start, not faults later)."""
    settings.require("entities")
    assert settings.entities is not None
    ledger = Ledger(settings.ledger_schema)
    try:
        registry = await load_registry(conn, settings.entities)
        if await conn.fetchval("SELECT to_regclass($1)", ledger.table) is None:
            raise ConfigError(f"{ledger.table} does not exist: run `processor migrate`")
        missing = await missing_privileges(conn, registry, ledger)
    except asyncpg.InsufficientPrivilegeError as exc:  # e.g. no USAGE on a schema
        missing = [str(exc)]
    if missing:
        raise ConfigError(
            "the database role lacks privileges the worker needs: "
            + "; ".join(missing)
            + " (`processor grants --role <role>` prints the GRANTs)"
        )
    return Engine(registry, ledger)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    settings.require("kafka_bootstrap_servers", "database_url", "entities")
    metrics = Metrics()
    worker: Worker | None = None
    # First, before any connection: a port another worker holds fails at once.
    server = await _start_http(settings, metrics, lambda: worker is not None and worker.ready())
    try:
        # Every worker connection gets the statement, lock and idle-in-transaction timeouts.
        pool = await create_pool(settings, max_size=pool_size(settings))
        try:
            async with pool.acquire() as conn:
                await check_connection_capacity(conn, settings)
                engine = await build_engine(conn, settings)
            worker = Worker(settings, engine, pool, metrics)
            await worker.run(stop)
        finally:
            await pool.close()
    finally:
        if server is not None:
            server.close()


def pool_size(settings: Settings) -> int:
    """The worker's connections: one per lane, and one for the offset marks and checks."""
    return settings.lanes + 1


async def check_connection_capacity(conn: Connection, settings: Settings) -> None:
    """Refuse ``PROCESSOR_LANES`` the server could never serve: the pool must fit in
    max_connections (less the reserved slots), the role's and the database's limits."""
    row = await conn.fetchrow(
        """SELECT current_setting('max_connections')::int AS max_connections,
                  current_setting('superuser_reserved_connections')::int
                  + coalesce(current_setting('reserved_connections', true)::int, 0) AS reserved,
                  (SELECT rolconnlimit FROM pg_roles WHERE rolname = current_user) AS role_limit,
                  (SELECT datconnlimit FROM pg_database
                    WHERE datname = current_database()) AS db_limit"""
    )
    assert row is not None
    need = pool_size(settings)
    limits = [(row["max_connections"] - row["reserved"], "the server")]
    limits += [(row["role_limit"], "the role's CONNECTION LIMIT")] * (row["role_limit"] >= 0)
    limits += [(row["db_limit"], "the database's CONNECTION LIMIT")] * (row["db_limit"] >= 0)
    allowed, what = min(limits)
    if need > allowed:
        detail = ""
        if what == "the server":
            detail = f" (max_connections={row['max_connections']} less {row['reserved']} reserved)"
        lanes = allowed - 1
        fix = (
            f"lower PROCESSOR_LANES to {lanes} or less"
            if lanes >= 1
            else "raise the limit: a worker needs at least 2"
        )
        raise ConfigError(
            f"PROCESSOR_LANES={settings.lanes} needs {need} database connections (one per "
            f"lane and one more), but {what} allows at most {allowed}{detail}: {fix}"
        )


async def _start_http(
    settings: Settings, metrics: Metrics, ready: Callable[[], bool]
) -> asyncio.Server | None:
    if not settings.metrics_port:
        return None
    host, port = settings.metrics_host, settings.metrics_port
    try:
        return await serve_http(host, port, metrics, ready)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"PROCESSOR_METRICS_PORT={port}: cannot listen on {host}:{port}: the port is "
                "taken (another worker on this host? give each worker its own "
                "PROCESSOR_METRICS_PORT, or 0 for no metrics server)"
            ) from None
        raise ConfigError(
            f"PROCESSOR_METRICS_HOST={host}, PROCESSOR_METRICS_PORT={port}: cannot listen "
            f"on {host}:{port}: {exc.strerror or exc}"
        ) from None
