"""Wiring for ``processor run``: pool, registry, engine, metrics server and the worker."""

from __future__ import annotations

import asyncio

import asyncpg

from processor.config import Settings
from processor.db import Connection, create_pool
from processor.engine import Engine
from processor.errors import ConfigError
from processor.grants import missing_privileges
from processor.ledger import Ledger
from processor.log import get_logger
from processor.metrics import Metrics, serve_http
from processor.registry import load_registry
from processor.worker import Worker

__all__ = ["build_engine", "serve"]

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
    # Every worker connection gets the statement, lock and idle-in-transaction timeouts.
    pool = await create_pool(settings, max_size=settings.lanes + 1)
    try:
        async with pool.acquire() as conn:
            engine = await build_engine(conn, settings)
        metrics = Metrics()
        worker = Worker(settings, engine, pool, metrics)
        server = None
        if settings.metrics_port:
            server = await serve_http("0.0.0.0", settings.metrics_port, metrics, worker.ready)  # noqa: S104
        try:
            await worker.run(stop)
        finally:
            if server is not None:
                server.close()
    finally:
        await pool.close()
