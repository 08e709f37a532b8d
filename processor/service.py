"""Wiring for ``processor run``: pool, registry, engine, metrics server and the worker."""

from __future__ import annotations

import asyncio

import asyncpg

from processor.config import Settings
from processor.db import Connection
from processor.engine import Engine
from processor.errors import ConfigError, ProcessorError
from processor.ledger import Ledger
from processor.log import get_logger
from processor.metrics import Metrics, serve_http
from processor.registry import load_registry
from processor.worker import Worker

__all__ = ["build_engine", "serve"]

log = get_logger("processor.service")


async def build_engine(conn: Connection, settings: Settings) -> Engine:
    """Load and validate the registry, and check the ledger was migrated."""
    settings.require("entities")
    assert settings.entities is not None
    registry = await load_registry(conn, settings.entities)
    ledger = Ledger(settings.ledger_schema)
    if await conn.fetchval("SELECT to_regclass($1)", ledger.table) is None:
        raise ConfigError(f"the ledger {ledger.table} does not exist: run `processor migrate`")
    return Engine(registry, ledger)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    settings.require("kafka_bootstrap_servers", "database_url", "entities")
    try:
        pool = await asyncpg.create_pool(
            settings.database_url,
            min_size=1,
            max_size=settings.lanes + 1,
            command_timeout=60,
            timeout=30,
            server_settings={
                "application_name": "processor",
                # A stuck lock or an abandoned transaction must not hold a key forever.
                "lock_timeout": "30s",
                "idle_in_transaction_session_timeout": "60s",
            },
        )
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise ProcessorError(f"cannot connect to DATABASE_URL: {exc}") from exc
    assert pool is not None
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
