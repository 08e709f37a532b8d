"""The ``processor`` command: the entry point, the only place that reads the environment."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
import uuid
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import fields
from datetime import timedelta
from importlib import metadata
from typing import Any, Final

import msgspec

from processor.config import SETTINGS, Settings
from processor.contract import Reply, Request, decode_request, encode_reply, record_key
from processor.errors import ConfigError, Fault, ProcessorError, ServiceUnreachable

__all__ = [
    "COMMANDS",
    "EXIT_FAULT",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "BadRequest",
    "main",
]

COMMANDS: Final = frozenset(
    {
        *("run", "migrate", "topics", "demo", "prune-ledger", "schemas", "send", "loadtest"),
        *("audit", "grants", "entities"),
    }
)

#: Exit statuses, the same in every command (the README's table is checked against it).
EXIT_OK: Final = 0
#: `send`: a fault reply; other commands: what they checked failed, or they did.
EXIT_FAULT: Final = 1
#: A bad flag, setting, registry or request: fix the input and run it again.
EXIT_USAGE: Final = 2
#: `send`: no reply in time; `audit`: anomalies found.
EXIT_TIMEOUT: Final = 3
#: Kafka or PostgreSQL cannot be reached (down, refusing or closing connections, silent).
EXIT_UNREACHABLE: Final = 4
EXIT_INTERRUPTED: Final = 130


class BadRequest(ProcessorError):
    """`processor send`: the request given is not one the contract accepts."""


_SETTING_DESTS: Final = frozenset(s.env for s in SETTINGS)


class _Formatter(argparse.HelpFormatter):
    """Every option's default shown when it has one; the usage line without the settings
    (listed in their own group, they would bury a command's own options)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and "%(default)" not in text
            and default not in (None, False, "", argparse.SUPPRESS)
        ):
            text += " (default: %(default)s)"
        return text

    def add_usage(
        self,
        usage: str | None,
        actions: Iterable[argparse.Action],
        groups: Iterable[argparse._MutuallyExclusiveGroup],
        prefix: str | None = None,
    ) -> None:
        own = [a for a in actions if a.dest not in _SETTING_DESTS]
        super().add_usage(usage, own, groups, prefix)


_EXIT_STATUSES: Final = (
    f"Exit status, as for every command: {EXIT_OK} done; {EXIT_FAULT} a fault reply (send) or "
    f"a failed check; {EXIT_USAGE} usage, configuration or bad request; {EXIT_TIMEOUT} no "
    f"reply in time (send) or anomalies (audit); {EXIT_UNREACHABLE} Kafka or PostgreSQL "
    "cannot be reached."
)


def _version() -> str:
    try:
        return metadata.version("processor")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def _settings_parent() -> argparse.ArgumentParser:
    """The settings as flags: accepted before the command and after it."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group(
        "settings",
        "each is also an environment variable (shown in brackets); a flag wins; give them "
        "before or after the command",
    )
    defaults = {f.name: f.default for f in fields(Settings)}
    for s in SETTINGS:
        default = defaults[s.name]
        shown = "" if default is None else f"; default: {default}"
        group.add_argument(
            s.flag,
            dest=s.env,
            metavar="VALUE",
            default=argparse.SUPPRESS,  # absent after the command: keep what came before
            help=f"{s.help} [{s.env}{shown}]".replace("%", "%%"),
        )
    return parent


# Long on purpose (~150 lines): the declaration of every command and flag, one after the
# other as `processor --help` lists them; no logic.
def _parser() -> argparse.ArgumentParser:
    settings = _settings_parent()
    parser = argparse.ArgumentParser(
        prog="processor",
        description="Kafka -> PostgreSQL request processor with optimistic concurrency.",
        epilog=_EXIT_STATUSES + " `processor COMMAND --help` explains a command.",
        parents=[settings],
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"processor {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=description,
            epilog=_EXIT_STATUSES,
            parents=[settings],
            formatter_class=_Formatter,
        )

    command(
        "run",
        "run a worker in the consumer group until SIGTERM/SIGINT",
        "Run one worker of the consumer group PROCESSOR_GROUP_ID: read requests from "
        "PROCESSOR_REQUEST_TOPIC, apply them to the tables of the registry (PROCESSOR_ENTITIES) "
        "and publish one reply per request. Start as many as the topic has partitions. At "
        "start it checks the registry against the database, the ledger (`processor "
        "migrate`), the role's privileges and the metrics port; any problem is one line and "
        "exit 2. SIGTERM or SIGINT: finish the batch in flight, commit, exit 0; a second "
        "signal exits at once. Logs: JSON lines on stderr. /metrics, /healthz and /readyz on "
        "PROCESSOR_METRICS_HOST:PROCESSOR_METRICS_PORT.",
    )
    command(
        "migrate",
        "create the request ledger (idempotent; nothing else)",
        "Create the schema PROCESSOR_LEDGER_SCHEMA with the request ledger, if missing "
        "(idempotent). Run it as the owner role, before `processor run`. "
        "Creates none of your tables: `processor demo --setup-only` creates the demo's.",
    )
    command(
        "topics",
        "create the request, reply and dead-letter topics if missing",
        "Create PROCESSOR_REQUEST_TOPIC, PROCESSOR_REPLY_TOPIC and PROCESSOR_DLQ_TOPIC with "
        "PROCESSOR_PARTITIONS partitions each, if they do not exist; prints one line per "
        "topic: created or exists.",
    )
    demo = command(
        "demo",
        "demo tables and registry, a worker, a mix of requests and their replies",
        "Create the demo tables (demo.account, demo.item, demo.note, demo.counter: "
        "processor/tools/demo_data/schema.sql, package data), the ledger and the topics; "
        "start a worker in this process; send successes, every concurrency fault, a race, a "
        "malformed message and a resend; print each reply. Exit 0 when every reply came, 1 if "
        "one did not. The registry is processor/tools/demo_data/entities.toml unless "
        "PROCESSOR_ENTITIES names another (its schema.sql must sit next to it).",
    )
    demo.add_argument(
        "--setup-only",
        action="store_true",
        help="create the tables, ledger and topics, print the registry path, and stop",
    )
    prune = command(
        "prune-ledger",
        "delete ledger entries past the retention",
        "Delete the ledger entries older than PROCESSOR_LEDGER_RETENTION_DAYS (or "
        "--older-than-days), in chunks. Keep the retention above the request topic's: an "
        "entry pruned while its request can still be replayed lets the request apply again.",
    )
    prune.add_argument(
        "--older-than-days",
        type=int,
        default=None,
        metavar="DAYS",
        help="keep this many days instead of PROCESSOR_LEDGER_RETENTION_DAYS",
    )
    prune.add_argument(
        "--dry-run", action="store_true", help="count what would be deleted; delete nothing"
    )
    grants = command(
        "grants",
        "print (--apply: execute, as the owner) the GRANTs of a least-privilege role",
        "Print the GRANT statements a least-privilege worker role needs (the "
        "registry's tables and the ledger, no DDL); --prune: those of the prune-ledger role "
        "instead; --apply: execute them as the connecting owner, then check the role.",
    )
    grants.add_argument("--role", required=True, help="the role to grant to (must exist)")
    grants.add_argument("--prune", action="store_true", help="the prune-ledger role's grants")
    grants.add_argument("--apply", action="store_true", help="execute them, then check")
    entities = command(
        "entities",
        "print the registry's entities as the workers answer retrieve_entity",
        "Load the registry (PROCESSOR_ENTITIES), validate it against the database, and print "
        "each entity's metadata: optimistic concurrency, the default behaviour, the row "
        "version, the key and the writable attributes.",
    )
    entities.add_argument("--json", action="store_true", help="one JSON array of EntityMetadata")
    schemas = command(
        "schemas",
        "write schemas/ from the code (--check: diff only)",
        "Generate the JSON Schemas, the AsyncAPI document and the fault table into schemas/ "
        "from the code.",
    )
    schemas.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 listing the files that drift"
    )
    send = command(
        "send",
        "send one request and print its reply (JSON)",
        "Send one request (JSON; request_id is filled in if missing) to the request "
        "topic and print its reply as JSON. The request is checked against the contract "
        "first: a bad one is not sent (`bad request: ...`, exit 2) unless --no-validate. "
        "Exit status: 0 success, 1 fault reply, 2 usage, configuration or bad request, 3 no "
        "reply in time (resend the same request_id to learn the outcome), 4 Kafka cannot be "
        "reached.",
    )
    send.add_argument("request", nargs="?", help="the request as JSON (default: read stdin)")
    send.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the reply")
    send.add_argument("--traceparent", help="W3C traceparent header to pass along")
    send.add_argument(
        "--no-validate",
        action="store_true",
        help="send the request as given, unchecked, to see the workers' own fault reply "
        "(a request_id is still added to a JSON object without one)",
    )
    from processor.tools.loadtest import add_arguments as loadtest_arguments

    loadtest_arguments(
        command(
            "loadtest",
            "read-modify-write load on demo.counter through the workers, then invariants",
            "Read-modify-write increments, stale updates and deletes on the rows "
            "of a counter entity through a running worker group (or --with-worker N), then "
            "the invariants; exit 1 if one breaks. Shares are fractions of the operations.",
        )
    )
    from processor.audit import add_arguments as audit_arguments

    audit_arguments(
        command(
            "audit",
            "prove from the topics and the ledger what happened to every request",
            "Read the request, reply and dead-letter topics and the ledger, and check that "
            "every request got exactly one reply, applied at most once, in order. Exit "
            "status: 0 no anomaly, 3 anomalies, 1 failure, 2 usage, 4 a service cannot be "
            "reached.",
        )
    )
    assert set(sub.choices) == COMMANDS
    return parser


async def _migrate(settings: Settings) -> int:
    from processor.db import connect
    from processor.db.ledger import Ledger

    conn = await connect(settings)  # the owner's job: DDL, no worker timeouts
    try:
        await Ledger(settings.ledger_schema).migrate(conn)
    finally:
        await conn.close()
    print(f"ledger ready: {settings.ledger_schema}.request_ledger")
    return 0


async def _topics(settings: Settings) -> int:
    from processor.kafka.clients import ensure_topics

    topics = [settings.request_topic, settings.reply_topic, settings.dlq_topic]
    created = await ensure_topics(
        settings.kafka_access(),
        topics,
        partitions=settings.partitions,
        replication=settings.replication_factor,
    )
    for t in topics:
        print(f"{t}: {'created' if t in created else 'exists'}")
    return 0


async def _prune(settings: Settings, days: int | None, dry_run: bool = False) -> int:
    from processor.db import connect
    from processor.db.ledger import Ledger

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
    # First, before the slow imports and checks: a SIGTERM during start-up is a clean stop.
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

    from processor.kafka.clients import check_access
    from processor.service import serve

    if settings.kafka_bootstrap_servers is not None:
        # a refused login or TLS handshake: one clear error before anything starts
        await check_access(settings.kafka_access())
    await serve(settings, stop)
    return 0


async def _send(settings: Settings, args: argparse.Namespace) -> int:
    from processor.client import Client
    from processor.errors import ReplyTimeout, reply_timeout_message

    access = settings.kafka_access()
    if args.timeout <= 0:
        raise ConfigError("--timeout must be > 0")
    if args.request is None and sys.stdin.isatty():
        raise BadRequest("no request: give it as an argument, or pipe it on stdin")
    raw = sys.stdin.read() if args.request is None else args.request
    if not raw.strip():
        raise BadRequest("the request is empty: give one JSON object, as an argument or on stdin")
    # Checked before connecting: a bad request is the same answer with Kafka up or down.
    if args.no_validate:
        value, request_id, key = _as_given(raw, settings.reply_topic)
    else:
        request = _checked_request(raw, settings.reply_topic)
    async with Client(
        access,
        request_topic=settings.request_topic,
        reply_topic=settings.reply_topic,
        timeout=args.timeout,
    ) as client:
        reply: Reply | None = None
        if args.no_validate:
            reply = await client.send_raw(
                value, request_id=request_id, key=key, traceparent=args.traceparent
            )
        else:
            request_id = request.request_id
            with contextlib.suppress(ReplyTimeout):
                reply = await client.send(request, traceparent=args.traceparent)
    if reply is None:
        print(f"processor send: {reply_timeout_message(request_id, args.timeout)}", file=sys.stderr)
        return EXIT_TIMEOUT
    print(encode_reply(reply).decode())
    return EXIT_OK if reply.status == "success" else EXIT_FAULT


def _request_object(raw: str) -> dict[str, Any]:
    try:
        fields = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the request is not JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise BadRequest(f"the request must be a JSON object, not {type(fields).__name__}")
    return fields


async def _entities(settings: Settings, as_json: bool) -> int:
    from processor.db import connect
    from processor.db.registry import load_registry
    from processor.engine.metadata import entity_metadata, render_table

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


def _checked_request(raw: str, reply_topic: str) -> Request:
    """The request, checked as a worker decodes it (not against the registry)."""
    fields = _request_object(raw)
    fields.setdefault("request_id", uuid.uuid4().hex)
    try:
        request = decode_request(msgspec.json.encode(fields))
    except Fault as exc:
        raise BadRequest(
            f"{_problem(exc)} (not sent; --no-validate sends it as given, to see the "
            "workers' fault reply)"
        ) from None
    _check_reply_to(request.reply_to, reply_topic)
    return request


def _as_given(raw: str, reply_topic: str) -> tuple[bytes, str, bytes | None]:
    """(value, request_id, key) of a request sent unchecked: the bytes as given, but a
    JSON object gets a request_id when it has none, so that its reply can be matched."""
    try:
        fields = _request_object(raw)
    except BadRequest:
        return raw.encode(), uuid.uuid4().hex, None
    value = raw.encode()
    request_id = fields.get("request_id")
    if "request_id" not in fields:
        request_id = fields["request_id"] = uuid.uuid4().hex
        value = msgspec.json.encode(fields)
    if not isinstance(request_id, str) or not request_id:
        request_id = uuid.uuid4().hex  # the header's; the body's cannot be read
    reply_to = fields.get("reply_to")
    _check_reply_to(reply_to if isinstance(reply_to, str) else None, reply_topic)
    return value, request_id, record_key(fields.get("entity"), fields.get("id"))


def _check_reply_to(reply_to: str | None, reply_topic: str) -> None:
    if reply_to not in (None, reply_topic):
        raise BadRequest(
            f"reply_to {reply_to!r}: `processor send` reads replies on the reply topic "
            f"{reply_topic!r} only; leave reply_to out"
        )


_FIELD_PROBLEM: Final = re.compile(
    r"^Object (?P<what>contains unknown|missing required) field `(?P<name>[^`]*)`"
    r"(?: - at `\$\.?(?P<at>[^`]*)`)?$"
)
_AT: Final = re.compile(r" - at `\$[^`]*`$")


def _problem(fault: Fault) -> str:
    """What is wrong with a request, naming the field: ``unknown field `related[0].x```."""
    text = fault.message.removeprefix("invalid request: ")
    match = _FIELD_PROBLEM.match(text)
    if match:
        name = f"{match['at']}.{match['name']}" if match["at"] else match["name"]
        what = "unknown field" if match["what"] == "contains unknown" else "missing field"
        return f"{what} `{name}`"
    if fault.path:
        return f"field `{fault.path}`: {_AT.sub('', text)}"
    return text


async def _demo(settings: Settings, setup_only: bool) -> int:
    from processor.tools.demo import install_demo, run_demo

    if setup_only:
        registry = await install_demo(settings)
        print(f"demo tables, ledger and topics ready; registry: {registry}")
        return EXIT_OK
    return await run_demo(settings)


async def _audit(settings: Settings, args: argparse.Namespace) -> int:
    from processor.audit import run_from_args

    return await run_from_args(settings, args)


async def _loadtest(settings: Settings, args: argparse.Namespace) -> int:
    from processor.tools.loadtest import run_from_args

    return await run_from_args(settings, args)


async def _explained(settings: Settings, command: Coroutine[Any, Any, int]) -> int:
    """Run ``command``; a client that could not reach Kafka gets the reason, not a traceback."""
    from aiokafka.errors import KafkaConnectionError

    from processor.kafka.clients import explain_unreachable, find_problem

    try:
        return await command
    except KafkaConnectionError as exc:  # aiokafka's bare "Unable to bootstrap from ..."
        if settings.kafka_bootstrap_servers is None:
            raise
        raise await explain_unreachable(settings.kafka_access(), exc) from None
    except TimeoutError:  # most likely a Kafka call bounded by kafka.CALL_TIMEOUT
        if settings.kafka_bootstrap_servers is None:
            raise
        problem = await find_problem(settings.kafka_access())
        if problem is None:  # Kafka answers: the timeout is something else's
            raise
        raise problem from None


class _BootstrapNoise(logging.Filter):
    """Drops aiokafka's per-host lines of a failed bootstrap: the client then raises
    "Unable to bootstrap", and the processor explains that failure itself, in one line."""

    MESSAGES: Final = frozenset(
        {'Unable connect to "%s:%s": %s', 'Unable to request metadata from "%s:%s": %s'}
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in self.MESSAGES


async def _grants(settings: Settings, args: argparse.Namespace) -> int:
    from processor.db.grants import run_grants

    return await run_grants(settings, args.role, prune=args.prune, apply=args.apply)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    flags = {s.env: getattr(args, s.env, None) for s in SETTINGS}
    try:
        settings = Settings.from_env(os.environ, flags)
        from processor.log import configure_logging

        configure_logging(settings.log_level, settings.log_format)
        aiokafka_log = logging.getLogger("aiokafka")
        if not any(isinstance(f, _BootstrapNoise) for f in aiokafka_log.filters):
            aiokafka_log.addFilter(_BootstrapNoise())
        command = args.command
        if command == "schemas":
            import processor.tools.schemas as schemas

            return schemas.main(["--check"] if args.check else [])
        coro = {
            "run": lambda: _run(settings),
            "migrate": lambda: _migrate(settings),
            "topics": lambda: _topics(settings),
            "prune-ledger": lambda: _prune(settings, args.older_than_days, args.dry_run),
            "demo": lambda: _demo(settings, args.setup_only),
            "send": lambda: _send(settings, args),
            "loadtest": lambda: _loadtest(settings, args),
            "audit": lambda: _audit(settings, args),
            "grants": lambda: _grants(settings, args),
            "entities": lambda: _entities(settings, args.json),
        }[command]()
        return asyncio.run(_explained(settings, coro))
    except ConfigError as exc:
        return _fail(f"configuration error: {exc}", EXIT_USAGE)
    except BadRequest as exc:
        return _fail(f"bad request: {exc}", EXIT_USAGE)
    except ServiceUnreachable as exc:
        return _fail(f"service unreachable: {exc}", EXIT_UNREACHABLE)
    except ProcessorError as exc:
        return _fail(str(exc), EXIT_FAULT)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _fail(message: str, status: int) -> int:
    """One line on stderr (a multi-line cause is joined), and the exit status."""
    print(f"processor: {' '.join(message.split())}", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
