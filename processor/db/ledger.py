"""The request ledger: one row per request_id, written in the same transaction as the write.

It holds the exact reply bytes, so a redelivered or replayed request gets the same reply
and applies nothing; and it holds every write's prior and new version, so an audit can
rebuild each record's version chain. It must outlive the request topic's retention.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from processor.db import Connection
from processor.errors import ConfigError, TransientError
from processor.names import is_identifier

__all__ = ["Ledger", "LedgerEntry", "StoredReply"]


@dataclass(frozen=True, slots=True)
class StoredReply:
    fingerprint: bytes
    reply: bytes


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    request_id: str
    fingerprint: bytes
    type: str
    entity: str
    record_id: str
    status: str
    fault_code: int | None
    applied: bool
    writes: str | None  # JSON: [{"entity","id","prior","new"}], None when nothing was written
    reply: bytes
    source_topic: str | None
    source_partition: int | None
    source_offset: int | None
    processed_at: datetime


class Ledger:
    """The ledger table ``<schema>.request_ledger``; the schema name is allowlisted."""

    def __init__(self, schema: str = "processor") -> None:
        if not is_identifier(schema):
            raise ConfigError(f"ledger schema {schema!r} is not a plain identifier")
        self.schema = schema
        self.table = f'"{schema}".request_ledger'
        self._lookup = (
            f"SELECT request_id, fingerprint, reply FROM {self.table} "
            "WHERE request_id = ANY($1::text[])"
        )
        self._insert = (
            f"INSERT INTO {self.table} (request_id, fingerprint, type, entity, record_id, "
            "status, fault_code, applied, writes, reply, source_topic, source_partition, "
            "source_offset, processed_at) SELECT * FROM unnest($1::text[], $2::bytea[], "
            "$3::text[], $4::text[], $5::text[], $6::text[], $7::int[], $8::bool[], "
            "$9::jsonb[], $10::bytea[], $11::text[], $12::int[], $13::bigint[], "
            "$14::timestamptz[])"
        )

    def migration_sql(self) -> str:
        """DDL that creates the ledger (and nothing else); safe to run again."""
        return f"""
CREATE SCHEMA IF NOT EXISTS "{self.schema}";
CREATE TABLE IF NOT EXISTS {self.table} (
    request_id       text PRIMARY KEY,
    fingerprint      bytea NOT NULL,
    type             text NOT NULL,
    entity           text NOT NULL,
    record_id        text NOT NULL,
    status           text NOT NULL CHECK (status IN ('success', 'fault')),
    fault_code       integer,
    applied          boolean NOT NULL,
    writes           jsonb,
    reply            bytea NOT NULL,
    source_topic     text,
    source_partition integer,
    source_offset    bigint,
    processed_at     timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS request_ledger_processed_at
    ON {self.table} (processed_at);
CREATE INDEX IF NOT EXISTS request_ledger_record
    ON {self.table} (entity, record_id, processed_at);
"""

    async def migrate(self, conn: Connection) -> None:
        # Two workers starting at once must not race on CREATE ... IF NOT EXISTS.
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('processor-ledger'))")
            await conn.execute(self.migration_sql())

    async def lookup(
        self, conn: Connection, request_ids: Sequence[str]
    ) -> Mapping[str, StoredReply]:
        rows = await conn.fetch(self._lookup, list(request_ids))
        if rows:
            # A stored reply is about to be published again: this transaction must not
            # commit before the rows it read are on the synchronous standby. A ledger row
            # can be visible and not replicated: its COMMIT's wait for the standby was
            # cancelled (the client's timeout, an operator), and PostgreSQL then commits
            # locally. A transaction that wrote no WAL does not wait at its commit (an xid
            # alone is not enough: tried); a transactional logical message is a WAL record
            # any role may write, and the commit then waits for WAL past the row it read.
            await conn.execute("SELECT pg_logical_emit_message(true, 'processor', 'replay')")
        return {r["request_id"]: StoredReply(r["fingerprint"], r["reply"]) for r in rows}

    async def insert(self, conn: Connection, entries: Sequence[LedgerEntry]) -> None:
        if not entries:
            return
        columns = list(
            zip(
                *(
                    (
                        e.request_id,
                        e.fingerprint,
                        e.type,
                        e.entity,
                        e.record_id,
                        e.status,
                        e.fault_code,
                        e.applied,
                        e.writes,
                        e.reply,
                        e.source_topic,
                        e.source_partition,
                        e.source_offset,
                        e.processed_at,
                    )
                    for e in entries
                ),
                strict=True,
            )
        )
        try:
            await conn.execute(self._insert, *[list(c) for c in columns])
        except asyncpg.UniqueViolationError as exc:
            # Another worker (a zombie, or a duplicate on another partition) committed the
            # same request_id first: this whole batch rolls back and is redone, and the
            # redo finds the request in the ledger instead of applying it again.
            raise TransientError(f"request_id claimed concurrently: {exc}") from exc

    async def prunable(self, conn: Connection, older_than: timedelta) -> int:
        """How many entries :meth:`prune` would delete now (``prune-ledger --dry-run``)."""
        found = await conn.fetchval(
            f"SELECT count(*) FROM {self.table} WHERE processed_at < now() - $1::interval",
            older_than,
        )
        return int(found)

    async def prune(self, conn: Connection, older_than: timedelta, *, chunk: int = 10_000) -> int:
        """Delete entries processed before now - ``older_than``, in chunks; returns the count."""
        total = 0
        while True:
            status = await conn.execute(
                f"DELETE FROM {self.table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {self.table} "
                "WHERE processed_at < now() - $1::interval LIMIT $2))",
                older_than,
                chunk,
            )
            deleted = int(status.split()[-1])
            total += deleted
            if deleted < chunk:
                return total
