"""The ``processor`` command: the entry point, the only place that reads the environment."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import Final

import asyncpg

from processor.config import SETTINGS, Settings
from processor.errors import ConfigError, ProcessorError

__all__ = ["COMMANDS", "main"]

COMMANDS: Final = frozenset({"run", "migrate", "topics", "demo", "prune-ledger", "schemas"})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="processor",
        description="Kafka -> PostgreSQL request processor with optimistic concurrency.",
    )
    for s in SETTINGS:
        parser.add_argument(s.flag, dest=s.env, metavar="VALUE", help=f"{s.help} [{s.env}]")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="run a worker in the consumer group until SIGTERM/SIGINT")
    sub.add_parser("migrate", help="create the request ledger (idempotent; nothing else)")
    sub.add_parser("topics", help="create the request, reply and dead-letter topics if missing")
    sub.add_parser("demo", help="demo table + registry, a worker, a mix of requests, replies")
    prune = sub.add_parser("prune-ledger", help="delete ledger entries past the retention")
    prune.add_argument("--older-than-days", type=int, default=None)
    schemas = sub.add_parser("schemas", help="write schemas/ from the code (--check: diff only)")
    schemas.add_argument("--check", action="store_true")
    assert set(sub.choices) == COMMANDS
    return parser


async def _connect(settings: Settings) -> asyncpg.Connection:
    settings.require("database_url")
    try:
        return await asyncpg.connect(settings.database_url, timeout=30)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise ProcessorError(f"cannot connect to DATABASE_URL: {exc}") from exc


async def _migrate(settings: Settings) -> int:
    from processor.ledger import Ledger

    conn = await _connect(settings)
    try:
        await Ledger(settings.ledger_schema).migrate(conn)
    finally:
        await conn.close()
    print(f"ledger ready: {settings.ledger_schema}.request_ledger")
    return 0


async def _topics(settings: Settings) -> int:
    from processor.kafka import ensure_topics

    settings.require("kafka_bootstrap_servers")
    assert settings.kafka_bootstrap_servers is not None
    topics = [settings.request_topic, settings.reply_topic, settings.dlq_topic]
    created = await ensure_topics(
        settings.kafka_bootstrap_servers, topics, partitions=settings.partitions
    )
    for t in topics:
        print(f"{t}: {'created' if t in created else 'exists'}")
    return 0


async def _prune(settings: Settings, days: int | None) -> int:
    from processor.ledger import Ledger

    keep = days if days is not None else settings.ledger_retention_days
    if keep <= 0:
        raise ConfigError("--older-than-days must be > 0")
    conn = await _connect(settings)
    try:
        deleted = await Ledger(settings.ledger_schema).prune(conn, timedelta(days=keep))
    finally:
        await conn.close()
    print(f"deleted {deleted} ledger entries older than {keep} days")
    return 0


async def _run(settings: Settings) -> int:
    from processor.service import serve

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            os._exit(130)  # second signal: leave at once
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await serve(settings, stop)
    return 0


async def _demo(settings: Settings) -> int:
    from processor.demo import run_demo

    return await run_demo(settings)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    flags = {s.env: getattr(args, s.env) for s in SETTINGS}
    try:
        settings = Settings.from_env(os.environ, flags)
        from processor.log import configure_logging

        configure_logging(settings.log_level)
        command = args.command
        if command == "schemas":
            import processor.schemas as schemas

            return schemas.main(["--check"] if args.check else [])
        coro = {
            "run": lambda: _run(settings),
            "migrate": lambda: _migrate(settings),
            "topics": lambda: _topics(settings),
            "prune-ledger": lambda: _prune(settings, args.older_than_days),
            "demo": lambda: _demo(settings),
        }[command]()
        return asyncio.run(coro)
    except ConfigError as exc:
        print(f"processor: configuration error: {exc}", file=sys.stderr)
        return 2
    except ProcessorError as exc:
        print(f"processor: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
