"""The ``processor`` command: the entry point, the only place that reads the environment."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import uuid
from collections.abc import Coroutine, Sequence
from datetime import timedelta
from typing import Any, Final

import msgspec

from processor.config import SETTINGS, Settings
from processor.errors import ConfigError, ProcessorError

__all__ = ["COMMANDS", "main"]

COMMANDS: Final = frozenset(
    {
        *("run", "migrate", "topics", "demo", "prune-ledger", "schemas", "send", "loadtest"),
        *("audit", "grants", "entities"),
    }
)

#: `processor send`: exit statuses besides 0 (success) and 2 (usage or configuration).
EXIT_FAULT: Final = 1
EXIT_TIMEOUT: Final = 3


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
    prune.add_argument(
        "--dry-run", action="store_true", help="count what would be deleted; delete nothing"
    )
    grants = sub.add_parser(
        "grants",
        help="print (--apply: execute, as the owner) the GRANTs of a least-privilege role",
        description="Print the GRANT statements a least-privilege worker role needs (the "
        "registry's tables and the ledger, no DDL); --prune: those of the prune-ledger role "
        "instead; --apply: execute them as the connecting owner, then check the role.",
    )
    grants.add_argument("--role", required=True, help="the role to grant to (must exist)")
    grants.add_argument("--prune", action="store_true", help="the prune-ledger role's grants")
    grants.add_argument("--apply", action="store_true", help="execute them, then check")
    entities = sub.add_parser(
        "entities",
        help="print the registry's entities as the workers answer retrieve_entity",
        description="Load the registry (PROCESSOR_ENTITIES), validate it against the "
        "database, and print each entity's metadata: optimistic concurrency, the default "
        "behaviour, the row version, the key and the writable attributes.",
    )
    entities.add_argument("--json", action="store_true", help="one JSON array of EntityMetadata")
    schemas = sub.add_parser("schemas", help="write schemas/ from the code (--check: diff only)")
    schemas.add_argument("--check", action="store_true")
    send = sub.add_parser(
        "send",
        help="send one request, print its reply (exit 0 success, 1 fault, 3 timeout, 2 usage)",
        description="Send one request (JSON; request_id is filled in if missing) to the request "
        "topic and print its reply as JSON. Exit status: 0 success, 1 fault reply, 3 no reply "
        "in time (resend the same request_id to learn the outcome), 2 usage or configuration.",
    )
    send.add_argument("request", nargs="?", help="the request as JSON (default: read stdin)")
    send.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the reply")
    send.add_argument("--traceparent", help="W3C traceparent header to pass along")
    from processor.loadtest import add_arguments as loadtest_arguments

    loadtest_arguments(
        sub.add_parser(
            "loadtest",
            help="read-modify-write load on demo.counter through the workers, then invariants",
            description="Read-modify-write increments, stale updates and deletes on the rows "
            "of a counter entity through a running worker group (or --with-worker N), then "
            "the invariants; exit 1 if one breaks. Shares are fractions of the operations.",
        )
    )
    from processor.audit import add_arguments as audit_arguments

    audit_arguments(
        sub.add_parser(
            "audit",
            help="prove from the topics and the ledger what happened to every request",
        )
    )
    assert set(sub.choices) == COMMANDS
    return parser


async def _migrate(settings: Settings) -> int:
    from processor.db import connect
    from processor.ledger import Ledger

    conn = await connect(settings)  # the owner's job: DDL, no worker timeouts
    try:
        await Ledger(settings.ledger_schema).migrate(conn)
    finally:
        await conn.close()
    print(f"ledger ready: {settings.ledger_schema}.request_ledger")
    return 0


async def _topics(settings: Settings) -> int:
    from processor.kafka import ensure_topics

    topics = [settings.request_topic, settings.reply_topic, settings.dlq_topic]
    created = await ensure_topics(settings.kafka_access(), topics, partitions=settings.partitions)
    for t in topics:
        print(f"{t}: {'created' if t in created else 'exists'}")
    return 0


async def _prune(settings: Settings, days: int | None, dry_run: bool = False) -> int:
    from processor.db import connect
    from processor.ledger import Ledger

    keep = days if days is not None else settings.ledger_retention_days
    if keep <= 0:
        raise ConfigError("--older-than-days must be > 0")
    conn = await connect(settings, timeouts=True)
    try:
        ledger = Ledger(settings.ledger_schema)
        if dry_run:
            found = await ledger.prunable(conn, timedelta(days=keep))
            print(f"dry run: would delete {found} ledger entries older than {keep} days")
            return 0
        deleted = await ledger.prune(conn, timedelta(days=keep))
    finally:
        await conn.close()
    print(f"deleted {deleted} ledger entries older than {keep} days")
    return 0


async def _run(settings: Settings) -> int:
    from processor.kafka import check_access
    from processor.service import serve

    if settings.kafka_bootstrap_servers is not None:
        # a refused login or TLS handshake: one clear error before anything starts
        await check_access(settings.kafka_access())
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


async def _send(settings: Settings, text: str | None, wait: float, trace: str | None) -> int:
    from processor.client import Client
    from processor.contract import decode_request, encode_reply
    from processor.errors import Fault, ReplyTimeout

    access = settings.kafka_access()
    if wait <= 0:
        raise ConfigError("--timeout must be > 0")
    raw = sys.stdin.read() if text is None else text
    try:
        fields = msgspec.json.decode(raw)
        if not isinstance(fields, dict):
            raise ConfigError("the request must be a JSON object")
        fields.setdefault("request_id", uuid.uuid4().hex)
        request = decode_request(msgspec.json.encode(fields))
    except msgspec.DecodeError as exc:
        raise ConfigError(f"the request is not JSON: {exc}") from None
    except Fault as exc:
        raise ConfigError(exc.message) from None
    if request.reply_to not in (None, settings.reply_topic):
        raise ConfigError(f"reply_to must be the reply topic {settings.reply_topic!r} or absent")
    async with Client(
        access,
        request_topic=settings.request_topic,
        reply_topic=settings.reply_topic,
        timeout=wait,
    ) as client:
        try:
            reply = await client.send(request, traceparent=trace)
        except ReplyTimeout as exc:
            print(f"processor send: {exc}", file=sys.stderr)
            return EXIT_TIMEOUT
    print(encode_reply(reply).decode())
    return 0 if reply.status == "success" else EXIT_FAULT


async def _entities(settings: Settings, as_json: bool) -> int:
    from processor.db import connect
    from processor.metadata import entity_metadata, render_table
    from processor.registry import load_registry

    settings.require("entities", "database_url")
    assert settings.entities is not None
    conn = await connect(settings, timeouts=True)
    try:
        registry = await load_registry(conn, settings.entities)
    finally:
        await conn.close()
    metadata = [entity_metadata(e) for e in registry.entities.values()]
    if as_json:
        print(msgspec.json.format(msgspec.json.encode(metadata)).decode())
    else:
        print(render_table(metadata))
    return 0


async def _demo(settings: Settings) -> int:
    from processor.demo import run_demo

    return await run_demo(settings)


async def _audit(settings: Settings, args: argparse.Namespace) -> int:
    from processor.audit import run_from_args

    return await run_from_args(settings, args)


async def _loadtest(settings: Settings, args: argparse.Namespace) -> int:
    from processor.loadtest import run_from_args

    return await run_from_args(settings, args)


async def _explained(settings: Settings, command: Coroutine[Any, Any, int]) -> int:
    """Run ``command``; a client that could not reach Kafka gets the reason, not a traceback."""
    from aiokafka.errors import KafkaConnectionError

    try:
        return await command
    except KafkaConnectionError as exc:  # aiokafka's bare "Unable to bootstrap from ..."
        if settings.kafka_bootstrap_servers is None:
            raise
        from processor.kafka import explain_unreachable

        raise await explain_unreachable(settings.kafka_access(), exc) from None


async def _grants(settings: Settings, args: argparse.Namespace) -> int:
    from processor.grants import run_grants

    return await run_grants(settings, args.role, prune=args.prune, apply=args.apply)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    flags = {s.env: getattr(args, s.env) for s in SETTINGS}
    try:
        settings = Settings.from_env(os.environ, flags)
        from processor.log import configure_logging

        configure_logging(settings.log_level, settings.log_format)
        command = args.command
        if command == "schemas":
            import processor.schemas as schemas

            return schemas.main(["--check"] if args.check else [])
        coro = {
            "run": lambda: _run(settings),
            "migrate": lambda: _migrate(settings),
            "topics": lambda: _topics(settings),
            "prune-ledger": lambda: _prune(settings, args.older_than_days, args.dry_run),
            "demo": lambda: _demo(settings),
            "send": lambda: _send(settings, args.request, args.timeout, args.traceparent),
            "loadtest": lambda: _loadtest(settings, args),
            "audit": lambda: _audit(settings, args),
            "grants": lambda: _grants(settings, args),
            "entities": lambda: _entities(settings, args.json),
        }[command]()
        return asyncio.run(_explained(settings, coro))
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
