"""The audit's reads of the ledger: the audited requests' rows, the rows citing the audited
offsets, the version chains of the records they wrote, and a record's history."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, Final

import asyncpg
import msgspec

from processor.audit.auditor import Auditor
from processor.audit.model import AuditOptions, Progress, Write, fault_name
from processor.db.ledger import LedgerEntry


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


_LEDGER_COLUMNS: Final = (
    "request_id, fingerprint, type, entity, record_id, status, fault_code, applied, "
    "writes::text AS writes, reply, source_topic, source_partition, source_offset, processed_at"
)


async def audit_ledger(
    conn: asyncpg.Connection[Any],
    table: str,
    auditor: Auditor,
    options: AuditOptions,
    progress: Progress,
) -> list[dict[str, Any]] | None:
    """Feed ``auditor`` the ledger (inside the caller's REPEATABLE READ snapshot); with
    ``options.entity``, return that entity's history."""
    await _rows(conn, table, auditor, options, progress)
    await _sources(conn, table, auditor, progress)
    await _other_topics(conn, table, auditor)
    await _chains(conn, table, auditor, progress)
    if options.entity is None:
        return None
    return await _history(conn, table, auditor, options)


async def _rows(
    conn: asyncpg.Connection[Any],
    table: str,
    auditor: Auditor,
    options: AuditOptions,
    progress: Progress,
) -> None:
    """The rows of the audited request_ids (and of their replies' and inner requests')."""
    ids = auditor.ledger_ids()
    done = 0
    for chunk in _chunks(ids, options.chunk):
        rows = await conn.fetch(
            f"SELECT {_LEDGER_COLUMNS} FROM {table} WHERE request_id = ANY($1::text[])",  # noqa: S608
            list(chunk),
        )
        for row in rows:
            auditor.add_ledger_row(LedgerEntry(**dict(row)))
        done += len(chunk)
        progress.update("ledger rows", done, len(ids))
    progress.done("ledger rows", done)


async def _sources(
    conn: asyncpg.Connection[Any], table: str, auditor: Auditor, progress: Progress
) -> None:
    """Every row citing an audited offset."""
    spans = sorted(auditor.spans.items())
    sources = (
        f"SELECT l.request_id, l.source_partition, l.source_offset FROM {table} AS l "  # noqa: S608
        "JOIN unnest($2::int[], $3::bigint[], $4::bigint[]) AS r(p, s, e) "
        "ON l.source_partition = r.p AND l.source_offset >= r.s AND l.source_offset < r.e "
        "WHERE l.source_topic = $1"
    )
    done = 0
    async for row in conn.cursor(
        sources,
        auditor.request_topic,
        [p for p, _ in spans],
        [s for _, (s, _) in spans],
        [e for _, (_, e) in spans],
        prefetch=5000,
    ):
        auditor.add_ledger_source(row["request_id"], row["source_partition"], row["source_offset"])
        done += 1
        progress.update("ledger sources", done)
    progress.done("ledger sources", done)


async def _other_topics(conn: asyncpg.Connection[Any], table: str, auditor: Auditor) -> None:
    # Rows of other request topics (or other deployments) sharing the ledger: not judged.
    other = await conn.fetchrow(
        f"SELECT count(*) AS n, count(DISTINCT source_topic) AS topics FROM {table} "  # noqa: S608
        "WHERE source_topic IS DISTINCT FROM $1",
        auditor.request_topic,
    )
    assert other is not None  # an aggregate always has its row
    auditor.counts["ledger_rows_other_topics"] = int(other["n"])
    auditor.counts["other_topics"] = int(other["topics"])


async def _chains(
    conn: asyncpg.Connection[Any], table: str, auditor: Auditor, progress: Progress
) -> None:
    # The chains of the records the audited requests wrote, over the processed_at window of
    # their writes; other requests' writes in it (another topic sharing the records) link.
    window = auditor.chain_window()
    records = sorted(auditor.written)
    if window is None or not records:
        return
    chain_sql = (
        "SELECT w.value->>'entity' AS entity, w.value->>'id' AS id, "  # noqa: S608
        "w.value->>'prior' AS prior, w.value->>'new' AS new, l.request_id, "
        "l.processed_at, l.source_topic, l.source_partition, l.source_offset, "
        "w.i = 1 AS own "
        f"FROM {table} AS l CROSS JOIN LATERAL jsonb_array_elements("
        "CASE WHEN jsonb_typeof(l.writes) = 'array' THEN l.writes ELSE '[]'::jsonb END"
        ") WITH ORDINALITY AS w(value, i) "
        "WHERE l.applied AND jsonb_typeof(w.value) = 'object' "
        "AND l.processed_at >= $1 AND l.processed_at <= $2 "
        "AND (w.value->>'entity', w.value->>'id') IN "
        "(SELECT * FROM unnest($3::text[], $4::text[])) "
        "ORDER BY 1, 2, l.processed_at, l.source_partition, l.source_offset, l.request_id"
    )
    key: tuple[str, str] | None = None
    writes: list[Write] = []
    done = 0
    async for row in conn.cursor(
        chain_sql,
        window[0],
        window[1],
        [e for e, _ in records],
        [i for _, i in records],
        prefetch=5000,
    ):
        this = (str(row["entity"]), str(row["id"]))
        if this != key:
            if key is not None:
                auditor.add_chain(key[0], key[1], writes)
            key, writes = this, []
        source = origin = None
        if row["source_partition"] is not None:
            source = f"{row['source_partition']}:{row['source_offset']}"
            if row["source_topic"] is not None and row["source_offset"] is not None:
                origin = (
                    str(row["source_topic"]),
                    int(row["source_partition"]),
                    int(row["source_offset"]),
                )
        writes.append(
            Write(
                row["request_id"],
                row["prior"],
                row["new"],
                row["processed_at"],
                source,
                origin,
                bool(row["own"]),
                audited=origin is not None and auditor.in_scope(*origin),
            )
        )
        done += 1
        progress.update("version chains (writes)", done)
    if key is not None:
        auditor.add_chain(key[0], key[1], writes)
    progress.done("version chains (writes)", done)


def _history_entry(row: asyncpg.Record, auditor: Auditor) -> dict[str, Any]:
    """One ledger row as an entry of a record's history (before its prior and new values)."""
    rid = row["request_id"]
    return {
        "at": row["processed_at"].isoformat(),
        "request_id": rid,
        "type": row["type"],
        "outcome": row["status"]
        if row["status"] == "success"
        else f"fault {fault_name(row['fault_code'])}",
        "source": None
        if row["source_partition"] is None
        else f"{row['source_partition']}:{row['source_offset']}",
        "replies": len(auditor.replies.get(rid, [])) if rid in auditor.by_id else None,
    }


async def _history(
    conn: asyncpg.Connection[Any], table: str, auditor: Auditor, options: AuditOptions
) -> list[dict[str, Any]]:
    entity, record_id = options.entity, options.record_id
    assert entity is not None
    window = (options.since, options.until)
    rows = await conn.fetch(
        f"SELECT request_id, type, entity, record_id, status, fault_code, writes::text AS writes, "  # noqa: S608
        f"source_partition, source_offset, processed_at FROM {table} AS l "
        "WHERE ((l.entity = $1 AND ($2::text IS NULL OR l.record_id = $2)) "
        "OR EXISTS (SELECT 1 FROM jsonb_array_elements(CASE WHEN jsonb_typeof(l.writes) = "
        "'array' THEN l.writes ELSE '[]'::jsonb END) AS w(value) "
        "WHERE w.value->>'entity' = $1 AND ($2::text IS NULL OR w.value->>'id' = $2))) "
        "AND ($3::timestamptz IS NULL OR l.processed_at >= $3) "
        "AND ($4::timestamptz IS NULL OR l.processed_at < $4) "
        "ORDER BY l.processed_at, l.source_partition, l.source_offset LIMIT $5",
        entity,
        record_id,
        window[0],
        window[1],
        options.history_limit,
    )
    records: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    ledgered: set[str] = set()
    for row in rows:
        ledgered.add(row["request_id"])
        base = _history_entry(row, auditor)
        touched = False
        for w in msgspec.json.decode(row["writes"]) if row["writes"] else []:
            if not isinstance(w, dict):
                continue
            if w.get("entity") == entity and record_id in (None, str(w.get("id"))):
                records[(entity, str(w.get("id")))].append(
                    {**base, "prior": w.get("prior"), "new": w.get("new")}
                )
                touched = True
        # A request about the entity itself (retrieve_entity) names no record: it belongs to
        # no record's history.
        if (
            not touched
            and row["record_id"]
            and row["entity"] == entity
            and record_id in (None, row["record_id"])
        ):
            records[(entity, row["record_id"])].append(base)
    for rec in auditor.history_records:
        if rec.request_id in ledgered or rec.entity is None or rec.record_id is None:
            continue
        copies = auditor.replies.get(rec.request_id or "", [])
        outcome = copies[0].summary if copies else "no reply"
        records[(rec.entity, rec.record_id)].append(
            {
                "at": None,
                "request_id": rec.request_id,
                "type": rec.type,
                "outcome": f"not ledgered: {outcome}",
                "source": f"{rec.partition}:{rec.offset}",
                "replies": len(copies),
            }
        )
    return [
        {
            "entity": e,
            "id": i,
            "chain": "broken"
            if (e, i) in auditor.broken_records
            else "ok"
            if (e, i) in auditor.written
            else "not judged",
            "entries": entries,
        }
        for (e, i), entries in sorted(records.items())
    ]
