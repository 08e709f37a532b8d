"""``run_audit``: the audit of a deployment's topics against its ledger."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg

from processor import db
from processor.audit.ledger import audit_ledger
from processor.audit.model import AuditOptions, Progress
from processor.audit.report import AuditReport, coverage
from processor.audit.topics import call, read_topics
from processor.config import Settings
from processor.db.ledger import Ledger
from processor.errors import ConfigError, ProcessorError
from processor.kafka import clients as kafka


async def run_audit(
    settings: Settings,
    options: AuditOptions | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> AuditReport:
    """Audit the request, reply and dead-letter topics of ``settings`` against its ledger.

    Needs ``kafka_bootstrap_servers`` and ``database_url``; uses ``request_topic``,
    ``reply_topic``, ``dlq_topic``, ``group_id`` (the original pass), ``ledger_schema``
    and ``max_message_bytes``. ``progress`` gets a line every 2 s during long reads.
    Raises :class:`ConfigError` for bad options or missing topics or ledger, and
    :class:`ProcessorError` when a service fails.
    """
    options = options or AuditOptions()
    options.validate()
    settings.require("kafka_bootstrap_servers", "database_url")
    assert settings.database_url is not None
    bootstrap = settings.kafka_access()
    shown = Progress(progress)
    ledger = Ledger(settings.ledger_schema)
    conn = await db.connect(settings)  # one line if it cannot: unreachable or refused
    try:
        if await conn.fetchval("SELECT to_regclass($1)", ledger.table) is None:
            raise ConfigError(f"the ledger {ledger.table} does not exist")
        admin = kafka.admin_client(bootstrap)
        meta = kafka.make_consumer(bootstrap, None)
        try:
            await call(admin.start())
            await call(meta.start())
            auditor, scope, passes, consumed = await read_topics(
                settings, options, admin, meta, shown
            )
        finally:
            await asyncio.wait_for(meta.stop(), kafka.CALL_TIMEOUT)
            await admin.close()
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            history = await audit_ledger(conn, ledger.table, auditor, options, shown)
    except (OSError, asyncpg.PostgresError) as exc:
        raise ProcessorError(f"the database failed during the audit: {exc}") from exc
    finally:
        await conn.close()
    auditor.finish(passes, consumed)
    scope["ledger"] = ledger.table
    report = auditor.build_report(scope)
    report.history = history
    report.coverage = coverage(report)
    return report
