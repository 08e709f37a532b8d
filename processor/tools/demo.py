"""``processor demo``: the product end to end on whatever stack the settings point at.

Creates the demo tables (``schema.sql``) and registry (``entities.toml``), package data in
``demo_data/`` next to this module,
the ledger and the topics; starts a worker in this process; sends a mix of requests (every
success and fault kind, a malformed message, a resend, a conflicting race) and prints
the replies as they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import TopicPartition

from processor import db
from processor.config import Settings
from processor.contract import Reply, decode_reply, record_key
from processor.db.ledger import Ledger
from processor.db.registry import load_registry, quote
from processor.errors import ConfigError
from processor.kafka import clients as kafka
from processor.log import configure_logging

__all__ = ["DEFAULT_REGISTRY", "install_demo", "run_demo"]

#: The demo's registry and, next to it, its schema.sql: package data, in a wheel too.
DEFAULT_REGISTRY = Path(__file__).resolve().parent / "demo_data" / "entities.toml"


async def install_demo(settings: Settings) -> Path:
    """Create the demo tables, the ledger and the topics; return the registry path."""
    settings.require("database_url", "kafka_bootstrap_servers")
    assert settings.database_url is not None
    assert settings.kafka_bootstrap_servers is not None
    registry = settings.entities or DEFAULT_REGISTRY
    schema_sql = registry.parent / "schema.sql"
    if not registry.is_file() or not schema_sql.is_file():
        raise ConfigError(f"demo files not found next to {registry} (entities.toml, schema.sql)")
    conn = await db.connect(settings)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('processor-demo'))")
            await conn.execute(schema_sql.read_text(encoding="utf-8"))
        await Ledger(settings.ledger_schema).migrate(conn)
    finally:
        await conn.close()
    await kafka.ensure_topics(
        settings.kafka_access(),
        [settings.request_topic, settings.reply_topic, settings.dlq_topic],
        partitions=settings.partitions,
        replication=settings.replication_factor,
    )
    return registry


# Long on purpose (~150 lines): a table of the demo's requests in the order they are sent,
# each with what it shows; splitting it would scatter the script a reader follows.
def _requests(run: str, versions: dict[str, str]) -> list[tuple[str, dict[str, Any] | bytes]]:
    """(what it shows, request) pairs; request ids are unique per demo run."""

    def rid(name: str) -> str:
        return f"demo-{run}-{name}"

    acct, item = versions["account"], versions["item"]
    return [
        (
            "retrieve a row and its version",
            {"type": "retrieve", "request_id": rid("retrieve"), "entity": "account", "id": 1},
        ),
        (
            "update, Default (= AlwaysOverwrite for account)",
            {
                "type": "update",
                "request_id": rid("overwrite"),
                "entity": "account",
                "id": 2,
                "attributes": {"balance": 150},
            },
        ),
        (
            "update IfRowVersionMatches with the current version",
            {
                "type": "update",
                "request_id": rid("match"),
                "entity": "account",
                "id": 1,
                "concurrency_behavior": "IfRowVersionMatches",
                "row_version": acct,
                "attributes": {"name": "renamed"},
            },
        ),
        (
            "the same version again: it is stale now",
            {
                "type": "update",
                "request_id": rid("stale"),
                "entity": "account",
                "id": 1,
                "concurrency_behavior": 1,
                "row_version": acct,
                "attributes": {"name": "lost"},
            },
        ),
        (
            "IfRowVersionMatches without a version",
            {
                "type": "delete",
                "request_id": rid("noversion"),
                "entity": "account",
                "id": 3,
                "concurrency_behavior": "IfRowVersionMatches",
            },
        ),
        (
            "IfRowVersionMatches on an entity without it",
            {
                "type": "update",
                "request_id": rid("notenabled"),
                "entity": "note",
                "id": 1,
                "concurrency_behavior": "IfRowVersionMatches",
                "row_version": "1",
                "attributes": {"body": "x"},
            },
        ),
        (
            "update of a missing row (never creates it)",
            {
                "type": "update",
                "request_id": rid("missing"),
                "entity": "account",
                "id": 999999,
                "attributes": {"name": "ghost"},
            },
        ),
        (
            "race: two updates with the same version (item defaults to IfRowVersionMatches)",
            {
                "type": "update",
                "request_id": rid("race-a"),
                "entity": "item",
                "id": "widget",
                "row_version": item,
                "attributes": {"qty": 9},
            },
        ),
        (
            "race: the loser",
            {
                "type": "update",
                "request_id": rid("race-b"),
                "entity": "item",
                "id": "widget",
                "row_version": item,
                "attributes": {"qty": 8},
            },
        ),
        (
            "related rows in one transaction",
            {
                "type": "update",
                "request_id": rid("related"),
                "entity": "account",
                "id": 4,
                "attributes": {"balance": 90},
                "related": [{"entity": "account", "id": 5, "attributes": {"balance": 110}}],
            },
        ),
        (
            "a value the table rejects (CHECK balance >= 0)",
            {
                "type": "update",
                "request_id": rid("negative"),
                "entity": "account",
                "id": 6,
                "attributes": {"balance": -1},
            },
        ),
        (
            "unknown entity",
            {"type": "delete", "request_id": rid("noentity"), "entity": "invoice", "id": 1},
        ),
        (
            "unknown attribute",
            {
                "type": "update",
                "request_id": rid("noattr"),
                "entity": "account",
                "id": 1,
                "attributes": {"owner": "x"},
            },
        ),
        (
            "malformed request (id of the wrong type)",
            b'{"type":"update","request_id":"'
            + rid("malformed").encode()
            + b'","entity":"account","id":1.5,"attributes":{"name":"x"}}',
        ),
        ("delete", {"type": "delete", "request_id": rid("delete"), "entity": "account", "id": 7}),
        (
            "a resend of the first update: the stored reply, nothing applied again",
            {
                "type": "update",
                "request_id": rid("overwrite"),
                "entity": "account",
                "id": 2,
                "attributes": {"balance": 150},
            },
        ),
    ]


async def run_demo(settings: Settings) -> int:
    from processor.service import serve

    if settings.log_level == "info":
        # The demo tells each request's story on stdout; the embedded worker's info lines
        # (start, stop, one per fault) and the clients' coordinator chatter would interleave
        # with it. Its warnings and errors still show; PROCESSOR_LOG_LEVEL=debug shows all.
        configure_logging("warning", settings.log_format)
    registry = await install_demo(settings)
    settings = Settings(**{**_fields(settings), "entities": registry})
    assert settings.database_url is not None
    assert settings.kafka_bootstrap_servers is not None
    conn = await db.connect(settings)
    try:
        # The tables as the registry names them (a copy of the demo may use another schema).
        entities = (await load_registry(conn, registry)).entities
        versions = {}
        for name, row in (("account", 1), ("item", "widget")):
            e = entities[name]
            versions[name] = await conn.fetchval(
                f"SELECT {e.version_sql} FROM {e.qualified} AS t WHERE t.{quote(e.key.name)} = $1",  # noqa: S608 (catalog-checked names)
                row,
            )
    finally:
        await conn.close()

    stop = asyncio.Event()
    worker = asyncio.create_task(serve(settings, stop), name="demo-worker")
    replies = kafka.make_consumer(settings.kafka_access(), group_id=None)
    producer = kafka.make_producer(settings.kafka_access())
    try:
        await replies.start()
        await producer.start()
        parts = await producer.partitions_for(settings.reply_topic)
        tps = [TopicPartition(settings.reply_topic, p) for p in sorted(parts)]
        replies.assign(tps)
        await replies.seek_to_end(*tps)
        run = uuid.uuid4().hex[:8]
        plan = _requests(run, versions)
        what: dict[str, str] = {}
        print(f"sending {len(plan)} requests to {settings.request_topic!r} ...\n")
        for label, request in plan:
            if isinstance(request, bytes):
                value, key = request, record_key("account", 1)
                rid = f"demo-{run}-malformed"
            else:
                value = msgspec.json.encode(request)
                key = record_key(request["entity"], request["id"])
                rid = str(request["request_id"])
            what.setdefault(rid, label)
            await producer.send_and_wait(
                settings.request_topic, value, key=key, headers=[("request_id", rid.encode())]
            )
        expected = len(plan)
        seen = 0
        deadline = time.monotonic() + 60
        while seen < expected and time.monotonic() < deadline:
            batch = await replies.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    reply = decode_reply(record.value)
                    if not reply.request_id.startswith(f"demo-{run}-"):
                        continue
                    seen += 1
                    print(_describe(what.get(reply.request_id, "?"), reply))
        print(f"\n{seen}/{expected} replies received")
        if seen != expected:
            return 1
        return await _producer_services(settings)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await producer.stop()
        with contextlib.suppress(Exception):
            await replies.stop()
        await worker


async def _producer_services(settings: Settings) -> int:
    """What a producer service does with the client: metadata, a transaction, a context."""
    from processor.client import Client
    from processor.contract import UpdateRequest
    from processor.engine.metadata import render_table
    from processor.errors import ConcurrencyVersionMismatch, ObjectDoesNotExist

    print("\n-- the producer client: metadata, a transaction, a context --\n")
    async with Client(
        settings.kafka_access(),
        request_topic=settings.request_topic,
        reply_topic=settings.reply_topic,
        timeout=60,
    ) as client:
        print("- entity metadata (RetrieveEntityRequest) of account:")
        print(
            "    " + render_table([await client.entity_metadata("account")]).replace("\n", "\n    ")
        )

        before = await client.retrieve("account", 8)
        try:
            await client.execute_transaction(
                [
                    UpdateRequest(
                        request_id=uuid.uuid4().hex,
                        entity="account",
                        id=8,
                        attributes={"balance": 1},
                    ),
                    UpdateRequest(
                        request_id=uuid.uuid4().hex,
                        entity="account",
                        id=999999,
                        attributes={"balance": 1},
                    ),
                ]
            )
            print("- the transaction applied: unexpected")
            return 1
        except ObjectDoesNotExist as exc:
            after = await client.retrieve("account", 8)
            unchanged = after.row_version == before.row_version
            print(
                f"- execute_transaction [update account 8, update account 999999]: rolled back, "
                f"faulted_request_index={exc.request_index} {exc.name}: {exc.message}; "
                f"account 8 {'unchanged' if unchanged else 'CHANGED'}"
            )

        async with client.context(concurrency_behavior="IfRowVersionMatches") as ctx:
            gadget = await ctx.retrieve("item", "gadget")
            qty = (gadget.attributes or {})["qty"]
            ctx.update("item", "gadget", {"qty": qty + 1})
            # Another writer comes first:
            await client.update("item", "gadget", {"qty": qty}, behavior="AlwaysOverwrite")
            try:
                await ctx.save_changes()
                print("- save_changes applied over another write: unexpected")
                return 1
            except ConcurrencyVersionMismatch as exc:
                print(
                    f"- save_changes with IfRowVersionMatches after another write: {exc.name} "
                    f"on {exc.change} (expected {exc.expected_version}, current "
                    f"{exc.current_version})"
                )
            await ctx.retrieve("item", "gadget")  # the new version; the change stays recorded
            (result,) = await ctx.save_changes()
            assert result.reply is not None
            print(
                f"- retrieved again and saved: {result.change.kind} of item 'gadget' -> "
                f"version {result.reply.row_version}; the context tracks {ctx.tracked[0]}"
            )
    return 0


def _fields(settings: Settings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in settings.__dataclass_fields__}


def _describe(label: str, reply: Reply) -> str:
    head = f"- {label}\n    {reply.request_id}: {reply.status}"
    if reply.fault is not None:
        f = reply.fault
        extra = ""
        if f.expected_version is not None:
            extra = f" (expected {f.expected_version}, current {f.current_version})"
        path = f" at {f.path}" if f.path else ""
        return f"{head} {f.name} {f.code}{path}{extra}: {f.message}"
    detail = f" row_version={reply.row_version}"
    if reply.behavior_applied:
        detail += f" behavior={reply.behavior_applied}"
    if reply.attributes is not None:
        detail += f" attributes={msgspec.json.encode(reply.attributes).decode()}"
    return head + detail
