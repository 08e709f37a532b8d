"""``run_loadtest``: set up, run the load, read the replies, check the invariants."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from processor.client import Client
from processor.config import Settings
from processor.contract import decode_reply
from processor.db.registry import Entity, quote
from processor.errors import (
    ProcessorError,
)
from processor.kafka import clients as kafka
from processor.tools.loadtest.load import LoadRun
from processor.tools.loadtest.model import (
    MAX_SAMPLES,
    Invariant,
    LoadOptions,
    check_invariants,
    latency_ms,
)
from processor.tools.loadtest.setup import Workers, prepare, reset_rows, stale_versions
from processor.tools.stats import percentile
from processor.tools.workers import wait_ready


async def _read_replies(
    settings: Settings, start: dict[TopicPartition, int], wanted: set[str]
) -> dict[str, list[bytes]]:
    """The run's replies on the reply topic (read_committed), by request_id."""
    assert settings.kafka_bootstrap_servers is not None
    found: dict[str, list[bytes]] = {}

    def keep(record: Any) -> None:
        rid = _header(record.headers)
        if rid is None and record.value is not None:
            rid = decode_reply(record.value).request_id
        if rid in wanted and record.value is not None:
            found.setdefault(rid, []).append(record.value)

    firsts: dict[str, dict[int, int]] = {}
    for tp, offset in start.items():
        firsts.setdefault(tp.topic, {})[tp.partition] = offset
    consumer = kafka.make_consumer(settings.kafka_access(), None)
    await asyncio.wait_for(consumer.start(), kafka.CALL_TIMEOUT)
    try:
        for topic, first in firsts.items():
            end = await kafka.offsets(consumer, topic, first, end=True)
            spans = {p: (first[p], end[p]) for p in first}
            await kafka.read_spans(consumer, topic, spans, keep, stall_seconds=120)
    finally:
        await consumer.stop()
    return found


def _header(headers: Sequence[tuple[str, bytes]]) -> str | None:
    for key, value in headers:
        if key == "request_id":
            return value.decode(errors="replace")
    return None


async def run_audit_hook(
    settings: Settings, since: datetime | None = None, until: datetime | None = None
) -> Invariant | None:
    """Run ``processor.audit`` over the run's requests, if that module exists (else None).

    Calls ``run_audit(settings, AuditOptions(since=..., until=...))`` and reads the
    report's ``ok``, ``anomalies`` and ``counts``; an exception is a broken invariant.
    Scoped to the run's time window: the rows of an earlier run were reset by plain SQL,
    which an unscoped audit would rightly see as writes outside the processor.
    """
    if importlib.util.find_spec("processor.audit") is None:
        return None
    module = importlib.import_module("processor.audit")
    entry = getattr(module, "run_audit", None)
    if not callable(entry):
        return Invariant("audit", False, "processor.audit has no run_audit entry point")
    options = getattr(module, "AuditOptions", None)
    try:
        report = entry(settings, options(since=since, until=until) if options else None)
        if inspect.isawaitable(report):
            report = await report
    except Exception as exc:
        return Invariant("audit", False, f"run_audit raised {exc!r}")
    ok = bool(getattr(report, "ok", False))
    counts = getattr(report, "counts", {}) or {}
    found = {k: v for k, v in (getattr(report, "anomalies", {}) or {}).items() if v}
    requests, replies = counts.get("request_records"), counts.get("replies")
    return Invariant(
        "audit (processor.audit over the run's window)",
        ok,
        f"{_count(requests)} requests, {_count(replies)} replies on the reply topic, "
        + ("no anomalies" if ok else f"anomalies: {found or report!r}"),
    )


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


BeforeCheck = Callable[[asyncpg.Connection, Entity], Awaitable[None]]


#: How long the check waits for the worker group to consume the last requests sent.
CONSUMED_SECONDS = 60.0


async def _wait_consumed(settings: Settings, limit: float) -> None:
    """Until the worker group has committed past every record on the request topic.

    An operation settles on its first reply; a resend of it still in flight then is
    answered afterwards, and an audit reading the topics before that reports its record
    as unanswered. Past ``limit`` the check goes on and the audit says what is missing.
    """
    access, topic = settings.kafka_access(), settings.request_topic
    deadline = time.monotonic() + limit
    consumer = kafka.make_consumer(access, None)
    admin = kafka.admin_client(access)
    why = ""
    try:
        await asyncio.wait_for(consumer.start(), kafka.CALL_TIMEOUT)
        await asyncio.wait_for(admin.start(), kafka.CALL_TIMEOUT)
        partitions = await kafka.topic_partitions(admin, topic) or []
        end = await kafka.offsets(consumer, topic, partitions, end=True)
        while time.monotonic() < deadline:
            done = await kafka.group_offsets(admin, settings.group_id, topic, partitions)
            behind = sum(max(0, end[p] - done.get(p, 0)) for p in partitions)
            if not behind:
                return
            why = f"still {behind} request(s) behind after {limit:g} s"
            await asyncio.sleep(0.2)
    except (KafkaError, OSError, TimeoutError) as exc:
        why = f"its offsets could not be read ({exc!r})"
    finally:
        for closing in (admin.close(), consumer.stop()):
            with contextlib.suppress(KafkaError, OSError, TimeoutError):
                await asyncio.wait_for(closing, kafka.CALL_TIMEOUT)
    print(
        f"loadtest: group {settings.group_id}: {why}; the audit reports what is unanswered",
        file=sys.stderr,
    )


async def run_loadtest(
    settings: Settings, opts: LoadOptions, *, before_check: BeforeCheck | None = None
) -> dict[str, Any]:
    """Set up, run, check; returns the result (``result["invariants"]["ok"]``).

    ``before_check`` runs on a database connection just before the final read (tests use
    it to break an invariant on purpose).
    """
    opts.validate()
    settings, entity = await prepare(settings, opts)
    assert settings.database_url is not None
    assert settings.kafka_bootstrap_servers is not None
    conn = await asyncpg.connect(settings.database_url, timeout=30)
    try:
        await reset_rows(conn, entity, opts)
    finally:
        await conn.close()
    workers = Workers(settings, opts.with_worker, opts.worker_logs) if opts.with_worker else None
    result: dict[str, Any] | None = None
    try:
        result = await _run(settings, opts, entity, workers, before_check)
        return result
    finally:
        if workers is not None:
            await workers.stop()
            logs = workers.settle_logs(result is not None and result["invariants"]["ok"])
            if result is not None:
                result["worker_logs"] = logs


async def _run(
    settings: Settings,
    opts: LoadOptions,
    entity: Entity,
    workers: Workers | None,
    before_check: BeforeCheck | None,
) -> dict[str, Any]:
    assert settings.database_url is not None
    client = Client(
        settings.kafka_access(),
        request_topic=settings.request_topic,
        reply_topic=settings.reply_topic,
        timeout=opts.timeout,
    )
    async with client:
        await wait_ready(
            client, entity.name, opts.first_id, opts.ready_timeout, hint=" (or use --with-worker N)"
        )
        run = LoadRun(client, entity, opts, await _stale_rows(settings, client, entity, opts))
        client.observer = run.observe
        if workers is not None:
            workers.check()
        print(
            f"loadtest: {opts.mode} loop, {opts.duration:g} s, "
            + (f"{opts.clients} clients" if opts.mode == "closed" else f"{opts.rate:g} ops/s")
            + f", {opts.rows} rows (skew {opts.skew:g}), deletes {opts.delete_share:.0%}, "
            f"stale {opts.stale_share:.0%}, entity {entity.name} ({entity.qualified})",
            file=sys.stderr,
        )
        # The audit's window starts here, after the setup's requests (readiness and stale
        # reads), so it counts the requests the summary counts. Kafka timestamps are ms.
        now = datetime.now(UTC)
        since = now.replace(microsecond=now.microsecond // 1000 * 1000)
        elapsed = await _drive(run, opts)
        start = dict(client.start_positions)
    await _wait_consumed(settings, CONSUMED_SECONDS)
    invariants = await _check(settings, run, entity, start, before_check)
    audit = await run_audit_hook(settings, since, datetime.now(UTC))
    invariants.append(
        audit or Invariant("audit", True, "skipped: processor.audit is not there (hook ready)")
    )
    result = _result(run, opts, entity, elapsed, invariants)
    first, last = opts.first_id, opts.first_id + opts.rows + opts.delete_rows - 1
    result["rows"] = {"table": entity.qualified, "first": first, "last": last, "kept": True}
    if not opts.keep_rows:
        conn = await asyncpg.connect(settings.database_url, timeout=30)
        try:
            await conn.execute(
                f"DELETE FROM {entity.qualified} "  # noqa: S608
                f"WHERE {quote(entity.key.name)} BETWEEN $1 AND $2",
                first,
                last,
            )
        finally:
            await conn.close()
        result["rows"]["kept"] = False
    return result


async def _stale_rows(
    settings: Settings, client: Client, entity: Entity, opts: LoadOptions
) -> dict[int, str]:
    """Read every counter row's version, then reset the rows: every version read is stale."""
    assert settings.database_url is not None
    counter_ids = range(opts.first_id, opts.first_id + opts.rows)
    stale = await stale_versions(client, entity, counter_ids)
    conn = await asyncpg.connect(settings.database_url, timeout=30)
    try:
        await conn.execute(
            f"UPDATE {entity.qualified} SET n = 0 "  # noqa: S608
            f"WHERE {quote(entity.key.name)} = ANY($1::int[])",
            list(counter_ids),
        )
    finally:
        await conn.close()
    return stale


async def _drive(run: LoadRun, opts: LoadOptions) -> float:
    """The load, closed or open loop, with its progress line; returns the seconds it took."""
    run.recording = True
    run.started_at = datetime.now(UTC)
    run.t0 = started = time.monotonic()
    stop = asyncio.Event()
    bar = asyncio.create_task(run.progress(started, stop)) if opts.progress else None
    deadline = started + opts.duration
    try:
        if opts.mode == "closed":
            await run.closed_loop(deadline)
        else:
            await run.open_loop(deadline)
    finally:
        stop.set()
        if bar is not None:
            await bar
    run.recording = False
    return time.monotonic() - started


async def _check(
    settings: Settings,
    run: LoadRun,
    entity: Entity,
    start: dict[TopicPartition, int],
    before_check: BeforeCheck | None,
) -> list[Invariant]:
    """The rows and the reply topic against what the clients saw."""
    assert settings.database_url is not None
    conn = await asyncpg.connect(settings.database_url, timeout=30)
    try:
        if before_check is not None:
            await before_check(conn, entity)
        key = quote(entity.key.name)
        rows = await conn.fetch(
            f"SELECT {key} AS k, n FROM {entity.qualified} WHERE {key} = ANY($1::int[])",  # noqa: S608
            run.counter_ids + run.delete_ids,
        )
    finally:
        await conn.close()
    present = {int(r["k"]): int(r["n"]) for r in rows}
    counters = {i: present.get(i, -1) for i in run.counter_ids}
    delete_left = {i for i in run.delete_ids if i in present}
    try:
        run.seen.topic = await _read_replies(settings, start, set(run.seen.sent))
        run.seen.topic_read = True
    except ProcessorError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
    invariants = check_invariants(run.seen, counters, run.delete_ids, delete_left)
    if not run.seen.topic_read:
        invariants.append(Invariant("reply topic read", False, "could not read it"))
    return invariants


def _result(
    run: LoadRun, opts: LoadOptions, entity: Entity, elapsed: float, invariants: list[Invariant]
) -> dict[str, Any]:
    by_kind: dict[str, list[float]] = {}
    seconds = max(1, math.ceil(elapsed))
    per_second: list[list[float]] = [[] for _ in range(seconds)]
    requests_per_second = [0] * seconds
    conflicts_per_second = [0] * seconds
    for end, lat, kind, outcome in run.ops:
        if outcome in ("ok", "rejected"):
            by_kind.setdefault(kind, []).append(lat)
        per_second[min(int(end), seconds - 1)].append(lat)
    for end, _ in run.requests:
        requests_per_second[min(int(end), seconds - 1)] += 1
    for end in run.conflict_times:
        conflicts_per_second[min(int(end), seconds - 1)] += 1
    timeline = []
    for s, lats in enumerate(per_second):
        # The last bucket is as long as what is left of the run; buckets from the load's
        # end on are the drain (operations in flight finishing, no new ones started).
        span = max(1e-3, min(1.0, elapsed - s))
        timeline.append(
            {
                "t": s,
                "span_s": round(span, 3),
                "drain": s >= opts.duration,
                "ops": len(lats),
                "requests": requests_per_second[s],
                "conflicts": conflicts_per_second[s],
                "ops_per_s": round(len(lats) / span, 1),
                "requests_per_s": round(requests_per_second[s] / span, 1),
                "conflicts_per_s": round(conflicts_per_second[s] / span, 1),
                "p50_ms": round(percentile(lats, 50) * 1000, 2) if lats else None,
                "p99_ms": round(percentile(lats, 99) * 1000, 2) if lats else None,
            }
        )
    increments = sum(run.seen.increments.values())
    requests = sum(run.seen.sent.values())
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
    if math.isinf(opts.skew):
        options["skew"] = "max"
    stride = max(1, math.ceil(len(run.ops) / MAX_SAMPLES))
    return {
        "started_at": run.started_at.isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "loadavg_at_start": run.loadavg},
        "options": options,
        "entity": {"name": entity.name, "table": entity.qualified},
        "elapsed_s": round(elapsed, 3),
        "ops": len(run.ops),
        "requests": requests,
        "request_ids": len(run.seen.sent),
        "replies": len(run.requests),  # replies the client received, one per answered send
        "request_ids_answered": len(run.seen.replied),
        "increments": increments,
        "conflicts": run.conflicts,
        "throughput": {
            "ops_per_s": round(len(run.ops) / elapsed, 1),
            "requests_per_s": round(requests / elapsed, 1),
            "increments_per_s": round(increments / elapsed, 1),
        },
        "latency_ms": {
            "op": latency_ms([lat for _, lat, _, _ in run.ops]),
            "request": latency_ms([lat for _, lat in run.requests]),
            **{kind: latency_ms(v) for kind, v in sorted(by_kind.items())},
        },
        "outcomes": dict(sorted(run.outcomes.items())),
        "invariants": {
            "ok": all(i.ok for i in invariants),
            "checks": [asdict(i) for i in invariants],
        },
        "timeline": timeline,
        # (end s, latency ms) of operations, every `stride`-th: the plot's scatter
        "samples": [[round(e, 3), round(lat * 1000, 2)] for e, lat, _, _ in run.ops[::stride]],
    }
