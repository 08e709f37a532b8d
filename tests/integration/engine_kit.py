"""Shared pieces of the engine's integration tests: tables, registry, requests, snapshots.

Each test gets its own schema (the ``db_schema`` fixture) holding these tables and the
request ledger. Two *flavours* of entity cover the two version sources: ``xmin`` (the
``*account`` tables, integer keys) and a bigint version column (the ``*item`` tables,
text keys). Per flavour there is a plain entity (Default -> AlwaysOverwrite), a strict one
(Default -> IfRowVersionMatches) and an open one (optimistic concurrency off).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from processor.contract import decode_request
from processor.db import Connection
from processor.db.ledger import Ledger
from processor.db.registry import Registry, load_registry
from processor.engine.engine import Engine, Envelope, Outcome
from processor.errors import InvalidArgument

_XMIN_TABLE = """
CREATE TABLE {schema}.{table} (
    id      integer PRIMARY KEY,
    label   text NOT NULL DEFAULT '',
    counter bigint NOT NULL DEFAULT 0 CHECK (counter >= 0)
);
"""
_VERSION_TABLE = """
CREATE TABLE {schema}.{table} (
    sku     text PRIMARY KEY,
    label   text NOT NULL DEFAULT '',
    counter bigint NOT NULL DEFAULT 0 CHECK (counter >= 0),
    version bigint NOT NULL DEFAULT 1
);
"""
#: A table with one column of each kind the engine type-checks, for hostile values.
_TYPED_TABLE = """
CREATE DOMAIN {schema}.positive AS integer NOT NULL DEFAULT 1 CHECK (VALUE > 0);
CREATE TABLE {schema}.typed (
    id      integer PRIMARY KEY,
    name    text NOT NULL DEFAULT '',
    note    text,
    small   smallint,
    big     bigint,
    amount  numeric(6,2) CHECK (amount IS NULL OR amount >= 0),
    ratio   double precision,
    flag    boolean,
    code    varchar(5),
    born    date,
    meta    jsonb,
    tags    text[],
    uid     uuid,
    email   text UNIQUE,
    rank    {schema}.positive
);
"""
_TABLES = {
    "account": _XMIN_TABLE,
    "strict_account": _XMIN_TABLE,
    "open_account": _XMIN_TABLE,
    "item": _VERSION_TABLE,
    "strict_item": _VERSION_TABLE,
    "open_item": _VERSION_TABLE,
}

REGISTRY = """
[entities.account]
table = "account"
key = "id"

[entities.strict_account]
table = "strict_account"
key = "id"
default_behavior = "IfRowVersionMatches"

[entities.open_account]
table = "open_account"
key = "id"
optimistic_concurrency = false

[entities.item]
table = "item"
key = "sku"
row_version = "version"

[entities.strict_item]
table = "strict_item"
key = "sku"
row_version = "version"
default_behavior = "IfRowVersionMatches"

[entities.open_item]
table = "open_item"
key = "sku"
row_version = "version"
optimistic_concurrency = false

[entities.typed]
table = "typed"
key = "id"
"""

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Flavor:
    """One version source: its three entities and how its keys look."""

    name: str
    plain: str  # Default -> AlwaysOverwrite
    strict: str  # Default -> IfRowVersionMatches
    open: str  # optimistic concurrency disabled

    def key(self, n: int) -> int | str:
        return n if self.name == "xmin" else f"k{n}"

    def __str__(self) -> str:
        return self.name


XMIN = Flavor("xmin", "account", "strict_account", "open_account")
VERSION = Flavor("version", "item", "strict_item", "open_item")
FLAVORS = [XMIN, VERSION]


class Clock:
    """The engine's clock, moved by the test."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


_ids = itertools.count(1)


def rid() -> str:
    return f"req-{next(_ids)}"


def update(
    entity: str,
    id: int | str,
    attributes: dict[str, Any],
    *,
    request_id: str | None = None,
    version: str | None = None,
    behavior: str | int | None = None,
    related: Sequence[dict[str, Any]] = (),
    expires_at: datetime | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": "update",
        "request_id": request_id or rid(),
        "entity": entity,
        "id": id,
        "attributes": attributes,
    }
    return _common(message, version, behavior, expires_at) | (
        {"related": list(related)} if related else {}
    )


def delete(
    entity: str,
    id: int | str,
    *,
    request_id: str | None = None,
    version: str | None = None,
    behavior: str | int | None = None,
    expires_at: datetime | None = None,
) -> dict[str, Any]:
    message = {"type": "delete", "request_id": request_id or rid(), "entity": entity, "id": id}
    return _common(message, version, behavior, expires_at)


def retrieve(
    entity: str, id: int | str, *, request_id: str | None = None, expires_at: datetime | None = None
) -> dict[str, Any]:
    message = {"type": "retrieve", "request_id": request_id or rid(), "entity": entity, "id": id}
    return _common(message, None, None, expires_at)


def related(
    entity: str, id: int | str, attributes: dict[str, Any], version: str | None = None
) -> dict[str, Any]:
    rel: dict[str, Any] = {"entity": entity, "id": id, "attributes": attributes}
    if version is not None:
        rel["row_version"] = version
    return rel


def _common(
    message: dict[str, Any],
    version: str | None,
    behavior: str | int | None,
    expires_at: datetime | None,
) -> dict[str, Any]:
    if version is not None:
        message["row_version"] = version
    if behavior is not None:
        message["concurrency_behavior"] = behavior
    if expires_at is not None:
        message["expires_at"] = expires_at.isoformat()
    return message


def envelope(message: dict[str, Any] | bytes) -> Envelope:
    data = message if isinstance(message, bytes) else json.dumps(message).encode()
    return Envelope.of(decode_request(data))


@dataclass
class Kit:
    """A schema with the test tables, its ledger, a registry and an engine on a fake clock."""

    pg: asyncpg.Connection
    schema: str
    registry: Registry
    ledger: Ledger
    engine: Engine
    clock: Clock

    @classmethod
    async def create(cls, pg: asyncpg.Connection, schema: str) -> Kit:
        await pg.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        for table, ddl in _TABLES.items():
            await pg.execute(ddl.format(schema=f'"{schema}"', table=table))
        await pg.execute(_TYPED_TABLE.format(schema=f'"{schema}"'))
        registry = await load_registry(
            pg, "tests.toml", text=REGISTRY.replace('table = "', f'table = "{schema}.')
        )
        ledger = Ledger(schema)
        await ledger.migrate(pg)
        clock = Clock()
        return cls(pg, schema, registry, ledger, Engine(registry, ledger, clock=clock), clock)

    def table(self, entity: str) -> str:
        found = self.registry.get(entity)
        assert found is not None, entity
        return found.qualified

    def _key_column(self, entity: str) -> str:
        found = self.registry.get(entity)
        assert found is not None, entity
        return found.key.name

    async def seed(self, entity: str, *keys: int | str, **values: Any) -> None:
        """Insert rows with these keys (and the same column values)."""
        columns = [self._key_column(entity), *values]
        placeholders = ", ".join(f"${i + 1}" for i in range(len(columns)))
        await self.pg.executemany(
            f"INSERT INTO {self.table(entity)} ({', '.join(columns)}) VALUES ({placeholders})",
            [(key, *values.values()) for key in keys],
        )

    async def token(self, entity: str, key: int | str) -> str | None:
        """The row's current version token, as the engine hands it out."""
        found = self.registry.get(entity)
        assert found is not None
        source = "xmin" if found.version_column is None else found.version_column
        value: str | None = await self.pg.fetchval(
            f"SELECT {source}::text FROM {found.qualified} WHERE {found.key.name} = $1", key
        )
        return value

    async def row(self, entity: str, key: int | str) -> dict[str, Any] | None:
        record = await self.pg.fetchrow(
            f"SELECT * FROM {self.table(entity)} WHERE {self._key_column(entity)} = $1", key
        )
        return dict(record) if record is not None else None

    async def count(self, entity: str) -> int:
        value: int = await self.pg.fetchval(f"SELECT count(*) FROM {self.table(entity)}")
        return value

    async def snapshot(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table (with xmin) and of the ledger: compare before/after."""
        state: dict[str, list[tuple[Any, ...]]] = {}
        for name in [*_TABLES, "typed"]:
            key = self._key_column(name)
            rows = await self.pg.fetch(
                f"SELECT t.*, t.xmin::text AS xmin FROM {self.table(name)} AS t ORDER BY {key}"
            )
            state[name] = [tuple(r.values()) for r in rows]
        rows = await self.pg.fetch(
            f"SELECT *, xmin::text AS xmin FROM {self.ledger.table} ORDER BY request_id"
        )
        state["ledger"] = [tuple(r.values()) for r in rows]
        return state

    async def ledger_row(self, request_id: str) -> dict[str, Any] | None:
        record = await self.pg.fetchrow(
            f"SELECT * FROM {self.ledger.table} WHERE request_id = $1", request_id
        )
        return dict(record) if record is not None else None

    async def ledger_count(self) -> int:
        value: int = await self.pg.fetchval(f"SELECT count(*) FROM {self.ledger.table}")
        return value

    async def run(
        self, *messages: dict[str, Any] | bytes, conn: Connection | None = None
    ) -> list[Outcome]:
        """One batch through the engine; every message must decode."""
        return await self.engine.process(
            conn or self.pg, [envelope(message) for message in messages]
        )

    async def one(self, message: dict[str, Any], conn: Connection | None = None) -> Outcome:
        (outcome,) = await self.run(message, conn=conn)
        return outcome

    async def submit(self, *messages: dict[str, Any] | bytes) -> list[Outcome | InvalidArgument]:
        """Like the worker's intake: decode each message (a fault if it does not), then run
        the ones that decoded as one batch. Results in the messages' order."""
        results: list[Outcome | InvalidArgument | None] = []
        good: list[Envelope] = []
        for message in messages:
            try:
                good.append(envelope(message))
                results.append(None)
            except InvalidArgument as fault:
                results.append(fault)
        outcomes = iter(await self.engine.process(self.pg, good))
        return [r if r is not None else next(outcomes) for r in results]
